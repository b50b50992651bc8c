"""AtP and AtP* over every MLP neuron of the organism, against brute-force exact patching.

Measured side by side in one run, on one batch of known facts (clean vs corrupt subject):

1. time(AtP over every neuron at every token position) / time(one clean forward of the same
   batch) (goal <= 5: AtP is two forwards and one backward);
2. time(brute-force exact patching of every one of those neuron nodes, one stacked copy each)
   / time(AtP* - QK fix and GradDrop - plus the verification loop, top-20 stopping rule)
   (goal >= 100);
3. the Spearman correlation of AtP and exact effects over all neurons at the ``subject_last``
   role (names are 2-4 tokens, so that role is its own node set, patched separately);
4. the share of the exact top-20 nodes (by |effect|) inside AtP*'s verified set;

plus the subsampling bound on what verification missed (timed separately), and a markdown line
for ``benchmarks/README.md``. ``--positions roles`` uses nodes at the four default roles
(subject_first, subject_last, relation, final) instead of every position.

    python benchmarks/bench_atp.py --threads 1       # the shipped organism
    python benchmarks/bench_atp.py --model DIR       # another checkpoint with its world.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of, machine
from scipy.stats import spearmanr

import factfind as ff
from factfind.atp import atp, estimate
from factfind.attribution import exact_patching, missed_effect_bound, verify
from factfind.patching import DEFAULT_ROLES, encode_pairs


def load(model_path: str, relation: str):
    model = ff.load_model(model_path)
    if model_path == "organism":
        facts = ff.load_facts(f"organism:{relation}")
    else:
        from factfind.loaders import load_organism

        facts = load_organism(relation, world_path=Path(model_path) / "world.json")
    return model, facts


def node_ids(df) -> list[str]:
    """``L2.n311@subject_last`` / ``L2.n311@-4`` labels (robust to <NA> site columns)."""
    where = df["role"].astype(object).where(df["role"].notna(), df["position"].astype(object))
    return [f"L{la}.n{ne}@{w}" for la, ne, w in zip(df["layer"], df["neuron"], where,
                                                     strict=True)]


def effects(df, column: str = "effect"):
    import pandas as pd

    return pd.Series(df[column].to_numpy(), index=node_ids(df))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="organism", help="'organism' or a checkpoint dir")
    parser.add_argument("--relation", default="sport")
    parser.add_argument("--prompts", type=int, default=32, help="prompt pairs in the batch")
    parser.add_argument("--positions", choices=["all", "roles"], default="all",
                        help="nodes at every token position, or at the four default roles")
    parser.add_argument("--top-k", type=int, default=20, help="verification's top-k rule")
    parser.add_argument("--patience", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of n for fast timings")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, facts = load(args.model, args.relation)
    known = facts.sample(min(len(facts), 8 * args.prompts), seed=0).known_by(model)
    pairs = known.corrupt(model, seed=0, on_missing="skip")[:args.prompts]
    n = len(pairs)
    pb = encode_pairs(model, pairs)
    n_pos = pb.clean.input_ids.shape[1]
    positions = list(range(-n_pos, 0)) if args.positions == "all" else list(DEFAULT_ROLES)
    n_nodes = len(positions) * model.n_layers * model.d_mlp
    kw = dict(components=["neurons"], positions=positions, batch_size=n)

    # 1. AtP over every neuron vs one clean forward of the same batch
    t_fwd = best_of(lambda: model.run(pb.clean), args.repeats)
    t_atp = best_of(lambda: atp(model, pb, **kw), args.repeats)

    # 2. brute force vs AtP* + verification (each measured once: they are long)
    t0 = time.perf_counter()
    exact = exact_patching(model, pb, **kw)
    t_brute = time.perf_counter() - t0
    t0 = time.perf_counter()
    star = estimate(model, pb, qk_fix=True, grad_drop=True, **kw)
    ver = verify(model, pb, star, top_k=args.top_k, patience=args.patience, batch_size=n)
    t_star = time.perf_counter() - t0
    t0 = time.perf_counter()
    bound = missed_effect_bound(model, pb, ver, subset_size=32, coverage=2, batch_size=n)
    t_bound = time.perf_counter() - t0

    # 3. Spearman AtP vs exact over all neurons at the last subject token (its role)
    sl = dict(kw, positions=["subject_last"])
    ex_sl = effects(exact if args.positions == "roles" else exact_patching(model, pb, **sl))
    ex_sl = ex_sl[[i.endswith("@subject_last") for i in ex_sl.index]]
    at_sl = effects(atp(model, pb, **sl))
    rho = spearmanr(at_sl.loc[ex_sl.index].to_numpy(), ex_sl.to_numpy()).statistic
    est, ex = effects(star.frame()), effects(exact)
    rho_all = spearmanr(est.loc[ex.index].to_numpy(), ex.to_numpy(), nan_policy="omit").statistic
    # 4. exact top-k inside the verified set
    top = set(ex.abs().nlargest(args.top_k).index)
    got = set(node_ids(ver.frame))
    recall = len(top & got) / len(top)
    missed_max = float(ex.drop(index=list(got)).abs().max())
    star_rank = effects(ver.candidates, "rank")
    worst = int(star_rank.loc[list(top)].max())

    where = (f"every position (-{n_pos}..-1)" if args.positions == "all"
             else "roles " + ", ".join(map(str, DEFAULT_ROLES)))
    print(f"machine: {machine()}")
    print(f"model: {model!r}; {n} prompt pairs ({args.relation}), {n_pos} tokens; {n_nodes} "
          f"neuron nodes ({model.n_layers} layers x {model.d_mlp} neurons x {where})")
    print(f"1. one clean forward {t_fwd * 1e3:.1f} ms, AtP over all neurons "
          f"{t_atp * 1e3:.1f} ms: ratio {t_atp / t_fwd:.2f} (goal <= 5)")
    print(f"2. brute-force exact patching {t_brute:.2f} s, AtP* + verification {t_star:.2f} s "
          f"({ver.n_verified} verified, stopped: {ver.stopped}): ratio {t_brute / t_star:.1f} "
          f"(goal >= 100)")
    print(f"3. Spearman(AtP, exact) over {len(ex_sl)} neurons at subject_last: {rho:.3f} "
          f"(AtP* over all {len(ex)} nodes: {rho_all:.3f})")
    print(f"4. exact top-{args.top_k} neurons inside AtP*'s verified set: {recall:.0%} "
          f"(goal >= 95%); their worst AtP* rank {worst}; largest exact |effect| left "
          f"unverified {missed_max:.4f}, final threshold {ver.threshold:.4f}, largest "
          f"{ex.abs().max():.4f}")
    print(f"   subsampling bound on unverified nodes: {bound.max:.4f} from {bound.subsets} "
          f"subsets of 32 (coverage 2) in {t_bound:.2f} s; by rank bucket: "
          + ", ".join(f"[{r.rank_start},{r.rank_stop}): {r.effect:.3f}"
                      for r in bound.buckets.itertuples()))
    print("markdown:")
    print(f"| AtP / AtP* over every neuron ({model.name}, {n} pairs, {n_nodes} neuron nodes at "
          f"{where}) | AtP ÷ clean forward **{t_atp / t_fwd:.2f}** (goal ≤ 5) | brute force ÷ "
          f"(AtP* + verification) **{t_brute / t_star:.0f}×** (goal ≥ 100) | Spearman AtP vs "
          f"exact at subject_last **{rho:.2f}** | exact top-{args.top_k} recovered "
          f"**{recall:.0%}** | {machine()} |")
    assert np.isfinite(rho)


if __name__ == "__main__":
    main()
