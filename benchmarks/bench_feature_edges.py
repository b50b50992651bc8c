"""Benchmark: the counterfactual feature graph (factfind.features.feature_edges), in FE.

For one model, in one run: one plain forward of the clean prompts (the FE unit, in batches of
``--batch-size``); ``feature_atp`` (AtP, or IG with ``--node-ig``), whose ``--nodes`` strongest
feature and error nodes are the graph's; ``feature_edges`` over them (EAP-IG with ``--steps``
points), its cost in FE per batch and per receiver and point; ``split_edge_heads`` of the
``--split`` strongest cross-position edges; and, with ``--check``, the reference path on the
first ``--check`` receivers' edges of one batch (max difference). Models: ``tiny`` (a random
4-layer Llama with random transcoders: FE only), ``smollm2`` and ``gemma3`` (athletes the model
knows, its default dictionaries as ``train_dictionaries`` cached them; never trains).

    OMP_NUM_THREADS=1 python benchmarks/bench_feature_edges.py --models gemma3 --pairs 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cached_default_dictionaries, known_pairs, machine

import factfind as ff
from factfind.features import Dictionaries, Dictionary
from factfind.features.attribution import feature_atp
from factfind.features.feature_edges import feature_edges, split_edge_heads


def _load(name: str, n_pairs: int) -> tuple[Any, Any, Dictionaries]:
    if name == "tiny":
        from factfind.testing.models import tiny_model

        model = tiny_model("llama", n_layers=4)
        facts = ff.load_facts("athletes")
        pairs = facts.corrupt(model, seed=0, on_missing="skip")[:n_pairs]
        dicts = Dictionaries([Dictionary.random(kind="skip_transcoder", activation="topk",
                                                layer=la, d_in=model.d_model, d_sae=128, k=8,
                                                seed=la) for la in range(model.n_layers)])
        return model, pairs, dicts
    model = ff.load_model({"smollm2": "smollm2-135m", "gemma3": "gemma-3-270m"}[name])
    pairs = known_pairs(model, ff.load_facts("athletes"), n_pairs)
    dicts = cached_default_dictionaries(model)
    if dicts is None:
        raise SystemExit(f"no cached default dictionaries of {model.name}: run "
                         f"`factfind train-dictionaries --model {model.name}` first")
    return model, pairs, dicts


def _forward(model: Any, pairs: Any, batch_size: int) -> float:
    from factfind.data.batch import pair_batches

    batches = [pb for _, pb in pair_batches(model, pairs, batch_size)]
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for pb in batches:
            with torch.no_grad():
                model.run(pb.clean)
        best = min(best, time.perf_counter() - t)
    return best / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--models", default="tiny,gemma3")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--split", type=int, default=5)
    ap.add_argument("--check", type=int, default=0)
    ap.add_argument("--node-ig", type=int, default=0,
                    help="IG steps of the node ranking (0: AtP, as the fact-finding step)")
    args = ap.parse_args()
    print(machine())
    print(f"threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
          f", load {os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.models.split(","):
        model, pairs, dicts = _load(name, args.pairs)
        n_batches = -(-len(pairs) // args.batch_size)
        fe = _forward(model, pairs, args.batch_size)
        t = time.perf_counter()
        est = feature_atp(model, pairs, dicts, steps=args.node_ig or None,
                          batch_size=args.batch_size, progress=False)
        t_atp = time.perf_counter() - t
        nodes = est.nlargest(args.nodes, "score")
        t = time.perf_counter()
        edges = feature_edges(model, pairs, dicts, nodes, steps=args.steps,
                              batch_size=args.batch_size, progress=False)
        t_edges = time.perf_counter() - t
        receivers = edges["receiver"].nunique()
        per_batch = t_edges / n_batches / fe
        row = {"model": name, "pairs": len(pairs), "nodes": len(nodes), "edges": len(edges),
               "receivers": receivers, "forward s/batch": round(fe, 3),
               f"node ranking ({'IG' if args.node_ig else 'AtP'}) FE/batch":
                   round(t_atp / n_batches / fe, 1),
               "feature edges FE/batch": round(per_batch, 1),
               "FE per receiver and point": round(per_batch / receivers
                                                  / max(args.steps, 1), 3),
               "edges s": round(t_edges, 1)}
        print(row, flush=True)
        cross = edges[[s.split("@")[1] != r.split("@")[1] for s, r in
                       zip(edges["sender"], edges["receiver"], strict=True)]]
        if args.split and len(cross):
            t = time.perf_counter()
            sp = split_edge_heads(model, pairs, dicts, cross.head(args.split), steps=args.steps,
                             batch_size=args.batch_size, progress=False)
            row["split s per edge"] = round((time.perf_counter() - t) / min(args.split,
                                                                            len(cross)), 1)
            e = sp.groupby(["sender", "receiver"])[["share", "edge"]].agg(
                {"share": "sum", "edge": "first"})
            row["split: |sum - edge| max"] = float((e["share"] - e["edge"]).abs().max())
            top = sp.loc[sp["share"].abs().idxmax()]
            print(f"{name}: strongest head share {top['sender']} -> {top['receiver']}: "
                  f"L{top['layer']}.h{top['head']} {top['share']:.4f} of {top['edge']:.4f}")
        if args.check:
            rec = edges["receiver"].drop_duplicates().head(args.check).tolist()
            sub = nodes[nodes["node"].isin(rec)]
            if len(sub):
                b = pairs[:args.batch_size]
                f = feature_edges(model, b, dicts, sub, steps=args.steps, progress=False)
                r = feature_edges(model, b, dicts, sub, steps=args.steps, progress=False,
                                  reference=True)
                m = f.merge(r, on=["sender", "receiver"])
                row["check: max |fast - ref| / max |ref|"] = float(
                    (m["effect_x"] - m["effect_y"]).abs().max() / m["effect_y"].abs().max())
        rows.append(row)
        print(row, flush=True)
        print(edges.head(10).to_string())
    import pandas as pd

    print(pd.DataFrame(rows).T.to_string())


if __name__ == "__main__":
    main()
