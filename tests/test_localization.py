"""Batched localization methods against their plain-loop references, and bad input."""

import numpy as np
import pytest
import torch

from factfind.localize.dla import direct_logit_attribution
from factfind.localize.knockout import attention_knockout, attention_knockout_reference
from factfind.localize.patching import activation_patching, activation_patching_reference
from factfind.localize.tracing import causal_tracing, causal_tracing_reference
from factfind.results import aggregate


def _pairs(model, facts):
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    assert len(pairs) >= 4, "the fixture facts must give several corrupt partners"
    return pairs


def _close(fast, slow, keys, col="effect", *, nonzero=1e-3, atol=1e-5):
    a = fast.set_index(keys)[col].sort_index()
    b = slow.set_index(keys)[col].sort_index()
    assert list(a.index) == list(b.index)
    finite = np.isfinite(b.to_numpy())
    assert finite.sum() > 0 and np.abs(b.to_numpy()[finite]).max() > nonzero
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_matches_reference(family_model, facts, direction):
    if direction == "noise" and family_model.spec.name != "gpt2":
        pytest.skip("noising shares every code path with denoising; one family suffices")
    pairs = _pairs(family_model, facts)[:4]
    kw = dict(components=["resid_pre", "attn_out", "mlp_out", "z"],
              positions=["subject_first", "subject_last", "relation", "final", -3],
              direction=direction)
    fast = activation_patching(family_model, pairs, batch_size=3, chunk=7, progress=False, **kw)
    slow = activation_patching_reference(family_model, pairs, **kw)
    keys = ["component", "layer", "head", "position", "role", "prompt"]
    # the patched logit difference to 1e-5; the effect divides it by the clean-corrupt gap,
    # which scales rounding up by 1/gap (incremental runs round differently from full ones)
    _close(fast, slow, keys, col="metric")
    gap = float((slow["clean"] - slow["corrupt"]).abs().min())
    _close(fast, slow, keys, atol=1e-5 / min(1.0, gap))


def test_patching_sanity(gpt2_model, facts):
    """Patching the whole residual stream at every position restores the clean run exactly."""
    pairs = _pairs(gpt2_model, facts)
    n = gpt2_model.n_layers
    df = activation_patching(gpt2_model, pairs, components=["resid_post"], layers=[n - 1],
                             positions=["final"], progress=False)
    np.testing.assert_allclose(df["effect"], 1.0, atol=1e-4)
    agg = aggregate(df)
    assert len(agg) == 1 and agg["n"].iloc[0] == len(pairs)


def test_causal_tracing_matches_reference(family_model, facts):
    data = facts[:2]
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=2, window=2, seed=3)
    fast = causal_tracing(family_model, data, batch_size=2, chunk=5, progress=False, **kw)
    slow = causal_tracing_reference(family_model, data, **kw)
    # effects are probabilities here: small on a random model, so compare at 1e-7
    _close(fast, slow, ["method", "layer", "position", "prompt"], nonzero=1e-5, atol=1e-7)


def test_causal_tracing_str_and_severed(gpt2_model, facts):
    pairs = _pairs(gpt2_model, facts)[:3]
    df = causal_tracing(gpt2_model, pairs, corruption="str", severed=True, window=1,
                        progress=False)
    assert set(df["method"]) == {"causal_tracing/hidden", "causal_tracing/mlp",
                                 "causal_tracing/attn", "causal_tracing/hidden/severed_mlp"}
    # restoring the last layer's hidden state at the final token restores p_clean exactly
    last = df[(df.method == "causal_tracing/hidden") & (df.layer == gpt2_model.n_layers - 1)
              & (df.role == "final")]
    np.testing.assert_allclose(last["p_restored"], last["p_clean"], atol=1e-5)
    np.testing.assert_allclose(last["effect"], last["te"], atol=1e-5)


def test_knockout_matches_reference(family_model, facts):
    data = facts[:3]
    fast = attention_knockout(family_model, data, window=2, batch_size=2, progress=False)
    slow = attention_knockout_reference(family_model, data, window=2)
    _close(fast, slow, ["role", "layer", "prompt"])


def test_dla_sums_to_logit_difference(family_model, facts):
    _check_dla_sums(family_model, facts)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_dla_sums_with_post_norms_and_softcap(family, facts):
    """Post-norm families (both norms: Gemma 2/3; post only: OLMo 2) with softcapped logits
    (Gemma): rows sum to the pre-softcap logit difference, which softcapped is the model's."""
    from factfind.testing.models import tiny_model

    model = tiny_model(family)
    df = _check_dla_sums(model, facts)
    pairs = _pairs(model, facts)[:3]
    run = model.run(model.tokenize(list(pairs.clean)))
    ids = model.tokenize(list(pairs.clean)).attribute_ids
    wrong = model.tokenize(list(pairs.corrupt)).attribute_ids
    rows = torch.arange(len(ids))
    totals = torch.tensor(df.groupby("prompt")["total"].first().to_numpy())
    raw = run.logits if run.logits_raw is None else run.logits_raw
    torch.testing.assert_close(raw[rows, ids] - raw[rows, wrong], totals.float(), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(model.softcap_logits(raw), run.logits)


def _check_dla_sums(model, facts):
    pairs = _pairs(model, facts)[:3]
    df = direct_logit_attribution(model, pairs)
    main = df[(df.method == "dla") & (df.component != "neurons")]
    sums = main.groupby("prompt")["effect"].sum()
    totals = main.groupby("prompt")["total"].first()
    assert totals.abs().max() > 1e-2
    np.testing.assert_allclose(sums, totals, atol=1e-4, rtol=1e-4)
    # neurons sum to their MLP (minus its bias), heads' source shares sum to the head
    neur = df[df.component == "neurons"].groupby(["prompt", "layer"])["effect"].sum()
    assert neur.abs().max() > 1e-3
    src = df[df.method == "dla/source"].groupby(["prompt", "layer", "head"])["effect"].sum()
    heads = df[(df.method == "dla") & (df.component == "head_out")].set_index(
        ["prompt", "layer", "head"])["effect"]
    np.testing.assert_allclose(src.sort_index(), heads.sort_index(), atol=1e-5)
    # the MLP row built from neurons equals the one read from mlp_out itself
    whole = direct_logit_attribution(model, pairs, neurons=False, sources=False)
    mlp = [d[(d.method == "dla") & (d.component == "mlp_out")].set_index(["prompt", "layer"])[
        "effect"].sort_index() for d in (df, whole)]
    assert mlp[1].abs().max() > 1e-3
    np.testing.assert_allclose(mlp[0], mlp[1], atol=1e-5)
    return df


def test_bad_input_is_clear(gpt2_model, facts):
    pairs = _pairs(gpt2_model, facts)
    with pytest.raises(IndexError, match="layer 50"):
        activation_patching(gpt2_model, pairs, layers=[50], progress=False)
    with pytest.raises(IndexError, match="position 99"):
        activation_patching(gpt2_model, pairs, positions=[99], progress=False)
    with pytest.raises(ValueError, match="direction"):
        activation_patching(gpt2_model, pairs, direction="sideways", progress=False)
    with pytest.raises(ValueError, match="empty"):
        activation_patching(gpt2_model, pairs[:0], progress=False)
    with pytest.raises(ValueError, match="empty"):
        causal_tracing(gpt2_model, facts[:0], progress=False)
    with pytest.raises(ValueError, match="kinds"):
        causal_tracing(gpt2_model, facts, kinds=("mlp", "nope"), progress=False)
    with pytest.raises(ValueError, match="window"):
        attention_knockout(gpt2_model, facts, window=0, progress=False)
    from factfind.data import FactDataError, FactPairs

    with pytest.raises(FactDataError):
        FactPairs(pairs.clean, pairs.corrupt[:-1])
    assert torch.is_tensor(gpt2_model.W_U)


@pytest.mark.parametrize("how", ["mean", "resample", "zero"])
def test_ablation_matches_reference(gpt2_model, facts, how):
    from factfind.localize.ablation import ablate_sets, ablate_sets_reference
    from factfind.types import Component, Role, Site

    data = facts.corrupt(gpt2_model, seed=0, on_missing="skip").clean[:4]
    sets = [[Site(Component.MLP_OUT, 0, position=Role.SUBJECT_LAST)],
            [Site(Component.Z, 1, head=2, position=Role.FINAL),
             Site(Component.NEURONS, 0, neuron=5)],
            [Site(Component.ATTN_OUT, layer) for layer in range(2)]]
    kw = dict(how=how, resamples=2, seed=0, pool=facts)
    fast = ablate_sets(gpt2_model, data, sets, batch_size=3, **kw)
    slow = ablate_sets_reference(gpt2_model, data, sets, **kw)
    _close(fast, slow, ["set", "prompt"])
    _close(fast, slow, ["set", "prompt"], col="correct", nonzero=0.5)


def test_effective_model_and_mean_ablation_identity(gpt2_model, facts):
    from factfind.localize.ablation import effective_model, mean_activations
    from factfind.types import Component

    df = effective_model(gpt2_model, facts)
    assert list(df["layer"]) == list(range(gpt2_model.n_layers + 1))
    # k = n_layers ablates nothing: accuracy equals the clean accuracy
    last = df.iloc[-1]
    assert last["accuracy"] == pytest.approx(last["clean_accuracy"])
    assert last["effect"] == pytest.approx(0.0, abs=1e-6)
    assert df["effect"].abs().max() > 1e-3
    means = mean_activations(gpt2_model, facts, [(Component.MLP_OUT, 0)], batch_size=5)
    assert means[(Component.MLP_OUT, 0)].shape == (6, gpt2_model.d_model)


def test_effective_model_with_a_single_answer_relation(gpt2_model, facts):
    """rome_known on SmolLM2: the known facts of a relation can share one answer; the
    metric then contrasts it with every relation's answers instead of crashing ('a row has no
    candidate other than its correct attribute')."""
    import dataclasses

    from factfind.data import FactDataset
    from factfind.localize.ablation import effective_model

    golf = [f for f in facts if f.attribute == "golf"]
    one = FactDataset([dataclasses.replace(f, relation="owns") for f in golf])
    mixed = one + FactDataset([f for f in facts if f.attribute != "golf"][:4])
    df = effective_model(gpt2_model, mixed)
    assert len(df) == gpt2_model.n_layers + 1 and df["effect"].notna().all()
    assert df["effect"].abs().max() > 0
