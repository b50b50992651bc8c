"""Verified attribution: exact patching of AtP* candidates, a stopping rule, and a bound.

:mod:`factfind.attribute.atp` *estimates* every node's patching effect ``c(n)`` in a few passes.
AtP* (Kramár, Lieberum, Shah & Nanda 2024) treats those estimates as a *ranking*: candidates are
patched exactly (:mod:`factfind.attribute.exact`) in order of their score until the remaining ones
are unlikely to matter, and a subsampling diagnostic bounds what the search may have missed.

**Verification** (:func:`verify`). Candidates are patched in chunks in descending order of
``score`` (for AtP*, ``max(|AtP*|, GradDrop)``). The stopping rule: stop once ``patience``
consecutive candidates have ``|c| < theta`` (after at least ``min_verified``), or after
``budget`` candidates, or when none are left, where ``theta`` is

* a given absolute ``threshold`` ("find every node with ``|c| >= theta``"), or
* with ``top_k``, the ``k``-th largest exact ``|c|`` verified so far ("find the top ``k``":
  stop when ``patience`` candidates in a row fail to enter the current top ``k``), or else
* ``rel_threshold`` times the largest exact ``|c|`` verified so far.

**What the loop may have missed** (:func:`missed_effect_bound`), AtP*'s subsampling
diagnostic. The unverified nodes are grouped by rank bucket (``[V, 2V), [2V, 4V), ...`` in
score order, ``V`` verified) and component (a head's query, key and value also by layer: they
are patched through its ``z``, :mod:`~factfind.attribute.exact`), so that nodes with similar
estimates share subsets and one large effect does not inflate the bound of many small ones.
Each group is cut into subsets of at most ``subset_size`` nodes adjacent in layer (so each
subset's patched run starts late), ``coverage`` times over with shifted cuts and shuffled ties
(each node lands in exactly ``coverage`` subsets; :func:`bound_subsets`). Every subset is
patched *as a whole*. Under the assumption of **no cancellation** - patching a set moves the
metric at least as much as its largest member, ``|c(S)| >= max_{n in S} |c(n)|`` - each
node's effect is bounded by the smallest ``|c(S)|`` among the subsets that contain it,
``u(n) = min_{S ∋ n} |c(S)|``, and a rank bucket's bound is ``max u(n)`` over its nodes. The
bound is only as good as the assumption: effects of opposite sign within a subset (or across
prompts, since ``c`` is a mean) can hide a node, which smaller subsets and more coverage make
less likely; and same-sign effects add up, which makes the bound loose where many nodes
matter a little. It costs about ``coverage * N / subset_size`` stacked copies (plus one per
group and round) for ``N`` unverified nodes, versus ``N`` for brute force.

Example::

    est = atp_star(model, pairs, components=["neurons"], positions=["subject_last"])
    ver = verify(model, pairs, est)
    ver.frame.head(20)                       # exact effects, in AtP* order
    missed_effect_bound(model, pairs, ver).buckets
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.attribute.atp import Estimates
from factfind.attribute.exact import _prepare, patch_node_sets
from factfind.attribute.node_index import ATTENTION_INPUTS, node_component
from factfind.attribute.running_stats import RunningStats
from factfind.data.batch import PairBatch
from factfind.errors import ArgumentError
from factfind.localize.patching import PatchSite
from factfind.results import tidy
from factfind.types import Metric, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- verification


def sites_from_frame(df: pd.DataFrame) -> list[PatchSite]:
    """Nodes from the site columns of a node frame (``component, layer, head, neuron,
    position, role``)."""
    out = []
    for comp, layer, head, neuron, pos, role in zip(
            df["component"], df["layer"], df["head"], df["neuron"], df["position"], df["role"],
            strict=True):
        where: Role | int = Role(role) if not pd.isna(role) else int(pos)
        out.append(PatchSite(node_component(comp), int(layer), where,
                             head=None if pd.isna(head) else int(head),
                             neuron=None if pd.isna(neuron) else int(neuron)))
    return out


@dataclass
class Verification:
    """The outcome of :func:`verify`.

    Attributes:
        frame: the verified nodes in rank order: ``method="exact"``, ``effect`` (exact mean
            effect) with CI and ``n``, the candidate's ``estimate``, ``score`` and ``rank``.
        candidates: every candidate in rank order with ``rank`` and ``verified``.
        threshold: the final ``theta`` of the stopping rule.
        stopped: ``"patience"``, ``"budget"`` or ``"exhausted"``.
        direction: of the patches.
    """

    frame: pd.DataFrame
    candidates: pd.DataFrame
    threshold: float
    stopped: str
    direction: str

    @property
    def n_verified(self) -> int:
        return len(self.frame)


def _as_frame(estimates: pd.DataFrame | Estimates) -> pd.DataFrame:
    df = estimates.frame if isinstance(estimates, Estimates) else estimates
    if "score" not in df.columns:
        df = df.assign(score=df["effect"].abs())
    if bool(df["prompt"].notna().any()):
        raise ArgumentError("verify() ranks nodes: pass the aggregate frame (one row per node)")
    return df


@validated
def verify(
    model: Model,
    pairs: FactPairs | PairBatch,
    estimates: pd.DataFrame | Estimates,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    rel_threshold: float = 0.05,
    patience: int = 32,
    min_verified: int = 0,
    budget: int | None = None,
    chunk: int = 16,
    batch_size: int = 32,
    progress: bool = True,
    metric: Metric | None = None,
) -> Verification:
    """Patch candidates exactly in descending ``score`` until the stopping rule (module doc).

    Args:
        estimates: an :class:`~factfind.attribute.atp.Estimates` or its frame (``score`` column;
        else
            ``|effect|``); its ``direction`` column sets the patch direction.
        threshold: absolute ``theta`` in metric units.
        top_k: ``theta`` is the ``top_k``-th largest exact ``|c|`` verified so far (0 until
            ``top_k`` are verified).
        rel_threshold: otherwise ``theta`` is this times the largest exact ``|c|`` so far.
        patience: consecutive candidates below ``theta`` before stopping.
        min_verified: never stop before this many.
        budget: never verify more than this many.
        chunk: candidates patched per stacked forward (fewer once the stopping rule is
            within reach, so no candidate is patched after the stop).
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference;
            use the estimates' metric).

    Returns:
        A :class:`Verification`.

    Example::

        ver = verify(model, pairs, atp_star(model, pairs), top_k=20, patience=16)
        ver.frame.assign(size=ver.frame.effect.abs()).nlargest(20, "size")
    """
    df = _as_frame(estimates)
    direction = str(df["direction"].iloc[0]) if "direction" in df.columns else "noise"
    order = np.argsort(-df["score"].to_numpy(dtype=float), kind="stable")
    cand = df.iloc[order].reset_index(drop=True)
    cand["rank"] = np.arange(len(cand))
    sites = sites_from_frame(cand)
    limit = len(sites) if budget is None else min(budget, len(sites))
    prepared = _prepare(model, pairs, sites[:limit], direction=direction,
                        batch_size=batch_size, metric=metric)
    stats: list[dict[str, Tensor]] = []
    if top_k is not None and top_k < 1:
        raise ArgumentError(f"top_k must be >= 1, got {top_k}")
    heap: list[float] = []
    largest, below, theta, stopped = 0.0, 0, threshold or 0.0, "exhausted"
    done = 0
    # the stop depends on what is found, so the bar's total is the fewest candidates that can
    # still end the search (``patience`` misses in a row from here, or the budget): its ETA is
    # the time to the stop if no further candidate clears theta, and it grows with each hit
    bar = tqdm(total=min(limit, max(min_verified, (top_k or 0) + patience)),
               disable=not progress,
               desc=f"verify (ETA: if the next {patience} miss)", unit="candidate")
    while done < limit:
        # never patch past a possible stop: with `below` misses in a row, `patience - below`
        # more could end the search
        size = chunk if below == 0 or done < min_verified else min(chunk, patience - below)
        group = [[s] for s in sites[done:min(limit, done + max(1, size))]]
        st = patch_node_sets(model, pairs, group, chunk=chunk, prepared=prepared,
                             progress=False)
        assert isinstance(st, RunningStats)
        vals = st.values()
        stats.append(vals)
        for e in vals["effect"].nan_to_num(0.0).tolist():
            done += 1
            largest = max(largest, abs(e))
            if top_k is not None:  # a min-heap of the top_k largest |c| seen
                (heapq.heappush if len(heap) < top_k else heapq.heappushpop)(heap, abs(e))
            if threshold is not None:
                theta = threshold
            elif top_k is not None:
                theta = heap[0] if len(heap) == top_k else 0.0
            else:
                theta = rel_threshold * largest
            below = below + 1 if abs(e) < theta else 0
            if below >= patience and done >= min_verified:
                stopped = "patience"
                break
        fewest = done + patience - below if theta > 0 else max(done, top_k or 0) + patience
        bar.total = min(limit, max(min_verified, fewest))
        bar.update(done - bar.n)
        if stopped == "patience":
            break
    bar.close()
    if stopped != "patience" and done < len(sites):
        stopped = "budget"
    got = {k: torch.cat([s[k] for s in stats])[:done] for k in ("effect", "ci_low", "ci_high",
                                                               "n")}
    ver = cand.iloc[:done].copy()
    ver["estimate"] = ver["effect"]
    ver["method"] = pd.array(["exact"] * done, dtype="string")
    for k, v in got.items():
        ver[k] = v.numpy() if k != "n" else pd.array(v.numpy().round(), dtype="Int64")
    cand["verified"] = cand["rank"] < done
    log.info("verify: %d of %d candidates patched (stopped: %s, theta=%.4g)", done, len(cand),
             stopped, theta)
    return Verification(ver.reset_index(drop=True), cand, float(theta), stopped, direction)


# ----------------------------------------------------------------------------- missed effects


@dataclass
class Bound:
    """The subsampling bound of :func:`missed_effect_bound`.

    Attributes:
        nodes: per unverified node: ``rank`` and ``bound`` (``u(n)``, NaN if not covered).
        buckets: per rank bucket ``[rank_start, rank_stop)``: ``nodes``, ``covered`` and
            ``effect`` = the bucket's bound ``max u(n)`` (a tidy frame, ``method="atp*/bound"``).
        max: the largest bound over every covered unverified node.
        subsets: how many subsets were patched.
    """

    nodes: pd.DataFrame
    buckets: pd.DataFrame
    max: float
    subsets: int


def bound_subsets(bucket: np.ndarray, component: Sequence[str], layer: np.ndarray, *,
                  subset_size: int, coverage: int, seed: int = 0) -> list[np.ndarray]:
    """The subsets :func:`missed_effect_bound` patches, as arrays of node indices.

    Nodes are grouped by rank bucket and ``component`` (any label: the caller puts a head's
    q/k/v of one layer in a group of their own). Each group is cut ``coverage`` times into
    runs of ``subset_size`` consecutive nodes in layer order (ties in a fresh random order
    each time), the cuts of round ``r`` shifted by ``r * subset_size / coverage`` so that no
    two rounds repeat a subset. A subset thus holds nodes of similar estimates from one or a
    few adjacent layers, its patched run starts at its first layer, each node lands in exactly
    ``coverage`` subsets, and there are about ``coverage * N / subset_size`` of them. (Grouping
    by single layers instead left the ~250 unverified heads of a 30-layer model's q/k/v x role
    search in 136 groups of ~2 nodes: 272 subsets where ~34 suffice.)
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, str], list[int]] = {}
    for j in range(len(layer)):
        groups.setdefault((int(bucket[j]), str(component[j])), []).append(j)
    members: list[np.ndarray] = []
    for key in sorted(groups):
        idx = np.asarray(groups[key])
        for r in range(coverage):
            order = idx[np.lexsort((rng.random(len(idx)), layer[idx]))]
            offset = (r * subset_size) // coverage
            cuts = [c for c in range(offset, len(order), subset_size) if c > 0]
            members += [m for m in np.split(order, cuts) if len(m)]
    return members


def missed_effect_bound(
    model: Model,
    pairs: FactPairs | PairBatch,
    verification: Verification,
    *,
    subset_size: int = 16,
    coverage: int = 2,
    max_nodes: int | None = None,
    seed: int = 0,
    chunk: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    metric: Metric | None = None,
) -> Bound:
    """Bound the exact effect of the candidates :func:`verify` did not patch (module doc).

    Args:
        verification: the result of :func:`verify`.
        subset_size: nodes patched together per subset.
        coverage: subsets each node lands in (the bound is the minimum over them).
        max_nodes: only the first ``max_nodes`` unverified ranks (default all).
        seed: the subsets' shuffle.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference;
            use the verification's metric).

    Returns:
        A :class:`Bound`; valid under the no-cancellation assumption stated in the module doc.
    """
    if subset_size < 1 or coverage < 1:
        raise ArgumentError("subset_size and coverage must be >= 1")
    cand = verification.candidates
    todo = cast(pd.DataFrame, cand.loc[~cand["verified"].to_numpy(dtype=bool)])
    if max_nodes is not None:
        todo = cast(pd.DataFrame, todo.iloc[:max_nodes])
    sites = sites_from_frame(todo)
    ranks = todo["rank"].to_numpy()
    n_ver = verification.n_verified
    edges = [n_ver]  # rank buckets [V, 2V), [2V, 4V), ... over the candidates
    while edges[-1] < len(cand):
        edges.append(min(len(cand), max(edges[-1] + 1, 2 * edges[-1])))
    bucket = np.searchsorted(edges, ranks, side="right")
    # a head's q, k and v are patched through its z at their own layer, so a set holding them
    # may hold nothing from another layer (exact._check_set): one group per layer for them
    groups = [f"q/k/v@{s.layer}" if s.component in ATTENTION_INPUTS else str(s.component)
              for s in sites]
    members = bound_subsets(bucket, groups, np.array([s.layer for s in sites]),
                            subset_size=subset_size, coverage=coverage, seed=seed)
    sets = [[sites[j] for j in m] for m in members]
    stats = patch_node_sets(model, pairs, sets, direction=verification.direction,
                            batch_size=batch_size, chunk=chunk, progress=progress,
                            metric=metric)
    assert isinstance(stats, RunningStats)
    size = stats.values()["effect"].abs().nan_to_num(0.0).numpy()
    bound = np.full(len(sites), np.inf)
    for m, e in zip(members, size, strict=True):
        bound[m] = np.minimum(bound[m], e)
    bound[~np.isfinite(bound)] = np.nan
    nodes = cast(pd.DataFrame, todo[["component", "layer", "head", "neuron", "position", "role",
                                     "rank", "score"]]).copy()
    nodes["bound"] = bound
    buckets, top = bound_buckets(bound, ranks, edges, method="atp*/bound")
    return Bound(nodes.reset_index(drop=True), buckets, top, len(sets))


def bound_buckets(bound: np.ndarray, ranks: np.ndarray, edges: Sequence[int], *, method: str
                  ) -> tuple[pd.DataFrame, float]:
    """The per-node bounds summarised per rank bucket ``[edges[i], edges[i+1])``: how many nodes,
    how many a subset covered, and the largest bound (an empty frame with an ``effect``
    column when no bucket has a node), plus the largest bound overall (NaN if none)."""
    rows = []
    for lo, hi in itertools.pairwise(edges):
        sel = (ranks >= lo) & (ranks < hi)
        if not sel.any():
            continue
        b = bound[sel]
        rows.append({"method": method, "rank_start": lo, "rank_stop": hi,
                     "nodes": int(sel.sum()), "covered": int(np.isfinite(b).sum()),
                     "effect": float(np.nanmax(b)) if np.isfinite(b).any() else math.nan})
    top = float(np.nanmax(bound)) if np.isfinite(bound).any() else math.nan
    return (tidy(rows) if rows else tidy(pd.DataFrame({"effect": pd.Series(dtype=float)})),
            top)

