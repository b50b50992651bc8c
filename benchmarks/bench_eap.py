"""EAP-IG on a real model: one batch of fact pairs, in forward-pass equivalents (FE).

FE = the time of ``edge_attribution(model, pairs, steps=m)`` ÷ one plain forward of the same
clean prompts through transformers (``no_grad``, ``logits_to_keep=1``), both timed in this run.
Goal (issues 16, 25): EAP-IG(5) ≤ 30 FE per batch, on every family. The receiver gradients come
from one forward and backward per integration point (:mod:`factfind.edges.eap_grads`); the old
way, one detached copy of the batch per receiver (:mod:`factfind.edges.eap_reference`,
``reference=True``), is timed too, with ``--old-layers`` of the model's layers kept (its cost
grows with layers x heads x roles, so on all 30 layers of SmolLM2 it takes ~20 minutes) and the
two results compared.

``--models`` runs the families side by side (issue 25): SmolLM2-135M, Gemma-3-270M (q/k norms,
post norms, sliding-window layers) and ``qwen3-shaped`` (Qwen3-0.6B's 28 layers and 16 / 8 heads
with q/k norms, widths / 4, random weights), each on 2 of Fact Finding's athlete pairs
(``bench_families.athlete_pairs``), at the first of ``--threads``; one line per model and a table.

    python benchmarks/bench_eap.py            # SmolLM2-135M if present; 1 thread, then default
    python -u benchmarks/bench_eap.py --models smollm2-135m,gemma-3-270m,qwen3-shaped --threads 1
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
    ap.add_argument("--models", default="", help="comma-separated: the families side by side "
                    "(smollm2-135m, gemma-3-270m, qwen3-shaped; 2 athlete pairs each)")
    args = ap.parse_args()
    default_threads = torch.get_num_threads()
    if args.models:
        families(args)
        return
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
        print(f"[{machine()}]")
        measure(model, pairs, args.steps, args.reps)
        if args.old_layers and threads == int(args.threads.split(",")[0]):
            compare_old(small, pairs)  # once: the old path takes minutes


def compare_old(small: ff.Model, pairs) -> dict[str, float]:
    """EAP-IG(1) by the old per-receiver copies and by the one-pass gradients, same model."""
    fwd, _ = forward_time(small, pairs)
    t_new, _, a = timed(lambda: edge_attribution(small, pairs, steps=1, batch_size=len(pairs),
                                                 progress=False), 2)
    t_old, _, b = timed(lambda: edge_attribution(small, pairs, steps=1, reference=True,
                                                 batch_size=len(pairs), copies=64,
                                                 progress=False))
    diff = float(np.abs(a["effect"].to_numpy() - b["effect"].to_numpy()).max())
    top = float(b["effect"].abs().max())
    print(f"  old vs new, first {small.n_layers} layers, EAP-IG(1): old {t_old:.2f} s = "
          f"{t_old / fwd:.0f} FE, new {t_new:.2f} s = {t_new / fwd:.1f} FE, "
          f"{t_old / t_new:.0f}x; max |new - old| {diff:.2g} (max |effect| {top:.3g})")
    return {"old_fe": t_old / fwd, "new_fe": t_new / fwd, "max_diff": diff, "max_effect": top}


def measure(model: ff.Model, pairs, steps: int, reps: int) -> dict[str, float]:
    """One model's EAP-IG(``steps``) and EAP in FE (wall and process CPU time)."""
    fwd, fwd_cpu = forward_time(model, pairs)
    edge_attribution(model, pairs[:1], steps=1, progress=False)  # warm-up
    t_ig, c_ig, df = timed(lambda: edge_attribution(
        model, pairs, steps=steps, batch_size=len(pairs), progress=False), reps)
    t_eap, c_eap, _ = timed(lambda: edge_attribution(
        model, pairs, batch_size=len(pairs), progress=False), reps)
    fwd2, fwd2_cpu = forward_time(model, pairs)  # again: the load may have changed
    fwd, fwd_cpu = min(fwd, fwd2), min(fwd_cpu, fwd2_cpu)
    print(f"  forward {fwd * 1e3:.0f} ms (CPU {fwd_cpu * 1e3:.0f} ms); EAP-IG({steps}) "
          f"{t_ig:.2f} s = {t_ig / fwd:.1f} FE (CPU time {c_ig / fwd_cpu:.1f} FE); EAP "
          f"{t_eap / fwd:.1f} FE (CPU {c_eap / fwd_cpu:.1f} FE); {len(df):,} edges", flush=True)
    return {"forward_ms": fwd * 1e3, f"eap_ig{steps}_fe": t_ig / fwd,
            f"eap_ig{steps}_cpu_fe": c_ig / fwd_cpu, "eap_fe": t_eap / fwd,
            "eap_cpu_fe": c_eap / fwd_cpu, "edges": len(df)}


def families(args: argparse.Namespace) -> None:
    """``--models``: EAP-IG(``--steps``) and EAP on each model, one table (see the module doc)."""
    import pandas as pd
    from bench_families import athlete_pairs, load

    torch.set_num_threads(int(args.threads.split(",")[0]) or torch.get_num_threads())
    load_start = os.getloadavg()
    smollm2 = ff.load_model("smollm2-135m")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        model = smollm2 if name == "smollm2-135m" else load(name, smollm2.tokenizer)
        pairs = athlete_pairs(model, args.pairs, known=name != "qwen3-shaped")
        P = model.tokenize(list(pairs.clean)).input_ids.shape[1]
        print(f"{name}: {model.n_layers} layers, {model.n_heads} q / {model.n_kv_heads} kv "
              f"heads, d_head {model.d_head}; {len(pairs)} pairs x {P} tokens", flush=True)
        row = {"model": name, **measure(model, pairs, args.steps, args.reps)}
        if 0 < args.old_layers < model.n_layers:
            old = compare_old(truncated(model, args.old_layers), pairs)
            row.update({f"reference_{args.old_layers}_layers_fe": old["old_fe"],
                        f"fast_{args.old_layers}_layers_fe": old["new_fe"],
                        "max_abs_diff": old["max_diff"], "max_abs_effect": old["max_effect"]})
        rows.append(row)
    table = pd.DataFrame(rows).set_index("model").T
    load_end = os.getloadavg()
    print(f"{date.today()}; {machine()}; load average {load_start[0]:.2f} at the start, "
          f"{load_end[0]:.2f} at the end; target EAP-IG(5) <= 30 FE")
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
