"""Evaluating circuits: faithfulness, completeness, minimality, curves, proportion explained.

A circuit is a claim: *these* heads and MLPs, at *these* token roles, compute the behaviour. It
is tested by removing everything else. The nodes here are heads and MLPs (or single MLP
neurons) at the roles of the token partition (:func:`factfind.pathpatch.role_labels`:
``prefix``, ``subject_first``, ``subject`` = inner subject tokens, ``subject_last``,
``relation``, ``final``); the embeddings are the input and are never ablated. "Ablated" means
replaced by the per-role mean over a reference set (``how="mean"``) or by the activation of
another prompt (``how="resample"``: the corrupt partner of each pair, or for a plain dataset
other subjects of the same relation and token length), as in :mod:`factfind.ablation`. With
``m`` the mean metric over prompts (logit difference, or for a plain dataset the logit of the
answer minus the mean logit of the relation's other answers):

* **faithfulness** ``F(C) = (m(C) - m(∅)) / (m(M) - m(∅))``: ``m(C)`` with every node outside
  ``C`` ablated, ``m(M)`` the full model, ``m(∅)`` everything ablated (Wang et al. 2022;
  Hanna et al. 2024). 1 = the circuit alone does what the model does.
* **completeness** ``(m(M) - m(M∖C)) / (m(M) - m(∅))``: the share of the behaviour lost when
  only the circuit is knocked out. 1 = nothing outside the circuit can do the task.
* **minimality** of a node ``v``: ``F(C) - F(C∖{v})``, how much faithfulness drops without it.
* **the faithfulness curve**: ``F`` of the top-``n`` nodes by score, against ``n``.
* **proportion explained** (Goldowsky-Dill et al. 2023): a circuit graph as a hypothesis about
  *paths*. Edge-level path patching runs the model with every edge of the graph carrying the
  clean (recomputed) value of its sender and every edge outside it the corrupt value; the
  proportion is ``(m(H) - m(corrupt)) / (m(clean) - m(corrupt))``. For the graph induced by a
  node set it equals resample faithfulness on the pairs - the tests check that.

Two searches optimise faithfulness directly: :func:`greedy_circuit` (forward selection) and
:func:`minimize_circuit` (backward elimination, which keeps nodes that only matter together,
like the two inputs of an AND).

All circuits of a call, plus the full and the empty one, run stacked as copies of each prompt
batch: one forward per batch and chunk of circuits. The replacement values are those of
:mod:`factfind.ablation` (:func:`~factfind.ablation.mean_activations` per role; the same
resample partners), and the tests check the engine against
:func:`~factfind.ablation.ablate_sets`; it is a separate engine because circuits address the
subject's inner tokens apart from its first and last (a :class:`~factfind.types.Site` cannot)
and because many circuits share one forward.

Example::

    truth = ["L0.h0@subject_last", "L1.mlp@subject_last", "L2.h0@final"]
    faithfulness(model, pairs, truth)                     # 1.0 on the planted model
    faithfulness_curve(model, pairs, eap_graph, sizes=[1, 2, 4, 8])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from factfind.ablation import TOKEN_ROLES, mean_activations
from factfind.graph import ENDPOINTS, CircuitGraph, Node
from factfind.metrics import logit_diff, logit_diff_vs_mean
from factfind.patching import encode_pairs, repeat, take
from factfind.pathpatch import (
    Metric,
    Placed,
    all_nodes,
    feeds,
    is_parallel,
    node_mask,
    role_labels,
    roles_present,
    stage,
    writes,
)
from factfind.types import Component, Role, Site

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs, TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)

CircuitLike = CircuitGraph | Iterable[Node | str | Site]
HOW = ("mean", "resample")

# ----------------------------------------------------------------------------- nodes


def _site_nodes(model: Model, site: Site, roles: Sequence[str]) -> list[Node]:
    pos = site.position
    if isinstance(pos, int):
        raise ValueError(f"{site.name}: circuits need position roles, not absolute positions")
    if pos is None:
        rs = list(roles)
    elif pos is Role.SUBJECT:  # a Site's "subject" is every subject token
        rs = [r for r in ("subject_first", "subject", "subject_last") if r in roles]
    else:
        rs = [str(pos)]
    c, layer = site.component, site.layer
    if c in (Component.Z, Component.HEAD_OUT, Component.ATTN_OUT):
        heads = range(model.n_heads) if site.head is None else [site.head]
        return [Node("head", layer, h, r) for h in heads for r in rs]
    if c is Component.MLP_OUT or (c is Component.NEURONS and site.neuron is None):
        return [Node("mlp", layer, None, r) for r in rs]
    if c is Component.NEURONS:
        return [Node("neuron", layer, site.neuron, r) for r in rs]
    raise ValueError(f"{site.name}: a circuit holds heads, MLPs and neurons, not {c}")


def circuit_nodes(model: Model, circuit: CircuitLike, roles: Sequence[str]) -> set[Node]:
    """The inner nodes (heads, MLPs, neurons at roles) of a circuit given as a graph, node
    ids, :class:`~factfind.graph.Node` values or :class:`~factfind.types.Site` values; ``attn``
    nodes expand to every head and role ``all`` to every role in ``roles``."""
    items = [circuit.node(n) for n in circuit.graph] if isinstance(circuit, CircuitGraph) \
        else list(circuit)
    out: set[Node] = set()
    for item in items:
        if isinstance(item, Site):
            out |= set(_site_nodes(model, item, roles))
            continue
        n = item if isinstance(item, Node) else Node.parse(item, n_layers=model.n_layers)
        if n.kind in ENDPOINTS:
            continue
        if n.kind == "resid":
            raise ValueError(f"{n.id}: residual-stream nodes cannot be kept or ablated")
        if not 0 <= n.layer < model.n_layers:
            raise IndexError(f"{n.id}: layer out of range ({model.n_layers} layers)")
        rs = list(roles) if n.role == "all" else [n.role]
        if n.kind == "attn":
            out |= {Node("head", n.layer, h, r) for h in range(model.n_heads) for r in rs}
        else:
            out |= {Node(n.kind, n.layer, n.index, r) for r in rs}
    return out


def node_scores(scores: CircuitGraph | pd.DataFrame | Mapping[str, float]) -> dict[str, float]:
    """Inner node id -> score from a scored graph (its node scores; for an EAP graph the sum of
    each node's outgoing edges), an EAP edge frame (``src``, ``score``: summed by source), a
    node frame (``id``, ``score``) or a mapping."""
    if isinstance(scores, CircuitGraph):
        items = {n: float(d["score"]) for n, d in scores.graph.nodes(data=True)}
    elif isinstance(scores, pd.DataFrame):
        if "src" in scores.columns:
            items = {}
            for src, score in zip(scores["src"], scores["score"], strict=True):
                items[src] = items.get(src, 0.0) + float(score)
        else:
            items = dict(zip(scores["id"], scores["score"], strict=True))
    else:
        items = dict(scores)
    return {str(k): float(v) for k, v in items.items()
            if not str(k).startswith(("embed@", "logits@"))}


# ----------------------------------------------------------------------------- the engine


def _keep_masks(model: Model, nodes: set[Node]) -> tuple[Tensor, Tensor]:
    """Per (layer, role): kept heads ``[L R H]`` and kept neurons ``[L R N]``."""
    R = len(TOKEN_ROLES)
    kz = torch.zeros(model.n_layers, R, model.n_heads, dtype=torch.bool)
    kn = torch.zeros(model.n_layers, R, model.d_mlp, dtype=torch.bool)
    for n in nodes:
        r = TOKEN_ROLES.index(n.role)
        if n.kind == "head":
            kz[n.layer, r, n.index] = True
        elif n.kind == "mlp":
            kn[n.layer, r] = True
        elif n.kind == "neuron":
            kn[n.layer, r, n.index] = True
    return kz, kn


def _ablate(mask_keep: Tensor, labels: Tensor, value: Tensor):
    """An edit replacing every entry whose (role, unit) is not kept. ``mask_keep`` is
    ``[copies R units]``, ``labels`` ``[batch pos]``, ``value`` ``[copies*batch pos units ...]``.
    """
    real = labels >= 0
    keep = mask_keep[:, labels.clamp(min=0)]  # [C B P units]
    ablate = (~keep & real[None, ..., None]).flatten(0, 1)

    def edit(act: Tensor) -> Tensor:
        m = ablate.to(act.device).reshape(*ablate.shape, *([1] * (act.dim() - ablate.dim())))
        return torch.where(m, value.to(act.device, act.dtype), act)
    return edit


def _candidates(model: Model, facts: FactDataset) -> dict[str, Tensor]:
    return {r: model.tokenize(list(facts.by_relation(r))).attribute_ids.unique()
            for r in facts.relations}


def _partners(model: Model, facts: FactDataset, seed: int) -> FactDataset:
    """One resample partner per prompt (as :func:`factfind.ablation.ablate_sets` draws them:
    another subject of the relation with the same token length and a different answer)."""
    pairs = facts.corrupt(model, seed=seed, on_missing="skip")
    if len(pairs) != len(facts):
        raise ValueError(f"resample ablation needs a partner for every prompt; "
                         f"{len(facts) - len(pairs)} of {len(facts)} have none (seed {seed})")
    return pairs.corrupt


def _facts(data: FactPairs | FactDataset) -> FactDataset:
    """The measured prompts: the clean side of pairs, or the dataset itself."""
    return data.clean if isinstance(data, _pairs_type()) else data  # type: ignore[return-value]


def _pairs_type() -> type:
    from factfind.pairs import FactPairs

    return FactPairs


def evaluate_circuits(
    model: Model, data: FactPairs | FactDataset, circuits: Sequence[CircuitLike], *,
    how: str = "mean", reference: FactDataset | None = None,
    means: dict[Any, Tensor] | None = None, resamples: int = 3, seed: int = 0,
    metric: Metric | None = None, neurons: bool = False, batch_size: int = 16,
    chunk: int = 16,
) -> pd.DataFrame:
    """Mean metric with everything outside each circuit ablated, and its faithfulness.

    Args:
        model: the model.
        data: :class:`~factfind.data.FactPairs` (metric: logit difference between the clean
            and the corrupt answer; resample = the corrupt partner) or a
            :class:`~factfind.data.FactDataset` (metric: the answer's logit minus the mean
            logit of the relation's other answers; resample = ``resamples`` partners).
        circuits: each a graph, node ids, nodes or sites (see :func:`circuit_nodes`).
        how: ``"mean"`` or ``"resample"``.
        reference: prompts for the means (default the clean prompts); means: precomputed
            :func:`~factfind.ablation.mean_activations` over ``z`` and ``neurons``.
        metric: for pairs, ``metric(logits, correct, wrong) -> [rows]``.
        neurons: count nodes at neuron granularity (``fraction``'s denominator).
        batch_size: prompts per forward; chunk: circuits stacked per forward.

    Returns:
        One row per circuit: ``circuit`` (index), ``n_nodes``, ``fraction`` (of all nodes at
        the granularity), ``metric`` (mean ``m(C)``), ``full`` (``m(M)``), ``empty``
        (``m(∅)``), ``faithfulness``, ``n`` (prompts).
    """
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    pairs: FactPairs | None = data if isinstance(data, _pairs_type()) else None  # type: ignore[assignment]
    facts = _facts(data)
    if len(facts) == 0:
        raise ValueError("no prompts: the dataset is empty")
    L = model.n_layers
    keys = [(c, layer) for layer in range(L) for c in (Component.Z, Component.NEURONS)]
    if pairs is not None:
        pb = encode_pairs(model, pairs)
        batch = pb.clean
        sources = [pb.corrupt] if how == "resample" else []
    else:
        batch = model.tokenize(list(facts))
        sources = [model.tokenize(list(_partners(model, facts, seed + r)))
                   for r in range(resamples)] if how == "resample" else []
    roles = roles_present(batch)
    universe = len(all_nodes(model, batch, neurons=neurons))
    sets = [circuit_nodes(model, c, roles) for c in circuits]
    full = set(all_nodes(model, batch, neurons=False))
    keeps = [_keep_masks(model, s) for s in [*sets, full, set()]]
    if how == "mean" and means is None:
        means = mean_activations(model, reference or facts, keys)
    cand = _candidates(model, facts) if pairs is None else {}
    metric = metric or logit_diff
    labels_all = role_labels(batch)
    n = len(facts)
    total = torch.zeros(len(keeps), dtype=torch.float64)
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        b = take(batch, idx)
        labels = labels_all[idx]
        B = len(b)
        src_acts = [model.run(take(s, idx), save=keys).acts for s in sources]
        reps = max(1, len(src_acts))
        for c0 in range(0, len(keeps), chunk):
            group = keeps[c0:c0 + chunk]
            C = len(group) * reps
            edits = {}
            for comp, k in ((Component.Z, 0), (Component.NEURONS, 1)):
                for layer in range(L):
                    keep = torch.stack([g[k][layer] for g in group for _ in range(reps)])
                    if how == "mean":
                        assert means is not None
                        value = means[(comp, layer)][labels.clamp(min=0)]  # [B P units ...]
                        value = value.repeat(C, *([1] * (value.dim() - 1)))
                    else:
                        value = torch.cat([a[(comp, layer)] for _ in group for a in src_acts])
                    edits[(comp, layer)] = _ablate(keep, labels, value)
            logits = model.run(repeat(b, C), edits=edits).logits
            if pairs is not None:
                m = metric(logits, pb.correct[idx].repeat(C), pb.wrong[idx].repeat(C))
            else:
                ids = b.attribute_ids.repeat(C)
                cands = [cand[p.relation] for p in b.prompts] * C
                m = torch.cat([logit_diff_vs_mean(logits[i:i + 1], ids[i:i + 1], cands[i])
                               for i in range(len(ids))])
            total[c0:c0 + len(group)] += m.double().cpu().reshape(len(group), reps, B).mean(1) \
                .sum(1)
    mean = total / n
    m_full, m_empty = float(mean[-2]), float(mean[-1])
    rows = []
    for i, s in enumerate(sets):
        rows.append({"circuit": i, "n_nodes": len(s), "fraction": len(s) / universe,
                     "metric": float(mean[i]), "full": m_full, "empty": m_empty,
                     "faithfulness": (float(mean[i]) - m_empty) / (m_full - m_empty),
                     "n": n, "how": how})
    return pd.DataFrame(rows)


def faithfulness(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
                 how: str = "mean", **kwargs: Any) -> float:
    """``F(C) = (m(C) - m(∅)) / (m(M) - m(∅))``: the mean metric with every head and MLP
    outside the circuit ablated (``how="mean"`` or ``"resample"``, per role; embeddings are
    never ablated), relative to the full model ``M`` and to the empty circuit ``∅`` (every head
    and MLP ablated). Options as for :func:`evaluate_circuits`.

    Example::

        faithfulness(model, pairs, ["L2.h0@final", "L1.mlp@subject_last"], how="resample")
    """
    return float(evaluate_circuits(model, data, [circuit], how=how, **kwargs)
                 ["faithfulness"].iloc[0])


def completeness(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
                 how: str = "mean", **kwargs: Any) -> float:
    """``(m(M) - m(M∖C)) / (m(M) - m(∅))``: the share of the behaviour lost when the circuit
    alone is knocked out (ablated) and everything else kept. Near 1: the rest of the model
    cannot do the task without the circuit; near 0: it can (the circuit is incomplete, or
    the behaviour is redundant)."""
    facts = _facts(data)
    batch = model.tokenize(list(facts[:64]))
    roles = roles_present(batch)
    inner = circuit_nodes(model, circuit, roles)
    # with single neurons in the circuit, keep the other neurons of their MLPs
    neurons = any(n.kind == "neuron" for n in inner)
    if neurons:  # an MLP node is all of its neurons
        inner |= {Node("neuron", n.layer, k, n.role) for n in inner if n.kind == "mlp"
                  for k in range(model.d_mlp)}
    rest = set(all_nodes(model, batch, neurons=neurons)) - inner
    df = evaluate_circuits(model, data, [sorted(rest)], how=how, **kwargs)
    r = df.iloc[0]
    return float((r["full"] - r["metric"]) / (r["full"] - r["empty"]))


def minimality(model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
               how: str = "mean", **kwargs: Any) -> pd.DataFrame:
    """Per node ``v`` of the circuit: ``faithfulness_without`` = ``F(C∖{v})`` and ``drop`` =
    ``F(C) - F(C∖{v})`` (large = the node is needed), sorted by drop."""
    facts = _facts(data)
    roles = roles_present(model.tokenize(list(facts[:64])))
    nodes = sorted(circuit_nodes(model, circuit, roles))
    if not nodes:
        raise ValueError("the circuit has no inner nodes")
    sets = [nodes] + [[m for m in nodes if m != v] for v in nodes]
    df = evaluate_circuits(model, data, sets, how=how, **kwargs)
    f = df["faithfulness"].to_numpy()
    out = pd.DataFrame({"node": [v.id for v in nodes], "faithfulness": f[0],
                        "faithfulness_without": f[1:], "drop": f[0] - f[1:]})
    return out.sort_values("drop", ascending=False, kind="stable").reset_index(drop=True)


def faithfulness_curve(
    model: Model, data: FactPairs | FactDataset,
    scores: CircuitGraph | pd.DataFrame | Mapping[str, float], *,
    sizes: Sequence[int] | None = None, how: str = "mean", neurons: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Faithfulness of the top-``n`` nodes by ``|score|`` for each ``n`` in ``sizes``.

    Args:
        scores: node scores (see :func:`node_scores`): a scored graph, an EAP edge frame, a
            node frame or a mapping id -> score.
        sizes: circuit sizes (default 1, 2, 4, ... up to every scored node).
        neurons: nodes are counted at neuron granularity (``fraction``'s denominator).

    Returns:
        A tidy frame: ``size`` (asked), ``n_nodes`` (in the circuit), ``fraction`` (of all nodes
        at the granularity), ``faithfulness``, ``metric``, ``full``, ``empty``, ``nodes``
        (the ids, ``;``-joined).
    """
    ranked = sorted(node_scores(scores).items(),
                    key=lambda kv: (-abs(kv[1]), Node.parse(kv[0], n_layers=model.n_layers)))
    if sizes is None:
        sizes, k = [], 1
        while k < len(ranked):
            sizes.append(k)
            k *= 2
        sizes.append(len(ranked))
    circuits = [[i for i, _ in ranked[:s]] for s in sizes]
    df = evaluate_circuits(model, data, circuits, how=how, neurons=neurons, **kwargs)
    df.insert(0, "size", list(sizes))
    df["nodes"] = [";".join(c) for c in circuits]
    first = ["size", "n_nodes", "fraction", "faithfulness"]
    return pd.DataFrame(df[first + [c for c in df.columns if c not in first and c != "circuit"]])


def greedy_circuit(
    model: Model, data: FactPairs | FactDataset, *, candidates: Iterable[str] | None = None,
    max_nodes: int = 12, target: float | None = None, how: str = "resample",
    neurons: bool = False, **kwargs: Any,
) -> pd.DataFrame:
    """Forward selection: start from the empty circuit and add, one at a time, the node whose
    addition raises faithfulness most (every candidate is tried, stacked in few forwards).
    An upper envelope for curves from attribution rankings, at a cost of one evaluation of
    every candidate per step.

    Args:
        candidates: node ids to choose from (default every node at the granularity).
        max_nodes: stop after this many nodes; target: or once faithfulness reaches it.

    Returns:
        The curve as :func:`faithfulness_curve` returns it, plus ``added`` (the node chosen at
        each size).
    """
    facts = _facts(data)
    batch = model.tokenize(list(facts[:64]))
    pool = list(candidates) if candidates is not None else [
        n.id for n in all_nodes(model, batch, neurons=neurons)]
    chosen: list[str] = []
    rows = []
    while pool and len(chosen) < max_nodes:
        df = evaluate_circuits(model, data, [[*chosen, c] for c in pool], how=how,
                               neurons=neurons, **kwargs)
        best = int(df["faithfulness"].to_numpy().argmax())
        chosen.append(pool.pop(best))
        row = df.iloc[best].to_dict()
        rows.append({"size": len(chosen), "n_nodes": row["n_nodes"], "fraction": row["fraction"],
                     "faithfulness": row["faithfulness"], "metric": row["metric"],
                     "full": row["full"], "empty": row["empty"], "n": row["n"], "how": how,
                     "added": chosen[-1], "nodes": ";".join(chosen)})
        if target is not None and row["faithfulness"] >= target:
            break
    return pd.DataFrame(rows)


def minimize_circuit(
    model: Model, data: FactPairs | FactDataset, circuit: CircuitLike, *,
    target: float = 0.9, how: str = "resample", **kwargs: Any,
) -> pd.DataFrame:
    """Backward elimination: from ``circuit``, repeatedly drop the node whose removal keeps
    faithfulness highest, while it stays at least ``target``. Unlike forward selection this
    keeps nodes that only matter together (an AND of two paths).

    Returns:
        One row per circuit visited, largest first (``removed``: the node dropped to reach it);
        the last row is the smallest circuit with faithfulness >= ``target`` (or the start, if
        it is below ``target`` already).
    """
    facts = _facts(data)
    roles = roles_present(model.tokenize(list(facts[:64])))
    nodes = [n.id for n in sorted(circuit_nodes(model, circuit, roles))]
    first = evaluate_circuits(model, data, [nodes], how=how, **kwargs).iloc[0].to_dict()
    rows = [{**first, "removed": None, "nodes": ";".join(nodes)}]
    while len(nodes) > 1 and rows[-1]["faithfulness"] >= target:
        df = evaluate_circuits(model, data, [[m for m in nodes if m != v] for v in nodes],
                               how=how, **kwargs)
        best = int(df["faithfulness"].to_numpy().argmax())
        if df["faithfulness"].iloc[best] < target:
            break
        removed = nodes.pop(best)
        rows.append({**df.iloc[best].to_dict(), "removed": removed, "nodes": ";".join(nodes)})
    out = pd.DataFrame(rows).drop(columns=["circuit"])
    out.insert(0, "size", out["n_nodes"])
    return out


# ----------------------------------------------------------------------------- paths


def _edges(model: Model, circuit: CircuitLike, roles: Sequence[str]) -> set[tuple[Node, Node]]:
    """The graph's edges, or for a node set the edges it induces with every embedding and the
    logits."""
    parallel = is_parallel(model)
    if isinstance(circuit, CircuitGraph) and circuit.graph.number_of_edges():
        return {(circuit.node(u), circuit.node(v)) for u, v in circuit.graph.edges}
    inner = circuit_nodes(model, circuit, roles)
    nodes = sorted(inner) + [Node("embed", -1, None, r) for r in roles] + [
        Node("logits", model.n_layers, None, "final")]
    return {(u, v) for u in nodes for v in nodes if feeds(u, v, parallel)}


def proportion_explained(model: Model, pairs: FactPairs, circuit: CircuitLike, *,
                         metric: Metric | None = None, batch_size: int = 16) -> float:
    """The proportion of the clean-corrupt effect a path hypothesis explains (Goldowsky-Dill et
    al. 2023): ``(m(H) - m(corrupt)) / (m(clean) - m(corrupt))``, where ``m(H)`` runs the model
    with every edge of the graph ``H`` carrying its sender's value in this run (computed from
    the clean input along ``H``'s paths) and every other edge its sender's corrupt value.

    Args:
        circuit: a :class:`~factfind.graph.CircuitGraph` (its edges), or nodes (the edges they
            induce, with the embeddings and the logits).

    Returns:
        The proportion (1 for the complete graph, 0 for the empty one).
    """
    metric = metric or logit_diff
    pb_all = encode_pairs(model, pairs)
    roles = roles_present(pb_all.clean)
    edges = _edges(model, circuit, roles)
    n = len(pairs)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        clean, bad = take(pb_all.clean, idx), take(pb_all.corrupt, idx)
        correct, wrong = pb_all.correct[idx], pb_all.wrong[idx]
        m_h = _edge_patched_metric(model, clean, bad, edges, correct, wrong, metric)
        m_c = metric(model.run(clean).logits, correct, wrong)
        m_k = metric(model.run(bad).logits, correct, wrong)
        sums += torch.stack([m_h.double().sum(), m_c.double().sum(), m_k.double().sum()]).cpu()
    m_h, m_c, m_k = (float(x) / n for x in sums)
    return (m_h - m_k) / (m_c - m_k)


def _edge_patched_metric(model: Model, clean: TokenBatch, bad: TokenBatch,
                         edges: set[tuple[Node, Node]], correct: Tensor, wrong: Tensor,
                         metric: Metric) -> Tensor:
    """``m(H)`` per prompt: layer by layer, each node of ``H`` recomputed from the corrupt
    stream plus, for each of its incoming edges, the sender's (patched - corrupt) change."""
    L, parallel = model.n_layers, is_parallel(model)
    labels = role_labels(clean)
    keys = [(Component.EMBED, 0)] + [(c, layer) for layer in range(L) for c in (
        Component.Z, Component.MLP_OUT, Component.NEURONS, Component.RESID_PRE,
        Component.ATTN_OUT, Component.RESID_POST)]
    ref = model.run(bad, save=keys).acts
    cl = model.run(clean, save=[(Component.EMBED, 0)]).acts
    placed: dict[Node, Placed] = {}

    def place(n: Node) -> Placed:
        if n not in placed:
            placed[n] = Placed(n.kind, n.layer, n.index, node_mask(clean, n.role, labels))
        return placed[n]

    change: dict[Node, Tensor] = {}  # node -> (patched - corrupt) writes [B P d]
    into: dict[Node, list[Node]] = {}
    for u, v in edges:
        into.setdefault(v, []).append(u)
    for u in {u for u, _ in edges if u.kind == "embed"}:
        p = place(u)
        change[u] = writes(model, cl, p) - writes(model, ref, p)

    def incoming(v: Node, below: tuple[int, int], only_layer: int | None = None) -> Tensor:
        out = torch.zeros_like(ref[(Component.RESID_PRE, 0)])
        for u in into.get(v, []):
            if stage(u.kind, u.layer, parallel) >= below or u not in change:
                continue
            if only_layer is not None and not (u.layer == only_layer and u.kind == "head"):
                continue
            out = out + change[u]
        return out

    for layer in range(L):
        here = sorted({v for v in into if v.kind not in ENDPOINTS and v.layer == layer})
        heads = [v for v in here if v.kind in ("head", "attn")]
        mlps = [v for v in here if v.kind in ("mlp", "neuron")]
        # sequential blocks: the MLP reads this layer's heads, so they run first
        for stage_nodes in ([heads + mlps] if parallel else [heads, mlps]):
            if stage_nodes:
                _run_stage(model, clean, ref, layer, stage_nodes, place, incoming, change)
    final = Node("logits", L, None, "final")
    x = ref[(Component.RESID_POST, L - 1)] + incoming(final, (L, 3))
    logits = model.run(clean, edits={(Component.RESID_POST, L - 1): _constant(x)}).logits
    return metric(logits, correct, wrong)


def _run_stage(model: Model, clean: TokenBatch, ref: dict[Any, Tensor], layer: int,
               here: list[Node], place: Any, incoming: Any, change: dict[Node, Tensor]) -> None:
    """Recompute the nodes ``here`` of one layer (one copy of the batch per head node, one per
    neuron index, one for all MLP nodes) and record their (patched - corrupt) changes."""
    parallel = is_parallel(model)
    copies: list[list[Node]] = [[v] for v in here if v.kind in ("head", "attn")]
    mlps = [v for v in here if v.kind == "mlp"]
    if mlps:
        copies.append(mlps)
    for k in sorted({v.index or 0 for v in here if v.kind == "neuron"}):
        copies.append([v for v in here if v.kind == "neuron" and v.index == k])
    pre, mid = [], []
    for group in copies:
        x = ref[(Component.RESID_PRE, layer)].clone()
        y = ref[(Component.ATTN_OUT, layer)].clone()
        for v in group:
            if v.kind in ("head", "attn"):
                x = x + incoming(v, stage("head", layer, parallel))
            else:  # MLPs act per position: only this node's positions change
                mask = place(v).mask[..., None].to(x.dtype)
                x = x + incoming(v, stage("head", layer, parallel)) * mask
                y = y + incoming(v, (layer, 2), only_layer=layer) * mask
        pre.append(x)
        mid.append(y)
    edits: dict[Any, Any] = {(Component.RESID_PRE, layer): _constant(torch.cat(pre))}
    if not parallel:  # the MLP reads resid_pre + attn_out: pin the attention output too
        edits[(Component.ATTN_OUT, layer)] = _constant(torch.cat(mid))
    B = clean.input_ids.shape[0]
    run = model.run(repeat(clean, len(copies)), edits=edits, save=[
        (Component.Z, layer), (Component.NEURONS, layer)]).acts
    for c, group in enumerate(copies):
        mine = {k: a[c * B:(c + 1) * B] for k, a in run.items()}
        for v in group:
            p = place(v)
            change[v] = writes(model, mine, p) - writes(model, ref, p)


def _constant(value: Tensor):
    def edit(act: Tensor) -> Tensor:
        return value.to(act.device, act.dtype)
    return edit


__all__ = ["circuit_nodes", "completeness", "evaluate_circuits", "faithfulness",
           "faithfulness_curve", "greedy_circuit", "minimality", "minimize_circuit",
           "node_scores", "proportion_explained"]
