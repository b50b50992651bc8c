"""The circuit as an interactive SVG: :func:`graph_view` lays a circuit graph out by layer (x)
and position role (y), with a native tooltip and a details panel per node and edge.
"""


from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
from markupsafe import escape

from factfind.errors import WrongTypeError
from factfind.report.document import _NEG, _POS, _ZERO, GraphView, _format_value
from factfind.report.figures import _axis_order

# ----------------------------------------------------------------------------- circuit graph view

_KIND_ORDER = {"embed": 0, "resid": 1, "attn": 2, "head": 3, "mlp": 4, "neuron": 5, "logits": 6}


def graph_view(graph: Any, *, caption: str = "", lane_height: int = 64,
               max_width: int = 760) -> GraphView:
    """Draw a circuit as SVG: columns are layers (embeddings left, logits right), lanes are
    position roles (:data:`ROLE_ORDER`), circles are nodes and curves are edges.

    ``graph`` is a networkx ``DiGraph`` (or an object with one at ``.graph``, such as
    ``factfind.graph.CircuitGraph``) whose nodes carry ``kind``, ``layer``, ``role`` and ``score``
    and whose edges carry ``score``. Circle area and edge width grow with ``|score|``; blue is
    positive, red negative. Every node and edge has a ``<title>`` tooltip and a ``data-info``
    attribute with all its attributes, shown in the details panel on hover, focus or click.
    """
    g = _as_graph(graph)
    nodes = list(g.nodes(data=True))
    roles = _axis_order(pd.Index([_lane(a) for _, a in nodes]), "role") if nodes else []
    present = {_column(a) for _, a in nodes}
    layers = [c[1] for c in present if c[0] == 1]
    # every layer between the first and the last, so that x is proportional to depth
    columns = sorted(present | {(1, i) for i in range(min(layers), max(layers) + 1)} if layers
                     else present)
    left, top, bottom, right = 112, 16, 34, 24
    col_w = max(30.0, min(120.0, (max_width - left - right) / max(1, len(columns))))
    width = left + right + col_w * len(columns)
    height = top + bottom + lane_height * max(1, len(roles))

    cells: dict[tuple[tuple[int, int], str], list[tuple[Any, dict[str, Any]]]] = {}
    for n, a in sorted(nodes, key=lambda na: (_KIND_ORDER.get(str(na[1].get("kind")), 9),
                                              str(na[0]))):
        cells.setdefault((_column(a), _lane(a)), []).append((n, a))
    max_node = max([abs(_score(a)) for _, a in nodes] + [1e-12])
    max_edge = max([abs(_score(a)) for _, _, a in g.edges(data=True)] + [1e-12])
    pos: dict[Any, tuple[float, float, float]] = {}
    labels: dict[Any, str] = {}
    for (col, lane), members in cells.items():
        cx = left + col_w * (columns.index(col) + 0.5)
        cy = top + lane_height * (roles.index(lane) + 0.5)
        ncols = math.ceil(math.sqrt(len(members)))
        nrows = math.ceil(len(members) / ncols)
        step = min(col_w * 0.8 / ncols, lane_height * 0.8 / nrows)
        for i, (n, a) in enumerate(members):
            r, c = divmod(i, ncols)
            x = cx + (c - (ncols - 1) / 2) * step
            y = cy + (r - (nrows - 1) / 2) * step
            radius = max(2.5, min(step * 0.48, 3 + 8 * math.sqrt(abs(_score(a)) / max_node)))
            pos[n] = (x, y, radius)
            if len(members) <= 3:
                labels[n] = _short_name(n)

    out = [f'<svg class="graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
           f'height="{height:.0f}" role="img" aria-label="Circuit graph with {len(nodes)} nodes '
           f'and {g.number_of_edges()} edges" xmlns="http://www.w3.org/2000/svg">']
    for i, lane in enumerate(roles):
        y0 = top + lane_height * i
        out.append(f'<rect class="lane" x="{left}" y="{y0}" width="{width - left - right:.0f}" '
                   f'height="{lane_height}"/>'
                   f'<text class="lane-label" x="{left - 8}" y="{y0 + lane_height / 2 + 4:.1f}">'
                   f"{escape(lane)}</text>")
    for i, col in enumerate(columns):
        x = left + col_w * (i + 0.5)
        out.append(f'<text class="layer-label" x="{x:.1f}" y="{height - 12}">'
                   f"{escape(_column_label(col))}</text>")
    for u, v, a in sorted(g.edges(data=True), key=lambda e: abs(_score(e[2]))):
        (x1, y1, _), (x2, y2, _) = pos[u], pos[v]
        s = _score(a)
        w = 0.6 + 3.4 * abs(s) / max_edge
        dx = max(12.0, abs(x2 - x1) * 0.45)
        info = {"edge": f"{u} → {v}", **_plain(a)}
        out.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} '
                   f'{x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" stroke="{_sign_color(s)}" '
                   f'stroke-width="{w:.2f}" data-source="{escape(str(u))}" '
                   f'data-target="{escape(str(v))}" data-info="{escape(_json(info))}">'
                   f"<title>{escape(f'{u} → {v}: score {_format_value(s)}')}</title></path>")
    for n, a in nodes:
        x, y, radius = pos[n]
        s = _score(a)
        opacity = 0.35 + 0.65 * abs(s) / max_node
        info = {"node": str(n), **_plain(a)}
        label = f"{n}: score {_format_value(s)}"
        out.append(f'<g class="node" tabindex="0" data-id="{escape(str(n))}" '
                   f'data-info="{escape(_json(info))}"><title>{escape(label)}</title>'
                   f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{_sign_color(s)}" '
                   f'fill-opacity="{opacity:.2f}" stroke="{_sign_color(s)}"/>'
                   + (f'<text class="node-label" x="{x:.1f}" y="{y + radius + 11:.1f}">'
                      f"{escape(labels[n])}</text>" if n in labels else "") + "</g>")
    out.append("</svg>")
    return GraphView(svg="".join(out), caption=caption, n_nodes=len(nodes),
                     n_edges=g.number_of_edges())


def _short_name(node: Any) -> str:
    """``L4.h1@final`` → ``h1``: the unit, since the column and lane give layer and role."""
    return re.sub(r"^L\d+\.", "", str(node)).split("@")[0]


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


def _sign_color(s: float) -> str:
    return _POS if s > 0 else _NEG if s < 0 else _ZERO


def _lane(attrs: Mapping[str, Any]) -> str:
    role = attrs.get("role")
    if role is None or (isinstance(role, float) and math.isnan(role)):
        return "final" if attrs.get("kind") == "logits" else "(any)"
    return str(role)


def _column(attrs: Mapping[str, Any]) -> tuple[int, int]:
    kind = attrs.get("kind")
    if kind == "embed":
        return (0, 0)
    if kind == "logits":
        return (2, 0)
    layer = attrs.get("layer")
    return (1, int(layer) if layer is not None else 0)


def _column_label(col: tuple[int, int]) -> str:
    return {0: "embed", 2: "logits"}.get(col[0], f"L{col[1]}")


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe attributes: scalars as they are (non-finite floats as null), the rest as text."""
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


def _json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


