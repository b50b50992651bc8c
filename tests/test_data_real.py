"""Fact data on a real pretrained model: SmolLM2-135M-Instruct (the `smollm2` fixture).

The counts measured on the whole sets (known_by needs a forward per fact, minutes on 2 cores)
are in the commit log; here a sample checks the same behaviour in about a minute: the paper's
known rule, the honest report on a bare prompt and on a copied one-shot answer, and that
corruption pairs at least 90% of the facts (tokenizer only, so on every fact of the sets).
"""

from __future__ import annotations

import pytest

from factfind.data import load_facts
from factfind.data.pairs import FALLBACKS

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def smol(smollm2):
    return smollm2


@pytest.mark.parametrize("name", ["athletes", "rome_known"])
def test_corruption_pairs_at_least_90_percent_of_every_fact(smol, name):
    facts = load_facts(name)
    pairs = facts.corrupt(smol, seed=0, on_missing="skip", pool=facts, fallback=FALLBACKS)
    assert len(pairs) >= 0.9 * len(facts)
    steps = pairs.to_frame()["partner_from"].value_counts()
    assert steps["relation"] >= 0.8 * len(facts)  # the fallback is the exception
    assert set(steps.index) <= set(FALLBACKS)


def test_known_rule_and_honest_reports_on_smollm2(smol, caplog):
    rome = load_facts("rome_known").sample(48, seed=0)
    scores = rome.attribute_scores(smol, batch_size=48)
    paper = rome.known_by(smol, rule="paper", batch_size=48)
    rank1 = int((scores["rank"] == 1).sum())
    assert 0 < len(paper) < rank1  # p > 0.5 is stricter than top-1, and it knows some facts
    assert all(p > 0.5 for p, f in zip(scores["prob"], rome, strict=True) if f in set(paper))
    known = rome.known_by(smol, batch_size=48)
    pairs = known.corrupt(smol, seed=0, on_missing="skip", pool=load_facts("rome_known"),
                          fallback=FALLBACKS)
    assert len(pairs) >= 0.9 * len(known)
    # regression: the bare LRE prompt's top prediction is " the", and the log says so
    caplog.clear()
    with caplog.at_level("WARNING", logger="factfind.data.dataset"):
        load_facts("lre:factual/person_plays_pro_sport").sample(24, seed=0).known_by(smol)
    assert "its top prediction is ' the'" in caplog.text
    # with Fact Finding's one-shot prefix SmolLM2-135M copies the example's " golf"
    caplog.clear()
    with caplog.at_level("WARNING", logger="factfind.data.dataset"):
        load_facts("athletes").sample(24, seed=0).known_by(smol, rule="paper")
    assert "its top prediction is ' golf'" in caplog.text and "copies" in caplog.text
