"""AtP and AtP* over every MLP neuron of the organism, against brute-force exact patching.

Measured side by side in one run, on one batch of known facts (clean vs corrupt subject):

1. time(AtP over every neuron at every token position) / time(one clean forward of the same
   batch) (goal <= 5: AtP is two forwards and one backward);
2. time(brute-force exact patching of every one of those neuron nodes, one stacked copy each)
   / time(AtP* - QK fix and GradDrop - plus the verification loop, top-20 stopping rule, over
   the same node set) (goal >= 100). With ``--brute-sample N`` brute force patches N random
   nodes with the same batched code and its time is extrapolated linearly (both printed);
   the default patches every node (~10-20 min on a shared CPU core);
3. the Spearman correlation of AtP and exact effects over all neurons at the ``subject_last``
   role (names are 2-4 tokens, so that role is its own node set, patched separately);
4. the share of the exact top-20 nodes (by |effect|) inside AtP*'s verified set;

plus the subsampling bound on what verification missed (timed separately), and a markdown line
for ``benchmarks/README.md``. ``--positions roles`` uses nodes at the four default roles
(subject_first, subject_last, relation, final) instead of every position.

    python benchmarks/bench_atp.py                      # the shipped organism, 1 thread
    python benchmarks/bench_atp.py --brute-sample 1024  # quick: brute force extrapolated
    python benchmarks/bench_atp.py --model DIR          # another checkpoint (its world.json)
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from _common import best_of, known_pairs, load_checkpoint, machine
from scipy.stats import spearmanr

from factfind.attribute.atp import atp, estimate
from factfind.attribute.exact import exact_patching, patch_node_sets
from factfind.attribute.node_index import NodeIndex
from factfind.attribute.verification import missed_effect_bound, verify
from factfind.data.batch import encode_pairs
from factfind.localize.patching import DEFAULT_ROLES


def node_ids(df) -> list[str]:
    """``L2.n311@subject_last`` / ``L2.n311@-4`` labels (robust to <NA> site columns)."""
    where = df["role"].astype(object).where(df["role"].notna(), df["position"].astype(object))
    return [f"L{la}.n{ne}@{w}" for la, ne, w in zip(df["layer"], df["neuron"], where,
                                                     strict=True)]


def effects(df: pd.DataFrame, column: str = "effect") -> pd.Series:
    return pd.Series(df[column].to_numpy(), index=node_ids(df))


def spearman(a: pd.Series, b: pd.Series) -> float:
    """Spearman correlation of two node series over ``b``'s nodes (NaNs left out)."""
    return float(np.asarray(spearmanr(a.loc[b.index].to_numpy(), b.to_numpy(),
                                      nan_policy="omit")[0]))


def brute_force(model, pb, index, *, sample: int | None, seed: int = 0):
    """Exact patching of every node of ``index`` (one stacked copy each), or of a random
    ``sample`` of them with the same batched code: (seconds, nodes patched, frame or None)."""
    if sample is None or sample >= len(index):
        t0 = time.perf_counter()
        exact = exact_patching(model, pb, components=["neurons"], positions=index.positions,
                               batch_size=len(pb.correct))
        return time.perf_counter() - t0, len(index), exact
    ids = np.random.default_rng(seed).choice(len(index), size=sample, replace=False)
    sets = [[index.site(int(i))] for i in ids]
    t0 = time.perf_counter()
    patch_node_sets(model, pb, sets, batch_size=len(pb.correct), progress=False)
    return time.perf_counter() - t0, sample, None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="organism", help="'organism' or a checkpoint dir")
    parser.add_argument("--relation", default="sport")
    parser.add_argument("--prompts", type=int, default=32, help="prompt pairs in the batch")
    parser.add_argument("--positions", choices=["all", "roles"], default="all",
                        help="nodes at every token position, or at the four default roles")
    parser.add_argument("--top-k", type=int, default=20, help="verification's top-k rule")
    parser.add_argument("--patience", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="best of n for fast timings")
    parser.add_argument("--brute-sample", type=int, default=None, metavar="N",
                        help="time brute force on N random nodes and extrapolate linearly "
                        "(default: patch every node; recall then needs --positions' full run)")
    parser.add_argument("--no-bound", action="store_true", help="skip the subsampling bound")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, facts = load_checkpoint(args.model, args.relation)
    pairs = known_pairs(model, facts, args.prompts, oversample=8)
    n = len(pairs)
    pb = encode_pairs(model, pairs)
    n_pos = pb.clean.input_ids.shape[1]
    positions = list(range(-n_pos, 0)) if args.positions == "all" else list(DEFAULT_ROLES)
    index = NodeIndex.build(model, components=["neurons"], positions=positions)
    n_nodes = len(index)
    kw: dict[str, Any] = dict(components=["neurons"], positions=positions, batch_size=n)

    # 1. AtP over every neuron (the tidy frame included) vs one clean forward of the batch
    t_fwd = best_of(lambda: model.run(pb.clean), args.repeats)
    t_atp = best_of(lambda: atp(model, pb, **kw), args.repeats)

    # 2. AtP* + verification vs brute force over the same node set
    def star_and_verify():
        est = estimate(model, pb, qk_fix=True, grad_drop=True, **kw)
        return est, verify(model, pb, est, top_k=args.top_k, patience=args.patience,
                           batch_size=n)

    t_star = best_of(star_and_verify, max(1, args.repeats // 2))
    star, ver = star_and_verify()
    t_sample, n_brute, exact = brute_force(model, pb, index, sample=args.brute_sample)
    t_brute = t_sample * n_nodes / n_brute  # = t_sample when every node was patched
    if not args.no_bound:
        t0 = time.perf_counter()
        bound = missed_effect_bound(model, pb, ver, subset_size=32, coverage=2, batch_size=n)
        t_bound = time.perf_counter() - t0

    # 3. Spearman AtP vs exact over all neurons at the last subject token (its role)
    sl = dict(kw, positions=["subject_last"])
    ex_sl = effects(exact if exact is not None and args.positions == "roles"
                    else exact_patching(model, pb, **sl))
    ex_sl = pd.Series(ex_sl[[str(i).endswith("@subject_last") for i in ex_sl.index]])
    rho = spearman(effects(atp(model, pb, **sl)), ex_sl)

    where = (f"every position (-{n_pos}..-1)" if args.positions == "all"
             else "roles " + ", ".join(map(str, DEFAULT_ROLES)))
    print(f"machine: {machine()}")
    print(f"model: {model!r}; {n} prompt pairs ({args.relation}), {n_pos} tokens; {n_nodes} "
          f"neuron nodes ({model.n_layers} layers x {model.d_mlp} neurons x {where})")
    print(f"1. one clean forward {t_fwd * 1e3:.1f} ms, AtP over all {n_nodes} neuron nodes "
          f"(frame included) {t_atp * 1e3:.1f} ms: ratio {t_atp / t_fwd:.2f} (goal <= 5; "
          f"best of {args.repeats})")
    if exact is not None:
        brute = f"brute-force exact patching of all {n_nodes} nodes {t_brute:.1f} s (measured)"
    else:
        brute = (f"brute-force exact patching measured on {n_brute} random nodes of the "
                 f"{n_nodes}: {t_sample:.2f} s, extrapolated linearly to all {n_nodes}: "
                 f"{t_brute:.1f} s")
    print(f"2. {brute}; AtP* (QK fix + GradDrop) + verification over the same {n_nodes} "
          f"nodes {t_star:.2f} s ({ver.n_verified} verified, stopped: {ver.stopped}): ratio "
          f"{t_brute / t_star:.1f} (goal >= 100)")
    print(f"3. Spearman(AtP, exact) over {len(ex_sl)} neurons at subject_last: {rho:.3f}")
    recall_md = "n/a (sampled brute force)"
    if exact is not None:
        est, ex = effects(star.frame), effects(exact)
        rho_all = spearman(est, ex)
        # 4. exact top-k inside the verified set
        top = set(ex.abs().nlargest(args.top_k).index)
        got = set(node_ids(ver.frame))
        recall = len(top & got) / len(top)
        recall_md = f"**{recall:.0%}**"
        missed_max = float(ex.drop(index=list(got)).abs().max())
        worst = int(effects(ver.candidates, "rank").loc[list(top)].max())
        print(f"   Spearman(AtP*, exact) over all {len(ex)} nodes: {rho_all:.3f}")
        print(f"4. exact top-{args.top_k} neurons inside AtP*'s verified set: {recall:.0%} "
              f"(goal >= 95%); their worst AtP* rank {worst}; largest exact |effect| left "
              f"unverified {missed_max:.4f}, final threshold {ver.threshold:.4f}, largest "
              f"{ex.abs().max():.4f}")
    else:
        print(f"4. recall of the exact top-{args.top_k}: needs every node patched (run without "
              "--brute-sample)")
    if not args.no_bound:
        print(f"   subsampling bound on unverified nodes: {bound.max:.4f} from {bound.subsets} "
              f"subsets of 32 (coverage 2) in {t_bound:.2f} s; by rank bucket: "
              + ", ".join(f"[{r['rank_start']},{r['rank_stop']}): {r['effect']:.3f}"
                          for r in bound.buckets.to_dict("records")))
    brute_md = (f"{t_brute:.0f} s" if exact is not None
                else f"{t_sample:.1f} s on {n_brute} sampled nodes, extrapolated {t_brute:.0f} s")
    print("markdown:")
    print(f"| `bench_atp.py` | AtP / AtP* over every MLP neuron ({model.name}, {n} pairs, "
          f"{n_nodes} neuron nodes at {where}) | ≤ 5; ≥ 100 | AtP ÷ clean forward "
          f"**{t_atp / t_fwd:.2f}** ({t_atp * 1e3:.0f} vs {t_fwd * 1e3:.0f} ms); brute force "
          f"({brute_md}) ÷ AtP* + verification ({t_star:.1f} s) **{t_brute / t_star:.0f}×**; "
          f"Spearman AtP vs exact at subject_last **{rho:.2f}**; exact top-{args.top_k} "
          f"recovered {recall_md} | {machine()} |")
    assert np.isfinite(rho)


if __name__ == "__main__":
    main()
