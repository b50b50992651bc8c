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

Example::

    ga, gb = prune(to_graph(eap_ig(m1, p1), m1, p1), top_n=40), prune(..., top_n=40)
    compare_graphs(ga, gb)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import networkx as nx
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
