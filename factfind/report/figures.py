"""Figures from tidy result frames: :func:`heatmap`, :func:`line_plot`, :func:`bar_plot`,
:func:`scatter_plot` (seaborn), and :func:`from_matplotlib` for any matplotlib figure.

Figures are inline SVG made deterministic (fixed ``svg.hashsalt``, no date metadata), so the
same data renders to the same bytes. Role axes follow :data:`~factfind.report.ROLE_ORDER`.
"""


from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.report.document import _NEG, _POS, ROLE_ORDER, Figure, _missing

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

# matplotlib and seaborn are imported where a figure is drawn: with scipy.stats they were 1.3 s
# of the 5 s ``import factfind`` took, paid by every command, even ``--help``

# ----------------------------------------------------------------------------- figures

# a fixed salt makes matplotlib's SVG ids reproducible; fonttype "none" writes <text>, not paths
_RC: dict[Any, Any] = {
    "svg.hashsalt": "factfind", "svg.fonttype": "none", "figure.dpi": 100,
    "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
}
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def from_matplotlib(fig: MplFigure, *, caption: str = "", alt: str = "",
                    format: str = "svg", dpi: int = 144) -> Figure:
    """Save a matplotlib figure as a report :class:`Figure` (SVG text or PNG bytes), without dates
    or other run-dependent metadata, so the same figure always gives the same bytes."""
    import matplotlib

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
    raise ArgumentError(f"format must be 'svg' or 'png', got {format!r}")


@contextlib.contextmanager
def _new_figure(width: float, height: float) -> Iterator[MplFigure]:
    # a bare Figure (no pyplot): nothing global to close, any backend, Agg-rendered when needed
    import matplotlib
    import seaborn as sns
    from matplotlib.figure import Figure as MplFigure

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
        raise ArgumentError(f"heatmap of a frame with no rows that have both {x} and {y}")
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
        import seaborn as sns

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
        raise ArgumentError("line plot of an empty frame")
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=True))
    import seaborn as sns

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
        raise ArgumentError("bar plot of an empty frame")
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
        raise ArgumentError(f"scatter plot of a frame with no rows that have both {x} and {y}")
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=True))
    import seaborn as sns

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


