"""``ff.show(result)``: any analysis result as the figure its report section draws, in a notebook.

The report and the notebook draw a result the same way, so that what a user explores while
working is what the report will show. :func:`show` looks at what it is given:

* a :class:`~factfind.graph.CircuitGraph` or networkx ``DiGraph``, or an *edge result*
  (``sender, receiver, effect``: EAP, EAP-IG, edge patching) -> the circuit explorer (an edge
  frame becomes a graph first; its strongest ``max_edges`` edges are shown);
* a *faithfulness curve* (``faithfulness`` against ``size`` or ``fraction``) -> the report's
  faithfulness line plot;
* a *node result* with layers and token roles (tracing, patching, knockout, probes, DLA ...)
  -> one layer x role heatmap per method and component, as in the tracing and patching
  sections; per-head rows without roles -> a head x layer heatmap; rows with only a layer
  (the effective model, norms by layer) -> the effect against the layer;
* per-unit rows (heads or neurons) -> the top units' bar chart;
* a :class:`~factfind.report.Figure`, :class:`~factfind.report.Section` or ``GraphView`` ->
  itself.

The result is a :class:`Shown`: Jupyter displays it (``_repr_html_``) and ``.html`` is the
markup. Anything else raises :class:`~factfind.errors.NoFigureError`.

Example::

    ff.show(ff.causal_tracing(model, facts[:8]))       # the tracing heatmaps
    ff.show(ff.eap_ig(model, pairs))                   # the explorer of the EAP-IG graph
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import pandas as pd
from markupsafe import escape

from factfind.errors import NoFigureError
from factfind.graph.circuit import CircuitGraph
from factfind.graph.provenance import Provenance
from factfind.report.document import Figure, GraphView, Section, _figure_context
from factfind.report.explorer import explorer_html, view_html
from factfind.report.figures import bar_plot, line_plot
from factfind.report.sections import _heatmaps as section_heatmaps
from factfind.report.tables import top_units

#: edges of an edge result shown by the explorer (the strongest)
MAX_EDGES = 2000


@dataclass(frozen=True)
class Shown:
    """A figure for a notebook: Jupyter calls :meth:`_repr_html_`; ``html`` is the markup."""

    html: str
    what: str = ""

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"Shown({self.what})"


def show(result: Any, *, max_edges: int = MAX_EDGES) -> Shown:
    """The report figure of ``result`` (module docstring), ready for Jupyter to display.

    Raises:
        NoFigureError: ``result`` is neither a circuit graph nor an analysis frame this knows.
    """
    if isinstance(result, Shown):
        return result
    if isinstance(result, CircuitGraph | nx.DiGraph):
        return Shown(explorer_html(result, max_edges=max_edges), "circuit explorer")
    if isinstance(result, GraphView):
        return Shown(view_html(result), "explorer")
    if isinstance(result, Figure):
        return Shown(_figures_html([result]), "figure")
    if isinstance(result, Section):
        parts = [view_html(g) for g in result.graphs]
        return Shown("".join(parts) + _figures_html(result.figures), f"section {result.id}")
    if isinstance(result, pd.DataFrame):
        return _frame(result, max_edges=max_edges)
    raise NoFigureError(f"show() has no figure for a {type(result).__name__}: pass an analysis "
                        "frame (a DataFrame), a CircuitGraph or networkx DiGraph, or a report "
                        "Figure or Section")


def _frame(df: pd.DataFrame, *, max_edges: int) -> Shown:
    cols = set(map(str, df.columns))
    if df.empty:
        raise NoFigureError("show() has no figure for an empty frame (no rows)")
    if {"sender", "receiver", "effect"} <= cols:
        method = str(df["method"].iloc[0]) if "method" in cols else "edges"
        prov = Provenance(model="unknown", revision=None, dataset="unknown", method=method)
        graph = CircuitGraph.from_edge_scores(df, prov)
        return Shown(explorer_html(graph, max_edges=max_edges), f"explorer of {method}")
    if "faithfulness" in cols:
        x = next((c for c in ("size", "fraction", "edges", "nodes") if c in cols), None)
        if x is not None:
            hue = "method" if "method" in cols and len(set(df["method"].tolist())) > 1 else None
            fig = line_plot(df, x=x, y="faithfulness", hue=hue, reference=1.0,
                            title="Faithfulness",
                            caption=f"faithfulness against {x}; 1 is the full model.")
            return Shown(_figures_html([fig]), "faithfulness curve")
    if "effect" in cols and "layer" in cols:
        has_role = "role" in cols and bool(df["role"].notna().to_numpy().any())
        if has_role:
            figs = _heatmaps(df, ("method", "component"), x="layer", y="role")
            return Shown(_figures_html(figs), "layer x role heatmaps")
        if "head" in cols and bool(df["head"].notna().to_numpy().any()):
            rows = pd.DataFrame(df[df["head"].notna().to_numpy()])
            figs = _heatmaps(rows, ("method", "component"), x="head", y="layer")
            return Shown(_figures_html(figs), "head x layer heatmaps")
        if "neuron" in cols and bool(df["neuron"].notna().to_numpy().any()):
            top = top_units(df, "neuron", k=20)
            fig = bar_plot(top, label="site", value="effect", k=20, title="Top neurons",
                           caption=f"The {len(top)} neurons of largest |effect|.")
            return Shown(_figures_html([fig]), "top neurons")
        if "position" in cols and bool(df["position"].notna().to_numpy().any()):
            figs = _heatmaps(df, ("method", "component"), x="layer", y="position")
            return Shown(_figures_html(figs), "layer x position heatmaps")
        # one value per layer (the effective model, a probe or a norm by layer): a line each
        hue = next((c for c in ("method", "component") if c in cols
                    and len(set(df[c].dropna().tolist())) > 1), None)
        keys = ["layer", *([hue] if hue else [])]
        means = pd.DataFrame(df.groupby(keys, dropna=False)["effect"].mean()).reset_index()
        fig = line_plot(means, x="layer", y="effect", hue=hue, title="Effect by layer",
                        caption="mean effect by layer" + (f", one line per {hue}." if hue
                                                            else "."))
        return Shown(_figures_html([fig]), "effect by layer")
    raise NoFigureError("show() has no figure for a frame with columns "
                        f"{', '.join(sorted(cols))}: it draws edge results (sender, receiver, "
                        "effect), faithfulness curves (faithfulness, size) and node results "
                        "(effect by layer, with a role, head, neuron or position or not)")


def _heatmaps(df: pd.DataFrame, group_by: Sequence[str], *, x: str, y: str) -> list[Figure]:
    return section_heatmaps(df, group_by, x=x, y=y, value="effect", noun="Effect")


def _figures_html(figures: Sequence[Figure]) -> str:
    out = []
    for i, f in enumerate(figures):
        ctx = _figure_context(f, f"ffshow-{id(f):x}-{i}")
        body = (str(ctx["svg"]) if ctx["svg"] is not None
                else f'<img src="{ctx["src"]}" alt="{escape(ctx["alt"])}">')
        cap = f"<figcaption>{escape(ctx['caption'])}</figcaption>" if ctx["caption"] else ""
        out.append(f'<figure class="plot" style="margin:0 0 1rem">{body}{cap}</figure>')
    return "".join(out)


__all__ = ["MAX_EDGES", "Shown", "show"]
