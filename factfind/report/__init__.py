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
  with sortable columns (click a header); a table longer than :data:`PREVIEW_ROWS` rows shows
  its top rows and a button that shows the rest, and a ``relation`` column shows each
  Wikidata id with its name (``P17 (country)``, :func:`factfind.data.relation_label`).
* :func:`graph_view` makes a circuit (a networkx ``DiGraph``, or anything with such a
  ``.graph``) an interactive explorer (:mod:`factfind.report.explorer`): layer by token lane,
  zoom, threshold and top-k, search, a panel per node with its evidence, pinning, supernodes
  and export; the same explorer is what a notebook shows for a ``CircuitGraph``, and
  :func:`show` renders any analysis frame as its report figure.
* Section builders (:func:`model_section`, :func:`dataset_section`, :func:`accuracy_section`,
  :func:`tracing_section`, :func:`patching_section`, :func:`units_section`,
  :func:`circuit_section`, :func:`faithfulness_section`, :func:`findings_section`,
  :func:`config_section`) assemble the standard sections; analyses may add their own
  :class:`Section` s. A report opens with :func:`summary_section`: the "findings first" lines
  that :func:`findings_summary` builds from the run's tables (what the model does, where, and
  how sure, each line with its numbers).
* :func:`render_report` turns a :class:`ReportData` into HTML; :func:`write_report` writes it
  atomically and refuses to replace an existing file unless asked.

One module per part: ``document`` (data model, rendering, writing), ``figures``, ``tables``,
``explorer``, ``sections``, ``show``; ``neurons`` and ``concepts`` hold the sections of the
neuron-level and concept analyses, ``features`` those of sparse dictionaries and
``feature_circuits`` those of the circuits read in their features. Everything public of the
first six is importable from here.

Example::

    data = ReportData(title="Fact recall in GPT-2", sections=[
        model_section({"name": "gpt2", "n_layers": 12}),
        tracing_section(tracing_df),
        config_section(config),
    ])
    write_report(data, "reports/gpt2.html")
"""

from factfind.report import concepts, findings, neurons
from factfind.report.document import (
    PREVIEW_ROWS,
    ROLE_ORDER,
    Figure,
    GraphView,
    ReportData,
    Section,
    Table,
    render_report,
    write_report,
)
from factfind.report.explorer import (
    explorer_html,
    graph_view,
)
from factfind.report.figures import (
    bar_plot,
    from_matplotlib,
    heatmap,
    line_plot,
    scatter_plot,
)
from factfind.report.findings import findings_summary
from factfind.report.sections import (
    EXPLAIN_ACCURACY,
    EXPLAIN_CIRCUIT,
    EXPLAIN_CONFIG,
    EXPLAIN_DATASET,
    EXPLAIN_FAITHFULNESS,
    EXPLAIN_MODEL,
    EXPLAIN_PATCHING,
    EXPLAIN_SUMMARY,
    EXPLAIN_TRACING,
    EXPLAIN_UNITS,
    accuracy_section,
    circuit_section,
    config_section,
    dataset_section,
    faithfulness_section,
    findings_section,
    model_section,
    patching_section,
    summary_section,
    tracing_section,
    units_section,
)
from factfind.report.show import Shown, show
from factfind.report.tables import (
    accuracy_table,
    site_label,
    top_units,
)

__all__ = [
    "EXPLAIN_ACCURACY",
    "EXPLAIN_CIRCUIT",
    "EXPLAIN_CONFIG",
    "EXPLAIN_DATASET",
    "EXPLAIN_FAITHFULNESS",
    "EXPLAIN_MODEL",
    "EXPLAIN_PATCHING",
    "EXPLAIN_SUMMARY",
    "EXPLAIN_TRACING",
    "EXPLAIN_UNITS",
    "PREVIEW_ROWS",
    "ROLE_ORDER",
    "Figure",
    "GraphView",
    "ReportData",
    "Section",
    "Shown",
    "Table",
    "accuracy_section",
    "accuracy_table",
    "bar_plot",
    "circuit_section",
    "concepts",
    "config_section",
    "dataset_section",
    "explorer_html",
    "faithfulness_section",
    "findings",
    "findings_section",
    "findings_summary",
    "from_matplotlib",
    "graph_view",
    "heatmap",
    "line_plot",
    "model_section",
    "neurons",
    "patching_section",
    "render_report",
    "scatter_plot",
    "show",
    "site_label",
    "summary_section",
    "top_units",
    "tracing_section",
    "units_section",
    "write_report",
]
