"""AtP and AtP* over every MLP neuron of the organism, against brute-force exact patching.

Measured side by side in one run, on one batch of known facts (clean vs corrupt subject):

1. time(AtP over every neuron at every role) / time(one clean forward of the same batch)
   (goal <= 5: AtP is two forwards and one backward);
2. time(brute-force exact patching of every neuron, one stacked copy per neuron) /
   time(AtP* - QK fix and GradDrop - plus the verification loop) (goal >= 100);
3. the Spearman correlation of AtP and exact effects over all neurons at ``subject_last``;
4. the share of the exact top-20 neurons (by |effect|) inside AtP*'s verified set;

plus the subsampling bound on what verification missed (timed separately), and a markdown line
for ``benchmarks/README.md``.

    python benchmarks/bench_atp.py                   # the shipped organism
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

KEYS = ["component", "layer", "neuron", "role"]


def load(model_path: str, relation: str):
    model = ff.load_model(model_path)
    if model_path == "organism":
        facts = ff.load_facts(f"organism:{relation}")
    else:
        from factfind.loaders import load_organism

        facts = load_organism(relation, world_path=Path(model_path) / "world.json")
    return model, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="organism", help="'organism' or a checkpoint dir")
    parser.add_argument("--relation", default="sport")
    parser.add_argument("--prompts", type=int, default=32, help="prompt pairs in the batch")
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
    roles = list(DEFAULT_ROLES)
    pb = encode_pairs(model, pairs)
    n_nodes = len(roles) * model.n_layers * model.d_mlp
    kw = dict(components=["neurons"], positions=roles, batch_size=n)

    # 1. AtP over every neuron vs one clean forward of the same batch
    t_fwd = best_of(lambda: model.run(pb.clean), args.repeats)
    t_atp = best_of(lambda: atp(model, pairs, **kw), args.repeats)

    # 2. brute force vs AtP* + verification (each measured once: they are long)
    t0 = time.perf_counter()
    exact = exact_patching(model, pairs, **kw)
    t_brute = time.perf_counter() - t0
    t0 = time.perf_counter()
    star = estimate(model, pairs, qk_fix=True, grad_drop=True, **kw)
    ver = verify(model, pairs, star, top_k=args.top_k, patience=args.patience, batch_size=n)
    t_star = time.perf_counter() - t0
    t0 = time.perf_counter()
    bound = missed_effect_bound(model, pairs, ver, subset_size=32, coverage=2, batch_size=n)
    t_bound = time.perf_counter() - t0

    # 3. Spearman AtP vs exact at the last subject token; 4. top-20 recall
    est = atp(model, pairs, **kw).set_index(KEYS)["effect"]
    ex = exact.set_index(KEYS)["effect"]
    at = est.xs("subject_last", level="role")
    rho = spearmanr(at.to_numpy(), ex.xs("subject_last", level="role").loc[at.index]).statistic
    rho_all = spearmanr(est.to_numpy(), ex.loc[est.index].to_numpy()).statistic
    top = set(ex.abs().nlargest(args.top_k).index)
    got = set(ver.frame.set_index(KEYS).index)
    recall = len(top & got) / len(top)
    missed_max = float(ex.drop(index=list(got)).abs().max())

    print(f"machine: {machine()}")
    print(f"model: {model!r}; {n} prompt pairs ({args.relation}), {pb.clean.input_ids.shape[1]} "
          f"tokens; {n_nodes} neuron nodes ({model.n_layers} layers x {model.d_mlp} neurons x "
          f"{len(roles)} roles: {', '.join(map(str, roles))})")
    print(f"1. one clean forward {t_fwd * 1e3:.1f} ms, AtP over all neurons "
          f"{t_atp * 1e3:.1f} ms: ratio {t_atp / t_fwd:.2f} (goal <= 5)")
    print(f"2. brute-force exact patching {t_brute:.2f} s, AtP* + verification {t_star:.2f} s "
          f"({ver.n_verified} verified, stopped: {ver.stopped}): ratio {t_brute / t_star:.1f} "
          f"(goal >= 100)")
    print(f"3. Spearman(AtP, exact) over {len(at)} neurons at subject_last: {rho:.3f} "
          f"(all {len(est)} neuron nodes: {rho_all:.3f})")
    print(f"4. exact top-{args.top_k} neurons inside AtP*'s verified set: {recall:.0%} "
          f"(goal >= 95%); largest exact |effect| left unverified {missed_max:.4f}, "
          f"threshold {ver.threshold:.4f}, largest exact |effect| {ex.abs().max():.4f}")
    print(f"   subsampling bound on unverified nodes: {bound.max:.4f} from {bound.subsets} "
          f"subsets of 32 (coverage 2) in {t_bound:.2f} s; by rank bucket: "
          + ", ".join(f"[{r.rank_start},{r.rank_stop}): {r.effect:.3f}"
                      for r in bound.buckets.itertuples()))
    print("markdown:")
    print(f"| AtP / AtP* over every neuron ({model.name}, {n} pairs, {n_nodes} neuron nodes) "
          f"| AtP ÷ clean forward **{t_atp / t_fwd:.2f}** (goal ≤ 5) | brute force ÷ "
          f"(AtP* + verification) **{t_brute / t_star:.0f}×** (goal ≥ 100) | Spearman AtP vs "
          f"exact at subject_last **{rho:.2f}** | exact top-20 recovered **{recall:.0%}** | "
          f"{machine()} |")
    assert np.isfinite(rho)


if __name__ == "__main__":
    main()
