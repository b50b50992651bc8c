"""Universality: do two models recall facts with the same circuit?

**Universality** (Olah et al. 2020, "Zoom in"; Chughtai, Chan & Nanda 2023; Gurnee et al.
2024, "Universal neurons") is the claim that different models trained on similar data learn
the same features and circuits. For fact recall it asks whether two models - organisms trained
from different seeds, two checkpoints, two sizes - both look facts up in MLPs at the subject's
last token and move them with heads at the final token, at the same relative depth.

Unit indices are not comparable across models (head 2 of one seed is not head 2 of another),
so nodes of :class:`~factfind.graph.CircuitGraph` s are compared by their **role signature**:
``(layer fraction bin, kind, position role)`` - the node's depth as a fraction of the model's
(``(layer + 0.5) / n_layers`` cut into ``bins``), its component kind (head, mlp, neuron,
attn, resid) and the token role it sits at. :func:`compare_graphs` returns one row per measure:

* ``nodes/id`` and ``edges/id``: Jaccard overlap of the node and edge ids themselves
  (:func:`factfind.graph.compare`; meaningful between models of one architecture);
* ``nodes/signature``, ``nodes/layer_fraction``, ``nodes/kind``, ``nodes/role`` and
  ``edges/signature``: the *weighted* Jaccard of the two multisets of signatures (or of one of
  their parts), ``sum_s min(a_s, b_s) / sum_s max(a_s, b_s)`` over the counts ``a_s``, ``b_s``;
* ``graph_edit_similarity``: ``1 - GED / (|V_a| + |E_a| + |V_b| + |E_b|)``, where the graph
  edit distance (:func:`networkx.graph_edit_distance`, with a timeout) may only match nodes of
  equal signature (deleting and inserting every node and edge costs the denominator), so
  identical graphs score 1 and graphs with no signature in common score 0. When the search
  times out, the best edit path found is used (an upper bound on the distance: ``ged_exact``
  says which). The greedy signature matching seeds the search as its upper bound.

:func:`signature_counts` lists the counts side by side, for the report.

**Across models of different sizes** the fact-recall measurements themselves are compared on
relative depth, ``layer / (n_layers - 1)`` (:func:`layer_depth`, the findings table's
convention): :func:`model_measures` reads one model's literature findings, knockout and pruned
circuit into one row per :data:`MEASURES` entry (ROME's early and late sites, Geva's knockout
peak and centroid, Fact Finding's effective-model and probe onsets, the circuit's median depth
and its size at faithfulness 0.9); :func:`agreement` says, per measure, which models sit
earliest and latest and whether they agree within :data:`AGREE_WITHIN`;
:func:`circuit_composition` counts a circuit's kinds (heads, neurons, ...) and
:func:`node_signature_similarity` compares circuits given as node lists by signature.

Example::

    ga, gb = prune(to_graph(eap_ig(m1, p1), m1, p1), top_n=40), prune(..., top_n=40)
    compare_graphs(ga, gb)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from factfind.graph import CircuitGraph, Node, compare
from factfind.results import tidy

ENDPOINT_BIN = {"embed": "in", "logits": "out"}


def n_layers_of(graph: CircuitGraph) -> int:
    """The model depth a graph implies: its logits node's layer, else the deepest layer + 1."""
    nodes = graph.nodes()
    logits = [n.layer for n in nodes if n.kind == "logits"]
    return logits[0] if logits else max((n.layer for n in nodes), default=-1) + 1


def signature(node: Node, n_layers: int, *, bins: int = 4) -> tuple[str, str, str]:
    """``(layer fraction bin, kind, role)``; the bin is ``"q1".."q<bins>"`` of the depth, or
    ``"in"`` / ``"out"`` for the embeddings and logits."""
    if node.kind in ENDPOINT_BIN:
        return ENDPOINT_BIN[node.kind], node.kind, node.role
    frac = (node.layer + 0.5) / max(1, n_layers)
    return f"q{min(bins, int(frac * bins) + 1)}", node.kind, node.role


def _signatures(graph: CircuitGraph, bins: int) -> dict[str, tuple[str, str, str]]:
    n = n_layers_of(graph)
    return {node.id: signature(node, n, bins=bins) for node in graph.nodes()}


def _weighted_jaccard(a: Counter, b: Counter) -> tuple[float, int, int, int]:
    keys = set(a) | set(b)
    shared = sum(min(a[k], b[k]) for k in keys)
    either = sum(max(a[k], b[k]) for k in keys)
    return (shared / either if either else 1.0), sum(a.values()), sum(b.values()), shared


def _greedy_mapping(sa: Mapping[str, Hashable], sb: Mapping[str, Hashable],
                    score_a: dict[str, float], score_b: dict[str, float]) -> dict[str, str]:
    """Match nodes of equal signature, strongest |score| with strongest."""
    pool: dict[Hashable, list[str]] = {}
    for v in sorted(sb, key=lambda x: -abs(score_b.get(x, 0.0))):
        pool.setdefault(sb[v], []).append(v)
    out = {}
    for u in sorted(sa, key=lambda x: -abs(score_a.get(x, 0.0))):
        if pool.get(sa[u]):
            out[u] = pool[sa[u]].pop(0)
    return out


def _mapping_cost(ga: nx.DiGraph, gb: nx.DiGraph, mapping: dict[str, str]) -> float:
    """Edit cost of a node mapping: unmatched nodes and unpreserved edges cost 1 each."""
    nodes = (ga.number_of_nodes() - len(mapping)) + (gb.number_of_nodes() - len(mapping))
    kept = sum(1 for u, v in ga.edges if u in mapping and v in mapping
               and gb.has_edge(mapping[u], mapping[v]))
    return nodes + (ga.number_of_edges() - kept) + (gb.number_of_edges() - kept)


def graph_edit_similarity(a: CircuitGraph, b: CircuitGraph, *, bins: int = 4,
                          timeout: float = 5.0) -> dict[str, Any]:
    """``1 - GED / (|V_a| + |E_a| + |V_b| + |E_b|)`` with nodes matched by signature only
    (module docstring). Returns ``similarity``, ``ged``, ``ged_exact`` and ``seconds``."""
    sa, sb = _signatures(a, bins), _signatures(b, bins)
    ga, gb = nx.DiGraph(), nx.DiGraph()
    ga.add_nodes_from((n, {"sig": s}) for n, s in sa.items())
    gb.add_nodes_from((n, {"sig": s}) for n, s in sb.items())
    ga.add_edges_from(a.graph.edges)
    gb.add_edges_from(b.graph.edges)
    total = (ga.number_of_nodes() + ga.number_of_edges() + gb.number_of_nodes()
             + gb.number_of_edges())
    if total == 0:
        return {"similarity": 1.0, "ged": 0.0, "ged_exact": True, "seconds": 0.0}
    scores = [{n: float(g.graph.nodes[n].get("score", 0.0)) for n in g.graph} for g in (a, b)]
    bound = _mapping_cost(ga, gb, _greedy_mapping(sa, sb, *scores))
    if bound == 0 or not set(sa.values()) & set(sb.values()):  # nothing left to search
        return {"similarity": 1.0 - bound / total, "ged": float(bound), "ged_exact": True,
                "seconds": 0.0}
    t0 = time.monotonic()
    ged = nx.graph_edit_distance(
        ga, gb,
        # a substitution across signatures costs more than deleting and inserting (never used)
        node_subst_cost=lambda x, y: 0.0 if x["sig"] == y["sig"] else 3.0,
        node_del_cost=lambda x: 1.0, node_ins_cost=lambda x: 1.0,
        edge_subst_cost=lambda x, y: 0.0, edge_del_cost=lambda x: 1.0,
        edge_ins_cost=lambda x: 1.0, upper_bound=bound, timeout=timeout)
    seconds = time.monotonic() - t0
    best = bound if ged is None else min(float(ged), bound)
    return {"similarity": 1.0 - best / total, "ged": best, "ged_exact": seconds < 0.95 * timeout,
            "seconds": seconds}


def compare_graphs(a: CircuitGraph, b: CircuitGraph, *, bins: int = 4, timeout: float = 5.0,
                   names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Overlap of two circuit graphs by id, by role signature and by graph edit distance.

    Args:
        bins: layer-fraction bins of the signature (4: quarters of the depth).
        timeout: seconds for the graph edit distance search.
        names: labels of the two graphs (columns ``graph_a``, ``graph_b``).

    Returns:
        One row per measure (module docstring): ``method="universality"``, ``measure``,
        ``effect`` (the similarity in [0, 1]), ``count_a``, ``count_b``, ``shared`` and, for the
        graph edit distance, ``ged`` and ``ged_exact``.
    """
    ids = compare(a, b, allow_mismatch=True)
    rows: list[dict[str, Any]] = [
        {"measure": f"{what}/id", "effect": ids[f"{what}_jaccard"], "count_a": ids[f"{what}_a"],
         "count_b": ids[f"{what}_b"], "shared": ids[f"{what}_shared"]}
        for what in ("nodes", "edges")]
    sa, sb = _signatures(a, bins), _signatures(b, bins)
    parts = {"signature": slice(0, 3), "layer_fraction": slice(0, 1), "kind": slice(1, 2),
             "role": slice(2, 3)}
    for name, sl in parts.items():
        j, na, nb, shared = _weighted_jaccard(Counter(s[sl] for s in sa.values()),
                                              Counter(s[sl] for s in sb.values()))
        rows.append({"measure": f"nodes/{name}", "effect": j, "count_a": na, "count_b": nb,
                     "shared": shared})
    j, na, nb, shared = _weighted_jaccard(
        Counter((sa[u], sa[v]) for u, v in a.graph.edges),
        Counter((sb[u], sb[v]) for u, v in b.graph.edges))
    rows.append({"measure": "edges/signature", "effect": j, "count_a": na, "count_b": nb,
                 "shared": shared})
    ged = graph_edit_similarity(a, b, bins=bins, timeout=timeout)
    rows.append({"measure": "graph_edit_similarity", "effect": ged["similarity"],
                 "count_a": len(a) + a.graph.number_of_edges(),
                 "count_b": len(b) + b.graph.number_of_edges(), "ged": ged["ged"],
                 "ged_exact": ged["ged_exact"]})
    df = tidy([{"method": "universality", **r} for r in rows])
    df["graph_a"], df["graph_b"] = names
    return df


def signature_counts(graphs: Iterable[tuple[str, CircuitGraph]], *, bins: int = 4
                     ) -> pd.DataFrame:
    """Node counts per role signature, one column per named graph (a side-by-side table)."""
    cols = {}
    for name, g in graphs:
        cols[name] = Counter(_signatures(g, bins).values())
    keys = sorted(set().union(*cols.values()))
    return pd.DataFrame([{"layer_fraction": k[0], "kind": k[1], "role": k[2],
                          **{name: c[k] for name, c in cols.items()}} for k in keys])


# ----------------------------------------------------------------------------- across models
# The same fact-recall measurements on several models, side by side on relative depth: where
# ROME's sites and Geva's knockout peak, when Fact Finding's effective model and probe set in,
# how large and of what kinds the circuit at faithfulness 0.9 is (analyses/universality.py).

AGREE_WITHIN = 0.15
"""Two depths "agree" when they differ by at most this (0.15 of the depth: about 2 of 18
layers, 4 of 30, and less than one of the organism's 4)."""

FINDING_MEASURES = {
    "ROME early site": "early site",
    "ROME late site": "late site",
    "Geva knockout: final -> subject": "knockout centroid",
    "Fact Finding effective model": "effective model onset",
    "Fact Finding probe by layer": "probe onset",
}
"""The literature finding (:mod:`factfind.report.findings`) each depth measure is read from."""

MEASURES = {
    "early site": "causal tracing: the layer whose MLP window at the last subject token restores "
                  "the answer most (ROME's early site)",
    "late site": "causal tracing: the layer whose attention window at the final token restores "
                 "the answer most (ROME's late site)",
    "knockout peak": "attention knockout: the window start whose final -> subject block drops "
                     "p(answer) most (Geva et al.)",
    "knockout centroid": "attention knockout: the damage-weighted mean window start of the "
                         "final -> subject block",
    "effective model onset": "the smallest k from which attention at the subject can be "
                             "mean-ablated keeping 90% of the accuracy (Fact Finding)",
    "probe onset": "the first layer where a linear probe at the last subject token reaches 90% "
                   "of its best held-out accuracy (Fact Finding)",
    "circuit depth": "the median layer of the nodes of the pruned circuit at F >= 0.9",
    "circuit size": "nodes (head or neuron x token role) of the pruned circuit at F >= 0.9; "
                    "value: share of all such nodes",
}
"""Every measure of :func:`model_measures`, in table order, with its definition."""

MEASURE_COLUMNS = ("model", "measure", "layer", "n_layers", "depth", "value", "holds",
                   "detail")


def layer_depth(layer: float, n_layers: int) -> float:
    """Relative depth ``layer / (n_layers - 1)``: 0 for the first layer, 1 for the last (the
    convention of :mod:`factfind.report.findings`, so one layer has one depth in a report)."""
    return float(layer) / max(1, n_layers - 1)


def circuit_nodes_of(path: pd.DataFrame, n_layers: int) -> list[Node]:
    """The nodes of a pruning search's result (:func:`~factfind.evaluate.prune_circuit`: the
    last accepted row's ``;``-joined ids)."""
    accepted = path.loc[path["accepted"].to_numpy(dtype=bool)]
    if accepted.empty or not str(accepted["nodes"].iloc[-1]):
        return []
    return [Node.parse(i, n_layers=n_layers) for i in str(accepted["nodes"].iloc[-1]).split(";")]


def _measure(model: str, measure: str, n_layers: int, *, layer: float | None = None,
             value: float | None = None, holds: bool | None = None, detail: str = ""
             ) -> dict[str, Any]:
    at = float("nan") if layer is None or pd.isna(layer) else float(layer)
    return {"model": model, "measure": measure, "layer": at, "n_layers": n_layers,
            "depth": float("nan") if np.isnan(at) else round(layer_depth(at, n_layers), 3),
            "value": float("nan") if value is None or pd.isna(value) else float(value),
            "holds": holds, "detail": detail}


def _knockout_peak(knockout: pd.DataFrame | None) -> tuple[float | None, float | None, str]:
    """The window start of the largest final -> subject drop in an aggregated knockout table."""
    if knockout is None or knockout.empty:
        return None, None, "not measured"
    rows = knockout.loc[(knockout["role"].astype(str) == "subject").to_numpy()]
    if rows.empty:
        return None, None, "no final -> subject knockout"
    curve = rows.groupby("layer")["effect"].mean()
    drop = -float(curve.min())
    if not drop > 0:
        return None, drop, "blocking final -> subject never lowers p(answer)"
    layer = int(curve.idxmin())
    return layer, drop, f"p(answer) drops {drop:.1%} blocking from layer {layer}"


def model_measures(model: str, n_layers: int, findings: pd.DataFrame, *,
                   knockout: pd.DataFrame | None = None, circuit: pd.DataFrame | None = None,
                   target: float = 0.9, max_rounds: int | None = None) -> pd.DataFrame:
    """One model's row per :data:`MEASURES` entry, on relative depth (:func:`layer_depth`).

    Args:
        model: the label of the model in the tables.
        n_layers: its depth.
        findings: :func:`~factfind.report.findings.literature_findings` of the model (the
            sites, the knockout centroid, the effective model and the probe onset are read
            from it, with its ``holds`` and its ``measured`` text as ``detail``).
        knockout: the aggregated attention knockout (for the peak: the window start of the
            largest final -> subject drop; ``value`` is the drop).
        circuit: the path of :func:`~factfind.evaluate.prune_circuit` (the last accepted row
            is the circuit; ``holds`` says whether it keeps ``F >= target``). A search that
            accepted no smaller circuit gives no size or depth (the whole model is no
            circuit); one that ran ``max_rounds`` says its size is an upper bound.

    Returns:
        :data:`MEASURE_COLUMNS`; ``layer``/``depth`` NaN where a measure has no layer (not
        measurable, or no circuit), ``detail`` says why.
    """
    by_finding = {r["finding"]: r for r in findings.to_dict("records")}
    rows: dict[str, dict[str, Any]] = {}
    for finding, measure in FINDING_MEASURES.items():
        r = by_finding.get(finding)
        if r is None:
            rows[measure] = _measure(model, measure, n_layers, detail="not measured")
            continue
        holds = None if r["holds"] is None or pd.isna(r["holds"]) else bool(r["holds"])
        layer = r["layer"]
        if measure in ("early site", "late site") and not (r["value"] is not None
                                                          and float(r["value"]) > 0):
            layer = None  # no restoration anywhere: the argmax of the curve is no site
        rows[measure] = _measure(model, measure, n_layers, layer=layer, value=r["value"],
                                 holds=holds, detail=str(r["measured"]))
    layer, drop, detail = _knockout_peak(knockout)
    rows["knockout peak"] = _measure(model, "knockout peak", n_layers, layer=layer, value=drop,
                                     detail=detail)
    rows.update(_circuit_measures(model, n_layers, circuit, target=target,
                                  max_rounds=max_rounds))
    return pd.DataFrame([rows[m] for m in MEASURES], columns=list(MEASURE_COLUMNS))


def _circuit_measures(model: str, n_layers: int, circuit: pd.DataFrame | None, *,
                      target: float, max_rounds: int | None) -> dict[str, dict[str, Any]]:
    """``circuit size`` and ``circuit depth`` from a pruning path (see :func:`model_measures`)."""
    if circuit is None or circuit.empty:
        return {m: _measure(model, m, n_layers, detail="not measured")
                for m in ("circuit size", "circuit depth")}
    accepted = circuit.loc[circuit["accepted"].to_numpy(dtype=bool)]
    last = accepted.iloc[-1]
    start = int(circuit["size"].iloc[0])
    rounds = int(circuit["round"].to_numpy().max())
    if int(last["size"]) >= start:  # nothing accepted after the whole model
        trials = circuit.iloc[1:]
        best = trials.iloc[int(np.argmax(trials["faithfulness"].to_numpy(dtype=float)))] \
            if len(trials) else None
        why = (f"no smaller circuit: none of {len(trials)} trial circuits kept faithfulness "
               f">= {target:g}" + (f" (best {float(best['faithfulness']):.2f} at "
                                   f"{int(best['size']):,} of {start:,} nodes)"
                                   if best is not None else ""))
        return {m: _measure(model, m, n_layers, detail=why)
                for m in ("circuit size", "circuit depth")}
    f = float(last["faithfulness"])
    bound = max_rounds is not None and rounds >= max_rounds
    detail = (f"{int(last['size']):,} of {start:,} nodes ({float(last['fraction']):.2%}) at "
              f"faithfulness {f:.2f} after {rounds} rounds"
              + ("; the search hit its round limit, so this is an upper bound" if bound else ""))
    nodes = circuit_nodes_of(circuit, n_layers)
    med = float(np.median([v.layer for v in nodes])) if nodes else None
    return {"circuit size": _measure(model, "circuit size", n_layers,
                                     value=float(last["fraction"]), holds=f >= target,
                                     detail=detail),
            "circuit depth": _measure(model, "circuit depth", n_layers, layer=med,
                                      value=float(len(nodes)),
                                      detail=f"median layer {med:g} of {len(nodes):,} nodes"
                                      if med is not None else "the circuit has no nodes")}


def circuit_composition(model: str, nodes: Sequence[Node], n_layers: int) -> pd.DataFrame:
    """The kinds of a circuit's components: one row per kind (head, mlp, neuron, feature, ...)
    with ``nodes``, ``share`` of the circuit, distinct ``layers`` it occupies (for neurons: the
    MLP layers), ``median_depth`` and its most common token ``role``."""
    rows = []
    total = len(nodes)
    for kind in sorted({v.kind for v in nodes}):
        of = [v for v in nodes if v.kind == kind]
        layers = [v.layer for v in of]
        rows.append({"model": model, "kind": kind, "nodes": len(of), "share": len(of) / total,
                     "layers": len(set(layers)),
                     "median_depth": round(layer_depth(float(np.median(layers)), n_layers), 3),
                     "role": Counter(v.role for v in of).most_common(1)[0][0]})
    return pd.DataFrame(rows, columns=["model", "kind", "nodes", "share", "layers",
                                       "median_depth", "role"])


def node_signature_similarity(circuits: Mapping[str, tuple[Sequence[Node], int]], *,
                              bins: int = 4) -> pd.DataFrame:
    """Every pair of circuits given as ``{model: (nodes, n_layers)}`` compared by the weighted
    Jaccard of their node signatures (:func:`signature`: depth quarter, kind, role) and of each
    part, as :func:`compare_graphs`' ``nodes/...`` rows (columns ``graph_a``, ``graph_b``,
    ``measure``, ``effect``, ``count_a``, ``count_b``, ``shared``). Unit indices never enter,
    so circuits of models of any size compare."""
    sigs = {m: [signature(v, n, bins=bins) for v in nodes] for m, (nodes, n) in circuits.items()}
    parts = {"signature": slice(0, 3), "layer_fraction": slice(0, 1), "kind": slice(1, 2),
             "role": slice(2, 3)}
    rows = []
    names = list(sigs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for part, sl in parts.items():
                j, na, nb, shared = _weighted_jaccard(Counter(s[sl] for s in sigs[a]),
                                                      Counter(s[sl] for s in sigs[b]))
                rows.append({"graph_a": a, "graph_b": b, "measure": f"nodes/{part}",
                             "effect": j, "count_a": na, "count_b": nb, "shared": shared})
    return pd.DataFrame(rows, columns=["graph_a", "graph_b", "measure", "effect", "count_a",
                                       "count_b", "shared"])


def agreement(measures: pd.DataFrame, *, within: float = AGREE_WITHIN,
              among: Sequence[str] | None = None) -> pd.DataFrame:
    """Where models agree: per depth measure of :func:`model_measures` rows (several models),
    the models that have it, the ``earliest`` and ``latest`` of them with their depths, the
    ``spread`` (latest - earliest) and ``agree`` (``spread <= within``). The circuit size is
    compared by the ratio of the largest to the smallest share (``ratio``; ``agree`` when it is
    at most 2). A measure fewer than two models have gets ``agree`` None. ``among``: only
    these models are compared (a reference model is shown beside them, not in the spread)."""
    if among is not None:
        measures = measures.loc[measures["model"].isin(list(among)).to_numpy()]
    rows = []
    for measure in MEASURES:
        m = measures.loc[(measures["measure"] == measure).to_numpy()]
        col = "value" if measure == "circuit size" else "depth"
        have = m.loc[m[col].notna().to_numpy()]
        row: dict[str, Any] = {"measure": measure, "models": len(have),
                               "missing": ", ".join(m.loc[m[col].isna().to_numpy(), "model"]
                                                    .astype(str))}
        if have.empty:
            rows.append({**row, "agree": None})
            continue
        order = have.sort_values(col, kind="stable")
        lo, hi = order.iloc[0], order.iloc[-1]
        row.update(earliest=lo["model"], earliest_value=float(lo[col]), latest=hi["model"],
                   latest_value=float(hi[col]), spread=float(hi[col]) - float(lo[col]))
        if measure == "circuit size":
            ratio = float(hi[col]) / float(lo[col]) if float(lo[col]) > 0 else float("inf")
            row.update(ratio=ratio, agree=bool(ratio <= 2.0) if len(have) > 1 else None)
        else:
            row.update(agree=bool(row["spread"] <= within) if len(have) > 1 else None)
        rows.append(row)
    return pd.DataFrame(rows, columns=["measure", "models", "agree", "earliest",
                                       "earliest_value", "latest", "latest_value", "spread",
                                       "ratio", "missing"])
