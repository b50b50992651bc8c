"""The circuit graph: scored nodes and edges over networkx, with their provenance.

A :class:`CircuitGraph` is a :class:`networkx.DiGraph` whose nodes are
:class:`~factfind.graph.Node` ids (``L3.h2@final``) and whose edges say which node's output
reaches which node's input (the rule of :func:`~factfind.graph.feeds`). Every node and edge
carries a score, its absolute value, its sign and the method that measured it.

Scores come in two kinds. *Node* scores are one effect per site from activation patching or
attribution patching (:meth:`CircuitGraph.from_node_scores`); their edges are ``structural``
(allowed, not measured). *Edge* scores come from edge attribution patching (EAP, Syed et al.
2023; EAP-IG, Hanna et al. 2024), which scores u→v by how much the metric moves if only v's
reading of u is patched (:meth:`CircuitGraph.from_edge_scores`). By linearity of the residual
stream, a node's outgoing edge scores in a complete EAP graph sum to its node score.

Example::

    g = CircuitGraph.from_node_scores(aggregate(df), prov, n_layers=12)
    g.nodes_frame()                 # one row per node: id, kind, layer, ..., score, method
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.graph.node import ROLES, Node, feeds
from factfind.graph.provenance import Provenance

STRUCTURAL = "structural"  # method of an edge that the architecture allows but nothing measured
NODE_COLUMNS = ("id", "kind", "layer", "index", "role", "score", "abs_score", "sign", "method")
EDGE_COLUMNS = ("sender", "receiver", "score", "abs_score", "sign", "method")
#: the column names of v0.1 edge frames (``src``, ``dst``, ``score``), still read
_V01_EDGE_NAMES = {"src": "sender", "dst": "receiver", "score": "effect"}
COMPONENT_KINDS = {
    "head_out": "head", "z": "head", "attn_out": "attn", "attn": "attn", "mlp_out": "mlp",
    "mlp": "mlp", "neurons": "neuron", "resid_pre": "resid", "resid_post": "resid",
    "embed": "embed",
}


#: Renders a graph as HTML for notebooks (:meth:`CircuitGraph._repr_html_`). The explorer lives
#: in :mod:`factfind.report`, a higher layer that this module may not import, so the report
#: registers it here when it is imported (``import factfind`` does).
_html_renderer: Callable[[CircuitGraph], str] | None = None


def set_html_renderer(render: Callable[[CircuitGraph], str] | None) -> None:
    """Make ``render(graph) -> html`` what a notebook shows for a :class:`CircuitGraph`."""
    global _html_renderer
    _html_renderer = render


def _scored(score: float, method: str, what: str) -> dict[str, Any]:
    score = float(score)
    if not math.isfinite(score):
        raise ArgumentError(f"score of {what} must be finite, got {score}")
    return {"score": score, "abs_score": abs(score), "sign": (score > 0) - (score < 0),
            "method": str(method)}


class CircuitGraph:
    """A scored circuit over a :class:`networkx.DiGraph` (``.graph``; node ids are
    :attr:`Node.id` strings) with its :class:`Provenance` in ``.graph.graph["provenance"]``.

    Node attributes: kind, layer, index, role, score, abs_score, sign (+1/-1/0), method.
    Edge attributes: score, abs_score, sign, method. Equality compares all of them exactly.
    """

    def __init__(self, provenance: Provenance, graph: nx.DiGraph | None = None) -> None:
        self.graph: nx.DiGraph = nx.DiGraph() if graph is None else graph
        self.graph.graph["provenance"] = provenance

    @property
    def provenance(self) -> Provenance:
        return self.graph.graph["provenance"]

    def add_node(self, node: Node, *, score: float, method: str | None = None) -> str:
        """Add (or overwrite) ``node`` with its score; ``method`` defaults to the provenance's."""
        attrs = _scored(score, method or self.provenance.method, node.id)
        if node.dictionary is not None:  # feature and error nodes name their dictionary
            attrs["dictionary"] = node.dictionary
        self.graph.add_node(node.id, kind=node.kind, layer=node.layer, index=node.index,
                            role=node.role, **attrs)
        return node.id

    def add_edge(self, src: Node | str, dst: Node | str, *, score: float,
                 method: str | None = None) -> None:
        """Add the edge ``src → dst`` between two nodes already in the graph."""
        u, v = (n.id if isinstance(n, Node) else n for n in (src, dst))
        for n in (u, v):
            if n not in self.graph:
                raise KeyError(f"add node {n!r} before an edge that touches it")
        self.graph.add_edge(u, v, **_scored(score, method or self.provenance.method, f"{u}->{v}"))

    def node(self, node_id: str) -> Node:
        d = self.graph.nodes[node_id]
        return Node(d["kind"], d["layer"], d.get("index"), d["role"], d.get("dictionary"))

    def nodes(self) -> list[Node]:
        return sorted(self.node(n) for n in self.graph)

    def nodes_frame(self) -> pd.DataFrame:
        """One row per node in node order: :data:`NODE_COLUMNS` plus any extra attributes."""
        rows = [{"id": n.id, **self.graph.nodes[n.id]} for n in self.nodes()]
        df = _frame(rows, NODE_COLUMNS)
        df["index"] = df["index"].astype("Int64")
        return df

    def edges_frame(self) -> pd.DataFrame:
        """One row per edge, ordered by (sender, receiver) node order: :data:`EDGE_COLUMNS` +
        extras."""
        edges = sorted(self.graph.edges, key=lambda e: (self.node(e[0]), self.node(e[1])))
        return _frame([{"sender": u, "receiver": v, **self.graph.edges[u, v]} for u, v in edges],
                      EDGE_COLUMNS)

    @classmethod
    def from_node_scores(cls, df: pd.DataFrame, provenance: Provenance, *, n_layers: int,
                         parallel: bool = False) -> CircuitGraph:
        """A graph with one node per row of an aggregated result frame and every edge the
        residual stream allows (``structural``, score 0), plus ``embed@<role>`` for each role
        used and ``logits@final``.

        Args:
            df: columns ``component`` (head_out/z, attn_out, mlp_out, neurons, resid_pre,
                resid_post (= resid_pre of the next layer), embed), ``layer``, ``head``,
                ``neuron``, ``role`` (<NA>: all positions), ``effect``; optional ``method``.
                One row per node: aggregate over prompts first.
            n_layers: the model's depth (the logits node's layer).
            parallel: attention and MLP of a layer read the same stream (GPT-NeoX).
        """
        g = cls(provenance)
        for row in df.to_dict("records"):
            node = node_of_row(row, n_layers)
            if node.id in g.graph:
                raise ArgumentError(f"two rows for node {node.id}: aggregate over prompts first")
            g.add_node(node, score=row["effect"], method=_get(row, "method", provenance.method))
        roles = {n.role for n in g.nodes()} | {"final"}
        for role in sorted(roles, key=ROLES.index):
            if f"embed@{role}" not in g.graph:
                g.add_node(Node("embed", -1, None, role), score=0.0, method=STRUCTURAL)
        g.add_node(Node("logits", n_layers, None, "final"), score=0.0, method=STRUCTURAL)
        nodes = g.nodes()
        for u, v in itertools.product(nodes, nodes):
            if feeds(u, v, parallel):
                g.add_edge(u, v, score=0.0, method=STRUCTURAL)
        return g

    @classmethod
    def from_edge_scores(cls, df: pd.DataFrame, provenance: Provenance, *,
                         n_layers: int | None = None) -> CircuitGraph:
        """A graph from an edge result frame (EAP, EAP-IG, edge patching): columns ``sender``,
        ``receiver`` (node ids), ``effect`` (the edge's score), optional ``method``; v0.1's
        ``src``, ``dst``, ``score`` are read too. A node's score is the sum of its outgoing
        edges' (for a complete EAP graph this is its attribution-patching score, by linearity
        of the residual stream); the logits' is the sum of its incoming ones. ``n_layers``
        defaults to what the ids imply.
        """
        df = df.rename(columns={k: v for k, v in _V01_EDGE_NAMES.items()
                                if k in df.columns and v not in df.columns})
        missing = [c for c in ("sender", "receiver", "effect") if c not in df.columns]
        if missing:
            have = ", ".join(map(str, df.columns))
            raise ArgumentError(f"an edge frame needs columns sender, receiver, effect; missing "
                                f"{', '.join(missing)} (columns: {have})")
        # vectorised: an EAP-IG frame of a 30-layer model has ~750k edges
        senders = df["sender"].astype(str).to_numpy(dtype=object)
        receivers = df["receiver"].astype(str).to_numpy(dtype=object)
        effect = np.asarray(pd.to_numeric(pd.Series(df["effect"]), errors="coerce"),
                            dtype=float)
        bad = ~np.isfinite(effect)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ArgumentError(f"score of {senders[i]}->{receivers[i]} must be finite, got "
                                f"{effect[i]}")
        twice = pd.DataFrame({"s": senders, "r": receivers}).duplicated().to_numpy()
        if twice.any():
            i = int(np.flatnonzero(twice)[0])
            raise ArgumentError(f"two rows for edge {senders[i]}->{receivers[i]}")
        if "method" in df.columns:
            method = pd.Series(df["method"]).astype(object)
            methods = [str(m) for m in method.where(method.notna(), provenance.method)]
        else:
            methods = [provenance.method] * len(df)
        ids = set(senders.tolist()) | set(receivers.tolist())
        inner = [Node.parse(i) for i in ids if not i.startswith("logits@")]
        if n_layers is None:
            n_layers = max((n.layer + (n.kind != "resid") for n in inner), default=0)
        nodes = [Node.parse(i, n_layers=n_layers) for i in ids]
        out, into = _sums(senders, effect), _sums(receivers, effect)
        g = cls(provenance)
        for n in sorted(nodes):
            g.add_node(n, score=out[n.id] if n.id in out else into[n.id])
        sign = np.sign(effect).astype(int)
        g.graph.add_edges_from(
            (u, v, {"score": e, "abs_score": abs(e), "sign": sg, "method": m})
            for u, v, e, sg, m in zip(senders.tolist(), receivers.tolist(), effect.tolist(),
                                      sign.tolist(), methods, strict=True))
        if not nx.is_directed_acyclic_graph(g.graph):
            raise ArgumentError(f"edges form a cycle: {nx.find_cycle(g.graph)}")
        return g

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CircuitGraph):
            return NotImplemented
        return (self.graph.graph == other.graph.graph
                and dict(self.graph.nodes(data=True)) == dict(other.graph.nodes(data=True))
                and _edge_dict(self.graph) == _edge_dict(other.graph))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __contains__(self, node: object) -> bool:
        return (node.id if isinstance(node, Node) else node) in self.graph

    def _repr_html_(self) -> str | None:
        """The interactive circuit explorer, inline in Jupyter (``None``, so the plain repr,
        where no renderer is registered: :func:`set_html_renderer`)."""
        return None if _html_renderer is None else _html_renderer(self)

    def __repr__(self) -> str:
        p = self.provenance
        return (f"CircuitGraph({len(self)} nodes, {self.graph.number_of_edges()} edges, "
                f"model={p.model}@{p.revision}, method={p.method})")


def _sums(ids: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """Per id, the sum of its values, added in row order (as a loop over rows would)."""
    codes, uniques = pd.factorize(ids)
    total = np.zeros(len(uniques))
    np.add.at(total, codes, values)
    return dict(zip(list(uniques), total.tolist(), strict=True))


def _get(row: Mapping[str, Any], key: str, default: Any) -> Any:
    value = row.get(key)
    return default if value is None or pd.isna(value) else value


def node_of_row(row: Mapping[str, Any], n_layers: int) -> Node:
    """The graph node a tidy result row measures (``component``, ``layer``, ``head``,
    ``neuron``, ``role``): ``mlp_out`` at layer 3, role ``subject_last`` is
    ``L3.mlp@subject_last``; ``resid_post`` of layer l is the ``resid`` entering l + 1."""
    node_id = _get(row, "node", None)
    if isinstance(node_id, str):  # feature and error nodes carry their id (feature_atp)
        return Node.parse(node_id, n_layers=n_layers)
    comp = str(row["component"])
    kind = COMPONENT_KINDS.get(comp)
    if kind is None:
        raise ArgumentError(f"no node kind for component {comp!r}; "
                            f"known: {sorted(COMPONENT_KINDS)}")
    role = _get(row, "role", None)
    if role is None and _get(row, "position", None) is not None:
        raise ArgumentError(f"{comp} row at absolute position {row['position']}: "
                         "circuit graphs need position roles")
    index = _get(row, kind, None) if kind in ("head", "neuron") else None  # column = kind
    if kind == "embed":
        return Node("embed", -1, None, role or "all")
    layer = int(row["layer"]) + (comp == "resid_post")
    if layer >= n_layers + (kind == "resid"):
        raise ArgumentError(f"{comp} at layer {row['layer']} lies outside {n_layers} layers")
    return Node(kind, layer, index, role or "all")


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns)) if not rows else pd.DataFrame(rows)
    return df.reindex(columns=list(columns) + [c for c in df.columns if c not in columns])


def _edge_dict(g: nx.DiGraph) -> dict[tuple[str, str], dict[str, Any]]:
    return {(u, v): d for u, v, d in g.edges(data=True)}


__all__ = ["COMPONENT_KINDS", "EDGE_COLUMNS", "NODE_COLUMNS", "STRUCTURAL", "CircuitGraph",
           "node_of_row", "set_html_renderer"]
