"""The circuit explorer: a circuit graph as a place to look around, in a report or a notebook.

Circuit-discovery tools show their graphs in an interactive frontend (circuit-tracer's, served
locally; Neuronpedia's, hosted). This one needs no server: the graph travels as JSON inside the
page, and a pinned copy of d3 (``vendor/``, inlined with its ISC licence) plus a small script of
ours (``templates/explorer.js``) draw it. What a reader gets:

* **layout** -- x is the layer (embeddings left, logits right; within a layer the residual
  stream, then attention, then the MLP), y is the token-position lane (the role of the token
  for dataset-level graphs, ``position`` for per-prompt ones); kinds have shapes (head ●,
  attention ▲, MLP ■, neuron ◆, stream ✚, embeddings Y, logits ★), the sign is the colour
  (blue positive, red negative) and |score| the size. The layers share the whole width the
  page gives the drawing, a layer's column widened by the square root of its densest cell's
  size (at most 8 times). The nodes of one (layer, stage, lane) cell -- tens of transcoder
  features of one layer at one token, in a feature graph -- form a compact grid inside the
  layer's slot, the strongest by |score| at the lane's centre and the weaker around them; one
  node pitch (16 px down to 3 px) serves the whole graph, the largest at which it fits 900 px
  tall, so that no two nodes overlap and sizes compare across cells. Zoom and pan with the
  wheel and drag; layer labels thin out so that 18, 30 and 80-layer models stay legible.
* **filters** -- an |effect| threshold slider (log scale) and a top-k box, both over the edges
  sorted by |effect|; a graph with more than ``initial_edges`` edges opens at the threshold of
  its ``initial_edges``-th edge and the rest appear as the slider moves. Search by node id or
  label (Enter selects the first match and centres it).
* **evidence** -- hovering over a node previews it and clicking selects it: its score and
  method, intervals and ``n`` where the graph has them, the per-prompt values of the node
  (``evidence=``, a per-prompt result frame such as activation patching's) as a strip plot
  with its mean and 95% interval, and its strongest incoming and outgoing edges, each a button
  that moves to the other node.
* **subgraphs** -- pin nodes, show the pinned ones alone, group them into a named supernode
  (its edges are the sums of its members'), and export the pinned subgraph as node-link JSON
  that :func:`factfind.graph.read_json` loads back into a :class:`~factfind.graph.CircuitGraph`.

:func:`explorer_data` is the JSON the page reads (columns, not records: a 10,000-node,
50,000-edge graph is ~1.5 MB, ``benchmarks/bench_explorer.py`` times it in the browser);
:func:`graph_view` wraps it for a report section, and :func:`explorer_html` for a notebook
(``CircuitGraph._repr_html_``, registered when this module is imported).

Example::

    view = graph_view(circuit, evidence=patching_per_prompt)      # a report's GraphView
    html = explorer_html(circuit)                                  # what Jupyter shows
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
from markupsafe import Markup

from factfind.errors import EmptyGraphError, MissingLayerError, WrongTypeError
from factfind.graph import circuit as _circuit
from factfind.graph.circuit import node_of_row
from factfind.report.document import GraphView, _assets, library
from factfind.results import aggregate

#: edges a large graph shows when it opens (the strongest by |effect|)
INITIAL_EDGES = 400
#: edges a notebook's explorer of a CircuitGraph holds (a complete EAP-IG graph of a 30-layer
#: model has ~750k, tens of MB of JSON; the strongest 5,000 are ~0.2 MB)
NOTEBOOK_EDGES = 5000
ENDPOINTS = ("embed", "logits")
_SCORE_KEYS = ("score",)           # the value a node or edge is drawn and filtered by
_DERIVED = ("abs_score", "sign")   # recomputed from the score, so never shipped


# ----------------------------------------------------------------------------- the data


def explorer_data(graph: Any, *, evidence: pd.DataFrame | None = None, title: str = "",
                  max_edges: int | None = None,
                  initial_edges: int = INITIAL_EDGES) -> dict[str, Any]:
    """The JSON the explorer draws: nodes and edges as columns, edges by |effect| descending.

    Args:
        graph: a :class:`~factfind.graph.CircuitGraph` or a networkx ``DiGraph`` whose nodes
            carry ``kind``, ``layer`` (not needed by ``embed`` and ``logits``), ``role`` or an
            integer ``position``, and ``score``; edges carry ``score`` (shown as the effect).
            Other scalar attributes (``ci_low``, ``ci_high``, ``n``, ``label`` ...) are shown
            in a node's panel and kept by the export.
        evidence: per-prompt node results (tidy rows: ``component``, ``layer``, ``head``,
            ``neuron``, ``role``, ``prompt``, ``effect``, ``method``) shown as each matching
            node's distribution, mean and 95% interval. Rows of methods other than the first
            are ignored; rows that name no node of the graph are skipped.
        title: shown above the drawing.
        max_edges: keep only the strongest ``max_edges`` edges (and the nodes they touch, plus
            the endpoints), e.g. for a complete EAP-IG graph of a 30-layer model (~750k
            edges); ``None`` keeps every edge.
        initial_edges: a graph with more edges opens showing only its strongest this many.

    Raises:
        EmptyGraphError: the graph has no nodes.
        MissingLayerError: a node other than ``embed``/``logits`` has no layer.
    """
    g = _as_graph(graph)
    if g.number_of_nodes() == 0:
        raise EmptyGraphError("the circuit graph has no nodes, so there is nothing to explore "
                              "(a graph pruned to nothing? keep more edges)")
    edges = sorted(g.edges(data=True), key=lambda e: -abs(_score(e[2])))  # stable
    n_total = len(edges)
    keep = list(g.nodes)
    if max_edges is not None and n_total > max_edges:
        edges = edges[:max_edges]
        touched = {u for u, _, _ in edges} | {v for _, v, _ in edges}
        keep = [n for n in g.nodes if n in touched or g.nodes[n].get("kind") in ENDPOINTS]
    index = {n: i for i, n in enumerate(keep)}
    attrs = [dict(g.nodes[n]) for n in keep]
    for n, a in zip(keep, attrs, strict=True):
        if a.get("kind") not in ENDPOINTS and _missing(a.get("layer")):
            raise MissingLayerError(f"node {n!r} has no layer (attributes: "
                                    f"{', '.join(sorted(map(str, a))) or 'none'}); every node "
                                    "but embed and logits needs one to be placed")
    lanes, lane_of, lane_kind = _lanes(attrs)
    node_method, node_methods = _shared([a.get("method") for a in attrs])
    nodes: dict[str, Any] = {
        "id": [str(n) for n in keep],
        "kind": [str(a.get("kind", "")) for a in attrs],
        "layer": [None if _missing(a.get("layer")) else int(a["layer"]) for a in attrs],
        "index": [None if _missing(a.get("index")) else int(a["index"]) for a in attrs],
        "role": [None if _missing(a.get("role")) else str(a["role"]) for a in attrs],
        "lane": lane_of,
        "score": [_score(a) for a in attrs],
    }
    if node_methods is not None:
        nodes["method"] = node_methods
    standard = {"kind", "layer", "index", "role", "method", *_SCORE_KEYS, *_DERIVED}
    extra = {str(i): x for i, a in enumerate(attrs)
             if (x := _plain({k: v for k, v in a.items() if k not in standard}))}
    edge_method, edge_methods = _shared([a.get("method") for _, _, a in edges])
    data: dict[str, Any] = {
        "title": title,
        "graph": _plain_graph(g.graph),
        "lanes": lanes,
        "lane_kind": lane_kind,
        "n_layers": _n_layers(attrs),
        "nodes": nodes,
        "node_method": node_method,
        "extra": extra,
        "edges": {"sender": [index[u] for u, _, _ in edges],
                  "receiver": [index[v] for _, v, _ in edges],
                  "effect": [_score(a) for _, _, a in edges]},
        "edge_method": edge_method,
        "edges_total": n_total,
        "nodes_total": g.number_of_nodes(),
        "initial_edges": int(initial_edges),
        "evidence": {} if evidence is None else _evidence(evidence, keep, index, attrs),
    }
    if edge_methods is not None:
        data["edges"]["method"] = edge_methods
    return data


def data_json(data: Mapping[str, Any]) -> Markup:
    """``data`` as JSON safe inside ``<script type="application/json">`` (no ``<``, ``>`` or
    ``&`` that could close the element)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _lanes(attrs: list[dict[str, Any]]) -> tuple[list[str], list[int], str]:
    """The y lanes: integer token positions where every inner node has one, else roles."""
    from factfind.report.figures import _axis_order

    inner = [a for a in attrs if a.get("kind") not in ENDPOINTS]
    if inner and all(isinstance(a.get("position"), int | np.integer) for a in inner):
        last = max(int(a["position"]) for a in inner)
        pos = [int(a["position"]) if isinstance(a.get("position"), int | np.integer)
               else (last if a.get("kind") == "logits" else 0) for a in attrs]
        lanes = sorted(set(pos))
        return [str(p) for p in lanes], [lanes.index(p) for p in pos], "position"
    names = [_lane(a) for a in attrs]
    lanes = [str(x) for x in _axis_order(pd.Index(names), "role")]
    return lanes, [lanes.index(x) for x in names], "role"


def _lane(a: Mapping[str, Any]) -> str:
    role = a.get("role")
    if _missing(role):
        return "final" if a.get("kind") == "logits" else "all"
    return str(role)


def _n_layers(attrs: list[dict[str, Any]]) -> int:
    layers = [int(a["layer"]) for a in attrs if not _missing(a.get("layer"))
              and a.get("kind") != "embed"]
    logits = [int(a["layer"]) for a in attrs if a.get("kind") == "logits"
              and not _missing(a.get("layer"))]
    return logits[0] if logits else max(layers, default=-1) + 1


def _evidence(df: pd.DataFrame, keep: list[Any], index: dict[Any, int],
              attrs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per node of the graph: the evidence frame's per-prompt values, mean, interval and n."""
    if df.empty:
        return {}
    if "method" in df.columns:
        df = pd.DataFrame(df[df["method"] == df["method"].iloc[0]])
    n_layers = _n_layers(attrs)
    ids = []
    for row in df.to_dict("records"):
        try:
            ids.append(node_of_row(row, n_layers).id)
        except Exception:  # a row no graph node could be (absolute position, unknown kind)
            ids.append(None)
    work = df.assign(node=ids)
    work = pd.DataFrame(work[work["node"].isin([str(n) for n in keep])])
    if work.empty:
        return {}
    stats = aggregate(work, by=["node"]).set_index("node")
    method = str(df["method"].iloc[0]) if "method" in df.columns else "per-prompt effect"
    by_id = {str(n): i for n, i in index.items()}
    out: dict[str, Any] = {}
    for node, group in work.groupby("node", sort=False):
        values = np.asarray(pd.to_numeric(pd.Series(group["effect"]), errors="coerce"),
                            dtype=float)
        values = values[np.isfinite(values)]
        s = stats.loc[node]
        out[str(by_id[str(node)])] = {
            "method": method, "values": [_round(v) for v in values.tolist()],
            "mean": _finite(s["effect"]), "ci_low": _finite(s["ci_low"]),
            "ci_high": _finite(s["ci_high"]), "n": int(s["n"])}
    return out


# ----------------------------------------------------------------------------- HTML


def explorer_html(graph: Any, *, caption: str = "", **kwargs: Any) -> str:
    """One self-contained HTML fragment with the explorer of ``graph``: what
    ``CircuitGraph._repr_html_`` returns in Jupyter (with ``max_edges=NOTEBOOK_EDGES``).
    ``kwargs`` go to :func:`explorer_data`."""
    return view_html(graph_view(graph, caption=caption, **kwargs))


def view_html(view: GraphView) -> str:
    """A :class:`GraphView` as a fragment for a notebook: its CSS, the inlined d3 (defined
    once per page however many fragments a notebook shows) and our script."""
    assets = _assets()
    fid = "ffx-" + hashlib.sha256(view.data.encode()).hexdigest()[:10]
    markup = assets.env.get_template("explorer.html.j2").render(
        g={"id": fid, "data": Markup(view.data), "caption": view.caption})
    return (f'<div class="ffx-notebook"><style>{assets.explorer_css}</style>'
            f"<script>if (typeof window.d3 === 'undefined') {{\n{library().script}\n}}"
            f"</script>{markup}<script>{assets.explorer_js}</script></div>")


def graph_view(graph: Any, *, caption: str = "", evidence: pd.DataFrame | None = None,
               title: str = "", max_edges: int | None = None,
               initial_edges: int = INITIAL_EDGES) -> GraphView:
    """A report's circuit explorer (a :class:`GraphView`; arguments as :func:`explorer_data`).

    ``graph`` is a networkx ``DiGraph`` or anything with one at ``.graph`` (a
    :class:`~factfind.graph.CircuitGraph`). The caption says how many of the graph's edges and
    nodes the page holds when ``max_edges`` cut it.
    """
    data = explorer_data(graph, evidence=evidence, title=title, max_edges=max_edges,
                         initial_edges=initial_edges)
    n_nodes, n_edges = len(data["nodes"]["id"]), len(data["edges"]["effect"])
    if n_edges < data["edges_total"]:
        cut = (f"The strongest {n_edges:,} of {data['edges_total']:,} edges and the {n_nodes:,} "
               f"of {data['nodes_total']:,} nodes they touch.")
        caption = f"{caption} {cut}".strip()
    return GraphView(data=str(data_json(data)), caption=caption, n_nodes=n_nodes,
                     n_edges=n_edges)


# ----------------------------------------------------------------------------- helpers


def _as_graph(graph: Any) -> nx.DiGraph:
    # a networkx graph has a .graph too (its attribute dict), so test the type first
    g = graph if isinstance(graph, nx.Graph) else getattr(graph, "graph", None)
    if not isinstance(g, nx.DiGraph):
        raise WrongTypeError(f"expected a networkx DiGraph or an object with one at .graph, got "
                             f"{type(graph).__name__}")
    return g


def _score(attrs: Mapping[str, Any]) -> float:
    try:
        s = float(attrs.get("score", 0.0))
    except (TypeError, ValueError):
        return 0.0
    return s if math.isfinite(s) else 0.0


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float | np.floating) and math.isnan(v))


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def _shared(values: list[Any]) -> tuple[str | None, list[str | None] | None]:
    """One value for all (shipped once), or ``None`` and the list where they differ."""
    texts = [None if _missing(v) else str(v) for v in values]
    if len(set(texts)) <= 1:
        return (texts[0] if texts else None), None
    return None, texts


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe scalars (non-finite floats as null); containers and objects as text."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, float | np.floating):
            v = float(v) if math.isfinite(v) else None
        elif isinstance(v, np.integer | np.bool_):
            v = v.item()
        elif not (isinstance(v, str | int | bool) or v is None):
            v = str(v)
        out[str(k)] = v
    return out


def _plain_graph(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Graph attributes for the export: the provenance as the object ``read_json`` expects."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        try:
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError):
            v = str(v)
        out[str(k)] = v
    return out


def _notebook_html(graph: Any) -> str:
    return explorer_html(graph, max_edges=NOTEBOOK_EDGES)


_circuit.set_html_renderer(_notebook_html)  # CircuitGraph._repr_html_

__all__ = ["INITIAL_EDGES", "NOTEBOOK_EDGES", "data_json", "explorer_data", "explorer_html",
           "graph_view", "view_html"]
