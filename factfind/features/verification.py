"""Exact patches of dictionary features, verification of their attributions, and the bound.

An attribution (:func:`~factfind.features.attribution.feature_atp`) is a first-order estimate;
this module measures. :func:`patch_features` patches one feature node exactly - the feature's
activation moved from the source run to the base run through its decoder, ``site += (a_src -
a_base) * W_dec[f]`` at the node's role, which is what splicing the dictionary with
``edit_features`` does when its error is kept - or one error node (the error's difference), many
nodes stacked into one incremental run from the cached base run. :func:`verify_features`
patches the top nodes the estimates rank and tabulates estimate against exact;
:func:`feature_missed_bound` bounds what the unverified nodes may hide by patching subsets of
them, with AtP*'s subsets (:func:`factfind.attribute.verification.bound_subsets`; Kramár et al.
2024). ``reference=True`` patches through :func:`~factfind.features.splice.spliced_run` one node
at a time.

Example::

    est = ff.feature_atp(model, pairs, dicts)
    ver = ff.verify_features(model, pairs, dicts, est, top=20)
    ff.feature_missed_bound(model, pairs, dicts, ver).buckets
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.attribute.verification import Bound, bound_buckets, bound_subsets
from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, NotFoundError, check_mode
from factfind.features.attribution import (
    _checked,
    _dense,
    _keys,
    _read,
)
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.features.splice import splice_edits
from factfind.graph.node import Node
from factfind.results import t_quantile, tidy
from factfind.types import DIRECTIONS, Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- exact patching


def parse_feature_node(node_id: str, dicts: Dictionaries) -> tuple[Dictionary, int | None, Role]:
    """``(dictionary, feature index or None for the error node, role)`` of a node id such as
    ``L5.tc.f1234@final``; a typed one-line error for ids that name no feature of ``dicts``."""
    try:
        node = Node.parse(node_id)
    except ArgumentError as e:
        raise ArgumentError(f"{node_id!r} is not a feature node id: {e}") from None
    if node.kind not in ("feature", "error"):
        raise NotFoundError(f"{node_id!r} names a {node.kind}, not a dictionary feature or "
                            "error node (e.g. 'L5.tc.f1234@final', 'L5.tc.err@final')")
    name = f"L{node.layer}.{node.dictionary}"
    if name not in dicts:
        raise NotFoundError(f"{node_id!r}: no dictionary {name} in this set (have "
                            f"{', '.join(dicts)})")
    d = dicts[name]
    if node.index is not None and node.index >= d.d_sae:
        raise NotFoundError(f"{node_id!r}: {name} has {d.d_sae} features (0..{d.d_sae - 1})")
    if node.role == "all":
        raise ArgumentError(f"{node_id!r}: patch a feature at a position role, not 'all'")
    return d, node.index, Role(node.role)


@dataclass
class _Patches:
    """One batch's base metric and, per dictionary, the activation and error changes."""

    pb: PairBatch
    base_tb: TokenBatch
    masks: dict[Role, Tensor]  # role -> [batch pos] float
    delta_a: dict[str, Tensor]  # name -> [batch pos d_sae]
    delta_e: dict[str, Tensor]  # name -> [batch pos d_out]
    base_metric: Tensor  # [batch]
    prefix: Any  # the base run kept for incremental patched runs (Model.base_run)


def _prepare_patches(model: Model, ds: Dictionaries, pb: PairBatch, roles: Iterable[Role],
                     direction: str, metric: Metric | None) -> _Patches:
    base_tb, src_tb = pb.base_and_source(direction)
    every = base_tb.attention_mask.to(model.device).bool()
    base, _, _ = _read(model, ds, base_tb, every)
    src, _, _ = _read(model, ds, src_tb, every)
    masks = {r: (base_tb.position_mask(r) & every.cpu()).to(model.device, torch.float32)
             for r in set(roles)}
    da = {n: _dense(src.acts[n] - base.acts[n], every) for n in ds}
    de = {n: _dense(src.err[n] - base.err[n], every) for n in ds}
    with torch.no_grad():
        m0 = pb.measure_run(lambda lg: model.run(base_tb, logits=lg).logits, 1, metric)
        prefix = model.base_run(base_tb)
    return _Patches(pb, base_tb, masks, da, de, m0, prefix)


def _node_delta(ds: Dictionaries, p: _Patches, node: tuple[Dictionary, int | None, Role]
                ) -> tuple[SiteKey, Tensor]:
    """The additive change of the written site that patches one node: ``m Δa_f W_dec[f]`` or
    ``m Δerr`` (``[batch pos d_out]``, ``m`` the role's positions)."""
    d, f, role = node
    m = p.masks[role][..., None]
    if f is None:
        return _keys(d)[1], m * p.delta_e[d.name]
    return _keys(d)[1], m * p.delta_a[d.name][..., f:f + 1] * d.W_dec[f]


def _patch_chunk(model: Model, ds: Dictionaries, p: _Patches,
                 sets: Sequence[Sequence[tuple[Dictionary, int | None, Role]]],
                 metric: Metric | None) -> Tensor:
    """``[set batch]`` exact effects ``M(patched) - M(base)`` of patching each set as a whole
    (NaN where none of its nodes' roles exists), one stacked forward of ``S * batch`` rows."""
    S, B = len(sets), len(p.pb)
    deltas: dict[SiteKey, Tensor] = {}
    for s, group in enumerate(sets):
        for node in group:
            key, dv = _node_delta(ds, p, node)
            if key not in deltas:
                deltas[key] = torch.zeros(S, *dv.shape, dtype=dv.dtype, device=dv.device)
            deltas[key][s] += dv
    edits = {k: (lambda y, v=v: y + v.flatten(0, 1).to(y.dtype)) for k, v in deltas.items()}
    # incremental (Model.run_from): nothing changes below the lowest patched layer or before
    # the first patched position, so the stacked run starts there from the cached base run
    layer = min(k[1] for k in deltas)
    touched = torch.stack([p.masks[node[2]] for group in sets for node in group]).sum(0)
    cols = touched.sum(0).nonzero()
    start = (layer, int(cols.min()) if len(cols) else 0)
    with torch.no_grad():
        m = p.pb.measure_run(lambda lg: model.run_from(
            p.prefix, start=start, reps=S, edits=edits, logits=lg).logits, S, metric)
    eff = (m.reshape(S, B) - p.base_metric[None]).double().cpu()
    valid = torch.stack([
        torch.stack([p.masks[node[2]].sum(-1).gt(0).cpu() for node in group]).any(0)
        for group in sets])
    return torch.where(valid, eff, torch.nan)


def _patch_sets(model: Model, ds: Dictionaries, pairs: FactPairs | PairBatch,
                sets: Sequence[Sequence[tuple[Dictionary, int | None, Role]]], *,
                direction: str, metric: Metric | None, batch_size: int, chunk: int,
                progress: bool, desc: str) -> Tensor:
    """``[set prompt]`` exact effects of every set, over every batch of pairs."""
    roles = {node[2] for group in sets for node in group}
    batches = list(pair_batches(model, pairs, batch_size))
    n_chunks = math.ceil(len(sets) / chunk)
    bar = tqdm(total=len(batches) * n_chunks, desc=desc, unit="chunk", disable=not progress)
    cols = []
    for _, pb in batches:
        p = _prepare_patches(model, ds, pb, roles, direction, metric)
        # sets of late layers together: each stacked run starts at its lowest layer
        order = sorted(range(len(sets)), key=lambda i: min(n[0].layer for n in sets[i]))
        out = torch.full((len(sets), len(pb)), torch.nan, dtype=torch.float64)
        for c in range(0, len(sets), chunk):
            idx = order[c:c + chunk]
            out[idx] = _patch_chunk(model, ds, p, [sets[i] for i in idx], metric)
            bar.update(1)
        cols.append(out)
    bar.close()
    return torch.cat(cols, 1)


def _summary(eff: Tensor) -> dict[str, np.ndarray]:
    """Mean over prompts (NaN left out), 95% CI and ``n`` per row of ``[set prompt]``."""
    x = eff.numpy()
    ok = np.isfinite(x)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0).sum(1) / n
        var = np.where(ok, (x - mean[:, None]) ** 2, 0).sum(1) / np.maximum(n - 1, 1)
        half = np.where(n > 1, np.sqrt(var / n) * t_quantile(n), np.nan)
    return {"effect": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


@validated
def patch_features(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    nodes: Sequence[str],
    *,
    direction: str = "noise",
    metric: Metric | None = None,
    batch_size: int = 32,
    chunk: int = 16,
    reference: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Exact effect of patching each feature (or error) node on its own.

    A feature node ``L5.tc.f1234@final`` takes its activation from the source run at the
    role's positions, in the base run with every dictionary spliced in and error terms kept:
    the run changes by exactly ``Δa_f W_dec[f]`` at the dictionary's written site, which is
    the additive edit applied here (``S`` nodes stacked in one incremental forward that starts
    at the lowest patched layer and first patched position, :meth:`Model.run_from`).
    ``reference=True`` runs :func:`~factfind.features.splice.spliced_run` with
    ``edit_features`` instead, one node at a time. An error node patches its dictionary's
    error term.

    Returns:
        One row per node: ``method="exact"``, the site columns, ``effect`` (mean of
        ``M(patched) - M(base)`` over prompts where the role exists) with a 95% CI and ``n``,
        ``dictionary``, ``feature``, ``node``.
    """
    check_mode(direction, "direction", DIRECTIONS)
    ds = _checked(dicts, model)
    if not nodes:
        raise ArgumentError("nodes is empty: name at least one feature node id")
    parsed = [parse_feature_node(n, ds) for n in nodes]
    if reference:
        eff = torch.cat([_reference_patch(model, ds, pb, parsed, direction, metric)
                         for _, pb in pair_batches(model, pairs, batch_size)], 1)
    else:
        eff = _patch_sets(model, ds, pairs, [[n] for n in parsed], direction=direction,
                          metric=metric, batch_size=batch_size, chunk=chunk, progress=progress,
                          desc="patch features")
    return _node_frame(parsed, list(nodes), _summary(eff), direction)


def _node_frame(parsed: Sequence[tuple[Dictionary, int | None, Role]], ids: Sequence[str],
                stats: dict[str, np.ndarray], direction: str) -> pd.DataFrame:
    df = pd.DataFrame({
        "method": "exact", "component": [d.short for d, _, _ in parsed],
        "layer": [d.layer for d, _, _ in parsed], "role": [str(r) for _, _, r in parsed],
        **stats, "dictionary": [d.name for d, _, _ in parsed],
        "feature": pd.array([f for _, f, _ in parsed], dtype="Int64"), "node": list(ids)})
    df["direction"] = direction
    return tidy(df)


def _reference_patch(model: Model, ds: Dictionaries, pb: PairBatch,
                     parsed: Sequence[tuple[Dictionary, int | None, Role]], direction: str,
                     metric: Metric | None) -> Tensor:
    """``[node batch]``: each node patched by a spliced run with ``edit_features`` (or, for an
    error node, its error term replaced), one node per forward."""
    base_tb, src_tb = pb.base_and_source(direction)
    every = base_tb.attention_mask.to(model.device).bool()
    src, _, _ = _read(model, ds, src_tb, every)
    with torch.no_grad():
        m0 = pb.measure_run(lambda lg: model.run(base_tb, logits=lg).logits, 1, metric)
    rows = []
    seen_x: dict[str, Tensor] = {}
    for d, f, role in parsed:
        m = (base_tb.position_mask(role) & every.cpu()).to(model.device)
        a1 = _dense(src.acts[d.name], every)
        e1 = _dense(src.err[d.name], every)
        if f is not None:
            def edit(a: Tensor, f: int = f, m: Tensor = m, a1: Tensor = a1) -> Tensor:
                out = a.clone()
                out[..., f] = torch.where(m, a1[..., f].to(a.dtype), a[..., f])
                return out
            edits = splice_edits(ds, error=True, edit_features={d.name: edit})
        else:
            edits = splice_edits([x for x in ds.values() if x is not d], error=True)
            write = _keys(d)[1]
            prev_write = edits.get(write)

            def swap_error(y: Tensor, d: Dictionary = d, m: Tensor = m, e1: Tensor = e1,
                           prev: Any = prev_write) -> Tensor:
                y = prev(y) if prev else y
                # y is the model's site: its error is y - decode(acts); put e1 where m holds
                x = seen_x.get(d.name, y)
                a = d.encode(x)
                e0 = y.to(a.dtype) - d.decode(a)
                return (y.to(a.dtype) + m[..., None] * (e1 - e0)).to(y.dtype)

            if d.kind is not DictKind.SAE:
                kin = (Component.MLP_IN, d.layer)
                pin = edits.get(kin)

                def remember(x: Tensor, d: Dictionary = d, pin: Any = pin) -> Tensor:
                    x = pin(x) if pin else x
                    seen_x[d.name] = x
                    return x
                edits[kin] = remember
            edits[write] = swap_error
        with torch.no_grad():
            m1 = pb.measure_run(
                lambda lg, edits=edits: model.run(base_tb, edits=edits, logits=lg).logits, 1,
                metric)
        ok = m.sum(-1).gt(0).cpu()
        rows.append(torch.where(ok, (m1 - m0).double().cpu(), torch.nan))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- verification


@dataclass
class FeatureVerification:
    """The outcome of :func:`verify_features`.

    Attributes:
        frame: the verified nodes in rank order: ``method="exact"``, ``effect`` (exact) with
            CI and ``n``, the attribution's ``estimate``, ``score``, ``rank``, ``node`` and the
            site columns.
        candidates: every attributed node in rank order with ``rank`` and ``verified``.
        direction: of the patches.
    """

    frame: pd.DataFrame
    candidates: pd.DataFrame
    direction: str

    @property
    def n_verified(self) -> int:
        return len(self.frame)


@validated
def verify_features(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    estimates: pd.DataFrame,
    *,
    top: int = 32,
    metric: Metric | None = None,
    batch_size: int = 32,
    chunk: int = 16,
    progress: bool = True,
) -> FeatureVerification:
    """Patch the ``top`` nodes of a :func:`feature_atp` frame exactly, in descending ``score``
    (``|effect|``), and return estimate against exact per node.

    Args:
        estimates: the aggregate frame of :func:`feature_atp` (one row per node; its
            ``direction`` column sets the patches' direction).
        top: how many nodes to verify (the rest are bounded by :func:`feature_missed_bound`).
        metric: the attribution's metric (default the logit difference).

    Example::

        ver = verify_features(model, pairs, dicts, feature_atp(model, pairs, dicts), top=16)
        ver.frame[["node", "estimate", "effect"]]
    """
    df = _candidates(estimates)
    direction = str(df["direction"].iloc[0]) if "direction" in df.columns else "noise"
    ds = _checked(dicts, model)
    k = min(top, len(df))
    ids = df["node"].astype(str).tolist()[:k]
    exact = patch_features(model, pairs, ds, ids, direction=direction, metric=metric,
                           batch_size=batch_size, chunk=chunk, progress=progress)
    ver = df.iloc[:k].copy()
    ver["estimate"] = ver["effect"]
    for col in ("method", "effect", "ci_low", "ci_high", "n"):
        ver[col] = exact[col].to_numpy()
    cand = df.copy()
    cand["verified"] = cand["rank"] < k
    log.info("verify_features: %d of %d nodes patched", k, len(df))
    return FeatureVerification(tidy(ver), cand, direction)


def _candidates(estimates: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(estimates, pd.DataFrame) or "node" not in estimates.columns:
        raise ArgumentError("verify_features needs a feature_atp frame (columns node, effect)")
    if bool(estimates["prompt"].notna().any()):
        raise ArgumentError("verify_features ranks nodes: pass the aggregate frame (one row "
                            "per node), not per_prompt=True")
    if len(estimates) == 0:
        raise ArgumentError("no nodes to verify: the attribution frame is empty")
    score = estimates["score"] if "score" in estimates.columns else estimates["effect"].abs()
    order = np.argsort(-np.nan_to_num(score.to_numpy(dtype=float)), kind="stable")
    cand = estimates.iloc[order].reset_index(drop=True)
    cand["score"] = np.nan_to_num(score.to_numpy(dtype=float)[order])
    cand["rank"] = np.arange(len(cand))
    return cand


def feature_missed_bound(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    verification: FeatureVerification,
    *,
    subset_size: int = 16,
    coverage: int = 2,
    max_nodes: int | None = None,
    seed: int = 0,
    metric: Metric | None = None,
    batch_size: int = 32,
    chunk: int = 16,
    progress: bool = True,
) -> Bound:
    """Bound the exact effect of the nodes :func:`verify_features` did not patch.

    AtP*'s subsampling diagnostic (:func:`factfind.attribute.verification.missed_effect_bound`,
    whose subsets :func:`~factfind.attribute.verification.bound_subsets` cuts here too): the
    unverified nodes, grouped by rank bucket ``[V, 2V), [2V, 4V), ...`` and dictionary, are
    patched in subsets of ``subset_size`` (each node in ``coverage`` subsets), and a node's
    bound is the smallest ``|c(S)|`` over the subsets that hold it - valid if patching a set
    moves the metric at least as much as its largest member (no cancellation). Nodes absent
    from the attribution frame changed in no prompt: their effect is exactly 0.

    Returns:
        A :class:`~factfind.attribute.verification.Bound` (``nodes`` with ``node``, ``rank``,
        ``score``, ``bound``; ``buckets``; ``max``; ``subsets``).
    """
    if subset_size < 1 or coverage < 1:
        raise ArgumentError("subset_size and coverage must be >= 1")
    ds = _checked(dicts, model)
    cand = verification.candidates
    todo = cast(pd.DataFrame, cand.loc[~cand["verified"].to_numpy(dtype=bool)])
    if max_nodes is not None:
        todo = cast(pd.DataFrame, todo.iloc[:max_nodes])
    parsed = [parse_feature_node(str(n), ds) for n in todo["node"]]
    ranks = todo["rank"].to_numpy()
    edges = [verification.n_verified]
    while edges[-1] < len(cand):
        edges.append(min(len(cand), max(edges[-1] + 1, 2 * edges[-1])))
    bucket = np.searchsorted(edges, ranks, side="right")
    members = bound_subsets(bucket, [d.name for d, _, _ in parsed],
                            np.array([d.layer for d, _, _ in parsed]),
                            subset_size=subset_size, coverage=coverage, seed=seed)
    sets = [[parsed[j] for j in m] for m in members]
    bound = np.full(len(parsed), np.inf)
    if sets:
        eff = _patch_sets(model, ds, pairs, sets, direction=verification.direction,
                          metric=metric, batch_size=batch_size, chunk=chunk, progress=progress,
                          desc="bound features")
        size = np.abs(np.nan_to_num(_summary(eff)["effect"]))
        for m, e in zip(members, size, strict=True):
            bound[m] = np.minimum(bound[m], e)
    bound[~np.isfinite(bound)] = np.nan
    nodes = cast(pd.DataFrame, todo[["node", "dictionary", "feature", "layer", "role", "rank",
                                     "score"]]).copy()
    nodes["bound"] = bound
    buckets, top = bound_buckets(bound, ranks, edges, method="feature/bound")
    return Bound(nodes.reset_index(drop=True), buckets, top, len(sets))


__all__ = ["FeatureVerification", "feature_missed_bound", "parse_feature_node", "patch_features",
           "verify_features"]
