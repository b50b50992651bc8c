"""Peer parity with TransformerLens on the same GPT-2 weights: activation patching equals its
`patching` sweeps, and direct logit attribution its `logit_attrs` per head and per MLP layer."""

import numpy as np
import pytest
import torch

from factfind.data.batch import encode_pairs
from factfind.localize.dla import direct_logit_attribution
from factfind.localize.patching import activation_patching
from factfind.model import load_model
from factfind.testing.models import tiny_hf_model, tiny_tokenizer

tl = pytest.importorskip("transformer_lens")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, facts):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("gpt2")
    tok = tiny_tokenizer()
    hf = tiny_hf_model("gpt2", len(tok), seed=5)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    model = load_model(path)
    bridge = TransformerBridge.boot_transformers(str(path), tokenizer=AutoTokenizer.from_pretrained(
        path), hf_model=hf)
    pairs = facts.corrupt(model, seed=1, on_missing="skip")[:2]
    return model, bridge, pairs


COMPONENTS = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn_out": "get_act_patch_attn_out",
    "mlp_out": "get_act_patch_mlp_out",
    "z": "get_act_patch_attn_head_out_by_pos",
}


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_activation_patching_matches_transformer_lens(setup, component):
    from transformer_lens import patching

    model, bridge, pairs = setup
    for i in range(len(pairs)):
        pb = encode_pairs(model, pairs[i:i + 1])
        clean, corrupt = pb.clean.input_ids, pb.corrupt.input_ids
        correct, wrong = int(pb.correct[0]), int(pb.wrong[0])

        def metric(logits, correct=correct, wrong=wrong):
            return logits[0, -1, correct] - logits[0, -1, wrong]

        _, cache = bridge.run_with_cache(clean)
        theirs = getattr(patching, COMPONENTS[component])(bridge, corrupt, cache, metric)
        n_pos = clean.shape[1]
        ours = activation_patching(model, pairs[i:i + 1], components=[component],
                                   positions=list(range(n_pos)), progress=False)
        if component == "z":  # TL: [layer pos head]
            got = ours.set_index(["layer", "position", "head"])["metric"].sort_index()
            want = theirs.detach().numpy().reshape(-1)
        else:  # TL: [layer pos]
            got = ours.set_index(["layer", "position"])["metric"].sort_index()
            want = theirs.detach().numpy().reshape(-1)
        assert np.abs(want).max() > 1e-2
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-4, rtol=1e-4)
        # and the logits of the unpatched model agree
        torch.testing.assert_close(bridge(clean)[0, -1], model.run(pb.clean).logits[0],
                                   atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def folded(tmp_path_factory, facts):
    """Our model and a TransformerLens bridge over a *separate* copy of the same GPT-2 weights,
    with the final LayerNorm's gain folded into ``W_U`` (TL's ``logit_attrs`` reads ``W_U``;
    folding mutates the module it wraps) and nothing else processed: no centring, value biases
    left in place, so per-head results are ``z @ W_O`` as ours are."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("gpt2-dla")
    tok = tiny_tokenizer()
    tiny_hf_model("gpt2", len(tok), seed=7).save_pretrained(path)
    tok.save_pretrained(path)
    model = load_model(path)
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(str(path), tokenizer=AutoTokenizer.from_pretrained(
        path), hf_model=hf)
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True,
                                     center_writing_weights=False, center_unembed=False,
                                     fold_value_biases=False)
    assert model.hf is not hf
    return model, bridge, facts.corrupt(model, seed=1, on_missing="skip")[:3]


@pytest.mark.parametrize("paired", [True, False])
def test_dla_matches_transformer_lens(folded, paired):
    """Direct logit attribution per head and per MLP layer equals TL's ``logit_attrs`` of
    ``cache.stack_head_results`` / ``cache.decompose_resid`` (final LayerNorm scale frozen at
    its cached value), on the logit difference (pairs) or the correct logit (facts)."""
    model, bridge, pairs = folded
    data = pairs if paired else pairs.clean
    ours = direct_logit_attribution(model, data, neurons=False, sources=False)
    L, H = model.n_layers, model.n_heads
    for i in range(len(pairs)):
        pb = encode_pairs(model, pairs[i:i + 1])
        _, cache = bridge.run_with_cache(pb.clean.input_ids)
        kw = dict(tokens=pb.correct, incorrect_tokens=pb.wrong if paired else None, pos_slice=-1)
        heads = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), **kw)
        resid, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
        parts = dict(zip(labels, cache.logit_attrs(resid, **kw)[:, 0].detach(), strict=True))
        mine = ours[ours["prompt"] == i].set_index(["component", "layer", "head"])["effect"]
        got = mine.loc["head_out"].sort_index().to_numpy()
        want = heads[:, 0].detach().numpy()
        assert got.shape == (L * H,) and np.abs(want).max() > 1e-2
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        got = mine.loc["mlp_out"].sort_index().to_numpy()
        want = np.array([float(parts[f"{layer}_mlp_out"]) for layer in range(L)])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        embed = float(parts["embed"] + parts["pos_embed"])
        assert float(mine.loc["embed"].iloc[0]) == pytest.approx(embed, abs=1e-4)
