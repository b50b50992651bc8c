"""Localization on the shipped organism, checked against what its world's construction implies.

The world gives every person a first and a last name each shared by many people with other
attributes, so (1) no single name token can carry the answer - both must be read; (2) the
final token must read the subject, so blocking final -> subject edges destroys the answer;
(3) the answer is moved to the final position by attention, so patching the final position
restores nothing early on (its token is the same in both prompts) and a substantial share
entering the last layer (how much the last layer still moves is the checkpoint's own business:
0.38 of the effect is already there on the shipped run, 0.63 on a 1-thread retrain);
(4) noising the subject's embeddings destroys the fact (a positive total effect).
"""

import pytest

import factfind as ff
from factfind.organism import CHECKPOINT_DIR

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                                reason="organism checkpoint not built")


@pytest.fixture(scope="module")
def organism():
    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").sample(64, seed=0).known_by(model)[:24]
    return model, facts, facts.corrupt(model, seed=0, on_missing="skip")


def _effect(df, **where):
    agg = ff.aggregate(df)
    for k, v in where.items():
        agg = agg[agg[k] == v]
    assert len(agg) == 1, where
    return float(agg["effect"].iloc[0])


def test_both_name_tokens_are_needed_and_the_answer_moves_to_final(organism):
    model, _, pairs = organism
    assert len(pairs) >= 16
    df = ff.activation_patching(model, pairs, components=["resid_pre"], progress=False)
    first = _effect(df, layer=0, role="subject_first")
    last = _effect(df, layer=0, role="subject_last")
    # each name token alone restores part of the fact, neither restores all of it
    assert 0.1 < first < 0.9 and 0.1 < last < 0.9, (first, last)
    top = model.n_layers - 1
    # the final token is identical in both prompts: nothing to restore there before attention
    assert abs(_effect(df, layer=0, role="final")) < 0.05
    # entering the last layer, a substantial share of the answer is at the final position,
    # more than at the last subject token
    final = _effect(df, layer=top, role="final")
    assert final > 0.25 and final > _effect(df, layer=top, role="subject_last"), final
    assert abs(_effect(df, layer=0, role="relation")) < 0.05  # identical in both prompts


def test_final_token_reads_the_subject(organism):
    model, facts, _ = organism
    df = ff.attention_knockout(model, facts, sources=["subject", "final"],
                               window=model.n_layers, progress=False)
    # blocking every layer leaves at most a guess among the relation's 4 sports
    assert _effect(df, role="subject") < -0.6
    assert df[df.role == "subject"]["p_knockout"].mean() < 0.4
    assert _effect(df, role="subject") < _effect(df, role="final")


def test_noising_the_subject_destroys_the_fact(organism):
    model, facts, _ = organism
    df = ff.causal_tracing(model, facts[:8], kinds=("hidden",), samples=2, progress=False)
    assert df.groupby("prompt")["te"].first().mean() > 0.3
    # restoring the final token's last hidden state restores the clean probability
    last = df[(df.layer == model.n_layers - 1) & (df.role == "final")]
    assert (last["effect"] - last["te"]).abs().max() < 1e-4
