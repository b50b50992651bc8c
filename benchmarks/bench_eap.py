"""EAP-IG on a real model: one batch of fact pairs, in forward-pass equivalents (FE).

FE = the time of ``edge_attribution(model, pairs, steps=m)`` ÷ one plain forward of the same
clean prompts through transformers (``no_grad``, ``logits_to_keep=1``), both timed in this run.
Goal (issue 16): EAP-IG(5) ≤ 30 FE per batch. The receiver gradients come from one forward and
backward per integration point (:mod:`factfind.edges.eap_grads`); the old way, one detached copy of
the batch per receiver (:mod:`factfind.edges.eap_reference`, ``reference=True``), is timed too, with
``--old-layers`` of the model's layers kept (its cost grows with layers x heads x roles, so on
all 30 layers of SmolLM2 it takes ~20 minutes) and the two results compared.

    python benchmarks/bench_eap.py            # SmolLM2-135M if present; 1 thread, then default
    python benchmarks/bench_eap.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from datetime import date
from typing import Any

import numpy as np
import torch
from _common import machine

import factfind as ff
from factfind.edges.eap import edge_attribution

SMOLLM2 = "/work/models/smollm2-135m"
ATHLETES = {
    "Michael Jordan": "basketball", "Serena Williams": "tennis", "Lionel Messi": "football",
    "Roger Federer": "tennis", "LeBron James": "basketball", "Tom Brady": "football",
    "Wayne Gretzky": "hockey", "Babe Ruth": "baseball", "Phil Mickelson": "golf",
    "Rafael Nadal": "tennis", "Kobe Bryant": "basketball", "Cristiano Ronaldo": "football",
}
PREFIX, TEMPLATE = "Fact: Tiger Woods plays the sport of golf\n", "Fact: {} plays the sport of"


def pairs_for(model: ff.Model, n: int):
    """``n`` clean/corrupt pairs of one token length (an athlete swapped for another)."""
    facts = ff.from_records([{"subject": s, "relation": "sport", "template": TEMPLATE,
                              "prefix": PREFIX, "attribute": a} for s, a in ATHLETES.items()],
                            name="athletes")
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    lengths = model.tokenize(list(pairs.clean)).lengths
    keep = [i for i in range(len(pairs)) if lengths[i] == int(lengths.max())]
    if len(keep) < n:
        keep = [i for i in range(len(pairs)) if lengths[i] == int(np.bincount(lengths).argmax())]
    from factfind.data.pairs import FactPairs

    return FactPairs(ff.FactDataset([pairs.clean[i] for i in keep[:n]]),
                     ff.FactDataset([pairs.corrupt[i] for i in keep[:n]]))


def forward_time(model: ff.Model, pairs, reps: int = 7) -> tuple[float, float]:
    """Best wall and CPU time of one plain transformers forward of the clean prompts."""
    batch = model.tokenize(list(pairs.clean))
    enc = {"input_ids": batch.input_ids.to(model.device),
           "attention_mask": batch.attention_mask.to(model.device)}
    with torch.no_grad():
        return timed(lambda: (model.hf(**enc, logits_to_keep=1, use_cache=False),
                              sync(model)), reps)[:2]


def sync(model: ff.Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 1) -> tuple[float, float, Any]:
    """Best wall time, best process CPU time (less disturbed by other jobs on a shared machine;
    with several threads it sums them) and the last result of ``reps`` calls."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu, out


def truncated(model: ff.Model, n_layers: int) -> ff.Model:
    """The same model with only its first ``n_layers`` blocks (real weights, shared)."""
    from factfind.model.architectures import _get

    hf = copy.copy(model.hf)
    hf.__dict__["_modules"] = dict(hf._modules)
    parent, name = model.spec.blocks.rsplit(".", 1)
    base = copy.copy(_get(hf, parent))
    base.__dict__["_modules"] = dict(base._modules)
    setattr(base, name, torch.nn.ModuleList(list(_get(model.hf, model.spec.blocks))[:n_layers]))
    setattr(hf, parent.split(".")[-1], base)
    hf.config = copy.deepcopy(model.hf.config)
    hf.config.num_hidden_layers = n_layers
    return ff.load_model((hf, model.tokenizer))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default=SMOLLM2 if os.path.isdir(SMOLLM2) else "tiny-llama",
                    help="a path or name for factfind.load_model (default: SmolLM2-135M)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--pairs", type=int, default=4, help="pairs in the batch")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG integration points")
    ap.add_argument("--threads", default="1,0", help="comma-separated; 0 = torch's default")
    ap.add_argument("--reps", type=int, default=2, help="timed runs (the best is kept)")
    ap.add_argument("--old-layers", type=int, default=2,
                    help="layers kept for the old-vs-new comparison (0: skip it)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    if args.model == "tiny-llama":
        from factfind.testing.models import tiny_model

        model = tiny_model("llama", n_layers=4, d_model=128)
    else:
        model = ff.load_model(args.model, device=args.device, dtype=torch.float32)
    pairs = pairs_for(model, args.pairs)
    P = model.tokenize(list(pairs.clean)).input_ids.shape[1]
    print(f"{date.today()}  model: {args.model} ({model.n_layers} layers, {model.n_heads} heads, "
          f"{model.n_kv_heads} kv heads), device {args.device}; {len(pairs)} pairs x {P} tokens, "
          f"e.g. {pairs.clean[0].prompt!r}")
    small = model
    if 0 < args.old_layers < model.n_layers:
        small = truncated(model, args.old_layers)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads or default_threads)
        fwd, fwd_cpu = forward_time(model, pairs)
        edge_attribution(model, pairs[:1], steps=1)  # warm-up
        t_ig, c_ig, df = timed(lambda: edge_attribution(model, pairs, steps=args.steps,
                                                        batch_size=len(pairs)), args.reps)
        t_eap, c_eap, _ = timed(lambda: edge_attribution(model, pairs, batch_size=len(pairs)),
                                args.reps)
        fwd2, fwd2_cpu = forward_time(model, pairs)  # again: the load may have changed
        fwd, fwd_cpu = min(fwd, fwd2), min(fwd_cpu, fwd2_cpu)
        print(f"[{machine()}] forward {fwd * 1e3:.0f} ms (CPU {fwd_cpu * 1e3:.0f} ms); "
              f"EAP-IG({args.steps}) {t_ig:.2f} s = {t_ig / fwd:.1f} FE (CPU time: "
              f"{c_ig / fwd_cpu:.1f} FE; {len(df):,} edges, max |effect| "
              f"{df['effect'].abs().max():.3g}); EAP {t_eap:.2f} s = {t_eap / fwd:.1f} FE "
              f"(CPU time: {c_eap / fwd_cpu:.1f} FE)")
        if args.old_layers and threads == int(args.threads.split(",")[0]):
            compare_old(small, pairs)  # once: the old path takes minutes


def compare_old(small: ff.Model, pairs) -> None:
    """EAP-IG(1) by the old per-receiver copies and by the one-pass gradients, same model."""
    fwd, _ = forward_time(small, pairs)
    t_new, _, a = timed(lambda: edge_attribution(small, pairs, steps=1, batch_size=len(pairs)),
                        2)
    t_old, _, b = timed(lambda: edge_attribution(small, pairs, steps=1, reference=True,
                                                 batch_size=len(pairs), copies=64))
    diff = float(np.abs(a["score"].to_numpy() - b["score"].to_numpy()).max())
    print(f"  old vs new, first {small.n_layers} layers, EAP-IG(1): old {t_old:.2f} s = "
          f"{t_old / fwd:.0f} FE, new {t_new:.2f} s = {t_new / fwd:.1f} FE, "
          f"{t_old / t_new:.0f}x; max |new - old| {diff:.2g} "
          f"(max |score| {b['score'].abs().max():.3g})")


if __name__ == "__main__":
    main()
