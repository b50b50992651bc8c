"""Report sections for universality across models (``analyses/universality.py``).

The same fact-recall measurements, made on several models, are set side by side on relative
depth ``layer / (n_layers - 1)`` (:func:`factfind.concepts.universality.layer_depth`): a table
of every measure per model, the literature's findings per model, a figure per measure (the
underlying curve of each model against depth, so a 4-layer and a 30-layer model share an axis)
and the circuits' size and kinds. The summary's paragraph is *computed*: each sentence is
built from the numbers of :func:`~factfind.concepts.universality.agreement` and the findings,
never written by hand, so it changes when the numbers do.

Section ids start with ``universality-`` (plus the standard ``dataset`` and ``config``).

Example::

    agree = agreement(measures)
    sections = [summary_section(measures, agree, findings, composition),
                *measure_sections(measures, depth_curves(tables, n_layers))]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factfind.concepts.universality import AGREE_WITHIN, MEASURES, layer_depth
from factfind.report.document import Figure, Section, Table
from factfind.report.figures import _new_figure, bar_plot, from_matplotlib, line_plot
from factfind.report.tables import columns

EXPLAIN_SUMMARY = (
    "The same measurements of fact recall on every model, on the same facts (those every "
    "compared model knows; the organism, which knows no real facts, joins on its own world's "
    "relation as a reference). Layers are compared as relative depth, layer / (n_layers - 1): "
    "0 is the first layer, 1 the last. Two depths agree when they differ by at most {within}. "
    "The paragraph below is generated from the table's numbers."
)
EXPLAIN_FINDINGS = (
    "The literature's claims about where facts travel (ROME's two sites, Geva's knockout, Fact "
    "Finding's effective model and probe), each judged on each model by the rule stated in the "
    "'measured' column (factfind.report.findings)."
)
EXPLAIN_CIRCUITS = (
    "Each model's circuit: every head and every MLP neuron at every token role, pruned by "
    "attribution-guided backward elimination (mean ablation) while faithfulness stays at or "
    "above 0.9. Its size is a share of all such nodes, so models of different width compare; "
    "its kinds say whether the circuit is mostly heads or neurons and in how many MLP layers "
    "the neurons sit. The signature similarity compares two circuits by their nodes' "
    "(depth quarter, kind, token role): the weighted Jaccard of the two multisets (1: the same "
    "mix at the same depths and roles). Feature nodes of sparse dictionaries would be counted "
    "as a kind of their own; these circuits are cut from heads and neurons."
)
CURVES = {
    "early site": ("causal tracing: MLP at the last subject token",
                   "indirect effect / the model's largest |effect|"),
    "late site": ("causal tracing: attention at the final token",
                  "indirect effect / the model's largest |effect|"),
    "knockout peak": ("attention knockout: final -> subject",
                      "relative change in p(answer)"),
    "effective model onset": ("effective model: subject attention ablated from layer k on",
                              "accuracy / clean accuracy"),
    "probe onset": ("linear probe at the last subject token", "held-out accuracy"),
}
"""The curve behind each depth measure's figure: its title and y axis."""


def _depth_text(row: Mapping[str, Any]) -> str:
    return (f"{float(row['depth']):.2f} (layer {float(row['layer']):.3g} of "
            f"{int(row['n_layers'])})")


def _label(model: str, reference: Sequence[str]) -> str:
    return f"{model} (reference)" if model in reference else model


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _apart(rows: pd.DataFrame, reference: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The compared models' rows and the reference models' rows."""
    ref = rows["model"].isin(list(reference)).to_numpy()
    return rows.loc[~ref], rows.loc[ref]


def measure_sentence(measure: str, rows: pd.DataFrame, agree: Mapping[str, Any], *,
                     within: float = AGREE_WITHIN, reference: Sequence[str] = ()) -> str:
    """One sentence on one measure across the models (``rows``: its :func:`model_measures`
    rows; ``agree``: its :func:`agreement` row over the compared models), citing every model's
    number; the ``reference`` models' numbers follow, outside the comparison."""
    rows, ref = _apart(rows, reference)
    col = "value" if measure == "circuit size" else "depth"

    def cite(r: Mapping[str, Any]) -> str:
        if measure == "circuit size":
            return f"{_label(r['model'], reference)} {float(r['value']):.2%} ({r['detail']})"
        return f"{_label(r['model'], reference)} {_depth_text(r)}"

    have = rows.loc[rows[col].notna().to_numpy()].sort_values(col, kind="stable")
    name = "Circuit size at F >= 0.9" if measure == "circuit size" else \
        measure[0].upper() + measure[1:]
    values = _join([cite(r) for r in have.to_dict("records")])
    if have.empty:
        text = f"{name}: none of the compared models has a value"
    elif agree.get("agree") is None:
        text = f"{name}: only {values}"
    elif measure == "circuit size":
        verdict = "within a factor of 2" if agree["agree"] else "more than 2x apart"
        text = (f"{name}: {values}; the largest share ({agree['latest']}) is "
                f"{float(agree['ratio']):.1f}x the smallest ({agree['earliest']}), {verdict}")
    elif agree["agree"]:
        text = (f"{name}: the models agree within {within:g} of the depth, {values} "
                f"(spread {float(agree['spread']):.2f})")
    else:
        text = (f"{name}: the models differ, {values}; the spread "
                f"{float(agree['spread']):.2f} exceeds {within:g}")
    beside = ref.loc[ref[col].notna().to_numpy()]
    if not beside.empty:
        text += "; beside them " + _join([cite(r) for r in beside.to_dict("records")])
    missing = pd.concat([rows.loc[rows[col].isna().to_numpy()],
                         ref.loc[ref[col].isna().to_numpy()]])
    if not missing.empty:
        text += "; no value on " + "; ".join(
            f"{_label(r['model'], reference)} ({r['detail']})" for r in missing.to_dict("records"))
    return text + "."


def finding_sentence(finding: str, rows: pd.DataFrame, *, reference: Sequence[str] = ()) -> str:
    """Which models a literature finding holds on, differs on, or could not be judged on."""
    groups: dict[str, list[str]] = {"holds": [], "differs": [], "open": []}
    for r in rows.to_dict("records"):
        h = r["holds"]
        key = "open" if h is None or pd.isna(h) else "holds" if bool(h) else "differs"
        who = _label(r["model"], reference)
        if key != "holds" and r.get("measured"):
            who += f" ({r['measured']})"
        groups[key].append(who)
    parts = []
    if groups["holds"]:
        parts.append(f"holds on {_join(groups['holds'])}")
    if groups["differs"]:
        parts.append(f"differs on {_join(groups['differs'])}")
    if groups["open"]:
        parts.append(f"is not judged on {_join(groups['open'])}")
    return f"{finding}: {'; '.join(parts)}."


def kinds_sentence(composition: pd.DataFrame, *, reference: Sequence[str] = ()) -> str:
    """The circuits' make-up: the share of heads and of neurons (and other kinds) per model."""
    if composition.empty:
        return "Kinds of the circuit components: no model has a circuit at F >= 0.9."
    parts = []
    for model, g in composition.groupby("model", sort=False):
        kinds = ", ".join(f"{float(r['share']):.0%} {r['kind']}s ({int(r['nodes']):,}"
                          + (f" in {int(r['layers'])} MLP layers" if r["kind"] == "neuron"
                             else "") + ")" for r in g.to_dict("records"))
        parts.append(f"{_label(str(model), reference)}: {kinds}")
    return f"Kinds of the circuit components: {'; '.join(parts)}."


def agreement_paragraphs(measures: pd.DataFrame, agree: pd.DataFrame, findings: pd.DataFrame,
                         composition: pd.DataFrame, *, within: float = AGREE_WITHIN,
                         reference: Sequence[str] = ()) -> list[str]:
    """Where the models agree and where they differ, with numbers: a headline, then a sentence
    per measure, per finding, and on the circuits' kinds - all computed from the tables."""
    depth = agree.loc[(agree["measure"] != "circuit size").to_numpy()]
    judged = depth.loc[depth["agree"].notna().to_numpy()]
    same = [str(m) for m, a in zip(judged["measure"], judged["agree"], strict=True) if a]
    differ = [str(m) for m, a in zip(judged["measure"], judged["agree"], strict=True) if not a]
    models = [m for m in dict.fromkeys(measures["model"]) if m not in reference]
    refs = [m for m in dict.fromkeys(measures["model"]) if m in reference]
    head = (f"Across {len(models)} compared models ({_join(models)}), {len(same)} of "
            f"{len(judged)} depth measures that at least two of them have agree within "
            f"{within:g} of the depth" + (f" ({_join(same)})" if same else "")
            + (f" and {len(differ)} differ ({_join(differ)})" if differ else "") + "."
            + (f" The reference {_join(refs)} is cited beside them, outside the comparison."
               if refs else ""))
    lines = [head]
    for measure in MEASURES:
        rows = measures.loc[(measures["measure"] == measure).to_numpy()]
        row = agree.loc[(agree["measure"] == measure).to_numpy()]
        lines.append(measure_sentence(measure, rows, row.iloc[0].to_dict() if len(row) else {},
                                      within=within, reference=reference))
    for finding, rows in findings.groupby("finding", sort=False):
        lines.append(finding_sentence(str(finding), rows, reference=reference))
    lines.append(kinds_sentence(composition, reference=reference))
    return lines


def depth_curves(tables: Mapping[str, Mapping[str, pd.DataFrame]],
                 n_layers: Mapping[str, int]) -> dict[str, pd.DataFrame]:
    """The curve behind each depth measure (:data:`CURVES`), per model against relative depth:
    ``{measure: frame(model, layer, depth, value)}`` from each model's aggregated ``tracing``,
    ``knockout``, ``effective`` and ``probes`` tables (tracing divided by the model's largest
    |effect|, so the question is only *where*)."""
    out: dict[str, list[pd.DataFrame]] = {m: [] for m in CURVES}

    def add(measure: str, model: str, df: pd.DataFrame, value: str, *,
            scale: bool = False) -> None:
        if df.empty:
            return
        curve = pd.DataFrame(df.groupby("layer", as_index=False)[value].mean())
        y = curve[value].to_numpy(dtype=float)
        if scale and np.nanmax(np.abs(y)) > 0:
            y = y / np.nanmax(np.abs(y))
        n = n_layers[model]
        out[measure].append(pd.DataFrame({
            "model": model, "layer": curve["layer"].astype(int),
            "depth": [layer_depth(v, n) for v in curve["layer"]], "value": y}))

    for model, t in tables.items():
        tr = t.get("tracing", pd.DataFrame())
        if not tr.empty:
            for measure, method, role in (("early site", "causal_tracing/mlp", "subject_last"),
                                          ("late site", "causal_tracing/attn", "final")):
                sel = ((tr["method"] == method) & (tr["role"].astype(str) == role)).to_numpy()
                add(measure, model, tr.loc[sel], "effect", scale=True)
        ko = t.get("knockout", pd.DataFrame())
        if not ko.empty:
            add("knockout peak", model, ko.loc[(ko["role"].astype(str) == "subject").to_numpy()],
                "effect")
        eff = t.get("effective", pd.DataFrame())
        if not eff.empty:
            clean = float(eff["clean_accuracy"].to_numpy(dtype=float).mean())
            rel = eff.assign(relative=eff["accuracy"] / clean if clean > 0 else np.nan)
            # k = n_layers ablates nothing: it sits past the last layer (depth > 1)
            add("effective model onset", model, rel, "relative")
        pr = t.get("probes", pd.DataFrame())
        if not pr.empty:
            add("probe onset", model, pr.loc[(pr["role"].astype(str) == "subject_last")
                                             .to_numpy()], "effect")
    return {m: pd.concat(v, ignore_index=True) for m, v in out.items() if v}


def overview_figure(measures: pd.DataFrame, *, reference: Sequence[str] = ()) -> Figure:
    """Every depth measure (rows) with one marker per model at its relative depth."""
    rows = measures.loc[(measures["measure"] != "circuit size").to_numpy()
                        & measures["depth"].notna().to_numpy()]
    order = [m for m in MEASURES if m != "circuit size"]
    models = list(dict.fromkeys(measures["model"]))
    import seaborn as sns

    palette = sns.color_palette("colorblind", max(1, len(models)))
    markers = ["o", "s", "D", "^", "v", "P", "X"]
    with _new_figure(6.8, 0.42 * len(order) + 1.4) as fig:
        ax = fig.subplots()
        for i, (model, color) in enumerate(zip(models, palette, strict=False)):
            m = rows.loc[(rows["model"] == model).to_numpy()]
            ys = [order.index(x) + (i - (len(models) - 1) / 2) * 0.12 for x in m["measure"]]
            ax.scatter(m["depth"].astype(float), ys, color=color, s=42,
                       marker=markers[i % len(markers)], label=_label(model, reference),
                       zorder=3)
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        ax.set_xlim(-0.05, 1.1)
        ax.set_xlabel("relative depth: layer / (n_layers - 1)")
        ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18),
                  ncol=min(3, len(models)))
        ax.set_title("Where each measure sits, per model", loc="left")
        return from_matplotlib(fig, caption="Each depth measure per model (the table above); "
                               "missing markers are measures a model has no value for.",
                               alt="depth of each measure per model")


def summary_section(measures: pd.DataFrame, agree: pd.DataFrame, findings: pd.DataFrame,
                    composition: pd.DataFrame, *, within: float = AGREE_WITHIN,
                    reference: Sequence[str] = ()) -> Section:
    """Section ``universality-summary``: the generated paragraph, the measures as a
    model x measure table of depths, the overview figure and the agreement table."""
    lines = agreement_paragraphs(measures, agree, findings, composition, within=within,
                                 reference=reference)
    wide = measures.assign(cell=[
        (f"{float(r['value']):.2%}" if r["measure"] == "circuit size" and pd.notna(r["value"])
         else f"{float(r['depth']):.2f} (L{float(r['layer']):.3g}/{int(r['n_layers'])})"
         if pd.notna(r["depth"]) else "-") for r in measures.to_dict("records")]
    ).pivot(index="measure", columns="model", values="cell").reindex(
        [m for m in MEASURES if m in set(measures["measure"])]).reset_index()
    wide = pd.DataFrame(wide[["measure", *dict.fromkeys(measures["model"])]])
    wide.columns.name = None
    return Section(
        id="universality-summary", title="Where the models agree and where they differ",
        explanation=EXPLAIN_SUMMARY.format(within=f"{within:g}") + "\n\n" + "\n\n".join(lines),
        figures=[overview_figure(measures, reference=reference)],
        tables=[Table(wide, caption="Relative depth of each measure, layer / (n_layers - 1); "
                      "circuit size as a share of all head and neuron x role nodes"),
                Table(columns(agree, ["measure", "models", "agree", "earliest",
                                      "earliest_value", "latest", "latest_value", "spread",
                                      "ratio", "missing"]),
                      caption=f"Agreement per measure (depths within {within:g}; circuit "
                      "sizes within a factor of 2)"),
                Table(pd.DataFrame({"measure": list(MEASURES),
                                    "definition": list(MEASURES.values())}),
                      caption="What each measure is")])


def models_section(models: pd.DataFrame) -> Section:
    """Section ``universality-models``: each model's size, facts known and pairs analysed."""
    return Section(id="universality-models", title="Models",
                   explanation="Each model, what it knows of its dataset (Fact Finding's rule "
                   "unless the config says otherwise) and the pairs analysed on it.",
                   tables=[Table(models, caption="Models side by side")])


def findings_section(findings: pd.DataFrame) -> Section:
    """Section ``universality-findings``: the literature's findings judged per model."""
    cols = ["finding", "model", "holds", "layer", "depth", "measured"]
    df = columns(findings, cols).sort_values(["finding", "model"], kind="stable").reset_index(
        drop=True)
    counts = findings.assign(judged=findings["holds"].notna()).groupby("model", sort=False)
    facts = {str(m): f"{int(g['holds'].fillna(False).to_numpy(dtype=bool).sum())} of "
             f"{int(g['judged'].to_numpy(dtype=bool).sum())} judged findings hold"
             for m, g in counts}
    return Section(id="universality-findings", title="The literature's findings, per model",
                   explanation=EXPLAIN_FINDINGS, facts=facts,
                   tables=[Table(df, caption="Findings per model (depth: layer / (n_layers - "
                                 "1))", max_rows=max(1, len(df)))])


def measure_sections(measures: pd.DataFrame, curves: Mapping[str, pd.DataFrame]
                     ) -> list[Section]:
    """One section per depth measure with a curve: its curve per model against depth, and
    the measure's row per model."""
    out = []
    for measure, (title, ylabel) in CURVES.items():
        rows = columns(measures.loc[(measures["measure"] == measure).to_numpy()],
                       ["model", "layer", "n_layers", "depth", "value", "holds", "detail"])
        figs = []
        curve = curves.get(measure)
        if curve is not None and not curve.empty:
            figs.append(line_plot(curve, x="depth", y="value", hue="model", band=None,
                                  title=title, xlabel="relative depth: layer / (n_layers - 1)",
                                  ylabel=ylabel, caption=f"{title}, per model against relative "
                                  f"depth. {MEASURES[measure]}.",
                                  alt=f"{measure} per model"))
        out.append(Section(id="universality-" + measure.replace(" ", "-"),
                           title=measure[0].upper() + measure[1:],
                           explanation=MEASURES[measure] + ".", figures=figs,
                           tables=[Table(rows, caption=f"{measure} per model")]))
    return out


def circuits_section(composition: pd.DataFrame, similarity: pd.DataFrame,
                     measures: pd.DataFrame) -> Section:
    """Section ``universality-circuits``: circuit size per model (a bar each), the kinds of
    its components (stacked shares) and the signature similarity of every pair."""
    size = measures.loc[((measures["measure"] == "circuit size")
                         & measures["value"].notna()).to_numpy()]
    figs = []
    if not size.empty:
        figs.append(bar_plot(size.assign(share=size["value"] * 100), label="model",
                             value="share", sort=False, title="Circuit size at F >= 0.9",
                             caption="Share (%) of all head and neuron x role nodes the "
                             "pruned circuit keeps.", alt="circuit size per model"))
    if not composition.empty:
        figs.append(_kinds_figure(composition))
    tables = [Table(composition, caption="Kinds of the circuit components per model"),
              Table(size[["model", "value", "holds", "detail"]].rename(
                  columns={"value": "share", "holds": "F >= 0.9"}),
                  caption="Circuit size per model")]
    if not similarity.empty:
        tables.append(Table(similarity, caption="Signature similarity of each pair of "
                            "circuits (weighted Jaccard; 1 = the same mix)"))
    return Section(id="universality-circuits", title="Circuits at faithfulness 0.9",
                   explanation=EXPLAIN_CIRCUITS, figures=figs, tables=tables)


def _kinds_figure(composition: pd.DataFrame) -> Figure:
    """Stacked horizontal bars: each model's circuit split into its kinds (shares)."""
    models = list(dict.fromkeys(composition["model"]))
    kinds = sorted(set(composition["kind"]))
    import seaborn as sns

    palette = sns.color_palette("colorblind", max(1, len(kinds)))
    with _new_figure(6.4, 0.45 * len(models) + 1.5) as fig:
        ax = fig.subplots()
        left = np.zeros(len(models))
        for kind, color in zip(kinds, palette, strict=False):
            share = np.array([float(composition.loc[(composition["model"] == m).to_numpy()
                                                    & (composition["kind"] == kind).to_numpy(),
                                                    "share"].sum()) for m in models])
            ax.barh(range(len(models)), share, left=left, color=color, label=kind)
            left += share
        ax.set_yticks(range(len(models)), models)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the circuit's nodes")
        ax.legend(frameon=False, fontsize=8, ncol=len(kinds), loc="upper center",
                  bbox_to_anchor=(0.5, -0.25))
        ax.set_title("Kinds of the circuit components", loc="left")
        return from_matplotlib(fig, caption="Each model's circuit at F >= 0.9 by kind of "
                               "component.", alt="circuit kinds per model")
