"""Dataset-level circuits: per-pair attributions aggregated over a relation, and their stability.

One pair's attribution is a noisy, prompt-specific picture; the circuit a relation uses is
what holds across its pairs. Following Marks et al. (2024), who attribute a metric averaged
over a dataset, :func:`aggregate_circuit` takes the per-pair node attributions of
:func:`~factfind.features.attribution.feature_atp` (``per_prompt=True``; any tidy per-prompt
frame works: heads, MLPs and neurons from :func:`~factfind.attribute.atp.atp` too) and gives
each node its **mean effect** over the pairs where its role exists, a Student-t 95% interval
and ``n`` - per relation if the pairs span several - ranked by ``|mean|``.

**Stability** asks whether that ranking is a property of the relation or of the sample.
:func:`circuit_stability` splits the pairs at random into two disjoint halves, aggregates each
half on its own, and compares the top-``k`` nodes of the two by their Jaccard index

    J_k = |top_k(A) ∩ top_k(B)| / |top_k(A) ∪ top_k(B)|

(1: the halves name the same ``k`` nodes; 0: none in common) at several ``k`` (the issue asks
for ``k = 50``), over ``splits`` random splits, with the mean and its interval. Two halves of
identical pairs give ``J = 1`` at every ``k``; a circuit that runs through subject-specific
features (a lookup table) gives low ``J`` even when each pair's attribution is exact - that is
a finding about the circuit, not noise. Ties in ``|mean|`` are broken by node id, so the top-k
of a half is deterministic; a node absent from a half's frame has effect 0 there; effects
below ``1e-6`` of the largest count as 0 (float rounding must not order nodes that do
nothing).

Cost: the per-prompt attribution once (:func:`feature_atp`, one AtP pass per batch); the
splits re-aggregate a ``[node prompt]`` matrix of that frame (no model runs; on SmolLM2's 64
pairs and ~10^5 nodes, well under a second per split).

Example::

    rows = ff.feature_atp(model, pairs, dicts, per_prompt=True)
    circuit = aggregate_circuit(rows, groups=[p.relation for p in pairs.clean])
    circuit_stability(rows, k=(10, 50, 200), splits=20)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError, EmptyInputError
from factfind.results import t_quantile, tidy

#: the ``k`` at which :func:`circuit_stability` compares the halves by default
STABILITY_KS = (10, 50, 200)


def node_ids(frame: pd.DataFrame) -> pd.Series:
    """The circuit-graph node id of each row: the ``node`` column where a frame has one
    (feature and error nodes), else built from the site columns (``L3.h2@final``,
    ``L4.n311@subject_last``, ``L5.mlp@final``)."""
    if "node" in frame.columns:
        return cast(pd.Series, frame["node"].astype(str))
    need = {"component", "layer", "role"}
    if not need <= set(frame.columns):
        raise ArgumentError(f"a node frame needs a node column or {sorted(need)}; got "
                            f"{list(frame.columns)}")
    comp = frame["component"].astype(str).to_numpy()
    layer = frame["layer"].astype("Int64").astype(str).to_numpy()
    role = frame["role"].astype(str).to_numpy()
    head = frame["head"].astype("Int64").astype(str).to_numpy() if "head" in frame.columns \
        else np.full(len(frame), "<NA>")
    neuron = frame["neuron"].astype("Int64").astype(str).to_numpy() \
        if "neuron" in frame.columns else np.full(len(frame), "<NA>")
    unit = np.where(np.isin(comp, ["head_out", "z", "q", "k", "v"]),
                    np.char.add("h", head.astype(str)),
                    np.where(comp == "neurons", np.char.add("n", neuron.astype(str)), "mlp"))
    return pd.Series(np.char.add(np.char.add(np.char.add(np.char.add("L", layer.astype(str)),
                                                         "."), unit), np.char.add("@", role)),
                     index=frame.index)


def _per_prompt(rows: pd.DataFrame) -> pd.DataFrame:
    """``node, prompt, effect`` from a per-prompt frame (typed errors for anything else)."""
    if not isinstance(rows, pd.DataFrame) or "effect" not in rows.columns or \
            "prompt" not in rows.columns:
        raise ArgumentError("rows must be a per-prompt attribution frame (columns prompt, "
                            "effect): feature_atp(..., per_prompt=True) or atp(..., "
                            "per_prompt=True)")
    if len(rows) == 0:
        raise EmptyInputError("rows is empty: no node was attributed (check the pairs and "
                              "roles)")
    if bool(rows["prompt"].isna().any()):
        raise ArgumentError("rows holds aggregate rows (prompt <NA>): pass the per-prompt "
                            "frame (per_prompt=True), not the node frame")
    out = pd.DataFrame({"node": node_ids(rows).to_numpy(),
                        "prompt": rows["prompt"].to_numpy(dtype=np.int64),
                        "effect": rows["effect"].to_numpy(dtype=float)})
    return out


def _aggregate(pp: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95% CI and ``n`` per node of ``node, prompt, effect`` rows (NaN left out)."""
    pp = cast(pd.DataFrame, pp[np.isfinite(pp["effect"].to_numpy())])
    g = pp.groupby("node", sort=False)["effect"]
    mean, n, sd = (cast(pd.Series, x) for x in (g.mean(), g.count(), g.std(ddof=1)))
    half = sd / np.sqrt(n) * t_quantile(n.to_numpy())
    half[n < 2] = np.nan
    return pd.DataFrame({"node": mean.index, "effect": mean.to_numpy(),
                         "ci_low": (mean - half).to_numpy(), "ci_high": (mean + half).to_numpy(),
                         "n": n.to_numpy()})


#: effects below this fraction of the largest ``|effect|`` rank as ties at zero (by node id):
#: float rounding (~1e-9 of a logit) must not order nodes that do nothing
RANK_RTOL = 1e-6


def _ranked(agg: pd.DataFrame) -> pd.DataFrame:
    """Rows by ``|effect|`` descending, ties (and effects below :data:`RANK_RTOL` of the
    largest) by node id; ``score`` and ``rank`` added."""
    score = np.abs(np.nan_to_num(agg["effect"].to_numpy(dtype=float)))
    key = np.where(score > RANK_RTOL * (score.max() if len(score) else 0.0), score, 0.0)
    agg = agg.assign(score=score, _key=key)
    agg = agg.sort_values(["_key", "node"], ascending=[False, True], kind="stable") \
        .drop(columns="_key")
    return agg.assign(rank=np.arange(len(agg))).reset_index(drop=True)


def aggregate_circuit(rows: pd.DataFrame, *, groups: Sequence[str] | None = None
                      ) -> pd.DataFrame:
    """Per node, the mean attribution over pairs with a 95% interval and ``n``, ranked.

    Args:
        rows: a per-prompt attribution frame (``feature_atp(..., per_prompt=True)``, or
            ``atp(..., per_prompt=True)`` for heads, MLPs and neurons).
        groups: one label per prompt (e.g. ``[p.relation for p in pairs.clean]``): the
            aggregate per label, plus ``"all"``.

    Returns:
        One row per (group, node): ``method`` (the attribution's, e.g. ``feature_atp``),
        the site columns of the node, ``effect`` (mean over pairs), ``ci_low``/``ci_high``,
        ``n``, then ``node``, ``group``, ``score = |effect|`` and ``rank`` (0 = largest).
    """
    pp = _per_prompt(rows)
    labels = {"all": np.ones(len(pp), dtype=bool)}
    if groups is not None:
        lab = np.asarray(list(groups), dtype=object)
        top = int(pp["prompt"].to_numpy().max()) + 1
        if len(lab) < top:
            raise ArgumentError(f"groups names {len(lab)} prompts, but rows has prompts up to "
                                f"{top - 1}: give one label per prompt")
        per_row = lab[pp["prompt"].to_numpy()]
        labels.update({str(g): per_row == g for g in dict.fromkeys(lab)})
    site_cols = [c for c in ("method", "component", "layer", "head", "neuron", "role",
                             "dictionary", "feature") if c in rows.columns]
    sites = pd.DataFrame(rows.assign(node=node_ids(rows).to_numpy())[["node", *site_cols]])
    sites = sites.drop_duplicates(subset=["node"])
    frames = []
    for g, sel in labels.items():
        agg = _ranked(_aggregate(cast(pd.DataFrame, pp[sel])))
        frames.append(agg.merge(sites, on="node", how="left").assign(group=g))
    return tidy(pd.concat(frames, ignore_index=True))


def top_nodes(agg: pd.DataFrame, k: int) -> list[str]:
    """The ``k`` nodes of largest ``|effect|`` of an aggregate frame (ties by node id)."""
    return _ranked(pd.DataFrame(agg[["node", "effect"]]))["node"].head(k).tolist()


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two node sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def _matrix(pp: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(node ids sorted, [node prompt] effects)`` with NaN where a node has no row."""
    ids, node = np.unique(pp["node"].to_numpy(dtype=str), return_inverse=True)
    prompt = pp["prompt"].to_numpy()
    M = np.full((len(ids), int(prompt.max()) + 1), np.nan)
    M[node, prompt] = pp["effect"].to_numpy(dtype=float)
    return ids, M


def _top_of_half(M: np.ndarray, half: np.ndarray, k: int) -> np.ndarray:
    """The row indices of the ``k`` largest ``|mean|`` over the prompts ``half`` (NaN left
    out, a node with no value there is 0; below :data:`RANK_RTOL` of the largest: 0; ties by
    row = by node id)."""
    sub = M[:, half]
    n = np.isfinite(sub).sum(1)
    score = np.abs(np.where(n > 0, np.nansum(sub, 1) / np.maximum(n, 1), 0.0))
    key = np.where(score > RANK_RTOL * (score.max() if len(score) else 0.0), score, 0.0)
    return np.lexsort((np.arange(len(key)), -key))[:k]


def circuit_stability(rows: pd.DataFrame, *, k: Sequence[int] = STABILITY_KS,
                      splits: int = 20, seed: int = 0, halves: tuple[Sequence[int],
                                                                      Sequence[int]] | None
                      = None, reference: bool = False) -> pd.DataFrame:
    """Jaccard of the top-``k`` nodes across two disjoint random halves of the pairs.

    Args:
        rows: a per-prompt attribution frame (as :func:`aggregate_circuit`).
        k: the top-k sizes to compare at.
        splits: random splits into halves (each half ``floor(n/2)`` prompts).
        seed: draws the splits.
        halves: two explicit lists of prompt indices instead of random splits.
        reference: aggregate each half through :func:`aggregate_circuit`'s pandas path (the
            slow reference of the default ``[node prompt]`` matrix, which the tests hold
            equal).

    Returns:
        One row per ``k``: ``method="stability"``, ``effect`` (the mean Jaccard over splits)
        with a 95% CI and ``n`` (splits), then ``k``, ``jaccard_first`` (the first split's),
        ``jaccard_min``, ``jaccard_max``, ``n_prompts`` (per half) and ``n_nodes`` (nodes
        attributed in the whole frame).
    """
    pp = _per_prompt(rows)
    ks = [int(x) for x in k]
    if not ks or any(x < 1 for x in ks):
        raise ArgumentError(f"k must be top-k sizes >= 1, got {list(k)}")
    prompts = np.unique(pp["prompt"].to_numpy())
    if halves is not None:
        a, b = (np.asarray(list(h), dtype=np.int64) for h in halves)
        if len(a) == 0 or len(b) == 0:
            raise ArgumentError("halves must be two non-empty lists of prompt indices")
        draws = [(a, b)]
    else:
        if len(prompts) < 2:
            raise ArgumentError(f"stability splits the pairs into two halves: need >= 2 "
                                f"prompts, got {len(prompts)}")
        if splits < 1:
            raise ArgumentError(f"splits must be >= 1, got {splits}")
        rng = np.random.default_rng(seed)
        half = len(prompts) // 2
        draws = []
        for _ in range(splits):
            perm = rng.permutation(prompts)
            draws.append((perm[:half], perm[half:2 * half]))
    every = np.asarray(pp["node"].unique())
    scores = np.zeros((len(draws), len(ks)))
    if reference:  # the literal recipe: aggregate each half as aggregate_circuit does
        by_prompt = pp["prompt"].to_numpy()
        for i, (a, b) in enumerate(draws):
            tops = []
            for h in (a, b):
                agg = _aggregate(cast(pd.DataFrame, pp[np.isin(by_prompt, h)]))
                # a node absent from a half has effect 0 there (it changed in none of its pairs)
                missing = np.setdiff1d(every, agg["node"].to_numpy())
                agg = pd.concat([agg, pd.DataFrame({"node": missing, "effect": 0.0})],
                                ignore_index=True)
                tops.append(_ranked(agg)["node"].tolist())
            scores[i] = [jaccard(tops[0][:x], tops[1][:x]) for x in ks]
    else:
        ids, M = _matrix(pp)
        for i, (a, b) in enumerate(draws):
            ta, tb = _top_of_half(M, a, max(ks)), _top_of_half(M, b, max(ks))
            scores[i] = [jaccard(ids[ta[:x]].tolist(), ids[tb[:x]].tolist()) for x in ks]
    n = len(draws)
    mean = scores.mean(0)
    half_ci = scores.std(0, ddof=1) / np.sqrt(n) * t_quantile(n) if n > 1 \
        else np.full(len(ks), np.nan)
    out = pd.DataFrame({"method": "stability", "effect": mean, "ci_low": mean - half_ci,
                        "ci_high": mean + half_ci, "n": n, "k": ks,
                        "jaccard_first": scores[0], "jaccard_min": scores.min(0),
                        "jaccard_max": scores.max(0), "n_prompts": len(draws[0][0]),
                        "n_nodes": len(every)})
    return tidy(out)


__all__ = ["STABILITY_KS", "aggregate_circuit", "circuit_stability", "jaccard", "node_ids",
           "top_nodes"]
