"""Circuits on the organism: path patching, EAP / EAP-IG, and faithfulness against circuit size.

Measured in one run, on one batch of known facts (clean vs corrupt subject):

1. path patching: the stacked two-run sweep vs the literal freeze-everything reference (time
   ratio, largest difference);
2. EAP and EAP-IG against exact edge patching of single edges: the time of scoring every edge
   by patching (extrapolated from a timed sample of edges) over the time of EAP, and the
   Spearman correlation of the scores on that sample;
3. the faithfulness-versus-size curve (EAP-IG node ranking; resample and mean ablation) at
   head/MLP x role granularity - every head and every MLP at every token role of the
   partition (prefix, subject_first, subject = inner subject tokens, subject_last, relation,
   final);
4. the smallest circuit found with faithfulness >= 0.9 (backward elimination from every node,
   :func:`factfind.evaluate.prune_circuit` with every removal measured exactly), against the
   goal of <= 5% of the nodes (at neuron granularity: bench_circuit_neurons.py);
   and the proportion of the effect explained (Goldowsky-Dill et al. 2023) by EAP-IG's top
   edges, pruned to input-to-logits paths;
5. the planted models (truth harness): precision and recall of path patching, EAP and EAP-IG.

    python benchmarks/bench_circuit.py                  # the shipped organism
    python benchmarks/bench_circuit.py --model DIR      # another checkpoint with its world.json
    python benchmarks/bench_circuit.py --out curves.csv # also write the curves
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from _common import best_of, known_pairs, load_checkpoint, machine
from scipy.stats import spearmanr

from factfind.edges.eap import eap, eap_ig, to_graph
from factfind.edges.edge_patching import edge_patching, path_patching_circuit
from factfind.edges.path_patching import path_patching_sweep
from factfind.edges.placement import all_nodes
from factfind.evaluate import (
    faithfulness_curve,
    proportion_explained,
    prune_circuit,
)
from factfind.graph import prune
from factfind.testing.planted import planted_model
from factfind.types import Site

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)


def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """The options the circuit benchmarks share: the model, the relation, the threads."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--model", default="organism", help="'organism' or a checkpoint dir")
    parser.add_argument("--relation", default="sport")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def planted_scores() -> list[str]:
    out = []
    for family in ("gpt2", "gpt_neox"):
        model, facts, truth = planted_model(family)
        pairs = facts.corrupt(model, seed=0)
        t0 = time.perf_counter()
        pp = path_patching_circuit(model, pairs, threshold=0.01)
        t_pp = time.perf_counter() - t0
        res = {"path patching": (truth.precision_recall(pp.graph.nodes), t_pp)}
        for name, fn in (("EAP", lambda m, p: eap(m, p)),
                         ("EAP-IG(5)", lambda m, p: eap_ig(m, p, steps=5))):
            t0 = time.perf_counter()
            df = fn(model, pairs)
            t = time.perf_counter() - t0
            g = prune(to_graph(df, model, pairs), threshold=0.01 * df["effect"].abs().max())
            res[name] = (truth.precision_recall(g.graph.nodes), t)
        out.append(f"{family}: " + "; ".join(f"{k} P={p:.2f} R={r:.2f} ({t:.2f} s)"
                                             for k, ((p, r), t) in res.items()))
    return out


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--prompts", type=int, default=64, help="prompt pairs")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--edges", type=int, default=300, help="edges patched exactly")
    parser.add_argument("--out", default=None, help="write the curves as CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, facts = load_checkpoint(args.model, args.relation)
    pairs = known_pairs(model, facts, args.prompts, oversample=6)
    n = len(pairs)
    batch = model.tokenize(list(pairs.clean))
    universe = all_nodes(model, batch)
    print(f"machine: {machine()}")
    print(f"model: {model!r}; {n} prompt pairs ({args.relation}), {batch.input_ids.shape[1]} "
          f"tokens; {len(universe)} nodes = {model.n_layers} layers x ({model.n_heads} heads + "
          f"1 MLP) x {len(universe) // (model.n_layers * (model.n_heads + 1))} roles")

    # 1. path patching: stacked vs literal
    L = model.n_layers
    senders = [Site("z", layer, head=h, position=r) for layer in range(L - 1)
               for h in range(model.n_heads) for r in ("subject_last", "final")]
    receivers = [Site("z", L - 1, head=h, position="final") for h in range(model.n_heads)]
    few = pairs[:8]
    kw = dict(receiver_input="v")
    t_fast = best_of(lambda: path_patching_sweep(model, few, senders, receivers, **kw), 2)
    t0 = time.perf_counter()
    slow = path_patching_sweep(model, few, senders, receivers, reference=True, **kw)
    t_slow = time.perf_counter() - t0
    fast = path_patching_sweep(model, few, senders, receivers, **kw)
    diff = float(np.abs(fast["metric"] - slow["metric"]).max())
    print(f"1. path patching {len(senders)} senders -> values of the last layer's heads at "
          f"final, {len(few)} pairs: stacked {t_fast:.2f} s, literal reference {t_slow:.2f} s: "
          f"ratio {t_slow / t_fast:.1f}; max |difference| {diff:.2e}")

    # 2. EAP / EAP-IG vs exact edge patching
    t0 = time.perf_counter()
    e0 = eap(model, pairs, batch_size=16)
    t_eap = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = eap_ig(model, pairs, steps=args.steps, batch_size=16)
    t_ig = time.perf_counter() - t0
    order = ig["effect"].abs().sort_values(ascending=False).index
    pick = list(order[:args.edges // 2]) + list(
        ig.drop(index=order[:args.edges // 2]).sample(args.edges // 2, random_state=0).index)
    sample = ig.loc[pick]
    t0 = time.perf_counter()
    edges = list(zip(sample["sender"], sample["receiver"], strict=True))
    exact = edge_patching(model, pairs, edges, batch_size=16)
    t_exact = (time.perf_counter() - t0) * len(ig) / len(sample)
    rho_ig = spearmanr(sample["effect"], exact["effect"]).statistic
    rho_eap = spearmanr(e0.set_index(["sender", "receiver"]).loc[list(zip(
        sample["sender"], sample["receiver"], strict=True)), "effect"], exact["effect"]).statistic
    print(f"2. {len(ig)} edges: EAP {t_eap:.1f} s, EAP-IG({args.steps}) {t_ig:.1f} s; exact edge "
          f"patching of every edge ~{t_exact:.0f} s (from {len(sample)} timed): ratio "
          f"{t_exact / t_eap:.0f}x over EAP, {t_exact / t_ig:.0f}x over EAP-IG; Spearman vs "
          f"exact on those edges: EAP {rho_eap:.3f}, EAP-IG {rho_ig:.3f}")

    # 3. faithfulness vs size
    graph = to_graph(ig, model, pairs)
    sizes = [s for s in SIZES if s < len(universe)] + [len(universe)]
    curves = []
    for how in ("resample", "mean"):
        c = faithfulness_curve(model, pairs, graph, sizes=sizes, how=how, batch_size=32)
        curves.append(c)
    table = pd.DataFrame({"size": curves[0]["size"], "fraction": curves[0]["fraction"],
                          "F resample": curves[0]["faithfulness"],
                          "F mean": curves[1]["faithfulness"]})
    print("3. faithfulness vs size (EAP-IG node ranking; F(all) = 1, F(none) = 0):")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

    # 3b. edge-level circuits: proportion explained (Goldowsky-Dill et al.) of EAP-IG's top edges
    parts = []
    for k in (25, 50, 100, 200, 400):
        sub = prune(graph, top_n=k)
        inner = [v for v in sub.graph.nodes if not v.startswith(("embed@", "logits@"))]
        pe = proportion_explained(model, pairs, sub) if len(sub) else 0.0
        parts.append(f"top {k} edges ({sub.graph.number_of_edges()} kept, {len(inner)} nodes): "
                     f"{pe:.3f}")
    print(f"3b. proportion explained by EAP-IG's top edges (of {len(ig)}): " + "; ".join(parts))

    # 4. the smallest circuit with F >= 0.9: backward elimination from the whole model (every
    # node's removal measured exactly at each round; see bench_circuit_neurons.py for neurons)
    t0 = time.perf_counter()
    path = prune_circuit(model, pairs, universe, target=0.9, how="resample", batch_size=32)
    t_min = time.perf_counter() - t0
    best = path[path["accepted"]].iloc[-1]
    goal = int(0.05 * len(universe))
    met = best["size"] <= goal and best["faithfulness"] >= 0.9
    print(f"4. smallest circuit with resample faithfulness >= 0.9 (backward elimination from "
          f"all {len(universe)} nodes, {len(path)} rounds, {t_min:.0f} s): {int(best['size'])} "
          f"nodes = {best['fraction']:.1%} of {len(universe)}, F = {best['faithfulness']:.3f}; "
          f"goal <= 5% ({goal} nodes): {'met' if met else 'NOT met'}")
    print(f"   nodes: {best['nodes']}")
    at_goal, at_goal_mean = (c.loc[c["size"] <= goal, "faithfulness"].max() for c in curves)
    print(f"   best faithfulness with <= {goal} nodes on the EAP-IG curve: resample "
          f"{at_goal:.3f}, mean {at_goal_mean:.3f}")

    # 5. planted truth
    print("5. planted circuits (precision / recall of the inner nodes):")
    for line in planted_scores():
        print(f"   {line}")
    if args.out:
        pd.concat(curves).to_csv(args.out, index=False)
        print(f"curves written to {args.out}")
    print("markdown:")
    print(f"| circuits ({model.name}, {n} pairs, {len(universe)} head/MLP x role nodes) | "
          f"EAP-IG ÷ exact edge patching **{t_exact / t_ig:.0f}×** faster, Spearman "
          f"**{rho_ig:.2f}** | smallest F ≥ 0.9 circuit **{int(best['size'])} nodes "
          f"({best['fraction']:.0%})** (goal ≤ 5%) | F at ≤ 5%: **{at_goal:.2f}** | {machine()} |")


if __name__ == "__main__":
    main()
