"""FactPrompt validation, FactDataset operations, known_by with a fake model, corruption, pairs."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from conftest_data import gpt2_like

from factfind.data import FactDataError, FactDataset, FactPairs, FactPrompt, encode, from_records
from factfind.data.dataset import describe_unknown, known_mask
from factfind.data.pairs import FALLBACKS
from factfind.types import POINT_ROLES, Role

SPORT = "Fact: {} plays the sport of"


def sport(subject: str, attribute: str, **kw) -> FactPrompt:
    return FactPrompt(subject, "sport", SPORT, attribute, **kw)


# -- FactPrompt -----------------------------------------------------------------------------------


def test_prompt_and_subject_span():
    f = FactPrompt("Michael Jordan", "sport", SPORT, "basketball",
                   prefix="Fact: Tiger Woods plays the sport of golf\n")
    assert f.prompt == ("Fact: Tiger Woods plays the sport of golf\n"
                        "Fact: Michael Jordan plays the sport of")
    start, end = f.subject_span
    assert (start, end) == (48, 62) and f.prompt[start:end] == "Michael Jordan"
    assert f.prompt == f.prefix + f.template.format(f.subject)


def test_literal_braces_and_braces_in_the_subject():
    f = FactPrompt("A{b}", "r", "{{team}} {} plays", "x")
    assert f.prompt == "{team} A{b} plays" == f.template.format(f.subject)
    assert f.subject_span == (7, 11)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"subject": 3}, "subject must be a string, got int"),
    ({"subject": ""}, "subject is empty"),
    ({"subject": " \n"}, "subject is empty"),
    ({"relation": ""}, "relation is empty"),
    ({"attribute": ""}, "attribute is empty"),
    ({"attribute": " golf"}, "attribute ' golf' starts with whitespace"),
    ({"prefix": None}, "prefix must be a string, got NoneType"),
    ({"template": b"{} x"}, "template must be a string, got bytes"),
    ({"template": "plays the sport of"}, "has no '{}' slot"),
    ({"template": "{} and {} play"}, "has 2 slots"),
    ({"template": "{0} plays"}, "must be a bare '{}'"),
    ({"template": "{name} plays"}, "must be a bare '{}'"),
    ({"template": "{:>9} plays"}, "must be a bare '{}'"),
    ({"template": "{!r} plays"}, "must be a bare '{}'"),
    ({"template": "{} plays }"}, "not a valid format string"),
    ({"template": "{ plays"}, "not a valid format string"),
    ({"template": "Fact: {}"}, "ends with the subject slot"),
    ({"template": "Fact: {}  \n"}, "ends with the subject slot"),
    ({"subject": "Jor\ud800dan"}, "lone surrogate"),
    ({"meta": (("k", 1),)}, "meta entries must be strings"),
    ({"meta": 5}, "meta must be (key, value) pairs"),
])
def test_invalid_prompts_raise_fact_data_error_naming_the_record(kwargs, reason):
    fields = {"subject": "Tiger", "relation": "sport", "template": SPORT, "attribute": "golf",
              "source": "facts.json#3", **kwargs}
    with pytest.raises(FactDataError) as info:
        FactPrompt(**fields)
    assert reason in info.value.reason
    assert info.value.record == "facts.json#3" and info.value.path is None
    assert str(info.value) == f"record facts.json#3: {info.value.reason}"


def test_prompt_is_frozen_hashable_and_meta_is_normalised():
    f = sport("Tiger", "golf", meta={"known_id": "7"})
    assert f.meta == (("known_id", "7"),) and f.get("known_id") == "7" and f.get("x") is None
    assert f == sport("Tiger", "golf", meta=(("known_id", "7"),))
    assert len({f, sport("Tiger", "golf", meta=[("known_id", "7")])}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.subject = "Jordan"  # type: ignore[misc]


def test_error_location_and_pickling():
    e = FactDataError("missing field 'subject'", path="data/x.json", record=4)
    assert str(e) == "data/x.json: record 4: missing field 'subject'"
    assert isinstance(e, ValueError)
    again = pickle.loads(pickle.dumps(e))
    assert (again.reason, again.path, again.record, str(again)) == (
        e.reason, e.path, e.record, str(e))
    assert str(FactDataError("bad")) == "bad"
    assert str(e.at(path="other", record=9)) == str(e)  # an existing location wins


# -- FactDataset ----------------------------------------------------------------------------------

FACTS = [sport("Michael Jordan", "basketball"), sport("Tiger Woods", "golf"),
         FactPrompt("Paris", "capital", "{} is the capital of", "France", meta={"id": "1"}),
         sport("Serena Williams", "tennis")]


def test_sequence_protocol():
    ds = FactDataset(FACTS, name="mini")
    assert len(ds) == 4 and ds[0] is FACTS[0] and ds[-1] is FACTS[3]
    sub = ds[1:3]
    assert isinstance(sub, FactDataset) and list(sub) == FACTS[1:3] and sub.name == "mini"
    assert list(ds) == FACTS and FACTS[2] in ds and ds.index(FACTS[3]) == 3
    assert ds.relations == ("sport", "capital")
    assert repr(ds) == "FactDataset('mini', n=4, relations=2)"
    assert ds == FactDataset(FACTS, name="mini") != FactDataset(FACTS[:3], name="mini")
    assert len(ds + ds[:1]) == 5 and (ds + ds[:1]).name == "mini+mini"
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="item 1 is a str"):
        FactDataset([FACTS[0], "Tiger"])  # type: ignore[list-item]


def test_filter_by_relation_sample_with_prefix():
    ds = FactDataset(FACTS, name="mini")
    assert [f.subject for f in ds.filter(lambda f: "o" in f.subject)] == [
        "Michael Jordan", "Tiger Woods"]
    assert [f.subject for f in ds.by_relation("capital")] == ["Paris"]
    with pytest.raises(KeyError, match="has no relation 'color'; it has 'sport', 'capital'"):
        ds.by_relation("color")
    s1, s2 = ds.sample(2, seed=3), ds.sample(2, seed=3)
    assert s1 == s2 and len(s1) == 2
    assert [FACTS.index(f) for f in s1] == sorted(FACTS.index(f) for f in s1)  # dataset order
    assert {tuple(ds.sample(2, seed=s)) for s in range(10)} != {tuple(s1)}  # the seed matters
    assert len(ds.sample(0)) == 0 and len(ds.sample(4)) == 4
    with pytest.raises(ValueError, match="cannot sample 5 of 4"):
        ds.sample(5)
    shot = "Fact: Tiger Woods plays the sport of golf\n"
    pre = ds.with_prefix(shot)
    assert pre[0].prompt == shot + "Fact: Michael Jordan plays the sport of"
    assert [f.subject for f in pre] == [f.subject for f in ds]


def test_filter_keeps_exactly_the_matching_facts():
    ds = FactDataset(FACTS)
    assert [f.subject for f in ds.filter(lambda f: f.relation == "sport")] == [
        "Michael Jordan", "Tiger Woods", "Serena Williams"]
    assert len(ds.filter(lambda f: False)) == 0


def test_fingerprint_is_stable_and_content_only():
    ds = FactDataset(FACTS[:2], name="a")
    # pinned: a change here silently invalidates every cache keyed on fingerprints
    assert ds.fingerprint() == (
        "7bb1fd0124ce8570533f50ba0e32a45a2c7e07f41e291e085507edb65e94ff0e")
    assert FactDataset(FACTS[:2], name="b").fingerprint() == ds.fingerprint()
    assert FactDataset(FACTS[1::-1]).fingerprint() != ds.fingerprint()  # order matters
    assert ds.with_prefix("x\n").fingerprint() != ds.fingerprint()


def test_to_frame():
    df = FactDataset(FACTS).to_frame()
    assert list(df.columns) == ["subject", "relation", "template", "attribute", "prefix",
                                "prompt", "source", "id"]
    assert df.loc[2, "prompt"] == "Paris is the capital of" and df.loc[2, "id"] == "1"
    assert df["id"].isna().sum() == 3
    clash = FactDataset([sport("Tiger", "golf", meta={"subject": "x"})]).to_frame()
    assert clash.loc[0, "meta.subject"] == "x" and clash.loc[0, "subject"] == "Tiger"
    assert list(FactDataset([]).to_frame().columns)[:2] == ["subject", "relation"]


# -- known_by -------------------------------------------------------------------------------------


class FakeModel:
    """Next-token logits from a table: ``{subject: {token text: logit}}``, 0 elsewhere."""

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.tokenizer = gpt2_like()
        self.table = table
        self.calls: list[int] = []

    def final_logits(self, prompts, *, batch_size: int) -> torch.Tensor:
        assert len(prompts) <= batch_size
        self.calls.append(len(prompts))
        out = torch.zeros(len(prompts), len(self.tokenizer))
        for i, p in enumerate(prompts):
            for text, value in self.table[p.subject].items():
                out[i, self.tokenizer(text)["input_ids"][0]] = value
        return out


def test_known_by_with_a_fake_model():
    ds = FactDataset([sport("Michael Jordan", "basketball"), sport("Tiger Woods", "golf"),
                      sport("Serena Williams", "tennis")], name="three")
    model = FakeModel({"Michael Jordan": {" basketball": 5.0},
                       "Tiger Woods": {" golf": 3.0, " tennis": 4.0},  # golf ranks 2nd
                       "Serena Williams": {" tennis": 1.0}})
    n_vocab = len(model.tokenizer)
    scores = ds.attribute_scores(model, batch_size=2)
    assert model.calls == [2, 1]  # batched
    assert scores["rank"].tolist() == [1, 2, 1]
    expected = [math.exp(5) / (math.exp(5) + n_vocab - 1),
                math.exp(3) / (math.exp(3) + math.exp(4) + n_vocab - 2),
                math.e / (math.e + n_vocab - 1)]
    assert scores["prob"].tolist() == pytest.approx(expected, rel=1e-5)
    assert scores["logit"].tolist() == [5.0, 3.0, 1.0]
    assert [f.subject for f in ds.known_by(model)] == ["Michael Jordan", "Serena Williams"]
    assert len(ds.known_by(model, top_k=2)) == 3
    assert [f.subject for f in ds.known_by(model, min_prob=0.1)] == ["Michael Jordan"]
    assert expected[0] > 0.1 > expected[2]
    with pytest.raises(ValueError, match="top_k"):
        ds.known_by(model, top_k=0)
    assert len(FactDataset([]).known_by(model)) == 0


# -- corrupt --------------------------------------------------------------------------------------

SPORTS = [("Michael Jordan", "basketball"), ("Tiger Woods", "golf"),
          ("Serena Williams", "tennis"), ("Lionel Messi", "football"),
          ("Michael Woods", "basketball"), ("Zoë Ångström", "golf"), ("Tiger", "golf"),
          ("Jordan", "basketball"), ("O'Neil", "tennis")]


def sports(name: str = "sports") -> FactDataset:
    return FactDataset([sport(s, a, source=f"s#{i}") for i, (s, a) in enumerate(SPORTS)]
                       + [FactPrompt("Tiger", "team", "Fact: {} plays for", "France"),
                          FactPrompt("Jordan", "team", "Fact: {} plays for", "Japan")],
                       name=name)


def test_corrupt_pairs_same_length_subjects_with_different_attributes(caplog):
    tok = gpt2_like()
    pairs = sports().corrupt(tok, seed=0, on_missing="skip")
    partner = {c.subject + "/" + c.relation: k.subject for c, k in pairs}
    # one-token subjects only have each other; "Zoë Ångström" is two subject tokens but its
    # prompt has an extra " " token, and "O'Neil" is the only three-token subject
    assert partner["Tiger/sport"] == "Jordan" and partner["Jordan/sport"] == "Tiger"
    assert partner["Tiger/team"] == "Jordan" and partner["Jordan/team"] == "Tiger"
    assert partner["Michael Jordan/sport"] in {"Tiger Woods", "Serena Williams", "Lionel Messi"}
    assert partner["Michael Woods/sport"] in {"Tiger Woods", "Serena Williams", "Lionel Messi"}
    assert [s for s, _ in pairs.skipped] == ["s#5", "s#8"]
    assert "skipped 2 of 11 prompts with no valid partner" in caplog.text
    assert len(pairs) == 9 and pairs.seed == 0
    for clean, bad in pairs:
        assert clean.relation == bad.relation and clean.template == bad.template
        assert clean.prefix == bad.prefix and clean.subject != bad.subject
    a, b = encode(tok, pairs.clean), encode(tok, pairs.corrupt)
    assert torch.equal(a.attention_mask, b.attention_mask)
    for r in POINT_ROLES:
        assert torch.equal(a.positions[r], b.positions[r])
    assert torch.equal(a.masks[Role.SUBJECT], b.masks[Role.SUBJECT])
    assert (a.attribute_ids != b.attribute_ids).all()
    relation = a.masks[Role.RELATION] | a.masks[Role.FINAL]
    assert torch.equal(a.input_ids[relation], b.input_ids[relation])  # same template tokens


def test_corrupt_is_deterministic_under_the_seed():
    tok = gpt2_like()
    runs = [sports().corrupt(tok, seed=s, on_missing="skip") for s in (0, 0, 1, 2, 3, 4, 5)]
    assert runs[0].corrupt == runs[1].corrupt
    assert runs[0].fingerprint() == runs[1].fingerprint() != runs[2].fingerprint()
    chosen = {r.corrupt[0].subject for r in runs}  # partners of "Michael Jordan"
    assert len(chosen) >= 2 and chosen <= {"Tiger Woods", "Serena Williams", "Lionel Messi"}


def test_corrupt_raises_for_a_prompt_without_partner():
    with pytest.raises(FactDataError) as info:
        sports().corrupt(gpt2_like(), seed=0)
    assert info.value.record == "s#5"
    assert "sports: no subject of relation 'sport' with the same token length (2)" in str(
        info.value)
    assert "(and 1 more prompts)" in str(info.value)
    with pytest.raises(ValueError, match="on_missing"):
        sports().corrupt(gpt2_like(), on_missing="ignore")  # type: ignore[arg-type]


def test_corrupt_accepts_a_model_with_a_tokenizer():
    model = FakeModel({})
    pairs = sports()[6:8].corrupt(model, seed=0)
    assert [(c.subject, k.subject) for c, k in pairs] == [("Tiger", "Jordan"), ("Jordan", "Tiger")]
    assert pairs.corrupt[0].attribute == "basketball" and pairs.corrupt[0].source == "s#7"
    with pytest.raises(TypeError, match="tokenizer"):
        sports().corrupt(object())


def test_pairs_construction_checks():
    tok = gpt2_like()
    a = FactDataset([sport("Michael Jordan", "basketball"), sport("Tiger", "golf")])
    b = FactDataset([sport("Tiger Woods", "golf"), sport("Jordan", "basketball")])
    pairs = FactPairs(a, b, seed=None, tokenizer=tok)
    assert len(pairs) == 2 and pairs[1] == (a[1], b[1])
    assert isinstance(pairs[:1], FactPairs) and len(pairs[:1]) == 1
    with pytest.raises(FactDataError, match="2 clean but 1 corrupt"):
        FactPairs(a, b[:1])
    with pytest.raises(FactDataError, match=r"record 1: .*do not align"):
        FactPairs(a, FactDataset([b[0], sport("Serena Williams", "tennis")]), tokenizer=tok)
    FactPairs(a, FactDataset([b[0], sport("Serena Williams", "tennis")]))  # unchecked: fine
    other = FactDataset([FactPrompt("Paris", "capital", SPORT, "France"), b[1]])
    with pytest.raises(FactDataError, match="record 0: clean relation 'sport' != corrupt"):
        FactPairs(a, other)


def test_conftest_style_records_corrupt_cleanly():
    # the shape other test modules build their fixtures from
    ds = from_records([{"subject": s, "relation": "sport", "template": SPORT, "attribute": a}
                       for s, a in SPORTS[:4]], name="tiny")
    pairs = ds.corrupt(gpt2_like(), seed=0)
    assert len(pairs) == 4 and not pairs.skipped


# -- the paper's known rule, honest reports, partners from a pool and fallbacks ------------------


def test_known_by_paper_rule_and_options():
    ds = FactDataset([sport("Michael Jordan", "basketball"), sport("Tiger Woods", "golf"),
                      sport("Serena Williams", "tennis")], name="three")
    model = FakeModel({"Michael Jordan": {" basketball": 20.0},           # p ~ 1
                       "Tiger Woods": {" golf": 3.0, " tennis": 4.0},     # rank 2
                       "Serena Williams": {" tennis": 1.0}})              # rank 1, p small
    scores = ds.attribute_scores(model)
    assert scores["prob"][0] > 0.5 > scores["prob"][2] and scores["rank"][2] == 1
    assert scores["top_id"].tolist() == [scores["attribute_id"][0], scores["attribute_id"][2],
                                         scores["attribute_id"][2]]  # Tiger's top is " tennis"
    assert known_mask(scores, rule="paper") == [True, False, False]
    assert known_mask(scores) == [True, False, True]                    # the old default
    assert known_mask(scores, top_k=2) == [True, True, True]
    assert known_mask(scores, rule="paper", top_k=2) == [True, False, False]  # p > .5 rules
    assert [f.subject for f in ds.known_by(model, rule="paper")] == ["Michael Jordan"]
    assert len(ds.known_by(model)) == 2
    with pytest.raises(ValueError, match="rule"):
        ds.known_by(model, rule="majority")  # type: ignore[arg-type]
    # exactly 0.5 is not known under the paper's rule (p(correct) > 0.5)
    assert known_mask(pd.DataFrame({"rank": [1, 1], "prob": [0.5, 0.5000001]}),
                      rule="paper") == [False, True]


def test_known_by_says_why_a_bare_prompt_is_not_known(caplog):
    """Regression: on lre:factual/person_plays_pro_sport SmolLM2 'knew 2 of 318' because its
    top prediction after "plays the sport of" is " the"; the log now says so."""
    bare = FactDataset([FactPrompt(s, "sport", "{} plays the sport of", a)
                        for s, a in SPORTS[:4]], name="bare")
    model = FakeModel({s: {" the": 6.0, f" {a}": 4.0} for s, a in SPORTS[:4]})
    model.table["Lionel Messi"] = {" football": 9.0}
    with caplog.at_level("INFO", logger="factfind.data.dataset"):
        assert len(bare.known_by(model)) == 1
    assert "known_by: 1 of 4 facts of bare" in caplog.text
    assert "on 3 of the 3 others its top prediction is ' the'" in caplog.text
    assert "the prompt does not ask for the attribute" in caplog.text
    # a one-shot prefix whose answer the model copies is named as such
    caplog.clear()
    shot = bare.with_prefix("Fact: Tiger Woods plays the sport of golf\n")
    copier = FakeModel({s: {" golf": 6.0} for s, _ in SPORTS[:4]})
    with caplog.at_level("WARNING", logger="factfind.data.dataset"):
        assert len(shot.known_by(copier, rule="paper")) == 0
    assert "its top prediction is ' golf'" in caplog.text and "copies" in caplog.text
    # enough known: no warning; a table without top_id (an old cache) still describes
    caplog.clear()
    assert len(FactDataset([sport("Lionel Messi", "football")]).known_by(model)) == 1
    assert "WARNING" not in caplog.text
    scores = bare.attribute_scores(model).drop(columns="top_id")
    assert describe_unknown(scores, model.tokenizer, name="bare") == "knows 1 of 4 facts of bare"


def test_corrupt_draws_partners_from_a_pool():
    tok = gpt2_like()
    known = FactDataset([sport("Michael Jordan", "basketball")], name="known")
    with pytest.raises(FactDataError, match="among 0 candidates"):
        known.corrupt(tok, seed=0)  # alone, it has no partner
    pairs = known.corrupt(tok, seed=0, pool=sports())
    assert len(pairs) == 1 and pairs.partner_from == ("relation",)
    assert pairs.corrupt[0].subject in {"Tiger Woods", "Serena Williams", "Lionel Messi"}
    assert pairs.corrupt[0].source.startswith("s#")  # the partner's own record
    # the same partner whether the pool holds the dataset or not (order-independent draw)
    again = known.corrupt(tok, seed=0, pool=sports() + known)
    assert again.corrupt == pairs.corrupt


def test_corrupt_falls_back_to_other_relations_and_records_it():
    tok = gpt2_like()
    clean = FactDataset([sport("Tiger", "golf", source="c#0")], name="one")
    pool = FactDataset([FactPrompt("Jordan", "team", "Fact: {} plays for", "Japan"),
                        sport("Serena Williams", "tennis"), sport("Michael Woods", "golf")])
    assert len(clean.corrupt(tok, pool=pool, on_missing="skip")) == 0  # no 1-token sport
    pairs = clean.corrupt(tok, pool=pool, fallback=FALLBACKS)
    ((_, k),) = pairs
    assert pairs.partner_from == ("other_relation",)
    assert (k.subject, k.relation, k.template, k.prompt) == (
        "Jordan", "sport", SPORT, "Fact: Jordan plays the sport of")
    assert k.attribute == "tennis"  # the relation's only other answer: a contrast, not a fact
    frame = pairs.to_frame()
    assert frame.loc[0, "partner_from"] == "other_relation"
    assert frame.loc[0, "clean_subject"] == "Tiger" and frame.loc[0, "corrupt_prompt"] == k.prompt
    FactPairs(pairs.clean, pairs.corrupt, tokenizer=tok)  # aligned role by role
    # the relation step still comes first when it can
    mixed = FactDataset([sport("Tiger", "golf"), sport("Jordan", "basketball")])
    both = mixed.corrupt(tok, pool=pool, fallback=FALLBACKS)
    assert both.partner_from == ("relation", "relation")
    assert both[:1].partner_from == ("relation",)
    with pytest.raises(ValueError, match="fallback"):
        mixed.corrupt(tok, fallback=("nearest",))
    with pytest.raises(FactDataError, match="partner_from"):
        FactPairs(both.clean, both.corrupt, partner_from=("relation",))
    assert FactPairs(both.clean, both.corrupt).to_frame()["partner_from"].tolist() == ["", ""]


def test_attribute_scores_sorted_batches_equal_one_prompt_at_a_time(facts):
    """Batches sorted by token length, results in dataset order: equal to one prompt per
    forward (no padding at all), on prompts of different lengths."""
    from factfind.testing import tiny_model

    model = tiny_model("llama", n_layers=2)
    lengths = model.tokenize(list(facts)).lengths.tolist()
    assert len(set(lengths)) > 1 and lengths != sorted(lengths)
    fast = facts.attribute_scores(model, batch_size=3)
    slow = pd.concat([facts[i:i + 1].attribute_scores(model, batch_size=1)
                      for i in range(len(facts))], ignore_index=True)
    assert fast["attribute_id"].tolist() == slow["attribute_id"].tolist()
    assert fast["top_id"].tolist() == slow["top_id"].tolist()
    assert slow["prob"].abs().max() > 0
    np.testing.assert_allclose(fast["prob"], slow["prob"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(fast["logit"], slow["logit"], rtol=1e-4, atol=1e-5)
    assert (fast["rank"] - slow["rank"]).abs().max() <= 0
