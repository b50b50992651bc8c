"""Edge patching, and growing a circuit backwards from the logits with it.

A single sender node ``u`` and a single receiver node ``v`` of a circuit graph
(:mod:`factfind.graph`) is the edge ``u → v``. Path patching that one path
(:mod:`factfind.edges.path_patching`: ``u``'s corrupt change reaches ``v``'s input only, into every
input of a head; ``v``'s change then flows freely) measures ``m(patched) - m(clean)``:
:func:`edge_patching`, the exact quantity that edge attribution patching
(:mod:`factfind.edges.eap`) approximates with one gradient. A ``logits@final`` receiver measures
``u``'s direct effect on the logits.

:func:`path_patching_circuit` automates Wang et al. (2022)'s manual procedure: score every edge
into the logits, keep those whose ``|score|`` is a large enough share of the clean-corrupt
metric gap, then score every edge into each kept node, and so on back to the embeddings. Nodes
name positions by the role partition of :func:`factfind.edges.placement.role_labels`.

Example::

    edge_patching(model, pairs, [("L1.mlp@subject_last", "L2.h0@final")])
    circuit = path_patching_circuit(model, pairs, threshold=0.05)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor

from factfind.data.batch import encode_pairs
from factfind.edges.engine import Job, run_jobs
from factfind.edges.placement import NodeLike, all_nodes, as_node, is_parallel, place_node
from factfind.errors import ArgumentError
from factfind.graph import CircuitGraph, Node, feeds, provenance
from factfind.metrics import logit_diff
from factfind.types import Metric
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)


@validated
def edge_patching(model: Model, pairs: FactPairs, edges: Sequence[tuple[NodeLike, NodeLike]],
                  *, metric: Metric | None = None, batch_size: int = 32,
                  chunk: int | None = None, progress: bool = True,
                  reference: bool = False) -> pd.DataFrame:
    """The effect of each circuit-graph edge ``u → v`` alone: ``u``'s corrupt change reaches
    ``v``'s input only (into every input of a head), ``v``'s change then flows freely; score =
    mean over prompts of ``m(patched) - m(clean)``. A ``logits@final`` receiver measures ``u``'s
    direct effect.

    Returns:
        One row per edge (:data:`factfind.types.EDGE_RESULT_COLUMNS`, as EAP's): ``method``,
        ``sender``, ``receiver`` (node ids), ``effect`` (the score above), ``n``.
    """
    pairs_ = [(as_node(u, model), as_node(v, model)) for u, v in edges]

    def make(batch: TokenBatch, labels: Tensor) -> list[Job]:
        jobs = []
        for u, v in pairs_:
            rcv = None if v.kind == "logits" else [place_node(model, batch, v, labels)]
            if v.kind == "logits" and v.role != "final":
                raise ArgumentError(f"{v.id}: the logits are read at the final token only")
            jobs.append(Job([place_node(model, batch, u, labels)], rcv))
        return jobs

    m, clean, _ = run_jobs(model, pairs, make, reference=reference, batch_size=batch_size,
                           chunk=chunk, progress=progress, desc="edge patching",
                           metric=metric)
    score = (m - clean[None]).mean(1)
    return pd.DataFrame({"method": "edge_patching", "sender": [u.id for u, _ in pairs_],
                         "receiver": [v.id for _, v in pairs_],
                         "effect": score.double().numpy(), "n": m.shape[1]})


@validated
def path_patching_circuit(model: Model, pairs: FactPairs, *, threshold: float = 0.05,
                          nodes: Sequence[NodeLike] | None = None, neurons: bool = False,
                          metric: Metric | None = None, batch_size: int = 32,
                          max_receivers: int = 64, progress: bool = True) -> CircuitGraph:
    """Grow a circuit backwards from the logits by edge patching (Wang et al. 2022's manual
    procedure, automated): score every edge into the logits, keep those whose ``|score|`` is at
    least ``threshold`` times the clean-corrupt metric gap, then score every edge into each kept
    node, and so on until only embeddings are left.

    Args:
        threshold: keep edges with ``|score| >= threshold * |mean(clean - corrupt)|``.
        nodes: candidate inner nodes (default :func:`all_nodes` at the given granularity).
        max_receivers: stop after this many receivers were expanded (a guard on cost).

    Returns:
        A :class:`~factfind.graph.CircuitGraph` of the kept edges (``method="path_patching"``)
        whose scores are the edge effects.
    """
    pb = encode_pairs(model, pairs)
    parallel = is_parallel(model)
    universe = [as_node(n, model) for n in nodes] if nodes is not None else all_nodes(
        model, pb.clean, neurons=neurons)
    embeds = [Node("embed", -1, None, r) for r in pb.clean.roles_present()]
    metric_ = metric or logit_diff
    gap = float((metric_(model.run(pb.clean).logits, pb.correct, pb.wrong)
                 - metric_(model.run(pb.corrupt).logits, pb.correct, pb.wrong)).mean())
    cut = threshold * abs(gap)
    frontier = [Node("logits", model.n_layers, None, "final")]
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    while frontier and len(seen) < max_receivers:  # one wave of receivers per call
        wave, frontier = frontier[:max_receivers - len(seen)], frontier[max_receivers:]
        seen |= {v.id for v in wave}
        edges = [(u, v) for v in wave for u in embeds + universe if feeds(u, v, parallel)]
        if not edges:
            continue
        df = edge_patching(model, pairs, edges, metric=metric, batch_size=batch_size,
                           progress=progress)
        for sender, receiver, effect in zip(df["sender"], df["receiver"], df["effect"],
                                            strict=True):
            if abs(effect) >= cut:
                kept.append({"sender": sender, "receiver": receiver, "effect": effect})
                u = Node.parse(str(sender), n_layers=model.n_layers)
                if u.kind != "embed" and u.id not in seen and u not in frontier:
                    frontier.append(u)
    if frontier:
        log.warning("path_patching_circuit stopped after %d receivers with %d left",
                    len(seen), len(frontier))
    prov = provenance(model, pairs, "path_patching",
                      {"threshold": threshold, "neurons": neurons, "n": len(pairs)})
    frame = pd.DataFrame(kept, columns=["sender", "receiver", "effect"])
    graph = CircuitGraph.from_edge_scores(frame, prov, n_layers=model.n_layers)
    return graph


__all__ = ["edge_patching", "path_patching_circuit"]
