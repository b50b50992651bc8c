"""Peer parity: activation patching equals TransformerLens `patching` on the same GPT-2 weights."""

import numpy as np
import pytest
import torch

from factfind.model import load_model
from factfind.patching import activation_patching, encode_pairs
from factfind.testing import tiny_hf_model, tiny_tokenizer

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
