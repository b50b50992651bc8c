"""Feature circuits at the dataset level, in FE (time ÷ one plain forward of the same prompts).

For the pairs of one model, with a dictionary at every MLP, this times side by side in one run:

1. one plain forward of the clean prompts (in batches of ``--batch-size``; the FE unit);
2. ``feature_atp(per_prompt=True)`` (AtP over every feature of every layer), then
   ``aggregate_circuit`` and ``circuit_stability`` (top-k Jaccard across two disjoint random
   halves, 20 splits; no model runs);
3. ``feature_interventions``: the top ``--top`` features at ``subject_last`` and at ``final``
   swapped (scale 1) and steered (scale 2) from the corrupt run, with a random control;
4. ``basis_scores`` (AtP of heads and MLPs, AtP* of heads and neurons, feature AtP) and
   ``basis_comparison`` at the budgets, mean and resample ablation.

Models: ``tiny`` (a random 4-layer Llama, random skip transcoders: FE only, the numbers mean
nothing), ``organism`` (the shipped organism, random skip transcoders: FE only) and
``smollm2`` (SmolLM2-135M on ROME known facts with its cached default dictionaries,
``ff.train_dictionaries(model)``: the real run, whose tables are written to
``benchmarks/results/feature_circuits_smollm2_*.csv``).

    python benchmarks/bench_feature_circuits.py --models tiny,organism
    python benchmarks/bench_feature_circuits.py --models smollm2 --pairs 64 --save \
        --dicts ~/.cache/factfind/dictionaries/<key>/dictionaries
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import known_pairs, machine

import factfind as ff
from factfind.evaluate.bases import basis_comparison, basis_scores
from factfind.features import Dictionaries, Dictionary
from factfind.features.circuits import aggregate_circuit, circuit_stability
from factfind.features.interventions import feature_interventions

RESULTS = Path(__file__).resolve().parent / "results"


def random_dictionaries(model: Any, width: int = 4, k: int = 32) -> Dictionaries:
    D = model.d_model
    out = []
    for layer in range(model.n_layers):
        d = Dictionary.random(kind="skip_transcoder", activation="topk", layer=layer, d_in=D,
                              d_sae=width * D, k=min(k, width * D), seed=layer)
        out.append(d)
    return Dictionaries(out)


def setup(name: str, n: int, dicts_path: str | None = None, known_partners: bool = False
          ) -> tuple[Any, Any, Dictionaries]:
    if name == "tiny":
        from factfind.testing.models import tiny_model

        model = tiny_model("llama", n_layers=4, d_model=128)
        facts = ff.from_records([{"subject": f"{a} {b}", "relation": "sport",
                                  "template": "Fact: {} plays the sport of", "attribute": s}
                                 for a in ("Michael", "Tiger", "Serena", "Lionel")
                                 for b, s in (("Jordan", "basketball"), ("Woods", "golf"),
                                              ("Williams", "tennis"), ("Messi", "football"))])
        return model, facts.corrupt(model, seed=0, on_missing="skip")[:n], \
            random_dictionaries(model)
    if name == "organism":
        model = ff.load_model("organism")
        pairs = known_pairs(model, ff.load_facts("organism:sport"), n)
        return model, pairs, random_dictionaries(model)
    if name == "smollm2":
        model = ff.load_model("smollm2-135m")
        facts = ff.load_facts("rome_known")
        known = facts.known_by(model)  # rank 1 (279 of 1,209)
        if known_partners:  # partners the model knows too: a swap can reach their answer
            pairs = known.corrupt(model, seed=0, on_missing="skip")[:n]
        else:
            pairs = known.sample(min(len(known), 4 * n), seed=0).corrupt(
                model, seed=0, on_missing="skip", pool=facts, fallback=ff.FALLBACKS)[:n]
        # the cached default set, or a saved one (a set train_dictionaries wrote)
        dicts = ff.load_dictionaries(dicts_path) if dicts_path else ff.train_dictionaries(model)
        return model, pairs, dicts
    raise SystemExit(f"unknown model {name!r}")


def timed(label: str, fn: Any, t_fwd: float, log: list[dict]) -> Any:
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    log.append({"step": label, "seconds": dt, "fe": dt / t_fwd})
    print(f"  {label:<34} {dt:8.1f} s = {dt / t_fwd:8.1f} FE", flush=True)
    return out


def run(name: str, args: Any) -> None:
    model, pairs, dicts = setup(name, args.pairs, args.dicts, args.known_partners)
    pb = ff.encode_pairs(model, pairs)
    bs = args.batch_size

    def forward() -> None:
        with torch.no_grad():
            for s in range(0, len(pb), bs):
                model.run(pb.clean.take(slice(s, s + bs)))

    forward()
    t_fwd = min(_time(forward) for _ in range(3))
    n_feats = sum(d.d_sae for d in dicts.values())
    print(f"\n{name}: {len(pb)} pairs x {pb.clean.input_ids.shape[1]} tokens, {len(dicts)} "
          f"dictionaries ({n_feats:,} features), batch {bs}; one plain forward of the pairs "
          f"{t_fwd:.2f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    log: list[dict] = []
    kw: dict[str, Any] = {"batch_size": bs, "progress": False}
    rows = timed("feature AtP (per prompt)", lambda: ff.feature_atp(
        model, pb, dicts, per_prompt=True, **kw), t_fwd, log)
    circuit = timed("aggregate_circuit", lambda: aggregate_circuit(rows), t_fwd, log)
    if args.interventions_only:
        est = ff.feature_atp(model, pb, dicts, roles=["subject_last", "final"], **kw)
        inter = timed("feature_interventions", lambda: feature_interventions(
            model, pairs, dicts, est, top=args.top, scales=(1.0, 2.0), **kw), t_fwd, log)
        print(inter[["role", "intervention", "selection", "n", "success_rate", "success_high",
                     "n_known", "success_known", "effect", "fraction", "source_rate"]]
              .to_string())
        if name == "smollm2" and args.save:
            inter.to_csv(RESULTS / "feature_circuits_smollm2_interventions_known.csv",
                         index=False)
        return
    ks = [int(k) for k in args.ks.split(",")]
    stab = timed("circuit_stability (20 splits)", lambda: circuit_stability(
        rows, k=ks, splits=20), t_fwd, log)
    est = ff.feature_atp(model, pb, dicts, roles=["subject_last", "final"], **kw)
    inter = timed("feature_interventions", lambda: feature_interventions(
        model, pairs, dicts, est, top=args.top, scales=(1.0, 2.0), **kw), t_fwd, log)
    scores = timed("basis_scores", lambda: basis_scores(model, pairs, dicts, **kw), t_fwd, log)
    budgets = [int(b) for b in args.budgets.split(",")]
    table = timed("basis_comparison (mean, resample)", lambda: basis_comparison(
        model, pairs, dicts, budgets=budgets, scores=scores, chunk=args.chunk, **kw),
        t_fwd, log)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(circuit[["node", "effect", "ci_low", "ci_high", "n"]].head(10).to_string())
        print(stab[["k", "effect", "ci_low", "ci_high", "jaccard_first", "n_prompts",
                    "n_nodes"]].to_string())
        print(inter[["role", "intervention", "selection", "n_features", "n", "success_rate",
                     "success_low", "success_high", "effect", "fraction", "base_rate",
                     "source_rate"]].to_string())
        print(table[["basis", "budget", "how", "n_nodes", "faithfulness", "full", "empty",
                     "n_heads", "n_units", "n_errors"]].to_string())
    if name == "smollm2" and args.save:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / "feature_circuits_smollm2"
        circuit.head(200).to_csv(f"{stem}_circuit.csv", index=False)
        stab.to_csv(f"{stem}_stability.csv", index=False)
        inter.to_csv(f"{stem}_interventions.csv", index=False)
        table.to_csv(f"{stem}_bases.csv", index=False)
        pd.DataFrame(log).assign(t_forward=t_fwd, pairs=len(pb),
                                 threads=torch.get_num_threads()).to_csv(
            f"{stem}_timings.csv", index=False)
        print(f"  wrote {stem}_*.csv")


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="tiny,organism")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--ks", default="10,50,200")
    parser.add_argument("--budgets", default="10,50,200")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="write the SmolLM2 tables")
    parser.add_argument("--known-partners", action="store_true",
                        help="SmolLM2: corrupt partners among the facts it knows")
    parser.add_argument("--interventions-only", action="store_true")
    parser.add_argument("--dicts", default=None,
                        help="SmolLM2's dictionaries from this folder (default: the cached "
                             "default set of ff.train_dictionaries, trained if missing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    for name in args.models.split(","):
        run(name, args)


if __name__ == "__main__":
    main()
