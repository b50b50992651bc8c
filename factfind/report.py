"""Self-contained HTML reports: one file per run, readable offline and safe to open.

A report is a list of :class:`Section` s, each a plain-text explanation of the method followed by
figures, tables and (for circuits) an interactive graph view. Everything the page needs is inline:
CSS, JavaScript, figures as SVG (or PNG data URIs). A Content-Security-Policy in the page forbids
every network fetch and every script other than the report's own (pinned by its SHA-256), so a
report stays inert even if a string slipped through unescaped; on top of that, Jinja2 autoescaping
escapes every dataset string (a subject called ``<script>alert(1)</script>`` is shown as text).

The parts, from the bottom up:

* :func:`heatmap`, :func:`line_plot`, :func:`bar_plot`, :func:`scatter_plot` draw tidy result
  frames (the columns of :data:`factfind.types.RESULT_COLUMNS`) with seaborn into a
  :class:`Figure` (inline SVG, made deterministic by a fixed ``svg.hashsalt``, no date and
  per-figure element ids);
  :func:`accuracy_table` and :func:`top_units` summarise frames for :class:`Table` s, which render
  with sortable columns (click a header).
* :func:`graph_view` draws a circuit (a networkx ``DiGraph``, or anything with such a ``.graph``)
  as SVG by layer (x) and position role (y), with a native tooltip and a details panel per node
  and edge.
* Section builders (:func:`model_section`, :func:`dataset_section`, :func:`accuracy_section`,
  :func:`tracing_section`, :func:`patching_section`, :func:`units_section`,
  :func:`circuit_section`, :func:`faithfulness_section`, :func:`config_section`) assemble the
  standard sections; analyses may add their own :class:`Section` s.
* :func:`render_report` turns a :class:`ReportData` into HTML; :func:`write_report` writes it
  atomically and refuses to replace an existing file unless asked.

Example::

    data = ReportData(title="Fact recall in GPT-2", sections=[
        model_section({"name": "gpt2", "n_layers": 12}),
        tracing_section(tracing_df),
        config_section(config),
    ])
    write_report(data, "reports/gpt2.html")
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import matplotlib
import networkx as nx
import numpy as np
import pandas as pd
import seaborn as sns
from markupsafe import Markup, escape
from matplotlib.figure import Figure as MplFigure

from factfind.types import Role

#: Order of position roles on every role axis (the order of tokens in a fact prompt).
ROLE_ORDER: tuple[str, ...] = tuple(
    str(r) for r in (Role.PREFIX, Role.SUBJECT_FIRST, Role.SUBJECT, Role.SUBJECT_LAST,
                     Role.RELATION, Role.FINAL)
)
_ID = re.compile(r"[a-z][a-z0-9-]*\Z")
_SVG_FORBIDDEN = re.compile(  # active content or a reference outside the document
    r"<script|<foreignobject|\son[a-z]+\s*=|(?:href|src)\s*=\s*[\"'](?!#|data:)", re.IGNORECASE)
# a fixed salt makes matplotlib's SVG ids reproducible; fonttype "none" writes <text>, not paths
_RC: dict[Any, Any] = {
    "svg.hashsalt": "factfind", "svg.fonttype": "none", "figure.dpi": 100,
    "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
}
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_POS, _NEG, _ZERO = "#2563eb", "#dc2626", "#9ca3af"


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Figure:
    """A figure: inline SVG markup (``svg``) or PNG bytes (``png``), a caption and alt text.

    ``svg`` is trusted markup (from :func:`from_matplotlib` or this module); it must not contain
    scripts, event handlers, ``foreignObject`` or references outside the document.
    """

    svg: str | None = None
    png: bytes | None = None
    caption: str = ""
    alt: str = ""

    def __post_init__(self) -> None:
        if (self.svg is None) == (self.png is None):
            raise ValueError("a Figure needs exactly one of svg= or png=")
        if self.svg is not None and _SVG_FORBIDDEN.search(self.svg):
            raise ValueError("Figure svg contains a script, event handler or external reference")


@dataclass(frozen=True, eq=False)
class Table:
    """A DataFrame shown as a sortable HTML table of at most ``max_rows`` rows (cells escaped)."""

    data: pd.DataFrame
    caption: str = ""
    max_rows: int = 50

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")


@dataclass(frozen=True)
class GraphView:
    """An interactive circuit drawing made by :func:`graph_view` (SVG plus a details panel)."""

    svg: str
    caption: str = ""
    n_nodes: int = 0
    n_edges: int = 0


@dataclass(frozen=True)
class Section:
    """One section of a report: ``id`` (lowercase, digits, hyphens; unique in the report), a title,
    a plain-text ``explanation`` (blank lines separate paragraphs), then ``facts`` (shown as a
    definition list), ``graphs``, ``figures``, ``tables`` and a preformatted ``code`` block."""

    id: str
    title: str
    explanation: str = ""
    figures: Sequence[Figure] = ()
    tables: Sequence[Table] = ()
    graphs: Sequence[GraphView] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    code: str | None = None

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ValueError(f"section id must match [a-z][a-z0-9-]*, got {self.id!r}")
        for name in ("figures", "tables", "graphs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "facts", dict(self.facts))


@dataclass(frozen=True)
class ReportData:
    """Everything one report shows. ``sections`` appear in order, each listed in the contents."""

    title: str
    sections: Sequence[Section]
    subtitle: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sections", tuple(self.sections))
        seen: set[str] = set()
        for s in self.sections:
            if s.id in seen:
                raise ValueError(f"duplicate section id {s.id!r}")
            seen.add(s.id)


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Assets:
    env: jinja2.Environment
    css: Markup
    js: Markup


@functools.cache
def _assets() -> _Assets:
    env = jinja2.Environment(loader=jinja2.PackageLoader("factfind", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    assert env.loader is not None
    css, js = (env.loader.get_source(env, name)[0] for name in ("report.css", "report.js"))
    return _Assets(env, Markup(css), Markup(js))


def render_report(data: ReportData) -> str:
    """Render ``data`` as one self-contained HTML page (deterministic: same data, same bytes).

    Example::

        html = render_report(ReportData(title="t", sections=[model_section({"name": "gpt2"})]))
    """
    assets = _assets()
    script_hash = base64.b64encode(hashlib.sha256(str(assets.js).encode()).digest()).decode()
    sections = []
    for s in data.sections:
        sections.append({
            "id": s.id, "title": s.title,
            "paragraphs": [p.strip() for p in re.split(r"\n\s*\n", s.explanation) if p.strip()],
            "facts": [(k, _format_fact(v)) for k, v in s.facts.items()],
            # the first graph of the "circuit" section has the stable id #circuit-graph
            "graphs": [{"id": "circuit-graph" if (s.id, i) == ("circuit", 0)
                        else f"{s.id}-graph{i}", "svg": Markup(g.svg), "caption": g.caption}
                       for i, g in enumerate(s.graphs)],
            "figures": [_figure_context(f, f"{s.id}-fig{i}") for i, f in enumerate(s.figures)],
            "tables": [_table_context(t, f"{s.id}-table{i}") for i, t in enumerate(s.tables)],
            "code": s.code,
        })
    return assets.env.get_template("report.html.j2").render(
        title=data.title, subtitle=data.subtitle, sections=sections,
        css=assets.css, js=assets.js, script_hash=script_hash,
    )


def write_report(data: ReportData | str, path: str | os.PathLike[str], *,
                 overwrite: bool = False) -> Path:
    """Render ``data`` (or take ready HTML) and write it to ``path`` atomically.

    The page is written to a temporary file beside ``path`` and moved into place, so a reader never
    sees half a report. An existing ``path`` raises :class:`FileExistsError` unless
    ``overwrite=True``; without it the final step is a hard link, which fails atomically if another
    writer got there first.

    Returns:
        The path written.
    """
    path = Path(path)
    html = data if isinstance(data, str) else render_report(data)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(html)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
            except OSError:  # a file system without hard links: check, then replace
                if path.exists():
                    raise FileExistsError(f"{path} exists; pass overwrite=True") from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def _missing(v: Any) -> bool:
    """None, NaN, <NA> or NaT (a scalar test; arrays are never missing)."""
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float | np.floating)
                                                      and math.isnan(v))


def _format_value(v: Any) -> str:
    if _missing(v):
        return ""
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, float | np.floating):
        return f"{float(v):.4g}"
    return str(v)


def _format_fact(v: Any) -> str:
    if isinstance(v, Mapping | list | tuple):
        return json.dumps(v, default=str, ensure_ascii=False)
    return _format_value(v)


def _figure_context(f: Figure, fid: str) -> dict[str, Any]:
    if f.svg is not None:
        svg = _namespace_svg_ids(f.svg, fid)
        svg = re.sub(r"<svg\b", f'<svg role="img" aria-label="{escape(f.alt or f.caption)}"',
                     svg, count=1)
        return {"id": fid, "svg": Markup(svg), "src": None, "alt": f.alt, "caption": f.caption}
    assert f.png is not None
    src = "data:image/png;base64," + base64.b64encode(f.png).decode()
    return {"id": fid, "svg": None, "src": src, "alt": f.alt, "caption": f.caption}


def _namespace_svg_ids(svg: str, prefix: str) -> str:
    """Strip the XML prologue and comments and prefix every id, so figures inlined in one page
    cannot clash (matplotlib names elements ``figure_1``, ``axes_1``, … in every file)."""
    svg = re.sub(r"<\?xml.*?\?>|<!DOCTYPE[^>]*>|<!--.*?-->", "", svg, flags=re.DOTALL).strip()
    ids = set(re.findall(r'\sid="([^"]+)"', svg))
    if not ids:
        return svg

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix}-{name}{m.group(3)}" if name in ids else m.group(0)

    svg = re.sub(r'(\sid=")([^"]+)(")', sub, svg)
    svg = re.sub(r'(href="#)([^"]+)(")', sub, svg)
    return re.sub(r"(url\(#)([^)]+)(\))", sub, svg)


def _table_context(t: Table, tid: str) -> dict[str, Any]:
    df = t.data
    if not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    shown = df.head(t.max_rows)
    columns = [str(c) for c in shown.columns]
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c])
               for c in shown.columns]
    rows = []
    for values in shown.itertuples(index=False, name=None):
        cells = []
        for v, is_num in zip(values, numeric, strict=True):
            text = _format_value(v)
            key = repr(float(v)) if is_num and text else text
            cells.append({"text": text, "key": key, "numeric": is_num})
        rows.append(cells)
    note = f"Showing {len(shown)} of {len(df)} rows." if len(df) > len(shown) else ""
    return {"id": tid, "caption": t.caption, "note": note, "columns": columns,
            "numeric": numeric, "rows": rows}


# ----------------------------------------------------------------------------- figures


def from_matplotlib(fig: MplFigure, *, caption: str = "", alt: str = "",
                    format: str = "svg", dpi: int = 144) -> Figure:
    """Save a matplotlib figure as a report :class:`Figure` (SVG text or PNG bytes), without dates
    or other run-dependent metadata, so the same figure always gives the same bytes."""
    with matplotlib.rc_context(_RC):
        if format == "svg":
            buf = io.StringIO()
            fig.savefig(buf, format="svg", metadata=_SVG_METADATA, bbox_inches="tight")
            return Figure(svg=buf.getvalue(), caption=caption, alt=alt)
        if format == "png":
            raw = io.BytesIO()
            fig.savefig(raw, format="png", dpi=dpi, metadata={"Software": None},
                        bbox_inches="tight")
            return Figure(png=raw.getvalue(), caption=caption, alt=alt)
    raise ValueError(f"format must be 'svg' or 'png', got {format!r}")


@contextlib.contextmanager
def _new_figure(width: float, height: float) -> Iterator[MplFigure]:
    # a bare Figure (no pyplot): nothing global to close, any backend, Agg-rendered when needed
    with matplotlib.rc_context(_RC), sns.axes_style("whitegrid"), warnings.catch_warnings():
        # seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 marks as pending deprecation
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield MplFigure(figsize=(width, height), layout="constrained")


def _aggregate(df: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """One row per ``keys``: the aggregate rows (``prompt`` is NA) when a frame has any, else the
    mean over prompts."""
    if "prompt" in df.columns:
        aggregate = df["prompt"].isna().to_numpy()
        if aggregate.any() and not aggregate.all():
            df = df.loc[aggregate]
    extra = [c for c in ("ci_low", "ci_high", "n") if c in df.columns and c != value]
    grouped = df[[*keys, value, *extra]].groupby(list(keys), dropna=False, sort=False)
    return pd.DataFrame(grouped.mean()).reset_index()


def _by_magnitude(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows by decreasing ``|column|`` (stable: ties keep their order)."""
    order = np.argsort(-np.abs(df[column].to_numpy(dtype=float)), kind="stable")
    return df.iloc[order]


def _axis_order(values: pd.Series | pd.Index, name: str) -> list[Any]:
    present = [v for v in pd.unique(values) if not _missing(v)]
    if name == "role":
        known = [r for r in ROLE_ORDER if r in present]
        return known + sorted((v for v in present if v not in ROLE_ORDER), key=str)
    return sorted(present, key=lambda v: (isinstance(v, str), v))


def heatmap(df: pd.DataFrame, *, x: str = "layer", y: str = "role", value: str = "effect",
            title: str = "", caption: str = "", alt: str = "", center: float | None = None,
            annotate: bool | None = None) -> Figure:
    """A seaborn heatmap of ``value`` over ``y`` (rows) × ``x`` (columns).

    If the frame has aggregate rows (``prompt`` is <NA>) only those are drawn, else per-prompt
    rows are averaged; several rows in one cell (every relation token under role ``relation``)
    are averaged too, and rows without an ``x`` or ``y`` are left out. Role axes follow
    :data:`ROLE_ORDER`. Values of both signs get a diverging map (blue positive) centred on 0.

    Example::

        fig = heatmap(tracing[tracing.method == "causal_tracing/mlp"], title="MLP windows")
    """
    df = df.loc[(df[x].notna() & df[y].notna()).to_numpy()]  # e.g. tokens outside every role
    if df.empty:
        raise ValueError(f"heatmap of a frame with no rows that have both {x} and {y}")
    agg = _aggregate(df, [y, x], value)
    grid = agg.pivot_table(index=y, columns=x, values=value, aggfunc="mean", dropna=False)
    grid = grid.reindex(index=_axis_order(grid.index, y), columns=_axis_order(grid.columns, x))
    vals = grid.to_numpy(dtype=float)
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # both signs: red-white-blue with symmetric limits (blue positive, as in the graph view)
    diverging = center is not None or (lo < 0 < hi)
    mid = 0.0 if center is None else center
    span = max(abs(lo - mid), abs(hi - mid)) or 1.0
    cmap = "RdBu" if diverging else "Blues" if hi > 0 else "Reds_r"
    vmin, vmax, centre = (mid - span, mid + span, mid) if diverging else (None, None, None)
    if annotate is None:
        annotate = vals.size <= 60
    width = min(14.0, max(5.0, 0.5 * grid.shape[1] + 2.4))
    height = min(10.0, max(2.2, 0.45 * grid.shape[0] + 1.3))
    with _new_figure(width, height) as fig:
        ax = fig.subplots()
        sns.heatmap(grid, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, center=centre,
                    annot=annotate, fmt=".2f", annot_kws={"fontsize": 7},
                    linewidths=0.5, linecolor="white", cbar_kws={"label": value, "shrink": 0.85})
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.tick_params(axis="y", rotation=0)
        if title:
            ax.set_title(title, loc="left")
        return from_matplotlib(fig, caption=caption, alt=alt or f"Heatmap of {value} by {y} and {x}"
                               + (f": {title}" if title else ""))


def line_plot(df: pd.DataFrame, *, x: str, y: str, hue: str | None = None, title: str = "",
              caption: str = "", alt: str = "",
              band: tuple[str, str] | None = ("ci_low", "ci_high"),
              reference: float | None = None, xlabel: str | None = None,
              ylabel: str | None = None) -> Figure:
    """Lines of ``y`` against ``x`` (one per ``hue`` value), with a shaded band between the
    ``band`` columns where present and an optional dashed ``reference`` level (e.g. faithfulness 1
    for the full model)."""
    if df.empty:
        raise ValueError("line plot of an empty frame")
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=True))
    palette = sns.color_palette("colorblind", max(1, len(groups)))
    with _new_figure(6.4, 3.6) as fig:
        ax = fig.subplots()
        for (name, g), color in zip(groups, palette, strict=False):
            g = g.sort_values(x)
            label = None if name is None else str(name[0] if isinstance(name, tuple) else name)
            ax.plot(g[x], g[y], marker="o", markersize=3.5, color=color, label=label, lw=1.6)
            if band is not None and set(band) <= set(g.columns) \
                    and g[list(band)].notna().to_numpy().any(axis=0).all():
                ax.fill_between(g[x], g[band[0]], g[band[1]], color=color, alpha=0.18, lw=0)
        if reference is not None:
            ax.axhline(reference, color="#6b7280", lw=1, ls="--")
        _label_axes(ax, hue=hue, xlabel=xlabel or x, ylabel=ylabel or y, title=title)
        return from_matplotlib(fig, caption=caption, alt=alt or f"{y} against {x}")


def _label_axes(ax: Any, *, hue: str | None, xlabel: str, ylabel: str, title: str) -> None:
    """The finishing touches every x-y plot shares: legend (when coloured), labels, title."""
    if hue is not None:
        ax.legend(title=hue, frameon=False, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, loc="left")


def bar_plot(df: pd.DataFrame, *, label: str, value: str = "effect", k: int = 20,
             title: str = "", caption: str = "", alt: str = "", sort: bool = True,
             xlim: tuple[float, float] | None = None) -> Figure:
    """Horizontal bars of the ``k`` rows of largest ``|value|`` (or the first ``k`` rows in order
    if ``sort=False``), labelled by ``label``, coloured by sign, with ``ci_low``/``ci_high``
    whiskers where present."""
    if df.empty:
        raise ValueError("bar plot of an empty frame")
    if sort:
        df = _by_magnitude(df, value)
    top = df.head(k)
    colors = [_POS if v >= 0 else _NEG for v in top[value]]
    with _new_figure(6.4, min(9.0, max(1.8, 0.26 * len(top) + 1.2))) as fig:
        ax = fig.subplots()
        ypos = np.arange(len(top))
        xerr = None
        ci = ["ci_low", "ci_high"]
        if set(ci) <= set(top.columns) and top[ci].notna().to_numpy().all():
            xerr = np.vstack([top[value] - top["ci_low"], top["ci_high"] - top[value]]).clip(0)
        ax.barh(ypos, top[value], color=colors, xerr=xerr,
                error_kw={"lw": 0.8, "ecolor": "#374151"})
        ax.set_yticks(ypos, [str(v) for v in top[label]])
        ax.invert_yaxis()
        ax.axvline(0, color="#374151", lw=0.8)
        ax.set_xlabel(value)
        if xlim is not None:
            ax.set_xlim(*xlim)
        if title:
            ax.set_title(title, loc="left")
        return from_matplotlib(fig, caption=caption, alt=alt or f"Top {len(top)} by |{value}|")


def scatter_plot(df: pd.DataFrame, *, x: str, y: str, hue: str | None = None, title: str = "",
                 caption: str = "", alt: str = "", diagonal: bool = True,
                 xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """Points of ``y`` against ``x`` (one colour per ``hue`` value), with the dashed line
    ``y = x`` when ``diagonal`` (e.g. an estimate against the exact value it estimates)."""
    df = df.loc[(df[x].notna() & df[y].notna()).to_numpy()]
    if df.empty:
        raise ValueError(f"scatter plot of a frame with no rows that have both {x} and {y}")
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=True))
    palette = sns.color_palette("colorblind", max(1, len(groups)))
    with _new_figure(5.2, 4.2) as fig:
        ax = fig.subplots()
        for (name, g), color in zip(groups, palette, strict=False):
            label = None if name is None else str(name[0] if isinstance(name, tuple) else name)
            ax.scatter(g[x].astype(float), g[y].astype(float), s=18, color=color, alpha=0.8,
                       label=label, lw=0)
        if diagonal:
            both = np.concatenate([df[x].to_numpy(dtype=float), df[y].to_numpy(dtype=float)])
            lo, hi = float(both.min()), float(both.max())
            ax.plot([lo, hi], [lo, hi], color="#6b7280", lw=1, ls="--")
        _label_axes(ax, hue=hue, xlabel=xlabel or x, ylabel=ylabel or y, title=title)
        return from_matplotlib(fig, caption=caption, alt=alt or f"{y} against {x}")


def site_label(row: Mapping[str, Any]) -> str:
    """A compact name for a result row, in the style of :attr:`factfind.types.Site.name`:
    ``L3.h2@final``, ``L4.n311@subject_last``, ``L5.mlp_out@pos7``."""
    def ok(key: str) -> bool:
        return not _missing(row.get(key))

    if ok("head"):
        unit = f"h{int(row['head'])}"
    elif ok("neuron"):
        unit = f"n{int(row['neuron'])}"
    else:
        unit = str(row.get("component", "site"))
    where = ""
    if ok("role"):
        where = f"@{row['role']}"
    elif ok("position"):
        where = f"@pos{int(row['position'])}"
    layer = f"L{int(row['layer'])}." if ok("layer") else ""
    return f"{layer}{unit}{where}"


def top_units(df: pd.DataFrame, unit: str, *, k: int = 20, value: str = "effect") -> pd.DataFrame:
    """The ``k`` heads (``unit="head"``) or neurons (``unit="neuron"``) of largest ``|value|``, one
    row per (method, component, layer, unit, role), with a ``site`` label first."""
    if unit not in ("head", "neuron"):
        raise ValueError(f"unit must be 'head' or 'neuron', got {unit!r}")
    rows = df.loc[df[unit].notna().to_numpy()] if unit in df.columns else df.iloc[0:0]
    keys = [c for c in ("method", "component", "layer", unit, "role", "position")
            if c in rows.columns]
    if rows.empty:
        return pd.DataFrame(columns=["site", *keys, value])
    agg = _by_magnitude(_aggregate(rows, keys, value), value).head(k)
    agg.insert(0, "site", [site_label(r) for r in agg.to_dict("records")])
    agg = agg.dropna(axis=1, how="all").reset_index(drop=True)
    return agg


def accuracy_table(df: pd.DataFrame, *, by: str | Sequence[str] | None = "relation",
                   correct: str = "correct") -> pd.DataFrame:
    """Accuracy per group of a per-prompt frame with a boolean ``correct`` column, with a Wilson
    95% interval; the last row (``all``) pools every prompt.

    Example::

        >>> accuracy_table(pd.DataFrame({"relation": ["a", "a", "b"], "correct": [1, 0, 1]}))
          relation  n  n_correct  accuracy  ci_low  ci_high
        ...
    """
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    ok = df[correct].to_numpy(dtype=bool)

    def row(idx: np.ndarray, names: Sequence[Any]) -> dict[str, Any]:
        n, c = len(idx), int(ok[idx].sum())
        lo, hi = _wilson(c, n)
        return {**dict(zip(keys, names, strict=True)), "n": n, "n_correct": c,
                "accuracy": c / n if n else math.nan, "ci_low": lo, "ci_high": hi}

    rows = []
    if keys:
        for names, idx in df.groupby(keys, sort=True, dropna=False).indices.items():
            rows.append(row(idx, names if isinstance(names, tuple) else (names,)))
    rows.append(row(np.arange(len(df)), ["all"] * len(keys)))
    return pd.DataFrame(rows)


def _wilson(c: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = c / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


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
        raise TypeError(f"expected a networkx DiGraph or an object with one at .graph, got "
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


# ----------------------------------------------------------------------------- standard sections

EXPLAIN_MODEL = "The model whose recall of facts this report dissects."
EXPLAIN_DATASET = (
    "Each prompt states a fact (subject, relation) and asks the model to complete the object, "
    "e.g. a subject followed by 'plays the sport of'. Token positions are named by role: the first "
    "and last subject token, the relation tokens and the final token, where the answer is read."
)
EXPLAIN_ACCURACY = (
    "Accuracy is the share of prompts whose top-1 next token is the first token of the correct "
    "object. Later analyses use the prompts the model gets right. Intervals are Wilson 95% "
    "intervals."
)
EXPLAIN_TRACING = (
    "Causal tracing (Meng et al. 2022, ROME) corrupts the subject token embeddings with noise and "
    "restores one hidden state (or a window of MLP or attention outputs) at a single layer and "
    "token from the clean run. The effect is how much of the correct answer's probability the "
    "restoration brings back. Facts are typically recalled through MLPs at the last subject token "
    "in middle layers and moved to the final token by attention in later layers."
)
EXPLAIN_PATCHING = (
    "Activation patching (Vig et al. 2020; Heimersheim and Nanda 2024) runs the model on a clean "
    "and a corrupted prompt that differ only in the subject, and copies one activation from one "
    "run into the other. Denoising (clean into corrupted) finds sites that suffice to restore the "
    "answer; noising (corrupted into clean) finds sites the answer needs. The effect is the "
    "normalised change in the logit difference between the correct and the counterfactual answer."
)
EXPLAIN_UNITS = (
    "The attention heads and MLP neurons with the largest effects (attribution patching, direct "
    "logit attribution or exact patching, as named in the method column). Click a column header "
    "to sort."
)
EXPLAIN_CIRCUIT = (
    "The circuit is the subgraph of components and connections that carries the fact from the "
    "subject to the prediction. Columns are layers, lanes are token roles; circle size and edge "
    "width show the size of a score, blue positive and red negative. Hover over or click a node or "
    "edge to see its scores."
)
EXPLAIN_FAITHFULNESS = (
    "Faithfulness is the share of the full model's metric (the logit difference) recovered when "
    "only the circuit's top-k edges are kept and everything else is ablated, as k grows. A "
    "faithful circuit reaches 1 (dashed line) with few edges."
)
EXPLAIN_CONFIG = (
    "The configuration reproduces this run on its own (model revision, dataset fingerprint, "
    "seeds); provenance records where and with what it ran."
)


def model_section(info: Mapping[str, Any], *, explanation: str = EXPLAIN_MODEL) -> Section:
    """Section ``model``: name, revision, ``n_layers``, ``d_model`` … as a definition list."""
    return Section(id="model", title="Model", explanation=explanation, facts=info)


def dataset_section(info: Mapping[str, Any], sample: pd.DataFrame | None = None, *,
                    max_rows: int = 20, explanation: str = EXPLAIN_DATASET) -> Section:
    """Section ``dataset``: name, fingerprint, counts, relations, and a sample of prompts."""
    tables = [] if sample is None else [Table(sample, caption="Sample of prompts",
                                              max_rows=max_rows)]
    return Section(id="dataset", title="Dataset", explanation=explanation, facts=info,
                   tables=tables)


def accuracy_section(table: pd.DataFrame, *, label: str = "relation",
                     explanation: str = EXPLAIN_ACCURACY) -> Section:
    """Section ``accuracy`` from :func:`accuracy_table` output: the table and a bar per group."""
    figures = []
    if label in table.columns and len(table) > 1:
        groups = table.loc[(table[label] != "all").to_numpy()]
        if not groups.empty:
            figures.append(bar_plot(
                groups, label=label, value="accuracy", k=len(groups), sort=False, xlim=(0.0, 1.0),
                title=f"Accuracy by {label}",
                caption=f"Top-1 accuracy by {label} with Wilson 95% intervals."))
    return Section(id="accuracy", title="Accuracy", explanation=explanation, figures=figures,
                   tables=[Table(table, caption="Top-1 accuracy")])


def _heatmaps(df: pd.DataFrame, group_by: Sequence[str], *, x: str, y: str, value: str,
              noun: str) -> list[Figure]:
    keys = [c for c in group_by if c in df.columns]
    groups = [((), df)] if not keys else df.groupby(keys, sort=True, dropna=False)
    figures = []
    for names, g in groups:
        names = names if isinstance(names, tuple) else (names,)
        title = " · ".join(str(n) for n in names if not _missing(n))
        figures.append(heatmap(g, x=x, y=y, value=value, title=title,
                               caption=f"{noun}: mean {value} by {y} and {x}"
                                       + (f" ({title})." if title else ".")))
    return figures


def tracing_section(df: pd.DataFrame, *, x: str = "layer", y: str = "role", value: str = "effect",
                    group_by: Sequence[str] = ("method",),
                    explanation: str = EXPLAIN_TRACING) -> Section:
    """Section ``causal-tracing``: one layer × role heatmap per method (state, MLP, attention)."""
    return Section(id="causal-tracing", title="Causal tracing", explanation=explanation,
                   figures=_heatmaps(df, group_by, x=x, y=y, value=value, noun="Causal tracing"))


def patching_section(df: pd.DataFrame, *, x: str = "layer", y: str = "role",
                     value: str = "effect", group_by: Sequence[str] = ("method", "component"),
                     explanation: str = EXPLAIN_PATCHING) -> Section:
    """Section ``patching``: one heatmap per (method, component), layer × role by default (pass
    ``x="head", y="layer"`` for per-head patching)."""
    return Section(id="patching", title="Activation patching", explanation=explanation,
                   figures=_heatmaps(df, group_by, x=x, y=y, value=value, noun="Patching"))


def units_section(df: pd.DataFrame, *, k: int = 20, value: str = "effect",
                  explanation: str = EXPLAIN_UNITS) -> Section:
    """Section ``top-units``: bar chart and sortable table of the top heads and top neurons."""
    figures, tables = [], []
    for unit, plural in (("head", "heads"), ("neuron", "neurons")):
        top = top_units(df, unit, k=k, value=value)
        if top.empty:
            continue
        figures.append(bar_plot(top, label="site", value=value, k=k, title=f"Top {plural}",
                                caption=f"The {len(top)} {plural} of largest |{value}|."))
        tables.append(Table(top, caption=f"Top {plural} by |{value}|", max_rows=k))
    return Section(id="top-units", title="Top heads and neurons", explanation=explanation,
                   figures=figures, tables=tables)


def circuit_section(graph: Any, *, caption: str = "", top_edges: int = 30,
                    explanation: str = EXPLAIN_CIRCUIT) -> Section:
    """Section ``circuit``: the interactive graph view (id ``circuit-graph``) and a sortable
    table of its strongest edges."""
    g = _as_graph(graph)
    view = graph_view(g, caption=caption or f"{g.number_of_nodes()} nodes, "
                                            f"{g.number_of_edges()} edges.")
    edges = pd.DataFrame([{"source": str(u), "target": str(v), "score": _score(a)}
                          for u, v, a in g.edges(data=True)], columns=["source", "target", "score"])
    edges = _by_magnitude(edges, "score")
    return Section(id="circuit", title="Circuit", explanation=explanation, graphs=[view],
                   tables=[Table(edges.reset_index(drop=True), caption="Strongest edges",
                                 max_rows=top_edges)])


def faithfulness_section(df: pd.DataFrame, *, x: str = "size", y: str = "faithfulness",
                         hue: str | None = "method",
                         explanation: str = EXPLAIN_FAITHFULNESS) -> Section:
    """Section ``faithfulness``: the faithfulness curve against circuit size, and its table."""
    hue = hue if hue is not None and hue in df.columns else None
    fig = line_plot(df, x=x, y=y, hue=hue, reference=1.0, title="Faithfulness",
                    caption=f"{y} against {x}; the band is the 95% interval where given.")
    return Section(id="faithfulness", title="Faithfulness", explanation=explanation,
                   figures=[fig], tables=[Table(df, caption="Faithfulness by circuit size")])


def config_section(config: Any, provenance: Mapping[str, Any] | None = None, *,
                   explanation: str = EXPLAIN_CONFIG) -> Section:
    """Section ``config``: provenance as a definition list and the config as pretty JSON.

    ``config`` may be a dataclass instance (serialised with :func:`dataclasses.asdict`) or a
    mapping.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, indent=2, default=str, ensure_ascii=False, sort_keys=False)
    return Section(id="config", title="Configuration and provenance", explanation=explanation,
                   facts=provenance or {}, code=text)
