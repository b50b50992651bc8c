"""Pruning: a circuit is what survives, and only paths from the inputs to the logits count.

Two criteria, by the kind of score the graph carries:

* :func:`prune` keeps *edges* by ``|score|`` (a threshold, the top ``n``, or the fewest edges
  whose scores sum to a share of the total): the edge-level circuits of ACDC (Conmy et al.
  2023) and of edge attribution patching (EAP, Syed et al. 2023).
* :func:`prune_nodes` keeps *nodes* by ``|score|`` (activation or attribution patching), and
  the edges among them.

Whatever the criterion, a node only matters to the output if it lies on a directed path from an
input to the logits, so pruning ends by keeping ``descendants(embeds) ∩ ancestors(logits)``: a
high-scoring node whose paths were all cut is dropped.

Example::

    circuit = prune_nodes(g, top_n=20)
    circuit = prune(eap_graph, cumulative=0.8)     # fewest edges carrying 80% of |score|
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import networkx as nx
import numpy as np

from factfind.errors import ArgumentError
from factfind.graph.circuit import STRUCTURAL, CircuitGraph
from factfind.graph.node import ENDPOINTS

log = logging.getLogger(__name__)


def _select(keys: list[Any], scores: list[float], threshold: float | None, top_n: int | None,
            cumulative: float | None) -> set[Any]:
    """Keys (sorted by descending score) passing every given criterion."""
    if threshold is None and top_n is None and cumulative is None:
        raise ArgumentError("give at least one of threshold, top_n, cumulative")
    keep = set(keys)
    if threshold is not None:
        keep &= {k for k, s in zip(keys, scores, strict=True) if s >= threshold}
    if top_n is not None:
        if top_n < 0:
            raise ArgumentError(f"top_n must be >= 0, got {top_n}")
        keep &= set(keys[:top_n])
    if cumulative is not None:
        if not 0 < cumulative <= 1:
            raise ArgumentError(f"cumulative must be in (0, 1], got {cumulative}")
        sums = [0.0, *itertools.accumulate(scores)]
        keep &= set(keys[:next(i for i, s in enumerate(sums) if s >= cumulative * sums[-1])])
    return keep


def _node_ranks(graph: CircuitGraph) -> dict[str, int]:
    """Node id -> its position in node order (:class:`~factfind.graph.Node`'s ordering)."""
    return {n.id: i for i, n in enumerate(graph.nodes())}


def _subgraph(g: nx.DiGraph, nodes: set[str], edges: set[tuple[str, str]] | None = None
              ) -> nx.DiGraph:
    """The nodes and edges of ``g`` given, with their data, in ``g``'s own order (networkx's
    ``subgraph`` iterates a small node set in hash order, which differs from process to
    process: the same run then wrote its circuit's nodes in another order each time)."""
    h = nx.DiGraph(**g.graph)
    kept = [n for n in g if n in nodes]
    h.add_nodes_from((n, g.nodes[n]) for n in kept)
    h.add_edges_from((u, v, d) for u in kept for v, d in g.adj[u].items()
                     if v in nodes and (edges is None or (u, v) in edges))
    return h


def _on_paths(graph: CircuitGraph, edges: Iterable[tuple[str, str]]) -> CircuitGraph:
    """The sub-circuit of ``edges`` restricted to nodes on an embed → logits path."""
    chosen = set(edges)
    h = _subgraph(graph.graph, {n for e in chosen for n in e}, chosen)
    kinds = dict(h.nodes(data="kind"))
    sources = [n for n, k in kinds.items() if k == "embed"]
    sinks = [n for n, k in kinds.items() if k == "logits"]
    down = set(sources).union(*(nx.descendants(h, s) for s in sources))
    up = set(sinks).union(*(nx.ancestors(h, t) for t in sinks))
    if not down & up:
        log.warning("pruning left no path from an input to the logits; the circuit is empty")
    return CircuitGraph(graph.provenance, _subgraph(h, down & up))


def prune(graph: CircuitGraph, *, threshold: float | None = None, top_n: int | None = None,
          cumulative: float | None = None) -> CircuitGraph:
    """Keep the edges with ``|score| >= threshold``, the ``top_n`` largest ``|score|`` (ties by
    node order), and/or the fewest largest whose ``|score|`` sums to ``cumulative`` of the
    total (each given criterion must hold), then only nodes on embed → logits paths."""
    rank = _node_ranks(graph)  # node order once per node, not twice per edge
    us, vs, size, measured = [], [], [], False
    for u, nbrs in graph.graph.adj.items():
        for v, d in nbrs.items():
            us.append(u)
            vs.append(v)
            size.append(d["abs_score"])
            measured = measured or d["method"] != STRUCTURAL
    if us and not measured:
        raise ArgumentError("this graph's edges carry no measured scores (built from node scores):"
                         " use prune_nodes")
    # descending |score|, ties in node order (of the sender, then the receiver)
    order = np.lexsort((np.array([rank[v] for v in vs], dtype=np.int64),
                        np.array([rank[u] for u in us], dtype=np.int64),
                        -np.array(size, dtype=float))).tolist()
    keep = _select([(us[i], vs[i]) for i in order], [size[i] for i in order],
                   threshold, top_n, cumulative)
    return _on_paths(graph, (e for e in graph.graph.edges if e in keep))


def prune_nodes(graph: CircuitGraph, *, top_n: int | None = None,
                threshold: float | None = None) -> CircuitGraph:
    """Keep the ``top_n`` nodes by ``|score|`` and/or those with ``|score| >= threshold`` (the
    embed and logits endpoints always), the edges among them, then only nodes on embed → logits
    paths."""
    inner = [n for n in graph.nodes() if n.kind not in ENDPOINTS]
    attrs = graph.graph.nodes
    if inner and all(attrs[n.id]["method"] == STRUCTURAL for n in inner):
        raise ArgumentError("this graph's nodes carry no measured scores: use prune")
    inner.sort(key=lambda n: (-attrs[n.id]["abs_score"], n))
    keep = _select([n.id for n in inner], [attrs[n.id]["abs_score"] for n in inner],
                   threshold, top_n, None)
    keep |= {n for n, k in graph.graph.nodes(data="kind") if k in ENDPOINTS}
    return _on_paths(graph, ((u, v) for u, v in graph.graph.edges if u in keep and v in keep))


__all__ = ["prune", "prune_nodes"]
