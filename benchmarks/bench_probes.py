"""Linear probes on a real model (SmolLM2-135M, 30 layers): the batched Newton fit against one
L-BFGS fit per probe, as ratios measured in one run.

``linear_probes`` fits one logistic probe per relation × layer × role (60 per relation on a
30-layer model at two roles). The reference (``reference=True``) runs torch's L-BFGS on each
probe alone: about 70 tiny evaluations each, Python overhead, not arithmetic. The default fits
a relation's probes together by Newton's method over the span of the training rows
(:func:`factfind.localize.probing.fit_logistic_newton`). The facts are the known ones of
rome_known under the rank rule (a seeded shuffle scored until ``--n`` are known), as the
64-pair fact-finding run uses them. Printed: both times in forward-pass equivalents (FE: time /
one plain transformers forward of the same prompts), their ratio, the rows whose held-out
accuracy differs, and how many probes Newton fits at or below the reference's loss.
(Scoring the shuffle until 256 are known takes about a minute at one thread.)

    python -u benchmarks/bench_probes.py                  # 1 thread, 256 known facts
    python benchmarks/bench_probes.py --threads 0         # torch's default threads
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine
from bench_incremental import DEFAULT_MODEL, forward_time

import factfind as ff
from factfind.localize import probing


def known_facts(model: ff.Model, name: str, n: int, batch_size: int = 64) -> ff.FactDataset:
    """The first ``n`` facts of a seeded shuffle whose attribute is the model's top-1 token."""
    data = ff.load_facts(name)
    order = data.sample(len(data), seed=0)
    keep: list[ff.FactPrompt] = []
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        ranks = part.attribute_scores(model, batch_size=batch_size)["rank"].tolist()
        keep += [f for f, r in zip(part, ranks, strict=True) if r == 1]
        if len(keep) >= n:
            break
    return ff.FactDataset(keep[:n], name=f"{name}|known")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--facts", default="rome_known")
    parser.add_argument("--n", type=int, default=256, help="known facts probed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ff.load_model(args.model, device=args.device)
    facts = known_facts(model, args.facts, args.n)
    losses: list[tuple[float, float]] = []
    newton, lbfgs = probing.fit_logistic_newton, probing.fit_logistic

    def newton_recorded(x, y, n_classes, **kw):  # the loss of every probe, for the comparison
        w = newton(x, y, n_classes, **kw)
        ref = torch.stack([lbfgs(xp, y, n_classes, l2=kw.get("l2", 1e-3)) for xp in x])
        one_hot = torch.nn.functional.one_hot(y, n_classes).double()
        fb = torch.cat([x, torch.ones(*x.shape[:2], 1)], 2).double()
        for a, b in zip(probing._logistic_loss(fb, one_hot, w.double(), kw.get("l2", 1e-3)),
                        probing._logistic_loss(fb, one_hot, ref.double(), kw.get("l2", 1e-3)),
                        strict=True):
            losses.append((float(a), float(b)))
        return w

    t0 = time.perf_counter()
    fast = ff.linear_probes(model, facts)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = ff.linear_probes(model, facts, reference=True)
    t_slow = time.perf_counter() - t0
    probing.fit_logistic_newton = newton_recorded
    try:  # untimed: the losses of both fits of every probe
        ff.linear_probes(model, facts)
    finally:
        probing.fit_logistic_newton = newton
    # FE: one plain forward of the prompts linear_probes runs, batched as it batches them (by
    # relation, 64 at a time; relations too small to split are never run)
    probed = [facts.by_relation(r) for r in fast["relation"].unique()]
    fe = sum(forward_time(model, model.tokenize(list(d[i:i + 64])), n=3)
             for d in probed for i in range(0, len(d), 64))
    print(f"machine: {machine()}; device {args.device}; {model.name} ({model.n_layers} layers); "
          f"{len(facts)} known facts of {args.facts} in {len(facts.relations)} relations, "
          f"{sum(len(d) for d in probed)} of them in the probed ones; one plain forward of those "
          f"{fe * 1e3:.0f} ms")
    differ = int((fast["effect"].to_numpy() != slow["effect"].to_numpy()).sum())
    below = sum(a <= b + 1e-12 for a, b in losses)
    print(f"linear probes ({len(fast)} probes, {fast['relation'].nunique()} relations): "
          f"Newton {t_fast:.1f} s = {t_fast / fe:.1f} FE; L-BFGS per probe {t_slow:.1f} s = "
          f"{t_slow / fe:.1f} FE; {t_slow / t_fast:.1f}x; held-out accuracy differs in {differ} "
          f"of {len(fast)} rows; Newton's loss <= L-BFGS's in {below} of {len(losses)} probes "
          f"(largest excess {max(a - b for a, b in losses):.1e})")


if __name__ == "__main__":
    main()
