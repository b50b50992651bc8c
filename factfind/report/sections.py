"""The standard report sections, each a plain-text explanation of its method followed by
figures and tables: :func:`model_section`, :func:`dataset_section`, :func:`accuracy_section`,
:func:`tracing_section`, :func:`patching_section`, :func:`units_section`,
:func:`circuit_section`, :func:`faithfulness_section`, :func:`findings_section`,
:func:`summary_section` (the "findings first" lines that open a report), :func:`config_section`.
"""


from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from factfind.data.relations import relation_label
from factfind.report.document import Figure, Section, Table, _missing
from factfind.report.explorer import _as_graph, _score, graph_view
from factfind.report.figures import _by_magnitude, bar_plot, heatmap, line_plot
from factfind.report.tables import top_units

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
    "subject to the prediction. Columns are layers (embeddings left, logits right), lanes are "
    "token roles; the shape is the kind of node (head, MLP, ...), size and edge width show the "
    "size of a score, blue positive and red negative. Zoom with the wheel and drag to pan; the "
    "|effect| slider and the top-k box filter the edges, the search box finds a node by id. "
    "Hover over or click a node to see its scores, its per-prompt values where measured and its "
    "strongest inputs and outputs (click one to follow it); pin nodes to show them alone, group "
    "them into a supernode or export them as node-link JSON."
)
EXPLAIN_FAITHFULNESS = (
    "Faithfulness is the share of the full model's metric (the logit difference) recovered when "
    "only the circuit's top-k edges are kept and everything else is ablated, as k grows. A "
    "faithful circuit reaches 1 (dashed line) with few edges."
)
EXPLAIN_FINDINGS = (
    "What the papers found, measured on this model: ROME's early site (MLPs at the last subject "
    "token) and late site (attention at the final token) from causal tracing; Geva et al.'s "
    "attention knockout (final -> subject matters in middle and upper layers, the relation "
    "arrives earlier); Fact Finding's effective model (how many layers of attention the subject "
    "needs) and the layer where a linear probe first decodes the attribute. Each row states the "
    "rule it was judged by; 'holds' is False where this model differs, with the numbers, and "
    "empty where the data cannot decide (too few held-out prompts, a method not run: the "
    "'measured' column says which). Depth is layer / (layers - 1)."
)
EXPLAIN_SUMMARY = (
    "What this run found, in a few lines, each with the numbers behind it: an effect with its "
    "95% interval over n prompts, and whether the papers' finding holds here. Every line is "
    "built from the tables below, where each method is explained."
)
EXPLAIN_CONFIG = (
    "The configuration reproduces this run on its own (model revision, dataset fingerprint, "
    "seeds); provenance records where and with what it ran."
)


def model_section(info: Mapping[str, Any], *, explanation: str = EXPLAIN_MODEL) -> Section:
    """Section ``model``: name, revision, ``n_layers``, ``d_model`` … as a definition list."""
    return Section(id="model", title="Model", explanation=explanation, facts=info)


def summary_section(summary: pd.DataFrame, *, title: str = "Findings first",
                    explanation: str = EXPLAIN_SUMMARY) -> Section:
    """Section ``summary``: the lines of :func:`factfind.report.findings.findings_summary`
    (its ``text`` column) as a list, to open a report."""
    return Section(id="summary", title=title, points=[str(t) for t in summary["text"]],
                   explanation=explanation)


def dataset_section(info: Mapping[str, Any], sample: pd.DataFrame | None = None, *,
                    max_rows: int = 20, explanation: str = EXPLAIN_DATASET) -> Section:
    """Section ``dataset``: name, fingerprint, counts, relations (a fact ``relations`` shows
    each id with its name, ``P17 (country)``), and a sample of prompts."""
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
        if label == "relation":  # bars labelled "P17 (country)"
            groups = groups.assign(relation=[relation_label(r) for r in groups[label]])
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
                    full: Any = None, full_caption: str = "", full_edges: int = 2000,
                    evidence: pd.DataFrame | None = None,
                    explanation: str = EXPLAIN_CIRCUIT) -> Section:
    """Section ``circuit``: the circuit explorer (id ``circuit-graph``), the explorer of the
    ``full`` graph it was cut from (its strongest ``full_edges`` edges, e.g. the whole EAP-IG
    graph; id ``circuit-graph1``) and a sortable table of the circuit's strongest edges, in the
    API's words: ``sender, receiver, effect``. ``evidence`` (per-prompt node results, e.g.
    activation patching) gives each matching node its per-prompt distribution in the panel."""
    g = _as_graph(graph)
    views = [graph_view(g, evidence=evidence, caption=caption or
                        f"{g.number_of_nodes()} nodes, {g.number_of_edges()} edges.")]
    if full is not None:
        views.append(graph_view(full, evidence=evidence, max_edges=full_edges,
                                caption=full_caption or "The graph the circuit was cut from."))
    return Section(id="circuit", title="Circuit", explanation=explanation, graphs=views,
                   tables=[Table(edge_table(g), caption="Strongest edges", max_rows=top_edges)])


def edge_table(graph: Any) -> pd.DataFrame:
    """A graph's edges as ``sender, receiver, effect`` (the edge results' columns,
    :data:`factfind.types.EDGE_RESULT_COLUMNS`), strongest |effect| first."""
    g = _as_graph(graph)
    edges = pd.DataFrame([{"sender": str(u), "receiver": str(v), "effect": _score(a)}
                          for u, v, a in g.edges(data=True)],
                         columns=["sender", "receiver", "effect"])
    return _by_magnitude(edges, "effect").reset_index(drop=True)


def faithfulness_section(df: pd.DataFrame, *, x: str = "size", y: str = "faithfulness",
                         hue: str | None = "method",
                         explanation: str = EXPLAIN_FAITHFULNESS) -> Section:
    """Section ``faithfulness``: the faithfulness curve against circuit size, and its table."""
    hue = hue if hue is not None and hue in df.columns else None
    fig = line_plot(df, x=x, y=y, hue=hue, reference=1.0, title="Faithfulness",
                    caption=f"{y} against {x}; the band is the 95% interval where given.")
    return Section(id="faithfulness", title="Faithfulness", explanation=explanation,
                   figures=[fig], tables=[Table(df, caption="Faithfulness by circuit size")])


def findings_section(df: pd.DataFrame, *, explanation: str = EXPLAIN_FINDINGS) -> Section:
    """Section ``findings``: :func:`factfind.report.findings.literature_findings` as a table, with
    the count of findings that hold among those measured."""
    holds = [h for h in df["holds"].tolist() if h is not None and not _missing(h)]
    facts = {"findings that hold": f"{sum(bool(h) for h in holds)} of {len(holds)} measured"}
    cols = [c for c in ("finding", "source", "claim", "measured", "holds", "layer", "depth",
                        "n") if c in df.columns]
    return Section(id="findings", title="The literature's findings on this model",
                   explanation=explanation, facts=facts,
                   tables=[Table(pd.DataFrame(df.loc[:, cols]),
                                 caption="Findings, the rule each was judged by, and what "
                                 "this model shows")])


def config_section(config: Any, provenance: Mapping[str, Any] | None = None, *,
                   explanation: str = EXPLAIN_CONFIG,
                   timings: pd.DataFrame | None = None) -> Section:
    """Section ``config``: provenance as a definition list and the config as pretty JSON.

    ``config`` may be a dataclass instance (serialised with :func:`dataclasses.asdict`) or a
    mapping. ``timings`` (e.g. :meth:`factfind.cache.RunCache.timing_table`: step, seconds,
    status, ...) is shown as a table of what each step cost.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, indent=2, default=str, ensure_ascii=False, sort_keys=False)
    tables = [] if timings is None else [Table(
        timings.round(1), max_rows=max(1, len(timings)),
        caption="Wall time per step: seconds (and process CPU seconds) of computing it - for a "
        "step served from the cache, as measured when it was computed - and whether this run "
        "computed it or read it from the cache")]
    return Section(id="config", title="Configuration and provenance", explanation=explanation,
                   facts=provenance or {}, code=text, tables=tables)
