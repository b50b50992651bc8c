"""Report sections for feature circuits: the fact-finding circuit read in the basis of the
dictionaries' features.

Each MLP is read through its transcoder as sparse features plus an error node that holds what
the features miss (Marks et al. 2024, Sparse Feature Circuits; Ameisen et al. 2025, attribution
graphs). The sections show that circuit three ways and then test it two ways:

* :func:`feature_graph_section` (``features-graph``): circuit-tracer's attribution graph of one
  prompt - attention patterns and norm scales frozen, so an edge is a direct, linear effect -
  with its replacement and completeness scores and the error nodes' share of each layer's
  influence (:func:`error_share_figure`); :func:`flagged_layers` names the layers above
  :data:`ERROR_FLAG`, where the dictionary does not explain what the model does.
* :func:`feature_circuit_section` (``features-circuit``): the dataset-level circuit of feature
  attribution patching over the pairs (mean and 95% CI per node), its stability across
  disjoint halves of the pairs (Jaccard of the top-k nodes), the exact patches of its top
  nodes and the missed-effect bound of the next ones.
* :func:`pairs_graph_section` (``features-pairs-graph``): the counterfactual graph over the
  pairs, each edge scored by EAP-IG with attention live; an edge between two positions crosses
  through attention, and the head split says which heads carry it (:func:`head_carriers`,
  :func:`pairs_edge_table`, :func:`pairs_graph_points`).
* :func:`interventions_section` (``features-interventions``): do the attributed features carry
  the attribute? Swapped (or steered) to the corrupt prompt's values, how many answers flip,
  against as many random features.
* :func:`bases_section` (``features-bases``): features against neurons and against whole
  heads/MLPs at equal node budgets, faithfulness under mean and resample ablation
  (:func:`basis_points` says where features lose, with the numbers).

:func:`features_summary` reads the findings off those tables as short lines, and
:func:`features_section` (``features``) opens the report's feature part with them. Each
function takes the tidy frames of :mod:`factfind.features` (and of :mod:`factfind.evaluate.bases`
for the basis comparison); the features step of ``analyses/fact_finding.py``
(``analyses/_features_step.py``) assembles the sections into the fact-finding report. The
dictionaries themselves - quality, corpus, dashboards - are shown by
:mod:`factfind.report.features`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.report.document import Figure, Section, Table
from factfind.report.figures import bar_plot, line_plot
from factfind.report.tables import columns

EXPLAIN_FEATURES = (
    "The circuit read in the basis of the dictionaries' features (Marks et al. 2024's Sparse "
    "Feature Circuits; Ameisen et al. 2025's attribution graphs): each MLP is read through its "
    "transcoder as sparse features plus an error node that holds what the features miss. The "
    "lines below come from the tables of the sections that follow: the single-prompt graph's "
    "replacement and completeness scores and its error share per layer, the dataset-level "
    "circuit's stability across halves of the pairs, the interventions that swap the "
    "attributed features, and the three bases at equal node budgets. Where features lose to "
    "neurons or to heads and MLPs, the lines say so."
)
EXPLAIN_GRAPH = (
    "circuit-tracer's attribution graph of one prompt (the first pair's clean prompt): "
    "attention patterns and norm scales are frozen at the prompt's run and the transcoders "
    "replace the MLPs, so the residual path is linear and an edge is the direct effect of a "
    "source (a feature, an error node, a token embedding) on a target feature's pre-activation "
    "or on a logit. The graph is pruned by cumulative influence on the logits (node threshold "
    "0.8, edge threshold 0.98, circuit-tracer's defaults). The replacement score is the share "
    "of the influence on the logits that flows from the embeddings through features only (1: "
    "no error node on any path); the completeness score the share of all inputs' influence "
    "that does not end in an error node. An error node that holds more than 30% of its layer's "
    "influence is flagged: there the dictionary does not explain what the model does.\n\n"
    "Nodes are grouped by token role (a feature at two relation tokens is one node); the logits "
    "are one node whose incoming edges are the probability-weighted sums over the top tokens. "
    "The graph is exported beside the report as GraphML, node-link JSON and circuit-tracer's "
    "graph JSON (its frontend opens it)."
)
EXPLAIN_FEATURE_CIRCUIT = (
    "Feature attribution patching over the pairs (Marks et al. 2024): each feature and error "
    "node at each token role gets the first-order estimate of the change in the logit "
    "difference when it takes the corrupt prompt's value, per pair; the dataset-level circuit "
    "is the mean over the pairs with a 95% interval. The top nodes are then patched exactly, "
    "one at a time (estimate against exact). Stability: the pairs are split at random into two "
    "disjoint halves, each half's circuit is ranked on its own, and the Jaccard index of the "
    "two top-k node sets is averaged over the splits (1: both halves name the same nodes; a "
    "circuit of subject-specific features has a low Jaccard even when each pair's attribution "
    "is exact)."
)
EXPLAIN_INTERVENTIONS = (
    "Do the attributed features carry the attribute? In each pair's clean run the top features "
    "at one token role are clamped to the corrupt prompt's values (swap; steer x2 moves them "
    "twice as far), the error terms kept, and the answer is read: success is the share of pairs "
    "whose top-1 token becomes the corrupt prompt's attribute, with a Wilson 95% interval. The "
    "control moves as many random attributed features at the same role. base_rate is how often "
    "the clean run already answers the other attribute, source_rate how often the corrupt run "
    "does (the ceiling of a perfect swap); fraction is the mean change of the logit difference "
    "over the change when the whole corrupt prompt is run."
)
EXPLAIN_BASES = (
    "The same pairs, three bases for the MLPs, equal node budgets: features (each MLP read "
    "through its dictionary as features plus an error node, which costs a node), neurons "
    "(ranked by AtP*) and whole MLPs (ranked by AtP); attention heads are nodes in all three. "
    "Each basis's top-n nodes form a circuit; everything outside it is ablated (mean: per token "
    "role over the clean prompts; resample: the corrupt partner's value) and faithfulness is "
    "(m(C) - m(empty)) / (m(model) - m(empty)) of the mean logit difference. Nothing is tuned "
    "toward a basis: each is ranked by its own standard estimate and measured by one engine. "
    "A fourth line, features with no error nodes, takes the features' ranking without its "
    "error nodes (the next heads and features fill the budget), so every error node is "
    "ablated: it measures what the features themselves carry, and even its full circuit "
    "(every head and feature) falls short of the model where the error nodes matter."
)

EXPLAIN_PAIRS_GRAPH = (
    "A second view of the same features, over the pairs rather than one prompt. The graph "
    "above is circuit-tracer's: one prompt, attention patterns and norms frozen at its run, an "
    "edge the direct, linear effect of a source on a target's pre-activation or on a logit. "
    "This one is Sparse Feature Circuits' (Marks et al. 2024): its nodes are the strongest "
    "feature and error nodes of the dataset-level circuit, one token-embedding node per role "
    "and the logits; an edge is scored against the counterfactual metric (the logit "
    "difference between the clean and the corrupt answer) with EAP-IG (Hanna et al. 2024): "
    "the sender's change from clean to corrupt times the gradient of the metric through the "
    "receiver, averaged over points between the corrupt and the clean input and over the "
    "pairs (95% interval). Every MLP with a transcoder is made of nodes, so an edge is the "
    "effect that passes through no other MLP; attention is live, not frozen, and heads are not "
    "nodes: an edge between two positions can only cross through attention, and the table "
    "says which heads carry it - each path's last step onto the receiver's position, split "
    "exactly, so the heads' shares and the same-position part sum to the edge.\n\n"
    "The graph keeps the strongest edges on paths from the embeddings to the logits and is "
    "exported beside the report as GraphML and node-link JSON (-features-pairs)."
)

#: an error node holding more than this share of its layer's influence is flagged (issue 24)
ERROR_FLAG = 0.3
BASIS_NAMES = {"features": "features", "features_no_errors": "features, no error nodes",
               "neurons": "neurons", "heads_mlps": "heads/MLPs"}


def _num(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{float(v):.{digits}f}"


def _need(df: pd.DataFrame, cols: set[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame) or not cols <= set(df.columns):
        got = sorted(df.columns) if isinstance(df, pd.DataFrame) else type(df).__name__
        raise ArgumentError(f"{what} needs columns {sorted(cols)}, got {got}")


def flagged_layers(error_share: pd.DataFrame, *, limit: float = ERROR_FLAG) -> list[int]:
    """The layers whose error nodes hold more than ``limit`` of their layer's influence on the
    logits (:meth:`~factfind.features.linear_graph.LinearGraph.error_share`'s
    ``error_share_of_layer``)."""
    _need(error_share, {"layer", "error_share_of_layer"}, "an error-share table")
    share = error_share["error_share_of_layer"].to_numpy(dtype=float)
    return [int(x) for x in error_share["layer"].to_numpy()[np.nan_to_num(share) > limit]]


def basis_points(table: pd.DataFrame) -> list[str]:
    """One line per ablation of a :func:`~factfind.evaluate.bases.basis_comparison` table:
    each basis's faithfulness at every budget, then where features lose to neurons (or to
    heads/MLPs), with the numbers; and, when the table has the ``features_no_errors`` basis,
    one line on it: its faithfulness per ablation beside the features' with their error nodes,
    and its full circuit's (every head and feature, no error node)."""
    _need(table, {"basis", "budget", "how", "faithfulness"}, "a basis table")
    df = pd.DataFrame(table[table["budget"].notna().to_numpy()])
    lines, plain = [], []
    for how, part in df.groupby("how", sort=False):
        wide = part.pivot_table(index="budget", columns="basis", values="faithfulness",
                                aggfunc="first").sort_index()
        budgets = [int(b) for b in wide.index]
        shown = "; ".join(f"{BASIS_NAMES.get(str(b), b)} "
                          + "/".join(_num(wide.at[x, b]) for x in wide.index)
                          for b in wide.columns if b != "features_no_errors")
        line = (f"{str(how).capitalize()} ablation, faithfulness at "
                f"{'/'.join(map(str, budgets))} nodes: {shown}.")
        for rival in ("neurons", "heads_mlps"):
            if "features" not in wide.columns or rival not in wide.columns:
                continue
            # compared as shown (two decimals): -0.001 against -0.0004 is a tie, not a loss
            lost = [(int(x), float(wide.at[x, "features"]), float(wide.at[x, rival]))
                    for x in wide.index
                    if round(float(wide.at[x, "features"]), 2)
                    < round(float(wide.at[x, rival]), 2)]
            if lost:
                line += (f" Features lose to {BASIS_NAMES[rival]} at "
                         + ", ".join(f"{b} nodes ({f:.2f} vs {r:.2f})" for b, f, r in lost)
                         + ".")
            else:
                line += f" Features match or beat {BASIS_NAMES[rival]} at every budget."
        lines.append(line)
        if "features_no_errors" in wide.columns:
            nums = "/".join(_num(wide.at[x, "features_no_errors"]) for x in wide.index)
            given = f"{nums} at {'/'.join(map(str, budgets))} nodes under {how} ablation"
            if "features" in wide.columns:
                given += (" (with them "
                          + "/".join(_num(wide.at[x, "features"]) for x in wide.index) + ")")
            plain.append(given)
    if plain:
        full = pd.DataFrame(table[(table["budget"].isna()
                                   & (table["basis"] == "features_no_errors")).to_numpy()])
        line = ("Without error nodes (each ablated like any node outside the circuit), "
                f"features score {' and '.join(plain)}")
        if len(full):
            line += ("; every head and feature but no error node: "
                     + ", ".join(f"{_num(f)} ({h})"
                                 for h, f in zip(full["how"], full["faithfulness"], strict=True)))
        lines.append(line + ".")
    return lines


def _swap_lines(df: pd.DataFrame) -> list[str]:
    _need(df, {"role", "scale", "selection", "success_rate", "n"}, "an interventions table")
    out = []
    for role, part in df.groupby("role", sort=False):
        swap = pd.DataFrame(part[(part["scale"].astype(float) == 1.0).to_numpy()])
        att = pd.DataFrame(swap[(swap["selection"] == "attributed").to_numpy()])
        if att.empty:
            continue
        a = att.iloc[0]
        hits = round(float(a["success_rate"]) * int(a["n"]))
        line = (f"Swapping the top {int(a.get('n_features', 0))} features at {role} to the "
                f"corrupt subject's values flips {hits} of {int(a['n'])} answers "
                f"({100 * float(a['success_rate']):.0f}%")
        if {"success_low", "success_high"} <= set(a.index):
            line += (f", 95% CI {100 * float(a['success_low']):.0f}-"
                     f"{100 * float(a['success_high']):.0f}%")
        line += ")"
        ctl = pd.DataFrame(swap[(swap["selection"] == "random").to_numpy()])
        if len(ctl):
            line += (f"; as many random features: "
                     f"{100 * float(ctl.iloc[0]['success_rate']):.0f}%")
        if "source_rate" in a.index and pd.notna(a["source_rate"]):
            line += f" (the corrupt run itself: {100 * float(a['source_rate']):.0f}%)"
        out.append(line + ".")
    return out


def features_summary(*, scores: Mapping[str, float] | None = None,
                     error_share: pd.DataFrame | None = None,
                     stability: pd.DataFrame | None = None,
                     interventions: pd.DataFrame | None = None,
                     bases: pd.DataFrame | None = None,
                     verification: pd.DataFrame | None = None,
                     pairs_edges: pd.DataFrame | None = None,
                     pairs_heads: pd.DataFrame | None = None, k: int = 50) -> list[str]:
    """The feature-circuit findings as short lines, each read off its table (any table may be
    left out): replacement and completeness of the single-prompt graph and its flagged layers,
    the top-``k`` Jaccard across halves, the swap success per role against its control, how
    well AtP's estimates match the exact patches, and the basis comparison (:func:`basis_points`:
    where features lose, with the numbers), then the counterfactual graph's strongest edge and
    the head that carries most of its strongest cross-position edge (:func:`pairs_graph_points`,
    given ``pairs_edges`` and ``pairs_heads``)."""
    lines = []
    if scores is not None:
        line = (f"Single-prompt graph: replacement score {_num(scores.get('replacement'))}, "
                f"completeness {_num(scores.get('completeness'))}")
        if error_share is not None:
            bad = flagged_layers(error_share)
            line += (f"; error nodes hold > {ERROR_FLAG:.0%} of their layer's influence at "
                     f"{len(bad)} of {len(error_share)} layers"
                     + (f" (L{', L'.join(map(str, bad))})" if 0 < len(bad) <= 12 else ""))
        lines.append(line + ".")
    if stability is not None:
        _need(stability, {"k", "effect"}, "a stability table")
        at = stability[(stability["k"].astype(int) == k).to_numpy()]
        row = (at if len(at) else stability).iloc[0]
        ci = (f" [{_num(row['ci_low'])}, {_num(row['ci_high'])}]"
              if "ci_low" in row.index and pd.notna(row["ci_low"]) else "")
        halves = (f" ({int(row['n'])} random splits into halves of {int(row['n_prompts'])} "
                  "pairs)" if {"n", "n_prompts"} <= set(row.index) else "")
        lines.append(f"Dataset-level circuit: the top-{int(row['k'])} nodes of two disjoint "
                     f"halves of the pairs overlap with Jaccard {_num(row['effect'])}{ci}"
                     f"{halves}.")
    if interventions is not None:
        lines += _swap_lines(interventions)
    if verification is not None and len(verification):
        _need(verification, {"estimate", "effect"}, "a verification table")
        est = verification["estimate"].to_numpy(dtype=float)
        ex = verification["effect"].to_numpy(dtype=float)
        same = int(np.sum(np.sign(est) == np.sign(ex)))
        lines.append(f"Exact patching of the top {len(ex)} attributed nodes: AtP's estimate has "
                     f"the exact effect's sign for {same}; the largest exact effect is "
                     f"{_num(ex[np.argmax(np.abs(ex))], 3)} (estimate "
                     f"{_num(est[np.argmax(np.abs(ex))], 3)}).")
    if bases is not None:
        lines += basis_points(bases)
    if pairs_edges is not None and pairs_heads is not None:
        lines += pairs_graph_points(pairs_edges, pairs_heads)
    return lines


def features_section(points: Sequence[str], facts: Mapping[str, Any], *,
                     explanation: str = EXPLAIN_FEATURES) -> Section:
    """Section ``features``: the feature-circuit findings (:func:`features_summary`) and the
    step's settings (dictionaries, pairs, budgets) as facts."""
    return Section(id="features", title="Features", explanation=explanation,
                   points=list(points), facts=dict(facts))


def error_share_figure(error_share: pd.DataFrame) -> Figure:
    """Per layer, the error nodes' share of the layer's influence (and of the whole graph's),
    with the 30% flag as a dashed line."""
    _need(error_share, {"layer", "error_share", "error_share_of_layer"}, "an error-share table")
    long = error_share.melt(id_vars=["layer"],
                            value_vars=["error_share_of_layer", "error_share"],
                            var_name="share", value_name="value")
    return line_plot(long, x="layer", y="value", hue="share", band=None, reference=ERROR_FLAG,
                     title="Error nodes' share of the influence per layer",
                     caption="error_share_of_layer: the layer's error nodes' share of its "
                             "influence on the logits (features + error); error_share: their "
                             "share of the whole graph's. Dashed: the 30% flag.",
                     alt="error share per layer")


def feature_graph_section(graph: Any, *, scores: Mapping[str, Any],
                          error_share: pd.DataFrame, facts: Mapping[str, Any] | None = None,
                          caption: str = "", max_edges: int = 300, top_edges: int = 30,
                          explanation: str = EXPLAIN_GRAPH) -> Section:
    """Section ``features-graph``: the pruned single-prompt attribution graph in the circuit
    explorer (a :class:`~factfind.graph.CircuitGraph` of feature, error, embedding and logit
    nodes), its replacement and completeness scores, the error share per layer (figure and
    table, flagged above 30%) and its strongest edges. The explorer draws the strongest
    ``max_edges`` edges (300: a pruned graph of Gemma-3-270M keeps ~800 nodes, stacked tens deep
    per layer and role, which at 2,000 edges drew as a tall, narrow column); the whole graph is
    in the exports beside the report."""
    from factfind.report.explorer import graph_view
    from factfind.report.sections import edge_table

    table = error_share.assign(flagged=[x in set(flagged_layers(error_share))
                                        for x in error_share["layer"].astype(int)])
    shown = columns(table, ["layer", "error_share_of_layer", "error_share", "flagged"])
    bad = flagged_layers(error_share)
    info: dict[str, Any] = {"replacement score": _num(scores.get("replacement"), 3),
                            "completeness score": _num(scores.get("completeness"), 3),
                            f"layers with error share > {ERROR_FLAG:.0%}":
                                f"{len(bad)} of {len(error_share)}"
                                + (f": {', '.join(map(str, bad))}" if bad else "")}
    info.update(dict(facts or {}))
    return Section(
        id="features-graph", title="Features: the attribution graph of one prompt",
        explanation=explanation, facts=info,
        graphs=[graph_view(graph, caption=caption, max_edges=max_edges)],
        figures=[error_share_figure(error_share)],
        tables=[Table(shown.round(4), caption="Error share per layer (flagged: the layer's "
                                              "error nodes hold > 30% of its influence)",
                      max_rows=max(50, len(shown))),
                Table(edge_table(graph), caption="Strongest edges of the pruned graph "
                                                 "(direct effects)", max_rows=top_edges)])


# ----------------------------------------------------------------------------- the pairs graph

EDGE_COLUMNS = {"sender", "receiver", "effect", "ci_low", "ci_high", "n"}
HEAD_COLUMNS = {"sender", "receiver", "layer", "head", "share", "local", "edge"}


def _role(node: str) -> str:
    return node.rsplit("@", 1)[-1]


def head_carriers(heads: pd.DataFrame, *, top: int = 2) -> dict[tuple[str, str], str]:
    """Per edge of a :func:`~factfind.features.feature_edges.split_edge_heads` frame, who carries
    it: its ``top`` largest parts by ``|share|`` - heads ``L9.h3`` and the same-position part
    (``local``) - each as its share of the edge in % (``"L9.h3 83%, L7.h1 12%"``; ``"no head"``
    when neither a head nor the local part carries anything)."""
    _need(heads, HEAD_COLUMNS, "a head-split table")
    out: dict[tuple[str, str], str] = {}
    for key, part in heads.groupby(["sender", "receiver"], sort=False):
        s, r = cast(tuple[str, str], key)  # two keys: a (sender, receiver) tuple
        edge = float(part["edge"].iloc[0])
        local = float(part["local"].iloc[0])
        named = pd.DataFrame(part[part["head"].notna().to_numpy()])
        parts = [(f"L{int(la)}.h{int(h)}", float(v)) for la, h, v in
                 zip(named["layer"], named["head"], named["share"], strict=True)]
        if local != 0:
            parts.append(("same position", local))
        parts = sorted((p for p in parts if p[1] != 0), key=lambda p: -abs(p[1]))[:top]
        if not parts:
            out[(str(s), str(r))] = "no head"
        elif edge == 0:
            out[(str(s), str(r))] = ", ".join(name for name, _ in parts)
        else:
            out[(str(s), str(r))] = ", ".join(f"{name} {100 * v / edge:.0f}%"
                                              for name, v in parts)
    return out


def _labelled(node: str, graph: Any, labels: Mapping[str, str]) -> str:
    """``node (label)`` where a label is known (``labels`` by id or by unit, else the graph
    node's ``label``), else the id."""
    import networkx as nx

    unit = node.split("@")[0]
    label = labels.get(node) or labels.get(unit)
    # a CircuitGraph holds its DiGraph at .graph (a networkx graph's .graph is its attributes)
    g = graph if isinstance(graph, nx.Graph) else getattr(graph, "graph", None)
    if not label and isinstance(g, nx.Graph) and node in g:
        label = g.nodes[node].get("label")
    return f"{node} ({label})" if label and str(label) not in (node, unit) else node


def pairs_edge_table(edges: pd.DataFrame, heads: pd.DataFrame, *, graph: Any = None,
                     labels: Mapping[str, str] | None = None, top: int = 20) -> pd.DataFrame:
    """The ``top`` strongest edges of a :func:`~factfind.features.feature_edges.feature_edges`
    frame as the report shows them: sender and receiver (with their labels), ``effect [95%
    CI]``, ``n`` and ``carried by`` (:func:`head_carriers`; for an edge the head split did not
    reach, ``same role (not split)`` when sender and receiver share a role, else ``not
    split``)."""
    _need(edges, EDGE_COLUMNS, "a feature-edge table")
    _need(heads, HEAD_COLUMNS, "a head-split table")
    carriers = head_carriers(heads)
    shown = edges.iloc[np.argsort(-np.abs(edges["effect"].to_numpy(dtype=float)),
                                  kind="stable")].head(top)
    labels = dict(labels or {})
    rows = []
    for r in shown.to_dict("records"):
        s, v = str(r["sender"]), str(r["receiver"])
        carried = carriers.get((s, v)) or ("same role (not split)" if _role(s) == _role(v)
                                           else "not split")
        rows.append({"sender": _labelled(s, graph, labels),
                     "receiver": _labelled(v, graph, labels),
                     "effect [95% CI]": f"{_num(r['effect'], 3)} [{_num(r['ci_low'], 3)}, "
                                        f"{_num(r['ci_high'], 3)}]",
                     "n": int(r["n"]), "carried by": carried})
    return pd.DataFrame(rows, columns=["sender", "receiver", "effect [95% CI]", "n",
                                       "carried by"])


def pairs_graph_points(edges: pd.DataFrame, heads: pd.DataFrame) -> list[str]:
    """The counterfactual graph's findings: its strongest edge, and the strongest cross-position
    edge the head split reached with the head that carries most of it."""
    _need(edges, EDGE_COLUMNS, "a feature-edge table")
    _need(heads, HEAD_COLUMNS, "a head-split table")
    if edges.empty:
        return []
    e = edges.iloc[int(np.argmax(np.abs(edges["effect"].to_numpy(dtype=float))))]
    lines = [f"Counterfactual graph over the pairs (EAP-IG): {len(edges):,} edges scored; the "
             f"strongest, {e['sender']} -> {e['receiver']}, has effect {_num(e['effect'], 3)} "
             f"[{_num(e['ci_low'], 3)}, {_num(e['ci_high'], 3)}] on the logit difference."]
    cross = pd.DataFrame(heads[np.array([_role(str(s)) != _role(str(r)) for s, r in
                                         zip(heads["sender"], heads["receiver"], strict=True)],
                                        dtype=bool)])
    named = pd.DataFrame(cross[cross["head"].notna().to_numpy()])
    if len(named):
        edge_size = named["edge"].abs().to_numpy(dtype=float)
        strongest = pd.DataFrame(named[edge_size == edge_size.max()])
        order = np.argsort(-np.abs(strongest["share"].to_numpy(dtype=float)), kind="stable")
        top = strongest.iloc[order[:2]]
        edge = float(top["edge"].iloc[0])
        carried = " and ".join((f"{100 * float(v) / edge:.0f}% " if edge else "")
                               + f"by L{int(la)}.h{int(h)}" for la, h, v in
                               zip(top["layer"], top["head"], top["share"], strict=True))
        lines.append(f"The strongest cross-position edge split over heads, "
                     f"{top['sender'].iloc[0]} -> {top['receiver'].iloc[0]} (effect "
                     f"{_num(edge, 3)}), is carried {carried}.")
    return lines


def pairs_graph_section(graph: Any, edges: pd.DataFrame, heads: pd.DataFrame, *,
                        facts: Mapping[str, Any] | None = None,
                        labels: Mapping[str, str] | None = None, caption: str = "",
                        max_edges: int = 300, top_edges: int = 20,
                        explanation: str = EXPLAIN_PAIRS_GRAPH) -> Section:
    """Section ``features-pairs-graph``: the counterfactual feature graph over the pairs
    (:func:`~factfind.features.feature_edges.feature_edges`, a
    :class:`~factfind.graph.CircuitGraph` of feature, error, embedding and logit nodes) in the
    circuit explorer, its findings (:func:`pairs_graph_points`) and its ``top_edges`` strongest
    edges with the heads that carry them (:func:`pairs_edge_table`, from
    :func:`~factfind.features.feature_edges.split_edge_heads`). Labels are ``labels`` (by id or
    by unit, e.g. the dashboards') or the graph nodes' ``label``."""
    from factfind.report.explorer import graph_view

    table = pairs_edge_table(edges, heads, graph=graph, labels=labels, top=top_edges)
    split = heads.groupby(["sender", "receiver"]).ngroups if len(heads) else 0
    info: dict[str, Any] = {"edges scored": len(edges),
                            "cross-position edges split over heads": split}
    info.update(dict(facts or {}))
    return Section(
        id="features-pairs-graph", title="Features: the counterfactual graph over the pairs",
        explanation=explanation, facts=info, points=pairs_graph_points(edges, heads),
        graphs=[graph_view(graph, caption=caption, max_edges=max_edges)],
        tables=[Table(table, caption=f"The {len(table)} strongest edges over the pairs (EAP-IG "
                                     "effect on the logit difference, 95% CI); carried by: the "
                                     "heads (or the same position) that carry the largest "
                                     "shares of the edge", max_rows=top_edges)])


def feature_circuit_section(circuit: pd.DataFrame, stability: pd.DataFrame, *,
                            verification: pd.DataFrame | None = None,
                            bound: pd.DataFrame | None = None, top: int = 30,
                            explanation: str = EXPLAIN_FEATURE_CIRCUIT) -> Section:
    """Section ``features-circuit``: the dataset-level circuit (the ``all`` group of
    :func:`~factfind.features.circuits.aggregate_circuit`; per relation its top 3 when there
    are several), its stability across halves (:func:`~factfind.features.circuits.
    circuit_stability`), the exact verification of the top nodes and the missed-effect bound
    of the next ones (:func:`~factfind.features.verification.feature_missed_bound`'s
    ``buckets``)."""
    _need(circuit, {"node", "effect"}, "a circuit table")
    _need(stability, {"k", "effect"}, "a stability table")
    groups = circuit["group"].astype(str) if "group" in circuit.columns \
        else pd.Series(["all"] * len(circuit), index=circuit.index)
    allc = pd.DataFrame(circuit[(groups == "all").to_numpy()])
    allc = allc.iloc[np.argsort(-np.abs(allc["effect"].to_numpy(dtype=float)), kind="stable")]
    if allc.empty:
        raise ArgumentError("the circuit table has no 'all' group to show")
    figs = [bar_plot(allc.head(20), label="node", title="Dataset-level feature circuit",
                     caption="The 20 nodes of largest mean attribution over the pairs (95% CI).",
                     alt="top feature circuit nodes")]
    st = stability.assign(jaccard=stability["effect"])
    figs.append(line_plot(st.assign(**{"top-k": st["k"].astype(int)}), x="top-k", y="jaccard",
                          title="Stability across halves", reference=1.0,
                          caption="Mean Jaccard of the two halves' top-k nodes over the random "
                                  "splits (band: 95% CI).", alt="stability"))
    tables = [Table(columns(allc, ["node", "component", "layer", "role", "feature", "effect",
                                   "ci_low", "ci_high", "n"]).round(4),
                    caption=f"The dataset-level circuit: its {top} strongest nodes (mean "
                            "attribution over the pairs, 95% CI)", max_rows=top),
              Table(columns(stability, ["k", "effect", "ci_low", "ci_high", "n",
                                        "jaccard_first", "jaccard_min", "jaccard_max",
                                        "n_prompts", "n_nodes"]).round(3)
                    .rename(columns={"effect": "jaccard", "n": "splits"}),
                    caption="Jaccard of the top-k nodes across two disjoint halves of the "
                            "pairs (n_prompts per half)")]
    others = sorted(set(groups) - {"all"})
    if len(others) > 1:
        per = pd.DataFrame(circuit[(groups != "all").to_numpy()])
        per = per.assign(_s=np.abs(per["effect"].to_numpy(dtype=float))).sort_values(
            ["group", "_s"], ascending=[True, False], kind="stable").groupby("group").head(3)
        tables.append(Table(columns(per.rename(columns={"group": "relation"}),
                                    ["relation", "node", "effect", "ci_low", "ci_high", "n"])
                            .round(4), caption="Per relation, its 3 strongest nodes",
                            max_rows=max(50, len(per))))
    if verification is not None and len(verification):
        tables.append(Table(columns(verification, ["rank", "node", "estimate", "effect",
                                                   "ci_low", "ci_high", "n"]).round(4)
                            .rename(columns={"effect": "exact"}),
                            caption="The top nodes patched exactly (the feature's activation "
                                    "from the corrupt run through its decoder, error kept): "
                                    "AtP's estimate against the exact effect"))
    if bound is not None and len(bound):
        _need(bound, {"rank_start", "rank_stop", "effect"}, "a bound table")
        tables.append(Table(columns(bound, ["rank_start", "rank_stop", "nodes", "covered",
                                            "effect"]).round(4).rename(
                                                columns={"effect": "bound"}),
                            caption="Missed-effect bound of the unverified nodes per rank "
                                    "bucket: the smallest |effect| of the patched subsets "
                                    "that hold a node, maximised over the bucket (valid if "
                                    "patching a set moves the metric at least as much as its "
                                    "largest member)"))
    facts: dict[str, Any] = {"nodes attributed": int(stability["n_nodes"].iloc[0])
                             if "n_nodes" in stability.columns else len(allc)}
    return Section(id="features-circuit", title="Features: the dataset-level circuit",
                   explanation=explanation, figures=figs, tables=tables, facts=facts)


def interventions_section(df: pd.DataFrame, *, explanation: str = EXPLAIN_INTERVENTIONS
                          ) -> Section:
    """Section ``features-interventions``: a :func:`~factfind.features.feature_interventions`
    table (success rates with Wilson intervals, per role, intervention and selection)."""
    _need(df, {"role", "intervention", "selection", "success_rate", "n"},
          "an interventions table")
    shown = columns(df, ["role", "intervention", "selection", "n_features", "n", "success_rate",
                         "success_low", "success_high", "effect", "ci_low", "ci_high",
                         "base_rate", "source_rate", "fraction"]).round(3)
    bars = pd.DataFrame({
        "label": (shown["role"].astype(str) + " " + shown["intervention"].astype(str) + " ("
                  + shown["selection"].astype(str) + ")"),
        "success": shown["success_rate"].astype(float)})
    if {"success_low", "success_high"} <= set(shown.columns):
        bars["ci_low"] = shown["success_low"].astype(float)
        bars["ci_high"] = shown["success_high"].astype(float)
    fig = bar_plot(bars, label="label", value="success", sort=False, xlim=(0.0, 1.0),
                   title="Answers flipped", caption="Share of pairs whose answer becomes the "
                   "corrupt subject's attribute (Wilson 95% CI).",
                   alt="intervention success rates")
    return Section(id="features-interventions", title="Features: interventions",
                   explanation=explanation, points=_swap_lines(df), figures=[fig],
                   tables=[Table(shown, caption="Interventions at the subject's last token and "
                                                "the final token")])


def bases_section(table: pd.DataFrame, *, explanation: str = EXPLAIN_BASES) -> Section:
    """Section ``features-bases``: the :func:`~factfind.evaluate.bases.basis_comparison` table,
    its figure (:func:`~factfind.evaluate.bases.basis_figure`) and :func:`basis_points`."""
    from factfind.evaluate.bases import basis_figure
    from factfind.report.figures import from_matplotlib

    _need(table, {"basis", "budget", "how", "faithfulness"}, "a basis table")
    dashed = ("; dashed: the features without their error nodes"
              if "features_no_errors" in set(table["basis"]) else "")
    fig = from_matplotlib(basis_figure(table, labels=BASIS_NAMES),
                          caption="Faithfulness against the node budget, one line per basis, "
                          f"one panel per ablation (dotted: the full model{dashed}).",
                          alt="faithfulness of the bases at equal budgets")
    shown = columns(table, ["how", "budget", "basis", "n_nodes", "faithfulness", "full",
                            "empty", "n", "n_heads", "n_units", "n_errors", "fraction"])
    return Section(id="features-bases", title="Features: bases at equal budgets",
                   explanation=explanation, points=basis_points(table), figures=[fig],
                   tables=[Table(shown.round(4), caption="Faithfulness per basis, budget and "
                                                         "ablation (budget <NA>: the full basis)",
                                 max_rows=max(50, len(shown)))])


__all__ = ["ERROR_FLAG", "bases_section", "basis_points", "error_share_figure",
           "feature_circuit_section", "feature_graph_section", "features_section",
           "features_summary", "flagged_layers", "head_carriers", "interventions_section",
           "pairs_edge_table", "pairs_graph_points", "pairs_graph_section"]
