"""The smallest faithful circuit on the organism at neuron granularity.

Nodes are every attention head and every MLP *neuron* at every token role of the partition
(prefix, subject_first, subject = inner subject tokens, subject_last, relation, final): on the
organism 4 layers x (4 heads + 512 neurons) x 6 roles = 12,384 nodes, so the goal "<= 5% of the
nodes" is <= 619. Measured in one run, for each number of prompt pairs in ``--train``:

1. iterative attribution-guided pruning (:func:`factfind.evaluate.prune_circuit`) from the
   whole model under **mean** ablation (per-role means over the same prompts; ``--how
   resample``: the corrupt partner's activations), target 0.9: the accepted circuits are the
   faithfulness-versus-size curve, each also measured under the other ablation and on
   **held-out** facts (64 known pairs of other subjects);
2. for contrast, the curve of a one-shot ranking by ``|removal score|`` of the full model
   (AtP towards the mean; heads measured exactly);
3. the smallest accepted circuit: its size, fraction and composition (heads; neurons per
   layer and role).

    python benchmarks/bench_circuit_neurons.py                    # 32, 64 and 128 pairs
    python benchmarks/bench_circuit_neurons.py --how resample --train 64
    python benchmarks/bench_circuit_neurons.py --train 64 --out path.csv
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from _common import load_checkpoint, machine
from bench_circuit import parser_for

from factfind.edges.placement import all_nodes
from factfind.evaluate import evaluate_circuits, faithfulness_curve, prune_circuit, removal_scores

SIZES = (100, 200, 400, 619, 1000, 2000, 4000, 8000)


def composition(nodes: list[str]) -> str:
    heads = [n for n in nodes if ".h" in n]
    neurons = pd.Series([f"L{n[1]}@{n.split('@')[1]}" for n in nodes if ".n" in n])
    top = neurons.value_counts().head(6)
    return (f"{len(heads)} heads ({', '.join(sorted(heads))}); {len(neurons)} neurons, most at "
            + ", ".join(f"{k} {v}" for k, v in top.items()))


def main() -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--train", default="32,64,128", help="prompt pairs to prune on")
    parser.add_argument("--held-out", type=int, default=64, help="pairs of other subjects")
    parser.add_argument("--how", default="mean", choices=["mean", "resample"],
                        help="the ablation to prune under")
    parser.add_argument("--step", type=float, default=0.5, help="largest fraction per round")
    parser.add_argument("--reserve", type=float, default=0.5,
                        help="keep this share of the faithfulness budget in proportion to size")
    parser.add_argument("--out", default=None, help="write the pruning paths as CSV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, facts = load_checkpoint(args.model, args.relation)
    print(f"machine: {machine()}")
    paths = []
    t_all = time.perf_counter()
    for n in [int(x) for x in args.train.split(",")]:
        known = facts.sample(min(len(facts), 6 * n), seed=0).known_by(model)
        pairs = known.corrupt(model, seed=0, on_missing="skip")[:n]
        seen = {p.subject for p in pairs.clean}
        other = facts.filter(lambda p, seen=seen: p.subject not in seen)
        held = other.sample(6 * args.held_out, seed=1).known_by(model) \
            .corrupt(model, seed=1, on_missing="skip")[:args.held_out]
        batch = model.tokenize(list(pairs.clean))
        universe = all_nodes(model, batch, neurons=True)
        goal = int(0.05 * len(universe))
        print(f"\n== {len(pairs)} prompt pairs ({args.relation}); {len(universe)} nodes = "
              f"{model.n_layers} layers x ({model.n_heads} heads + {model.d_mlp} neurons) x "
              f"{len(universe) // (model.n_layers * (model.n_heads + model.d_mlp))} roles; "
              f"goal <= 5% = {goal} nodes; held out: {len(held)} pairs")

        t0 = time.perf_counter()
        path = prune_circuit(model, pairs, universe, target=0.9, step=args.step, how=args.how,
                             reserve=args.reserve, batch_size=64)
        t_prune = time.perf_counter() - t0
        acc = path[path["accepted"]].reset_index(drop=True)
        circuits = [c.split(";") for c in acc["nodes"]]
        cols = {"size": acc["size"], "fraction": acc["fraction"],
                f"F {args.how}": acc["faithfulness"]}
        for label, data in (("", pairs), ("held-out ", held)):
            for how in ("mean", "resample"):
                if label or how != args.how:
                    cols[f"{label}F {how}"] = evaluate_circuits(
                        model, data, circuits, how=how, batch_size=64)["faithfulness"].to_numpy()
        table = pd.DataFrame(cols)
        print(f"1. iterative pruning under {args.how} ablation, target 0.9 ({len(path)} rounds, "
              f"{t_prune:.0f} s); the accepted circuits:")
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))

        t0 = time.perf_counter()
        scores = removal_scores(model, pairs, universe, how=args.how, exact=("head",),
                                batch_size=64)
        curve = faithfulness_curve(model, pairs, dict(zip(scores["node"], scores["delta"],
                                                          strict=True)),
                                   sizes=[s for s in SIZES if s < len(universe)], how=args.how,
                                   neurons=True, batch_size=64)
        t_rank = time.perf_counter() - t0
        print(f"2. one-shot ranking (the full model's removal scores, {t_rank:.0f} s): "
              f"{args.how}-ablation F at " + ", ".join(
                  f"{s}: {f:.3f}" for s, f in zip(curve["size"], curve["faithfulness"],
                                                   strict=True)))

        best = table.iloc[-1]
        met = best["size"] <= goal and best[f"F {args.how}"] >= 0.9
        print(f"3. smallest circuit with {args.how}-ablation F >= 0.9: {int(best['size'])} nodes "
              f"= {best['fraction']:.2%} of {len(universe)} (F mean {best['F mean']:.3f}, "
              f"resample {best['F resample']:.3f}; held out: mean {best['held-out F mean']:.3f}, "
              f"resample {best['held-out F resample']:.3f}); goal <= 5% on these prompts: "
              f"{'met' if met else 'NOT met'}")
        print(f"   {composition(circuits[-1])}")
        paths.append(path.assign(pairs=len(pairs)))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.out:
        pd.concat(paths).to_csv(args.out, index=False)
        print(f"paths written to {args.out}")


if __name__ == "__main__":
    main()
