"""EAP and EAP-IG's one-pass receiver gradients on every family: fast == the per-receiver
reference (factfind.edges.eap_reference), and the attention recomputation they rest on
(factfind.model.attention) == the model's own z.

Families: every registered and derived one (tiny random configs, every parameter drawn, left
padding), plus variants with a sliding window shorter than every prompt (Mistral: 5 tokens on
every layer; Qwen2, Gemma 2, Gemma 3 and EXAONE 4: 3 tokens on the first layer of two, Gemma 3's
global layer with its own rotary base, EXAONE 4's with none).
"""

import numpy as np
import pytest
import torch

from factfind.edges import eap_grads
from factfind.edges.eap import _fast_path_unsupported, edge_attribution
from factfind.model.attention import AttentionMismatchError, layer_attention
from factfind.testing import models
from factfind.testing.models import DERIVED_FAMILIES, FAMILIES, tiny_model
from factfind.types import Component

WINDOWED = ("mistral", "qwen2", "gemma2", "gemma3", "exaone4")
VARIANTS = FAMILIES + DERIVED_FAMILIES + tuple(f"{f}+window" for f in WINDOWED)
WINDOW = {"mistral": 5}
"""Sliding windows of the ``+window`` variants (3 tokens where not listed; Mistral's is on both
layers, so a wider one lets the subject still reach the final token)."""


def variant_model(variant: str):
    """``tiny_model`` of a family, or of ``<family>+window``: its config with a 3-token
    sliding window (on the first of two layers where the family has layer types)."""
    family, _, window = variant.partition("+")
    if not window:
        return tiny_model(family)
    plain = models.tiny_config

    def config(*args, **kwargs):
        cfg = plain(*args, **kwargs)
        cfg.sliding_window = WINDOW.get(family, 3)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = ["sliding_attention", "full_attention"]
        return cfg

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "tiny_config", config)
        return tiny_model(family)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, facts):
    model = variant_model(request.param)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:5]
    return request.param, model, pairs


def test_recomputed_attention_is_the_models(variant):
    name, model, pairs = variant
    batch = model.tokenize(list(pairs.clean))
    assert not bool(batch.attention_mask.all())  # left padding
    L = model.n_layers
    run = model.run(batch, save=[(c, layer) for layer in range(L)
                                 for c in (Component.RESID_PRE, Component.Z)])
    real = batch.attention_mask.bool()[..., None, None]
    for layer in range(L):
        att = layer_attention(model, layer)
        saved = run.acts[(Component.Z, layer)]
        z = att.recompute(run.acts[(Component.RESID_PRE, layer)], batch.attention_mask,
                          batch.position_ids)
        top = float((saved * real).abs().max())
        assert top > 0.1
        assert float(((z - saved) * real).abs().max()) < 1e-5 * (1 + top)
        att.check(z, saved, batch.attention_mask)
        if name.endswith("+window") and att.window is not None:  # the window matters
            assert att.window == WINDOW.get(name.split("+")[0], 3) < batch.input_ids.shape[1]
            att.window = None
            wide = att.recompute(run.acts[(Component.RESID_PRE, layer)],
                                 batch.attention_mask, batch.position_ids)
            assert float(((wide - saved) * real).abs().max()) > 1e-3
            with pytest.raises(AttentionMismatchError, match=f"layer {layer}.*reference=True"):
                att.check(wide, saved, batch.attention_mask)
    if name == "exaone4+window":  # a global layer of a hybrid EXAONE 4: no rotary embedding
        att = layer_attention(model, 1)
        assert att.rope is None and layer_attention(model, 0).rope is not None
        # nor in the q and k sites (Model.run): they give the model's own pattern
        run = model.run(batch, save=[(c, 1) for c in (Component.Q, Component.K,
                                                      Component.PATTERN)])
        A, _ = att.pattern(run.acts[(Component.Q, 1)], run.acts[(Component.K, 1)],
                           batch.attention_mask)
        rows = batch.attention_mask.bool()
        torch.testing.assert_close(A.transpose(1, 2)[rows],
                                   run.acts[(Component.PATTERN, 1)].transpose(1, 2)[rows],
                                   atol=1e-5, rtol=1e-4)


def test_fast_equals_the_per_receiver_reference(variant, caplog, monkeypatch):
    """EAP and EAP-IG(3): the one-pass gradients (stacked points and one point per pass)
    against one detached copy of the batch per receiver, on non-zero values of every kind of
    receiver; the fast path is taken (no fallback)."""
    _, model, pairs = variant
    for steps in (0, 3):
        with caplog.at_level("DEBUG", logger="factfind.edges.eap"):
            caplog.clear()
            fast = edge_attribution(model, pairs, steps=steps, progress=False)
        assert "uses the one-pass receiver gradients" in caplog.text
        assert "reference" not in caplog.text
        slow = edge_attribution(model, pairs, steps=steps, reference=True, copies=256,
                                progress=False)
        for end in ("sender", "receiver"):
            assert list(fast[end]) == list(slow[end])
        top = np.abs(slow["effect"]).max()
        assert top > 0.05 and (np.abs(slow["effect"]) > 1e-3 * top).sum() > 50
        for kind in (r"\.h\d+@final", r"\.h\d+@subject_last", r"\.mlp@", "logits"):
            assert np.abs(slow.loc[slow["receiver"].str.contains(kind), "effect"]).max() > 1e-3
        np.testing.assert_allclose(fast["effect"], slow["effect"], rtol=1e-4, atol=1e-5 * top)
        if steps:
            monkeypatch.setattr(eap_grads, "STACK_ROWS", 1)
            single = edge_attribution(model, pairs, steps=steps, progress=False)
            monkeypatch.undo()
            np.testing.assert_allclose(single["effect"], slow["effect"], rtol=1e-4,
                                       atol=1e-5 * top)


@pytest.mark.parametrize("family", ["olmo2", "gpt2", "gemma2", "phi3", "gemma3"])
def test_head_pull_back_is_autograd_through_one_head(family, facts):
    """The hand-written linear half (projections, input norm, a whole-projection q/k norm's
    scale) summed over two points against autograd through one head's recomputed attention,
    per role and head: OLMo 2 given an input norm too (no family has both), GPT-2 (LayerNorm:
    centring, biases), Gemma 2 (softcap), Phi-3 (fused projections), Gemma 3 (q/k norms)."""
    model = tiny_model(family)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:4]
    batch = model.tokenize(list(pairs.clean))
    layer = 1
    x = model.run(batch, save=[(Component.RESID_PRE, layer)]).acts[(Component.RESID_PRE, layer)]
    cache: dict = {}
    att, _, _ = eap_grads._attention(model, layer, cache, torch.float32)
    if family == "olmo2":
        assert att.whole and not att.has_norm
        att.has_norm, att.eps = True, 1e-5
    g = torch.Generator().manual_seed(0)
    c, (B, P, d), H, e = 2, x.shape, model.n_heads, model.d_head
    xs = torch.cat([x, 0.5 * x + torch.randn(x.shape, generator=g)])  # two points
    keys, pos = batch.attention_mask.repeat(c, 1), batch.position_ids.repeat(c, 1)
    # zero at padding queries, as in a real run (their z feeds nothing)
    dz = torch.randn(c * B, P, H, e, generator=g) * keys[..., None, None]
    labels = torch.randint(0, 3, (B, P), generator=g)
    masks = torch.stack([labels == r for r in range(3)]).float()  # [R B P]
    z = att.recompute(xs, keys, pos)
    acc: dict = {}
    eap_grads._accumulate(model, layer, acc, xs, z, dz, masks.repeat(1, c, 1), keys.bool(),
                          pos, cache, 1 / c, c)
    got = eap_grads._project(model, layer, acc, masks, cache)  # [R H B P d]
    want = torch.zeros_like(got)
    for r in range(3):
        for h in range(H):
            xg = xs.clone().requires_grad_(True)
            out = att.recompute(xg, keys, pos)[..., h, :]
            cot = dz[..., h, :] * masks.repeat(1, c, 1)[r][..., None]
            (grad,) = torch.autograd.grad((out * cot).sum(), xg)
            want[r, h] = grad.reshape(c, B, P, d).mean(0)
    top = float(want.abs().max())
    assert top > 1e-2 and float((want.abs() > 1e-3 * top).float().mean()) > 0.3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * top)


def test_a_mismatch_falls_back_to_the_reference(facts, caplog, monkeypatch):
    """An attention the recomputation gets wrong (here: a softcap the model does not have) is
    caught and the call takes the exact per-receiver path instead, with a warning."""
    model = tiny_model("llama")
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:3]
    real = eap_grads.layer_attention

    def wrong(model, layer):
        att = real(model, layer)
        att.softcap = 1.0
        return att

    monkeypatch.setattr(eap_grads, "layer_attention", wrong)
    with caplog.at_level("WARNING", logger="factfind.edges.eap"):
        got = edge_attribution(model, pairs, steps=0, progress=False)
    assert "falls back to the per-receiver reference path" in caplog.text
    assert "layer 0" in caplog.text and "max error" in caplog.text
    slow = edge_attribution(model, pairs, steps=0, reference=True, progress=False)
    assert np.abs(slow["effect"]).max() > 1e-3
    np.testing.assert_array_equal(got["effect"], slow["effect"])


def test_bidirectional_attention_takes_the_reference(monkeypatch):
    model = tiny_model("gemma3")
    assert _fast_path_unsupported(model) is None
    monkeypatch.setattr(model.hf.config, "use_bidirectional_attention", True)
    assert _fast_path_unsupported(model) == "bidirectional attention"


@pytest.mark.real
@pytest.mark.slow
def test_gemma3_270m_recomputes_and_takes_the_fast_path(gemma3, caplog):
    """The real Gemma-3-270M (q/k norms, post norms, 5 local layers to 1 global with their own
    rotary bases): every layer's attention recomputes to the model's z, and EAP runs on the
    one-pass gradients."""
    from factfind.data import from_records

    facts = from_records([{"subject": s, "relation": "sport", "attribute": a,
                           "template": "Fact: {} plays the sport of"}
                          for s, a in (("Michael Jordan", "basketball"),
                                       ("Serena Williams", "tennis"))], name="two")
    model = gemma3
    batch = model.tokenize(list(facts))
    L = model.n_layers
    run = model.run(batch, save=[(c, layer) for layer in range(L)
                                 for c in (Component.RESID_PRE, Component.Z)])
    for layer in range(L):
        att = layer_attention(model, layer)
        att.check(att.recompute(run.acts[(Component.RESID_PRE, layer)], batch.attention_mask,
                                batch.position_ids), run.acts[(Component.Z, layer)],
                  batch.attention_mask)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    with caplog.at_level("DEBUG", logger="factfind.edges.eap"):
        df = edge_attribution(model, pairs, steps=0, progress=False)
    assert "one-pass" in caplog.text and "reference" not in caplog.text
    assert np.isfinite(df["effect"]).all() and np.abs(df["effect"]).max() > 1e-2
