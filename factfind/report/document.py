"""The report's data model and its rendering: :class:`Figure`, :class:`Table`,
:class:`GraphView`, :class:`Section`, :class:`ReportData`, :func:`render_report` and the atomic
:func:`write_report`.

The page is one Jinja2 template (``factfind/report/templates/report.html.j2``) with autoescaping on,
its CSS and JavaScript inlined and pinned by a Content-Security-Policy hash; figures arrive as SVG
(checked for active content and namespaced per figure) or PNG data URIs.
"""


from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape

from factfind.data.relations import relation_label
from factfind.errors import ArgumentError
from factfind.types import Role

#: Order of position roles on every role axis (the order of tokens in a fact prompt).
ROLE_ORDER: tuple[str, ...] = tuple(
    str(r) for r in (Role.PREFIX, Role.SUBJECT_FIRST, Role.SUBJECT, Role.SUBJECT_LAST,
                     Role.RELATION, Role.FINAL)
)
_ID = re.compile(r"[a-z][a-z0-9-]*\Z")
_SVG_FORBIDDEN = re.compile(  # active content or a reference outside the document
    r"<script|<foreignobject|\son[a-z]+\s*=|(?:href|src)\s*=\s*[\"'](?!#|data:)", re.IGNORECASE)
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
            raise ArgumentError("a Figure needs exactly one of svg= or png=")
        if self.svg is not None and _SVG_FORBIDDEN.search(self.svg):
            raise ArgumentError("Figure svg contains a script, event handler or external reference")


#: Rows a long table shows until the reader asks for the rest (its top rows, in its order).
PREVIEW_ROWS = 20


@dataclass(frozen=True, eq=False)
class Table:
    """A DataFrame shown as a sortable HTML table (cells escaped).

    The page holds the first ``max_rows`` rows (a note says when there are more). A table
    longer than :data:`PREVIEW_ROWS` opens showing its top rows, with a button under it that
    shows all of them and back; sorting keeps showing the top rows of the new order. Without
    JavaScript every row is shown. A column named ``relation`` is shown with each relation
    id's name (``P17 (country)``, :func:`factfind.data.relation_label`).
    """

    data: pd.DataFrame
    caption: str = ""
    max_rows: int = 500

    def __post_init__(self) -> None:
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int | np.integer):
            raise ArgumentError(f"max_rows must be an int >= 1, got {self.max_rows!r}")
        if self.max_rows < 1:
            raise ArgumentError(f"max_rows must be >= 1, got {self.max_rows}")
        if not isinstance(self.data, pd.DataFrame):
            raise ArgumentError(f"a Table needs a pandas DataFrame, got "
                                f"{type(self.data).__name__}")


@dataclass(frozen=True)
class GraphView:
    """An interactive circuit explorer made by :func:`factfind.report.explorer.graph_view`:
    ``data`` is the graph as the explorer's JSON (already safe inside a ``<script>``)."""

    data: str
    caption: str = ""
    n_nodes: int = 0
    n_edges: int = 0


@dataclass(frozen=True)
class Section:
    """One section of a report: ``id`` (lowercase, digits, hyphens; unique in the report), a title,
    ``points`` (short plain-text lines shown as a list, e.g. a summary's findings), a plain-text
    ``explanation`` (blank lines separate paragraphs), then ``facts`` (shown as a definition
    list; a fact ``relation`` or ``relations`` shows each id with its name, ``P17 (country)``),
    ``graphs``, ``figures``, ``tables`` and a preformatted ``code`` block."""

    id: str
    title: str
    explanation: str = ""
    points: Sequence[str] = ()
    figures: Sequence[Figure] = ()
    tables: Sequence[Table] = ()
    graphs: Sequence[GraphView] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    code: str | None = None

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ArgumentError(f"section id must match [a-z][a-z0-9-]*, got {self.id!r}")
        if isinstance(self.points, str):
            raise ArgumentError("Section points must be a list of lines, got one string")
        for name in ("figures", "tables", "graphs", "points"):
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
                raise ArgumentError(f"duplicate section id {s.id!r}")
            seen.add(s.id)


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Library:
    """A vendored JavaScript library (``factfind/report/vendor/manifest.json``)."""

    name: str
    version: str
    license: str
    license_text: str
    sha256: str
    code: str

    @property
    def script(self) -> str:
        """The code as it is inlined: the licence first, in a comment that minifiers keep."""
        notice = self.license_text.strip().replace("*/", "* /")
        return (f"/*! {self.name} {self.version} | {self.license} licence, inlined by "
                f"factfind.\n{notice}\n*/\n{self.code}")


@functools.cache
def library(name: str = "d3") -> Library:
    """The pinned copy of ``name`` shipped in ``factfind/report/vendor`` (read once)."""
    vendor = resources.files("factfind.report") / "vendor"
    entry = json.loads((vendor / "manifest.json").read_text(encoding="utf-8"))[name]
    return Library(name=name, version=entry["version"], license=entry["license"],
                   license_text=(vendor / entry["license_file"]).read_text(encoding="utf-8"),
                   sha256=entry["sha256"],
                   code=(vendor / entry["file"]).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class _Assets:
    env: jinja2.Environment
    css: Markup           # the page's CSS, the explorer's included
    js: Markup            # our script: sortable tables and the circuit explorer
    explorer_css: Markup  # the explorer's alone (notebook fragments)
    explorer_js: Markup
    library: Markup       # the vendored d3, licence first (:func:`library`)


@functools.cache
def _assets() -> _Assets:
    env = jinja2.Environment(loader=jinja2.PackageLoader("factfind.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    assert env.loader is not None
    css, js, ecss, ejs = (env.loader.get_source(env, name)[0] for name in
                          ("report.css", "report.js", "explorer.css", "explorer.js"))
    return _Assets(env, Markup(css + ecss), Markup(js + ejs), Markup(ecss), Markup(ejs),
                   Markup(library().script))


def render_report(data: ReportData) -> str:
    """Render ``data`` as one self-contained HTML page (deterministic: same data, same bytes).

    Example::

        html = render_report(ReportData(title="t", sections=[model_section({"name": "gpt2"})]))
    """
    assets = _assets()
    script_hashes = [base64.b64encode(hashlib.sha256(str(js).encode()).digest()).decode()
                     for js in (assets.library, assets.js)]
    sections = []
    for s in data.sections:
        sections.append({
            "id": s.id, "title": s.title,
            "paragraphs": [p.strip() for p in re.split(r"\n\s*\n", s.explanation) if p.strip()],
            "points": [str(p) for p in s.points],
            "facts": [(k, _format_fact(_relations(v) if k in _RELATION_KEYS else v))
                      for k, v in s.facts.items()],
            # the first graph of the "circuit" section has the stable id #circuit-graph
            "graphs": [{"id": "circuit-graph" if (s.id, i) == ("circuit", 0)
                        else f"{s.id}-graph{i}", "data": Markup(g.data), "caption": g.caption}
                       for i, g in enumerate(s.graphs)],
            "figures": [_figure_context(f, f"{s.id}-fig{i}") for i, f in enumerate(s.figures)],
            "tables": [_table_context(t, f"{s.id}-table{i}") for i, t in enumerate(s.tables)],
            "code": s.code,
        })
    return assets.env.get_template("report.html.j2").render(
        title=data.title, subtitle=data.subtitle, sections=sections,
        css=assets.css, js=assets.js, library=assets.library, script_hashes=script_hashes,
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


#: facts shown with each relation id's name (``P17 (country)``)
_RELATION_KEYS = ("relation", "relations")


def _relations(value: Any) -> Any:
    """Relation ids with their names: one id, a comma-separated string or a list of them."""
    if isinstance(value, str):
        return ", ".join(relation_label(r.strip()) for r in value.split(",") if r.strip())
    if isinstance(value, list | tuple):
        return [relation_label(r) for r in value]
    return value


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
    relation = [c == "relation" for c in columns]
    for values in shown.itertuples(index=False, name=None):
        cells = []
        for v, is_num, is_rel in zip(values, numeric, relation, strict=True):
            text = relation_label(v) if is_rel and not is_num else _format_value(v)
            key = repr(float(v)) if is_num and text else text
            cells.append({"text": text, "key": key, "numeric": is_num})
        rows.append(cells)
    note = f"Showing {len(shown)} of {len(df)} rows." if len(df) > len(shown) else ""
    return {"id": tid, "caption": t.caption, "note": note, "columns": columns,
            "numeric": numeric, "rows": rows,
            "preview": PREVIEW_ROWS if len(rows) > PREVIEW_ROWS else None}


