"""Activation-patching sweep: factfind (sites stacked in one forward) vs TransformerLens (one
forward per site), same GPT-2 weights and prompts; prints the speed ratio measured in one run.

    python benchmarks/bench_patching.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from _common import best_of, machine

import factfind as ff
from factfind.data.batch import encode_pairs
from factfind.testing.models import tiny_hf_model, tiny_tokenizer


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; ratios are single-threaded
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    hf = tiny_hf_model("gpt2", len(tok), n_layers=4, d_model=128, n_heads=4)
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    model = ff.load_model(path)
    bridge = TransformerBridge.boot_transformers(path, tokenizer=AutoTokenizer.from_pretrained(
        path), hf_model=hf)
    names = [f"{a} {b}" for a in ("Michael", "Tiger", "Serena", "Lionel", "Zoë", "Beats")
             for b in ("Jordan", "Woods", "Williams", "Messi", "Music", "Tower")]
    facts = ff.from_records([{"subject": n, "relation": "sport", "attribute": s,
                              "template": "Fact: {} plays the sport of"}
                             for n, s in zip(names, ["basketball", "golf", "tennis",
                                                     "football"] * 9, strict=False)])
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    pb = encode_pairs(model, pairs)
    lengths = pb.clean.attention_mask.sum(-1)
    keep = (lengths == lengths.mode().values).nonzero()[:, 0].tolist()[:16]
    pairs = pairs[keep[0]:keep[0]] if not keep else type(pairs)(
        ff.FactDataset([pairs.clean[i] for i in keep]),
        ff.FactDataset([pairs.corrupt[i] for i in keep]))
    pb = encode_pairs(model, pairs)
    n_pos = pb.clean.input_ids.shape[1]
    correct, wrong = pb.correct, pb.wrong

    def metric(logits):
        return (logits[:, -1].gather(-1, correct[:, None]) - logits[:, -1].gather(
            -1, wrong[:, None])).mean()

    _, cache = bridge.run_with_cache(pb.clean.input_ids)
    comps = ["resid_pre", "attn_out", "mlp_out"]

    def tl_sweep():
        return [patching.get_act_patch_resid_pre(bridge, pb.corrupt.input_ids, cache, metric),
                patching.get_act_patch_attn_out(bridge, pb.corrupt.input_ids, cache, metric),
                patching.get_act_patch_mlp_out(bridge, pb.corrupt.input_ids, cache, metric)]

    def ff_sweep():
        return ff.activation_patching(model, pairs, components=comps,
                                      positions=list(range(n_pos)), batch_size=len(pairs),
                                      progress=False)

    theirs = tl_sweep()
    ours = ff_sweep()
    got = ours.groupby(["component", "layer", "position"], sort=False)["metric"].mean()
    for comp, t in zip(comps, theirs, strict=True):
        mine = got[comp].to_numpy().reshape(t.shape)
        assert np.allclose(mine, t.detach().numpy(), atol=1e-4), comp
    t_tl = best_of(tl_sweep)
    t_ff = best_of(ff_sweep)
    n_sites = 3 * model.n_layers * n_pos
    print(f"machine: {machine()}")
    print(f"sweep: {n_sites} sites (resid_pre, attn_out, mlp_out x {model.n_layers} layers x "
          f"{n_pos} positions), {len(pairs)} prompt pairs, GPT-2 4L d128; results agree (1e-4)")
    print(f"TransformerLens: {t_tl:.3f}s   factfind: {t_ff:.3f}s   "
          f"ratio TL/factfind = {t_tl / t_ff:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
