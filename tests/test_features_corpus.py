"""load_corpus: the offline default, text and JSONL files, hub names offline, splits, errors."""

import json

import pytest

from factfind.errors import ArgumentError, EmptyInputError, NotFoundError
from factfind.features.corpus import Corpus, fact_sentences, load_corpus


def test_default_corpus_is_the_shipped_facts_as_sentences():
    facts = fact_sentences()
    assert set(facts) == {"counterfact", "rome_known", "athletes", "lre"}
    assert len(facts["counterfact"]) == 3 * 1919 and len(facts["rome_known"]) == 1209
    assert "Vinson Massif is located in the continent of Antarctica" in facts["rome_known"][0]
    assert facts["athletes"][0].endswith("soccer.")
    c = load_corpus(samples=0)
    assert len(c) == sum(len(v) for v in facts.values())
    assert c.provenance["source"] == "default" and "not a pretraining corpus" in \
        c.provenance["what"]
    assert c.provenance["facts"]["lre"] == len(facts["lre"]) > 1000
    assert c.fingerprint() == load_corpus(samples=0).fingerprint()  # reproducible


def test_files_jsonl_lists_and_token_counts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nsecond line\n")
    assert load_corpus(txt).texts == ["first line", "second line"]
    assert load_corpus(txt, per_line=False).texts == ["first line\n\nsecond line\n"]
    js = tmp_path / "b.jsonl"
    js.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in
                            enumerate(["alpha beta", "gamma"])))
    assert load_corpus(js).texts == ["alpha beta", "gamma"]
    both = load_corpus(tmp_path)
    assert len(both) == 4 and both.provenance["files"] == 2
    assert load_corpus(["x y", "z"]).texts == ["x y", "z"]

    class Tok:
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [t.split() for t in texts]}

    c = load_corpus(js)
    assert c.count_tokens(Tok()) == 3 and c.provenance["tokens"] == 3


def test_split_is_stable_and_disjoint():
    c = Corpus([f"text number {i}" for i in range(400)], {"source": "t"})
    train, test = c.split(0.1)
    assert set(train.texts).isdisjoint(test.texts) and len(train) + len(test) == 400
    assert 20 < len(test) < 70
    again = Corpus([*c.texts, "one more"], {}).split(0.1)[1]
    assert set(test.texts) <= set(again.texts)  # adding texts moves none of the others
    with pytest.raises(ArgumentError, match="held_out"):
        c.split(1.5)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(EmptyInputError, match="empty corpus"):
        load_corpus(["", "  "])
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(EmptyInputError):
        load_corpus(empty)
    with pytest.raises(NotFoundError, match="no corpus file"):
        load_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ArgumentError, match="no 'text' field"):
        load_corpus(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(NotFoundError) as err:
        load_corpus("someone/some-dataset-that-is-not-here")
    assert "\n" not in str(err.value) and "offline default" in str(err.value)
