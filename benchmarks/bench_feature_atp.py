"""Feature AtP over every feature of every layer, in FE (time ÷ one plain forward), per model.

For one batch of clean/corrupt pairs per model, with the model's **default dictionaries** (the
set ``analyses/dictionaries.py`` and the fact-finding run's features step use: a TopK skip
transcoder at every layer, 4 x d_model wide, k 32, read from ``$FACTFIND_CACHE/dictionaries``),
this times, in one run, the FE unit and ``feature_atp`` side by side, in wall and in CPU time
(the process's; on a shared machine less hit by the others than wall time), each the best of
``--repeats`` or more (small models run more: ~1 s of AtP), alternating, so a change of load
hits both:

1. one plain forward of the batch's clean prompts (``Model.run``, the FE unit);
2. ``feature_atp`` (AtP: one base forward + backward and one source forward of the plain model,
   the encoders at the roles' positions, sparse scores over the active features, the tidy
   frame) - goal <= 5 FE per batch - and its parts in CPU time, from timers wrapped around
   the module's steps: the base run (forward + backward), the source run, the encoders
   (every dictionary's encoder product, top-k and error decode), the scoring (the rest of the
   batch: gathers, ``g @ W_dec^T``, the sums into nodes) and the frame (the rest: checks,
   role masks, the tidy frame);
3. ``feature_atp(reference=True)`` once (the literal recipe: every dictionary spliced in,
   autograd with respect to every feature activation and error term, dense), and the largest
   difference between the two;
4. with ``--ig``, ``feature_atp(steps=10)`` (IG: 10 stacked points per written site).

Models: the shipped organism (16 known sport pairs; its default set is trained here in ~10 s
the first time, as the features step would), SmolLM2-135M and Gemma-3-270M (bench_eap's athlete
pairs of one token length). A real model whose default set is not cached is skipped with a
note, never trained here (``python analyses/dictionaries.py --model NAME`` trains it).

    python benchmarks/bench_feature_atp.py                       # 1 thread, all three
    python benchmarks/bench_feature_atp.py --models organism --ig

Measured (1 thread, shared 2-core machine, load 4.5 at the start and 4.0 at the end; FE per
batch, wall / CPU): organism 16 x 15 tokens 4.69 / 4.17, SmolLM2-135M 6 x 20 3.58 / 3.51,
Gemma-3-270M 10 x 19 3.06 / 2.78; the model's runs 2.8-3.0 CPU FE of it; fast == reference
within 2.5e-8 (largest |effect| 2.1-2.6). The fast path before this table (the same run, CPU
FE): 5.15, 3.69, 3.36, and 2e-3 to 1e-2 off the reference (TopK entries of value 0 counted
twice).
"""

from __future__ import annotations

import argparse
import os
import runpy
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import cached_default_dictionaries, known_pairs, machine

import factfind as ff
import factfind.features.attribution as attribution
from factfind.features import Dictionaries
from factfind.features.attribution import DEFAULT_IG_STEPS

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("base fwd+bwd", "source fwd", "encoders", "scoring", "frame")


def default_dictionaries(model: Any, name: str) -> tuple[Dictionaries | None, str]:
    """The model's default set. The organism: ``analyses/dictionaries.py``'s recipe (its
    corpus, split and training call, as the features step runs it: loaded from the cache, or
    trained in ~10 s the first time). A real model: a cached set of the default configuration
    for this model's fingerprint, else ``None`` (training one takes ~30 min)."""
    if name == "organism":
        script = runpy.run_path(str(ROOT / "analyses" / "dictionaries.py"),
                                run_name="dictionaries_steps")
        cfg = script["Config"](model="organism")
        train, _ = script["corpus_for"](model, cfg).split(cfg.held_out, seed=cfg.seed)
        t = time.perf_counter()
        dicts = ff.train_dictionaries(model, train, kind=cfg.kind, width=cfg.width, k=cfg.k,
                                      tokens=cfg.tokens, epochs=cfg.epochs, seed=cfg.seed,
                                      progress=False)
        return dicts, ("cached" if dicts.meta.get("loaded_from_cache") else
                       f"trained in {time.perf_counter() - t:.0f} s")
    dicts = cached_default_dictionaries(model)
    if dicts is not None:
        return dicts, "cached"
    return None, "no cached default set"


def models(which: list[str], n_pairs: int) -> list[tuple[str, Any, Any]]:
    out = []
    for name in which:
        model = ff.load_model(name)
        if name == "organism":
            pairs = known_pairs(model, ff.load_facts("organism:sport"), n_pairs)
        else:
            from bench_eap import pairs_for

            pairs = pairs_for(model, n_pairs)
        out.append((name, model, ff.encode_pairs(model, pairs)))
    return out


class Timers:
    """CPU time spent in ``model.run`` (base: with a metric; source: without), in
    ``attribution._active`` (the encoders), ``_fast_batch`` and ``_finish`` while on."""

    def __init__(self, model: Any) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.model = model
        self.saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, label: Callable[[dict[str, Any]], str]) -> None:
        fn = getattr(owner, attr)
        self.saved.append((owner, attr, fn))

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.process_time()
            out = fn(*args, **kwargs)
            self.t[label(kwargs)] += time.process_time() - t
            return out

        setattr(owner, attr, timed)

    def __enter__(self) -> Timers:
        self._wrap(self.model, "run",
                   lambda kw: "base fwd+bwd" if kw.get("metric") else "source fwd")
        self._wrap(attribution, "_active", lambda kw: "encoders")
        self._wrap(attribution, "_fast_batch", lambda kw: "batch")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, fn in reversed(self.saved):
            if owner is self.model:
                delattr(owner, attr)  # back to the class's method
            else:
                setattr(owner, attr, fn)

    def parts(self, total: float) -> dict[str, float]:
        t = dict(self.t)
        runs = t["base fwd+bwd"] + t["source fwd"]
        return {"base fwd+bwd": t["base fwd+bwd"], "source fwd": t["source fwd"],
                "encoders": t["encoders"], "scoring": t["batch"] - runs - t["encoders"],
                "frame": total - t["batch"]}


def measure(name: str, model: Any, pb: Any, dicts: Dictionaries, args: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"batch_size": len(pb), "progress": False}
    model.run(pb.clean)
    ff.feature_atp(model, pb, dicts, **kw)  # warm-up
    t = time.perf_counter()
    ff.feature_atp(model, pb, dicts, **kw)
    # at least ~1 s of AtP per model: the minimum of a few ms-long runs on a loaded machine
    # needs more tries than that of second-long ones
    repeats = max(args.repeats, min(40, int(1.0 / (time.perf_counter() - t))))
    fwd, fwd_cpu, atp, atp_cpu = [], [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        model.run(pb.clean)
        fwd.append(time.perf_counter() - t)
        fwd_cpu.append(time.process_time() - c)
        with Timers(model) as timers:
            t, c = time.perf_counter(), time.process_time()
            est = ff.feature_atp(model, pb, dicts, **kw)
            atp.append(time.perf_counter() - t)
            total = time.process_time() - c
        atp_cpu.append((total, timers.parts(total)))
    t_fwd, c_fwd = min(fwd), min(fwd_cpu)
    c_atp, parts = min(atp_cpu, key=lambda x: x[0])
    ref = ff.feature_atp(model, pb, dicts, reference=True, **kw)
    both = est.merge(ref, on="node", suffixes=("", "_ref"))
    row = {"model": name, "shape": f"{len(pb)}x{pb.clean.input_ids.shape[1]}",
           "dicts": f"{len(dicts)}x{next(iter(dicts.values())).d_sae}",
           "fwd_ms": t_fwd * 1e3, "fe": min(atp) / t_fwd, "fe_cpu": c_atp / c_fwd,
           **{p: parts[p] / c_fwd for p in PARTS},
           "diff": float(np.abs(both["effect"] - both["effect_ref"]).max()),
           "scale": float(ref["effect"].abs().to_numpy().max()),
           "same_nodes": set(est["node"]) == set(ref["node"]), "ig": float("nan")}
    if args.ig:
        t = time.perf_counter()
        ff.feature_atp(model, pb, dicts, steps=DEFAULT_IG_STEPS, **kw)
        row["ig"] = (time.perf_counter() - t) / t_fwd
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="organism,smollm2-135m,gemma-3-270m")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5,
                        help="at least; small models get more (~1 s of AtP)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ig", action="store_true",
                        help=f"time IG ({DEFAULT_IG_STEPS} steps) too: slow on deep models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    rows, notes = [], []
    for name, model, pb in models(args.models.split(","), args.pairs):
        dicts, source = default_dictionaries(model, name)
        if dicts is None:
            notes.append(f"{name}: skipped ({source}; python analyses/dictionaries.py "
                         f"--model {name} trains it)")
            continue
        notes.append(f"{name}: default dictionaries {source}")
        rows.append(measure(name, model, pb, dicts, args))
    load1 = os.getloadavg()[0]
    print(f"{machine()}; load average {load0:.1f} at the start, {load1:.1f} at the end")
    print("feature AtP per batch, in FE (one plain forward of the batch's clean prompts), best "
          f"of >= {args.repeats}: wall time, and CPU time (less hit by other processes on a "
          "shared machine); the parts in CPU FE")
    head = (f"{'model':<14} {'pairs x tok':>11} {'dicts':>8} {'fwd ms':>7} {'AtP FE':>7} "
            f"{'CPU FE':>7} "
            + " ".join(f"{p:>12}" for p in PARTS) + f" {'|fast-ref|':>10} {'max|eff|':>8}"
            + (f" {'IG FE':>7}" if args.ig else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<14} {r['shape']:>11} {r['dicts']:>8} {r['fwd_ms']:7.1f} "
              f"{r['fe']:7.2f} {r['fe_cpu']:7.2f} " + " ".join(f"{r[p]:12.2f}" for p in PARTS)
              + f" {r['diff']:10.1e} {r['scale']:8.3f}"
              + (f" {r['ig']:7.1f}" if args.ig else "")
              + ("" if r["same_nodes"] else "  (node sets differ!)"))
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
