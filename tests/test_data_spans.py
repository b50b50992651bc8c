"""Token-span alignment on real (locally trained) tokenizers: roles, padding, BPE boundaries."""

from __future__ import annotations

import pytest
import torch
from conftest_data import gpt2_like, llama_like, tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factfind.data import (
    FactDataError,
    FactPrompt,
    align,
    attribute_collisions,
    attribute_token_ids,
    encode,
)
from factfind.types import GROUP_ROLES, POINT_ROLES, Role

SPORT = "Fact: {} plays the sport of"


def fact(subject: str, template: str = SPORT, attribute: str = "basketball", **kw) -> FactPrompt:
    return FactPrompt(subject, "sport", template, attribute, **kw)


def role_strings(tok, batch, row: int) -> dict[str, object]:
    """Decoded text of every role in one row of a batch."""
    ids = batch.input_ids[row]
    out: dict[str, object] = {str(r): tok.decode([int(ids[batch.positions[r][row]])])
                              for r in POINT_ROLES}
    for r in GROUP_ROLES:
        out[f"{r}*"] = [tok.decode([int(i)]) for i in ids[batch.masks[r][row]]]
    return out


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_like()


@pytest.fixture(scope="module")
def llama():
    return llama_like()


def test_tokenizers_behave_like_gpt2_and_llama(gpt2, llama):
    # Pins the fixtures: every hand-computed position below relies on these splits.
    assert tokens(gpt2, "Fact: Michael Jordan plays the sport of") == [
        "Fact", ":", " Michael", " Jordan", " plays", " the", " sport", " of"]
    assert tokens(llama, "Michael Jordan, plays") == ["<s>", "Michael", "Jordan,", "plays"]


def test_roles_of_a_gpt2_prompt(gpt2):
    batch = encode(gpt2, [fact("Michael Jordan")])
    assert batch.input_ids.shape == (1, 8)
    assert batch.positions[Role.SUBJECT_FIRST].tolist() == [2]
    assert batch.positions[Role.SUBJECT_LAST].tolist() == [3]
    assert batch.positions[Role.FINAL].tolist() == [7]
    assert batch.masks[Role.SUBJECT][0].nonzero()[:, 0].tolist() == [2, 3]
    assert batch.masks[Role.RELATION][0].nonzero()[:, 0].tolist() == [0, 1, 4, 5, 6]
    assert batch.masks[Role.FINAL][0].nonzero()[:, 0].tolist() == [7]
    assert not batch.masks[Role.PREFIX].any()  # empty prefix: no prefix positions
    got = role_strings(gpt2, batch, 0)
    # the BPE token " Jordan" carries the template's space and still counts as subject
    assert got["subject_first"] == " Michael" and got["subject_last"] == " Jordan"
    assert got["final"] == " of"
    assert batch.attribute_ids.tolist() == [gpt2(" basketball")["input_ids"][0]]
    assert batch.lengths.tolist() == [8] and batch.merged.tolist() == [False]
    assert batch.position_ids.tolist() == [list(range(8))]


def test_subject_at_start_has_no_leading_space(gpt2):
    batch = encode(gpt2, [fact("Michael Jordan", "{} plays the sport of")])
    got = role_strings(gpt2, batch, 0)
    assert got["subject*"] == ["Michael", " Jordan"]
    assert got["relation*"] == [" plays", " the", " sport"]


@pytest.mark.parametrize("make", [gpt2_like, llama_like])
def test_left_and_right_padding_give_the_same_role_tokens(make):
    tok = make()
    facts = [fact("Michael Jordan"), fact("Tiger"), fact("Zoë Ångström", "{} lives in"),
             fact("Serena Williams", prefix="Fact: Tiger Woods plays the sport of golf\n")]
    left = encode(tok, facts, padding_side="left")
    right = encode(tok, facts, padding_side="right")
    n_pos = left.input_ids.shape[1]
    assert left.positions[Role.FINAL].tolist() == [n_pos - 1] * 4  # final is always last
    assert right.positions[Role.FINAL].tolist() == (right.lengths - 1).tolist()
    for row in range(4):
        assert role_strings(tok, left, row) == role_strings(tok, right, row)
        # left-padded rows see the same position ids as the unpadded prompt
        real = left.attention_mask[row].bool()
        assert left.position_ids[row][real].tolist() == list(range(int(left.lengths[row])))
        assert left.position_ids[row][~real].tolist() == [0] * int((~real).sum())
        assert (left.input_ids[row][~real] == tok.eos_token_id).all()
    short = 1  # "Fact: Tiger plays the sport of" is the shortest: padded on the left
    assert left.attention_mask[short, 0] == 0 and right.attention_mask[short, -1] == 0


def test_subject_with_a_leading_space_of_its_own(gpt2):
    batch = encode(gpt2, [fact(" Jordan")])  # prompt "Fact:  Jordan plays the sport of"
    assert tokens(gpt2, batch.prompts[0].prompt)[:4] == ["Fact", ":", " ", " Jordan"]
    got = role_strings(gpt2, batch, 0)
    assert got["subject*"] == [" Jordan"]
    assert got["relation*"] == ["Fact", ":", " ", " plays", " the", " sport"]


def test_punctuation_inside_and_after_the_subject(gpt2):
    batch = encode(gpt2, [fact("O'Neil"), fact("Jordan", "Fact: {}, the player, plays the")])
    assert role_strings(gpt2, batch, 0)["subject*"] == ["O", "'", "Neil"]
    got = role_strings(gpt2, batch, 1)
    assert got["subject*"] == [" Jordan"]
    assert got["relation*"][:3] == ["Fact", ":", ","]
    assert batch.merged.tolist() == [False, False]


def test_merged_boundary_token_counts_as_subject_last(llama, caplog):
    # SentencePiece keeps "Jordan," as one token: it holds the subject and the template's comma
    f = fact("Jordan", "{}, the player, plays the")
    batch = encode(llama, [f, fact("Michael Jordan")])
    assert tokens(llama, f.prompt)[:3] == ["<s>", "Jordan,", "the"]
    got = role_strings(llama, batch, 0)
    assert got["subject_first"] == got["subject_last"] == "Jordan,"
    assert batch.merged.tolist() == [True, False]
    assert "1 of 2 prompts have a token merging subject and template" in caplog.text
    with pytest.raises(FactDataError, match="'Jordan,' merges the subject 'Jordan'"):
        encode(llama, [f], on_merge="raise")


def test_bos_token_has_no_role(llama):
    batch = encode(llama, [fact("Michael Jordan", "{} plays the sport of")])
    assert batch.input_ids[0, 0] == llama.bos_token_id
    assert batch.positions[Role.SUBJECT_FIRST].tolist() == [1]
    assert not any(batch.masks[r][0, 0] for r in GROUP_ROLES)
    assert batch.position_ids[0].tolist() == list(range(7))


@pytest.mark.parametrize("make", [gpt2_like, llama_like])
def test_unicode_subjects(make):
    tok = make()
    batch = encode(tok, [fact("Zoë Ångström", "Fact: {} lives in")])
    subject = tok.decode(batch.input_ids[0][batch.masks[Role.SUBJECT][0]].tolist())
    assert subject.strip() == "Zoë Ångström"
    assert role_strings(tok, batch, 0)["final"] in (" in", "in")


def test_cjk_subject_merged_into_one_token(gpt2):
    # byte-level BPE learned "北京是中国的首都" as one token: subject and relation share it
    batch = encode(gpt2, [FactPrompt("北京", "capital", "{}是中国的首都。", "x")])
    got = role_strings(gpt2, batch, 0)
    assert got["subject*"] == ["北京是中国的首都"] and got["final"] == "。"
    assert got["relation*"] == [] and batch.merged.tolist() == [True]
    # with nothing after the merged token there is no final position to read
    with pytest.raises(FactDataError, match="no template token follows the subject"):
        encode(gpt2, [FactPrompt("北京", "capital", "{}是中国的首都", "x", source="cjk#0")])


def test_subject_twice_in_prompt_uses_the_template_slot(gpt2):
    f = fact("Michael Jordan", "Michael Jordan, also called {}, plays the sport of")
    batch = encode(gpt2, [f])
    assert batch.positions[Role.SUBJECT_FIRST].tolist() == [5]  # the second occurrence
    assert batch.positions[Role.SUBJECT_LAST].tolist() == [6]
    got = role_strings(gpt2, batch, 0)
    assert got["subject*"] == [" Michael", " Jordan"]
    assert got["relation*"][:2] == ["Michael", " Jordan"]  # the first one is template text


def test_few_shot_prefix_holding_the_same_subject(gpt2):
    prefix = "Fact: Michael Jordan plays the sport of basketball\n"
    batch = encode(gpt2, [fact("Michael Jordan", prefix=prefix)])
    got = role_strings(gpt2, batch, 0)
    assert "".join(got["prefix*"]) == prefix  # type: ignore[arg-type]
    n_prefix = len(got["prefix*"])  # type: ignore[arg-type]
    assert batch.positions[Role.SUBJECT_FIRST].tolist() == [n_prefix + 2]
    assert got["subject*"] == [" Michael", " Jordan"]
    assert got["relation*"] == ["Fact", ":", " plays", " the", " sport"]


def test_trimmed_offsets_give_the_same_roles():
    plain, trimmed = gpt2_like(), gpt2_like(trim_offsets=True)
    facts = [fact("Michael Jordan"), fact("Jordan", "Fact: {}, the player, plays the")]
    a, b = encode(plain, facts), encode(trimmed, facts)
    for r in POINT_ROLES:
        assert a.positions[r].tolist() == b.positions[r].tolist()
    for r in GROUP_ROLES:
        assert torch.equal(a.masks[r], b.masks[r])


def test_mask_and_to(gpt2):
    batch = encode(gpt2, [fact("Michael Jordan"), fact("Tiger")])
    m = batch.mask(Role.SUBJECT_LAST)
    assert m.sum(-1).tolist() == [1, 1]
    assert m[0].nonzero()[:, 0].tolist() == [3]
    assert torch.equal(batch.mask("relation"), batch.masks[Role.RELATION])
    assert batch.to("cpu").input_ids.device.type == "cpu" and len(batch) == 2


def test_attribute_ids_match_the_token_after_the_prompt(gpt2, llama):
    attrs = ["basketball", "golf", "New York", "Paris", "Zoë", "Antarctica"]
    for tok in (gpt2, llama):
        ids = attribute_token_ids(tok, attrs).tolist()
        for a, i in zip(attrs, ids, strict=True):
            prompt = tok("The answer is")["input_ids"]
            full = tok(f"The answer is {a}")["input_ids"]
            assert full[:len(prompt)] == prompt
            assert full[len(prompt)] == i, (a, tok.decode([i]))
    # byte-level BPE: exactly the first token of " " + attribute, even a bare space
    assert attribute_token_ids(gpt2, ["Zoë"]).tolist() == [gpt2(" Zoë")["input_ids"][0]]
    assert gpt2.decode(gpt2(" Zoë")["input_ids"][:1]) == " "
    # SentencePiece: "▁Paris"-style token, never a lone "▁"
    golf = attribute_token_ids(llama, ["golf"]).tolist()
    assert llama.convert_ids_to_tokens(golf) == ["▁gol"]
    assert attribute_token_ids(gpt2, []).shape == (0,)


def test_attribute_collisions(gpt2):
    facts = [FactPrompt("New York", "in country", "{} is in", "United States"),
             FactPrompt("Tokyo", "capital of", "{} is the capital of", "New York"),
             FactPrompt("Delhi", "capital of", "{} is the capital of", "New Delhi"),
             FactPrompt("Delhi", "capital of", "The capital {} is of", "New Delhi"),
             FactPrompt("Paris", "capital of", "{} is the capital of", "France"),
             FactPrompt("Rome", "in country", "{} is in", "New Delhi")]
    df = attribute_collisions(facts, gpt2)
    assert df.to_dict("records") == [
        {"relation": "capital of", "token_id": gpt2(" New")["input_ids"][0], "token": " New",
         "attributes": ("New Delhi", "New York"), "n_facts": 3}]
    assert attribute_collisions(facts[:2], gpt2).empty
    assert list(attribute_collisions([], gpt2).columns) == [
        "relation", "token_id", "token", "attributes", "n_facts"]


def test_alignment_errors(gpt2):
    with pytest.raises(ValueError, match="at least one prompt"):
        encode(gpt2, [])
    with pytest.raises(ValueError, match="padding_side"):
        encode(gpt2, [fact("Tiger")], padding_side="middle")

    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        encode(Slow(), [fact("Tiger")])


def test_tokenizer_that_appends_eos_is_refused():
    from tokenizers import processors

    tok = llama_like()
    backend = tok.backend_tokenizer
    saved = backend.post_processor
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    try:
        with pytest.raises(FactDataError, match=r"record x\.csv#line 2: .*special token"):
            encode(tok, [fact("Tiger", source="x.csv#line 2")])
    finally:
        backend.post_processor = saved


# -- property: any subject, in any template, aligns consistently ----------------------------------

SUBJECT_TEXT = st.lists(
    st.sampled_from([*"abcJMOZ'-., ëÅö北京東", "Jordan", "Michael", " Tiger"]),
    min_size=1, max_size=8,
).map("".join).filter(lambda s: s.strip() != "")
TEMPLATES = st.sampled_from([SPORT, "{} plays the sport of", "{}, the player, plays",
                             "Michael Jordan and {} live in", "«{}» is in", "{}'s team is"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subjects=st.lists(SUBJECT_TEXT, min_size=1, max_size=3), template=TEMPLATES,
       prefix=st.sampled_from(["", "Fact: Tiger Woods plays the sport of golf\n"]),
       which=st.sampled_from(["gpt2", "llama"]))
def test_alignment_invariants(subjects, template, prefix, which):
    tok = gpt2_like() if which == "gpt2" else llama_like()
    facts = [fact(s, template, prefix=prefix) for s in subjects]
    try:
        left = encode(tok, facts)
    except FactDataError as e:
        # the only refusal: a merged token swallowed the text after the subject
        assert "no template token follows the subject" in str(e)
        return
    right = encode(tok, facts, padding_side="right")
    for row, f in enumerate(facts):
        real = left.attention_mask[row].bool()
        subj = left.masks[Role.SUBJECT][row]
        idx = subj.nonzero()[:, 0].tolist()
        assert idx == list(range(idx[0], idx[-1] + 1))  # contiguous
        assert idx[0] == left.positions[Role.SUBJECT_FIRST][row]
        assert idx[-1] == left.positions[Role.SUBJECT_LAST][row]
        assert left.positions[Role.FINAL][row] == left.input_ids.shape[1] - 1
        assert idx[-1] < left.positions[Role.FINAL][row]
        # roles are disjoint and cover every real non-special token
        stacked = torch.stack([left.masks[r][row] for r in GROUP_ROLES]).long()
        assert (stacked.sum(0) <= 1).all() and not (stacked.sum(0).bool() & ~real).any()
        n_special = int(real.sum() - stacked.sum())
        assert n_special == (1 if which == "llama" else 0)
        # the subject tokens' text contains the subject
        text = tok.decode(left.input_ids[row][subj].tolist())
        assert f.subject.strip() in text or left.merged[row] or "\ufffd" in text
        assert role_strings(tok, left, row) == role_strings(tok, right, row)
    assert len(align(tok, facts)) == len(facts)
