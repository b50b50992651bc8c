"""Combining, comparing and drawing circuit graphs.

Circuits found by different methods on the same model and data can be merged (:func:`union`)
or compared by node and edge overlap (:func:`compare`, Jaccard). Node ids name a layer, a unit
and a position role, not a model's module paths, so circuits of *different* models can be
compared too, for universality, when asked for (``allow_mismatch=True``); otherwise a
provenance mismatch raises (:mod:`factfind.graph.provenance`). :func:`layout` places nodes for
drawing: layers left to right, position roles bottom to top.

Example::

    compare(prune(eap_graph, top_n=30), prune_nodes(patching_graph, top_n=10))
    nx.draw(g.graph, pos=layout(g))
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import networkx as nx

from factfind.graph.circuit import CircuitGraph
from factfind.graph.node import ROLES, Node
from factfind.graph.provenance import _now, check_compatible


def union(a: CircuitGraph, b: CircuitGraph) -> CircuitGraph:
    """All nodes and edges of both (``a``'s attributes where both have one); the methods may
    differ, the model, revision and dataset may not."""
    check_compatible(a.provenance, b.provenance)
    pa, pb = a.provenance, b.provenance
    prov = pa
    if (pa.method, pa.config) != (pb.method, pb.config):
        method = pa.method if pa.method == pb.method else f"{pa.method}+{pb.method}"
        prov = dataclasses.replace(pa, method=method, config={
            "union": [pa.config_dict, pb.config_dict]}, created=_now())
    return CircuitGraph(prov, nx.compose(b.graph, a.graph))


def compare(a: CircuitGraph, b: CircuitGraph, *, allow_mismatch: bool = False) -> dict[str, Any]:
    """Node and edge overlap (Jaccard; 1.0 for two empty sets). Graphs of different models or
    datasets raise unless ``allow_mismatch`` (ids are architecture-agnostic, so comparing
    circuits across models, for universality, is meaningful when asked for)."""
    if not allow_mismatch:
        check_compatible(a.provenance, b.provenance)
    out: dict[str, Any] = {}
    for what, sa, sb in (("nodes", set(a.graph.nodes), set(b.graph.nodes)),
                         ("edges", set(a.graph.edges), set(b.graph.edges))):
        shared, either = len(sa & sb), len(sa | sb)
        out |= {f"{what}_a": len(sa), f"{what}_b": len(sb), f"{what}_shared": shared,
                f"{what}_jaccard": shared / either if either else 1.0}
    return out


_X_OFFSET = {"embed": 0.0, "resid": 0.0, "attn": 0.25, "head": 0.25, "mlp": 0.5, "neuron": 0.5,
             "logits": 0.0}


def layout(graph: CircuitGraph) -> dict[str, tuple[float, float]]:
    """Positions for drawing: x = layer (attention +0.25, MLP +0.5 within a block), y = the
    role's row in :data:`ROLES`, nodes sharing a cell spread over [row, row + 1); for
    ``nx.draw(g.graph, pos=layout(g))``."""
    cells: dict[tuple[float, str], list[Node]] = defaultdict(list)
    for n in graph.nodes():
        cells[(n.layer + _X_OFFSET[n.kind], n.role)].append(n)
    return {n.id: (x, ROLES.index(role) + i / len(ns))
            for (x, role), ns in cells.items() for i, n in enumerate(ns)}


__all__ = ["compare", "layout", "union"]
