"""The organism: features scored against its world's known attributes (issue 23, Must show).

Every known person of the organism's world has a sport. One prompt per (person, relation) in a
seeded template; a TopK SAE (width 256, k=4) is trained on the residual stream after the last
layer at two roles of 1,200 people's prompts, and :func:`attribute_features` scores its
features on the other 400 people against their sports.

Measured (seed 0, `pytest tests/test_features_organism.py -m slow`):

* at the **final token** of sport prompts, L3.res features are sport features: the best
  feature per sport reaches precision 0.81 / recall 0.50 (baseball), 0.72 / 0.77 (tennis),
  0.61 / 0.63 (football), 0.58 / 0.34 (basketball), against base rates 0.22-0.29;
* at the **subject's last token** (L1.res, any relation's prompt) no feature is a sport
  feature: best F1 0.13-0.18, precision at most 0.61 with recall 0.10. The organism does not
  carry a person's sport at the subject's last token (its recorded linear probes there are at
  chance too: reports/concepts-organism-organism-seed1.json; a logistic probe on resid_post at
  subject_last of the three templates that name the relation before the subject, 1,200 people
  to train, 400 held out, scores 0.24-0.28 at layers 0-3 against 0.998 at the final token of
  layer 3); it looks the sport up later, at the final token.
"""

import random

import pytest
import torch

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionary
from factfind.features.labels import (
    attribute_features,
    best_attribute_features,
    role_feature_activations,
    subject_labels,
)


def test_attribute_features_against_a_loop(facts, gpt2_model):
    d = Dictionary.random(d_in=gpt2_model.d_model, d_sae=32, k=4, layer=1, seed=3,
                          site="resid_post")
    df = attribute_features(gpt2_model, d, facts, attribute=facts[0].relation, role="final")
    acts = role_feature_activations(gpt2_model, d, list(facts), role="final")[d.name]
    lab = subject_labels(facts, facts[0].relation)
    prompts = [p for p in facts if p.subject in lab]
    assert len(df) > 0 and (df["hits"] > 0).any()
    for row in df.head(20).itertuples():
        fires = [bool(acts[i, row.feature] > 0) for i in range(len(prompts))]
        pos = [lab[p.subject] == row.value for p in prompts]
        hits = sum(f and q for f, q in zip(fires, pos, strict=True))
        assert row.fired == sum(fires) and row.positives == sum(pos) and row.hits == hits
        assert row.precision == pytest.approx(hits / sum(fires))
        assert row.recall == pytest.approx(hits / sum(pos))
    assert list(df["f1"]) == sorted(df["f1"], reverse=True)
    assert df["feature_id"].iloc[0].startswith("L1.res.f") and df["feature_id"].iloc[0].endswith(
        "@final")
    best = best_attribute_features(df)
    assert sorted(best["value"]) == sorted(set(lab.values()))


def test_attribute_features_errors(facts, gpt2_model):
    d = Dictionary.random(d_in=gpt2_model.d_model, d_sae=8, k=2, site="resid_post")
    with pytest.raises(ArgumentError, match="no fact of relation 'colour'"):
        attribute_features(gpt2_model, d, facts, attribute="colour")
    with pytest.raises(EmptyInputError):
        attribute_features(gpt2_model, d, facts, labels={"nobody": "x"})


@pytest.fixture(scope="module")
def organism_split():
    import factfind as ff
    from factfind.data import FactDataset

    model = ff.load_model("organism")
    facts = ff.load_facts("organism")
    rng = random.Random(0)
    by: dict = {}
    for p in facts:
        by.setdefault((p.subject, p.relation), []).append(p)
    sel = [rng.choice(v) for v in by.values()]  # one prompt per (person, relation)
    people = sorted({p.subject for p in sel})
    train = set(people[:1200])
    sport = {p.subject: p.attribute for p in facts.by_relation("sport")}
    return (model, FactDataset([p for p in sel if p.subject in train]),
            [p for p in sel if p.subject not in train], sport)


@pytest.mark.slow
def test_organism_features_for_one_sport(organism_split):
    from factfind.concepts.representation import role_activations
    from factfind.features.training import fit_dictionary

    model, train, held_out, sport = organism_split
    acts = role_activations(model, train, component="resid_post", layers=[1, 3],
                            roles=["final", "subject_last"], batch_size=800)
    fit = dict(kind="sae", width=256, k=4, batch_size=256, epochs=20, seed=0, progress=False,
               site="resid_post")
    final = fit_dictionary(acts[(3, "final")], layer=3, **fit)
    df = attribute_features(model, final, [p for p in held_out if p.relation == "sport"],
                            attribute="sport", role="final", labels=sport, batch_size=800)
    best = best_attribute_features(df)
    assert len(best) == 4 and best["n"].iloc[0] == 400
    # at least one sport has a feature with precision and recall >= 0.6 (measured: tennis
    # 0.72 / 0.77), and every sport's best feature beats its base rate by 2x in precision
    both = best[["precision", "recall"]].min(axis=1)
    assert both.max() >= 0.6, best
    assert (best["precision"] >= 2 * best["base_rate"]).all(), best
    # at the subject's last token the organism holds no sport: no feature gets past F1 0.4
    subj = fit_dictionary(acts[(1, "subject_last")], layer=1, **fit)
    df_s = attribute_features(model, subj, held_out, attribute="sport", role="subject_last",
                              labels=sport, batch_size=800)
    assert 0 < df_s["f1"].max() < 0.4, best_attribute_features(df_s)
    torch.testing.assert_close(df_s["base_rate"].max(), 0.2925, atol=0.05, rtol=0)
