"""AtP*'s GradDrop on a real model (SmolLM2-135M, 30 layers, GQA): one retained graph against
the literal recipe, as ratios measured in one run.

GradDrop needs, for every layer ``l``, the gradient with layer ``l``'s attention and MLP writes
blocked. The literal recipe (``estimate(..., reference=True)``) runs one detached forward and
backward per layer; factfind's default takes one forward and one backward, then per layer a
vector-Jacobian product from ``resid_pre[l]`` down (:mod:`factfind.attribute.atp`). Printed:
the time of each in forward-pass equivalents (FE: time / one plain transformers forward of the
same clean prompts), their ratio, and the largest difference of the GradDrop scores.

    python -u benchmarks/bench_graddrop.py                 # 1 thread, 8 pairs
    python benchmarks/bench_graddrop.py --threads 0        # torch's default threads
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine
from bench_incremental import DEFAULT_MODEL, forward_time, same_length_pairs

import factfind as ff
from factfind.data.batch import encode_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ff.load_model(args.model, device=args.device)
    pairs = same_length_pairs(model, args.pairs)
    pb = encode_pairs(model, pairs)
    fe = forward_time(model, pb.clean, n=11)
    print(f"machine: {machine()}; device {args.device}; {model.name} ({model.n_layers} layers); "
          f"{len(pairs)} pairs x {pb.clean.input_ids.shape[1]} tokens; one plain forward "
          f"{fe * 1e3:.1f} ms")
    for comps, roles in ((["neurons"], ["subject_first", "subject_last"]),
                         (["head_out", "q", "k", "v"], list(ff.DEFAULT_ROLES))):
        kw = dict(components=comps, positions=roles, qk_fix=True, grad_drop=True,
                  batch_size=len(pairs), progress=False)
        t0 = time.perf_counter()
        fast = ff.estimate(model, pairs, **kw)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = ff.estimate(model, pairs, reference=True, **kw)
        t_slow = time.perf_counter() - t0
        assert fast.grad_drop is not None and slow.grad_drop is not None
        diff = (fast.grad_drop - slow.grad_drop).abs().max().item()
        top = slow.grad_drop.abs().max().item()
        print(f"AtP* {'+'.join(comps)} at {len(roles)} roles ({len(fast.index):,} nodes): "
              f"one graph {t_fast:.1f} s = {t_fast / fe:.0f} FE; a pass per layer "
              f"{t_slow:.1f} s = {t_slow / fe:.0f} FE; {t_slow / t_fast:.2f}x; GradDrop max "
              f"|diff| {diff:.1e} (max {top:.2e})")


if __name__ == "__main__":
    main()
