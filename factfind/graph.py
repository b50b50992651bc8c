"""Circuit graphs: which components, at which positions, pass a fact along which paths.

The residual stream makes a transformer a directed acyclic graph: every block reads the sum of
everything written before it, so any component can feed any later one. A *circuit graph* has a
node per component at a position role and an edge wherever one node's output reaches another's
input:

* ``L5.mlp@subject_last``  layer 5's MLP at the subject's last token;
* ``L3.h2@final``          head 2 of layer 3 at the final token;
* ``L4.n311@subject_last`` neuron 311 of layer 4's MLP; ``L2.attn@final``, ``L6.resid@final``
  (the stream *entering* block 6) likewise; role ``all`` means every position;
* ``embed@<role>``         the inputs, and ``logits@final`` the one output.

MLPs and neurons act per position, so they read only nodes at their own role; heads move
information between positions, so they read any role. Only the final position's stream reaches
the logits. In parallel blocks (GPT-NeoX) attention and MLP of one layer do not feed each other.

Scores come in two kinds. *Node* scores are one effect per site from activation patching or
attribution patching (:meth:`CircuitGraph.from_node_scores`); their edges are ``structural``
(allowed, not measured). *Edge* scores come from edge attribution patching (EAP, Syed et al.
2023; EAP-IG, Hanna et al. 2024), which scores u→v by how much the metric moves if only v's
reading of u is patched (:meth:`CircuitGraph.from_edge_scores`).

A circuit is what survives pruning (:func:`prune` on edge scores, the edge-level circuits of
ACDC, Conmy et al. 2023, and EAP; :func:`prune_nodes` on node scores). Whatever the criterion,
a node only matters to the output if it lies on a directed path from an input to the logits,
so pruning ends by keeping ``descendants(embeds) ∩ ancestors(logits)``: a high-scoring node
whose paths were all cut is dropped. Every graph carries its :class:`Provenance`; combining
graphs of different models or datasets raises :class:`ProvenanceMismatchError`.

Example::

    g = CircuitGraph.from_node_scores(aggregate(df), prov, n_layers=12)
    circuit = prune_nodes(g, top_n=20)
    to_json(circuit, "circuit.json"); assert read_json("circuit.json") == circuit
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import logging
import math
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import networkx as nx
import pandas as pd

from factfind.types import Role

log = logging.getLogger(__name__)

KINDS = ("embed", "resid", "attn", "head", "mlp", "neuron", "logits")  # order within a layer
ROLES = (*(r.value for r in Role), "all")
ENDPOINTS = ("embed", "logits")
STRUCTURAL = "structural"  # method of an edge that the architecture allows but nothing measured
NODE_COLUMNS = ("id", "kind", "layer", "index", "role", "score", "abs_score", "sign", "method")
EDGE_COLUMNS = ("src", "dst", "score", "abs_score", "sign", "method")
COMPONENT_KINDS = {
    "head_out": "head", "z": "head", "attn_out": "attn", "attn": "attn", "mlp_out": "mlp",
    "mlp": "mlp", "neurons": "neuron", "resid_pre": "resid", "resid_post": "resid",
    "embed": "embed",
}
_ID = re.compile(r"(?:(?P<end>embed|logits)|L(?P<layer>\d+)\."
                 r"(?:h(?P<head>\d+)|n(?P<neuron>\d+)|(?P<block>mlp|attn|resid)))@(?P<role>\w+)")


class ProvenanceMismatchError(ValueError):
    """Graphs from different models, revisions or datasets were combined."""


@functools.total_ordering
@dataclass(frozen=True)
class Node:
    """A component at a position role; ordered by (layer, kind, index, role).

    ``layer`` is -1 for ``embed`` and ``n_layers`` for ``logits``; ``index`` is the head or
    neuron index (``None`` for the other kinds); ``role`` is a :class:`Role` value or ``"all"``.
    """

    kind: str
    layer: int
    index: int | None = None
    role: str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "role", str(self.role))
        if self.index is not None:
            object.__setattr__(self, "index", int(self.index))
        if self.kind not in KINDS:
            raise ValueError(f"node kind must be one of {KINDS}, got {self.kind!r}")
        if self.role not in ROLES:
            raise ValueError(f"node role must be one of {ROLES}, got {self.role!r}")
        if (self.index is None) == (self.kind in ("head", "neuron")):
            raise ValueError(f"{self.kind} nodes {'need' if self.index is None else 'take no'} "
                             f"index, got {self.index!r}")
        if self.index is not None and self.index < 0:
            raise ValueError(f"node index must be >= 0, got {self.index}")
        if (self.layer == -1) != (self.kind == "embed") or self.layer < -1:
            raise ValueError(f"layer must be -1 exactly for embed nodes, got {self.kind} "
                             f"at layer {self.layer}")

    @property
    def id(self) -> str:
        """``L5.mlp@subject_last``, ``L3.h2@final``, ``L4.n311@subject_last``, ``embed@final``."""
        if self.kind in ENDPOINTS:
            return f"{self.kind}@{self.role}"
        unit = {"head": f"h{self.index}", "neuron": f"n{self.index}"}.get(self.kind, self.kind)
        return f"L{self.layer}.{unit}@{self.role}"

    @classmethod
    def parse(cls, node_id: str, *, n_layers: int | None = None) -> Node:
        """The node with this id. ``logits`` ids carry no layer, so they need ``n_layers``;
        with it, other ids are also checked to lie inside the model."""
        m = _ID.fullmatch(node_id)
        if m is None:
            raise ValueError(f"malformed node id {node_id!r}: expected e.g. 'L5.mlp@subject_last',"
                             " 'L3.h2@final', 'L4.n311@final', 'embed@final' or 'logits@final'")
        role = m["role"]
        if m["end"] == "embed":
            return cls("embed", -1, None, role)
        if m["end"] == "logits":
            if n_layers is None:
                raise ValueError(f"{node_id!r} carries no layer: pass n_layers to parse it")
            return cls("logits", n_layers, None, role)
        kind = "head" if m["head"] else "neuron" if m["neuron"] else m["block"]
        index = m["head"] or m["neuron"]
        node = cls(kind, int(m["layer"]), None if index is None else int(index), role)
        if n_layers is not None and node.layer >= n_layers + (kind == "resid"):
            raise ValueError(f"{node_id!r} lies outside a model with {n_layers} layers")
        return node

    def _key(self) -> tuple[int, int, int, int]:
        index = -1 if self.index is None else self.index
        return (self.layer, KINDS.index(self.kind), index, ROLES.index(self.role))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Node):
            return NotImplemented
        return self._key() < other._key()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version() -> str:
    try:
        return importlib.metadata.version("factfind")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Provenance:
    """Where a graph came from. ``config`` (a JSON-able dict) is kept as sorted JSON text so the
    record stays hashable; read it back with :attr:`config_dict`."""

    model: str
    revision: str | None
    dataset: str  # the dataset's fingerprint
    method: str
    config: str | Mapping[str, Any] = "{}"
    created: str = field(default_factory=_now)
    version: str = field(default_factory=_version)

    def __post_init__(self) -> None:
        cfg = json.loads(self.config) if isinstance(self.config, str) else self.config
        object.__setattr__(self, "config", json.dumps(cfg, sort_keys=True, allow_nan=False))

    @property
    def config_dict(self) -> dict[str, Any]:
        return json.loads(str(self.config))


def check_compatible(a: Provenance, b: Provenance) -> None:
    """Raise :class:`ProvenanceMismatchError` unless ``a`` and ``b`` share model, revision and
    dataset (the method may differ)."""
    problems = []
    if (a.model, a.revision) != (b.model, b.revision):
        problems.append(f"models {a.model}@{a.revision} vs {b.model}@{b.revision}")
    if a.dataset != b.dataset:
        problems.append(f"datasets {a.dataset} vs {b.dataset}")
    if problems:
        raise ProvenanceMismatchError("cannot combine circuit graphs from different "
                                      + " and ".join(problems))


def _scored(score: float, method: str, what: str) -> dict[str, Any]:
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score of {what} must be finite, got {score}")
    return {"score": score, "abs_score": abs(score), "sign": (score > 0) - (score < 0),
            "method": str(method)}


def _feeds(u: Node, v: Node, parallel: bool) -> bool:
    """Whether ``v`` reads what ``u`` writes into the residual stream."""
    # stage in the forward pass: (layer, 0) embed and the stream entering the block, (layer, 1)
    # attention, (layer, 2) MLP (1 in parallel blocks: it reads the same stream), logits last
    sub = {"attn": 1, "head": 1, "mlp": 2 - parallel, "neuron": 2 - parallel, "logits": 3}
    if (u.layer, sub.get(u.kind, 0)) >= (v.layer, sub.get(v.kind, 0)):
        return False
    if v.kind in ("attn", "head"):  # attention reads every (earlier) position
        return True
    return u.role == v.role or "all" in (u.role, v.role)  # MLPs, stream, logits: per position


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
        return Node(d["kind"], d["layer"], d.get("index"), d["role"])

    def nodes(self) -> list[Node]:
        return sorted(self.node(n) for n in self.graph)

    def nodes_frame(self) -> pd.DataFrame:
        """One row per node in node order: :data:`NODE_COLUMNS` plus any extra attributes."""
        rows = [{"id": n.id, **self.graph.nodes[n.id]} for n in self.nodes()]
        df = _frame(rows, NODE_COLUMNS)
        df["index"] = df["index"].astype("Int64")
        return df

    def edges_frame(self) -> pd.DataFrame:
        """One row per edge, ordered by (src, dst) node order: :data:`EDGE_COLUMNS` + extras."""
        edges = sorted(self.graph.edges, key=lambda e: (self.node(e[0]), self.node(e[1])))
        return _frame([{"src": u, "dst": v, **self.graph.edges[u, v]} for u, v in edges],
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
            node = _row_node(row, n_layers)
            if node.id in g.graph:
                raise ValueError(f"two rows for node {node.id}: aggregate over prompts first")
            g.add_node(node, score=row["effect"], method=_get(row, "method", provenance.method))
        roles = {n.role for n in g.nodes()} | {"final"}
        for role in sorted(roles, key=ROLES.index):
            if f"embed@{role}" not in g.graph:
                g.add_node(Node("embed", -1, None, role), score=0.0, method=STRUCTURAL)
        g.add_node(Node("logits", n_layers, None, "final"), score=0.0, method=STRUCTURAL)
        nodes = g.nodes()
        for u, v in itertools.product(nodes, nodes):
            if _feeds(u, v, parallel):
                g.add_edge(u, v, score=0.0, method=STRUCTURAL)
        return g

    @classmethod
    def from_edge_scores(cls, df: pd.DataFrame, provenance: Provenance, *,
                         n_layers: int | None = None) -> CircuitGraph:
        """A graph from EAP / EAP-IG results: columns ``src``, ``dst`` (node ids), ``score``,
        optional ``method``. A node's score is the sum of its outgoing edges' (for a complete
        EAP graph this is its attribution-patching score, by linearity of the residual stream);
        the logits' is the sum of its incoming ones. ``n_layers`` defaults to what the ids imply.
        """
        rows = df.to_dict("records")
        ids = {r["src"] for r in rows} | {r["dst"] for r in rows}
        inner = [Node.parse(i) for i in ids if not i.startswith("logits@")]
        if n_layers is None:
            n_layers = max((n.layer + (n.kind != "resid") for n in inner), default=0)
        nodes = [Node.parse(i, n_layers=n_layers) for i in ids]
        out: dict[str, float] = defaultdict(float)
        into: dict[str, float] = defaultdict(float)
        for r in rows:
            out[r["src"]] += float(r["score"])
            into[r["dst"]] += float(r["score"])
        g = cls(provenance)
        for n in sorted(nodes):
            g.add_node(n, score=out[n.id] if n.id in out else into[n.id])
        for r in rows:
            if g.graph.has_edge(r["src"], r["dst"]):
                raise ValueError(f"two rows for edge {r['src']}->{r['dst']}")
            g.add_edge(r["src"], r["dst"], score=r["score"], method=_get(r, "method", None))
        if not nx.is_directed_acyclic_graph(g.graph):
            raise ValueError(f"edges form a cycle: {nx.find_cycle(g.graph)}")
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

    def __repr__(self) -> str:
        p = self.provenance
        return (f"CircuitGraph({len(self)} nodes, {self.graph.number_of_edges()} edges, "
                f"model={p.model}@{p.revision}, method={p.method})")


def _get(row: Mapping[str, Any], key: str, default: Any) -> Any:
    value = row.get(key)
    return default if value is None or pd.isna(value) else value


def _row_node(row: Mapping[str, Any], n_layers: int) -> Node:
    comp = str(row["component"])
    kind = COMPONENT_KINDS.get(comp)
    if kind is None:
        raise ValueError(f"no node kind for component {comp!r}; known: {sorted(COMPONENT_KINDS)}")
    role = _get(row, "role", None)
    if role is None and _get(row, "position", None) is not None:
        raise ValueError(f"{comp} row at absolute position {row['position']}: "
                         "circuit graphs need position roles")
    index = _get(row, kind, None) if kind in ("head", "neuron") else None  # column = kind
    if kind == "embed":
        return Node("embed", -1, None, role or "all")
    layer = int(row["layer"]) + (comp == "resid_post")
    if layer >= n_layers + (kind == "resid"):
        raise ValueError(f"{comp} at layer {row['layer']} lies outside {n_layers} layers")
    return Node(kind, layer, index, role or "all")


def _frame(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns)) if not rows else pd.DataFrame(rows)
    return df.reindex(columns=list(columns) + [c for c in df.columns if c not in columns])


def _edge_dict(g: nx.DiGraph) -> dict[tuple[str, str], dict[str, Any]]:
    return {(u, v): d for u, v, d in g.edges(data=True)}


# ----------------------------------------------------------------------------------- pruning


def _select(keys: list[Any], scores: list[float], threshold: float | None, top_n: int | None,
            cumulative: float | None) -> set[Any]:
    """Keys (sorted by descending score) passing every given criterion."""
    if threshold is None and top_n is None and cumulative is None:
        raise ValueError("give at least one of threshold, top_n, cumulative")
    keep = set(keys)
    if threshold is not None:
        keep &= {k for k, s in zip(keys, scores, strict=True) if s >= threshold}
    if top_n is not None:
        if top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {top_n}")
        keep &= set(keys[:top_n])
    if cumulative is not None:
        if not 0 < cumulative <= 1:
            raise ValueError(f"cumulative must be in (0, 1], got {cumulative}")
        sums = [0.0, *itertools.accumulate(scores)]
        keep &= set(keys[:next(i for i, s in enumerate(sums) if s >= cumulative * sums[-1])])
    return keep


def _on_paths(graph: CircuitGraph, edges: Iterable[tuple[str, str]]) -> CircuitGraph:
    """The sub-circuit of ``edges`` restricted to nodes on an embed → logits path."""
    h: nx.DiGraph = graph.graph.edge_subgraph(list(edges)).copy()
    kinds = dict(h.nodes(data="kind"))
    sources = [n for n, k in kinds.items() if k == "embed"]
    sinks = [n for n, k in kinds.items() if k == "logits"]
    down = set(sources).union(*(nx.descendants(h, s) for s in sources))
    up = set(sinks).union(*(nx.ancestors(h, t) for t in sinks))
    if not down & up:
        log.warning("pruning left no path from an input to the logits; the circuit is empty")
    return CircuitGraph(graph.provenance, h.subgraph(down & up).copy())


def prune(graph: CircuitGraph, *, threshold: float | None = None, top_n: int | None = None,
          cumulative: float | None = None) -> CircuitGraph:
    """Keep the edges with ``|score| >= threshold``, the ``top_n`` largest ``|score|`` (ties by
    node order), and/or the fewest largest whose ``|score|`` sums to ``cumulative`` of the
    total (each given criterion must hold), then only nodes on embed → logits paths."""
    data = list(graph.graph.edges(data=True))
    if data and all(d["method"] == STRUCTURAL for *_, d in data):
        raise ValueError("this graph's edges carry no measured scores (built from node scores):"
                         " use prune_nodes")
    data.sort(key=lambda e: (-e[2]["abs_score"], graph.node(e[0]), graph.node(e[1])))
    keep = _select([(u, v) for u, v, _ in data], [d["abs_score"] for *_, d in data],
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
        raise ValueError("this graph's nodes carry no measured scores: use prune")
    inner.sort(key=lambda n: (-attrs[n.id]["abs_score"], n))
    keep = _select([n.id for n in inner], [attrs[n.id]["abs_score"] for n in inner],
                   threshold, top_n, None)
    keep |= {n for n, k in graph.graph.nodes(data="kind") if k in ENDPOINTS}
    return _on_paths(graph, ((u, v) for u, v in graph.graph.edges if u in keep and v in keep))


# --------------------------------------------------------------------------- export / import


def _atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *,
                  overwrite: bool) -> Path:
    """Write through ``write(tmp_path)`` to a temporary sibling, then rename it into place, so a
    failure never leaves a partial file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _encoded(graph: CircuitGraph, *, graphml: bool) -> nx.DiGraph:
    g = graph.graph.copy()
    prov = dataclasses.asdict(graph.provenance)
    g.graph["provenance"] = json.dumps(prov, sort_keys=True) if graphml else prov
    if graphml:  # GraphML has no null: a missing index means None
        for _, d in g.nodes(data=True):
            if d.get("index") is None:
                d.pop("index", None)
    return g


def _decoded(g: nx.DiGraph) -> CircuitGraph:
    prov = g.graph.pop("provenance")
    for _, d in g.nodes(data=True):
        d.setdefault("index", None)
    return CircuitGraph(Provenance(**(json.loads(prov) if isinstance(prov, str) else prov)), g)


def to_graphml(graph: CircuitGraph, path: str | os.PathLike[str], *,
               overwrite: bool = False) -> Path:
    """Write GraphML (provenance as JSON text); :func:`read_graphml` gives an equal graph."""
    g = _encoded(graph, graphml=True)
    return _atomic_write(path, lambda tmp: nx.write_graphml(g, tmp), overwrite=overwrite)


def read_graphml(path: str | os.PathLike[str]) -> CircuitGraph:
    g = nx.read_graphml(path, node_type=str)
    if not isinstance(g, nx.DiGraph) or "provenance" not in g.graph:
        raise ValueError(f"{path} holds no factfind circuit graph")
    for key in ("node_default", "edge_default"):  # added by the reader when empty
        if g.graph.get(key) == {}:
            del g.graph[key]
    return _decoded(g)


def to_json(graph: CircuitGraph, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write node-link JSON; :func:`read_json` gives an equal graph."""
    data = nx.node_link_data(_encoded(graph, graphml=False), edges="edges")

    def write(tmp: str) -> None:  # streamed, so a failure midway is what atomicity is for
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)

    return _atomic_write(path, write, overwrite=overwrite)


def read_json(path: str | os.PathLike[str]) -> CircuitGraph:
    data = json.loads(Path(path).read_text())
    return _decoded(nx.node_link_graph(data, directed=True, multigraph=False, edges="edges"))


# --------------------------------------------------------------------------- combine / draw


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
