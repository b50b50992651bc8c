"""A single-prompt attribution graph out: a :class:`~factfind.graph.CircuitGraph`, and
circuit-tracer's graph JSON for its frontend.

**As a CircuitGraph** (:func:`to_circuit_graph`). factfind's nodes sit at position *roles*
(``L5.tc.f1234@subject_last``), so the graph's per-position nodes are grouped by role: the
features of one (layer, dictionary, feature) at two ``relation`` tokens become one node, with
their influence and their edges summed and their positions listed in ``positions``. Token
embeddings become ``embed@<role>`` and the logit nodes one ``logits@final`` node whose incoming
edges are the probability-weighted sums of the edges into each logit (circuit-tracer's logit
weights); its ``tokens`` attribute lists them. A node's score is its influence on the logits
(:func:`~factfind.features.linear_graph_prune.compute_influence`), an edge's its direct effect;
the method is ``linear_graph``. The result saves as GraphML or node-link JSON like any circuit
(:func:`factfind.graph.to_graphml`, :func:`factfind.graph.to_json`).

**As circuit-tracer's JSON** (:func:`to_circuit_tracer_json`), the file its frontend opens
(``circuit_tracer.utils.create_graph_files`` of circuit-tracer 0.5.0): ``{"metadata": {slug,
scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version}, "qParams":
{pinnedIds, supernodes, linkType, clickedId, sg_pos}, "nodes": [{node_id, feature, layer,
ctx_idx, feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp,
influence, activation}], "links": [{source, target, weight}]}`` with its node ids (feature
``{layer}_{feature}_{pos}``, error ``0_{layer}_{pos}``, embedding ``E_{token}_{pos}``, logit
``{n_layers + 1}_{token}_{pos}``), written beside a ``graph-metadata.json`` that lists the graphs
of the folder. Its scan is ``custom-...`` with one transcoder id per layer, as circuit-tracer
writes a graph over a list of transcoders. Note circuit-tracer's own id scheme: an error
``0_{layer}_{pos}`` and a layer-0 feature ``0_{feature}_{pos}`` share an id when ``feature ==
layer``; such a feature keeps its node and the error is written as ``0_{layer}_{pos}e``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from factfind.errors import ArgumentError, EmptyGraphError
from factfind.features.linear_graph import LinearGraph
from factfind.features.linear_graph_prune import (
    PruneResult,
    compute_influence,
    logit_weights,
    normalize_matrix,
)
from factfind.graph import CircuitGraph, Node, Provenance

METHOD = "linear_graph"


def _kept(lg: LinearGraph, pruned: PruneResult | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = lg.n_nodes
    if pruned is None:
        return torch.ones(n, dtype=torch.bool), lg.adjacency != 0
    if pruned.node_mask.shape != (n,):
        raise ArgumentError(f"the prune result has {pruned.node_mask.shape[0]} nodes, the graph "
                            f"{n}: prune this graph")
    return pruned.node_mask, pruned.edge_mask & (lg.adjacency != 0)


def _factfind_node(lg: LinearGraph, i: int) -> Node:
    if i < lg.n_features:
        la, p, f = lg.features[i].tolist()
        return Node("feature", int(la), int(f), lg.roles[int(p)], lg.dictionary[int(la)])
    if i < lg.n_features + lg.n_errors:
        la, p = divmod(i - lg.n_features, lg.n_pos)
        return Node("error", la, None, lg.roles[p], lg.dictionary[la])
    if i < lg.n_features + lg.n_errors + lg.n_pos:
        return Node("embed", -1, None, lg.roles[i - lg.n_features - lg.n_errors])
    return Node("logits", lg.n_layers, None, "final")


def to_circuit_graph(lg: LinearGraph, pruned: PruneResult | None = None, *,
                     labels: dict[str, str] | None = None,
                     revision: str | None = None) -> CircuitGraph:
    """The graph (its pruned part, given a prune result) as a :class:`CircuitGraph` over
    position roles (module docstring). ``labels`` maps node ids (``L5.tc.f12@final``) to
    labels; unlabelled features are labelled by their unit (``L5.tc.f12``). An empty graph is a
    one-line :class:`EmptyGraphError`."""
    node_mask, edge_mask = _kept(lg, pruned)
    if not bool(edge_mask.any()):
        raise EmptyGraphError("the attribution graph has no edges to export (an empty prompt, "
                              "or pruned to nothing: raise node_threshold / edge_threshold)")
    w = logit_weights(lg.n_nodes, lg.logit_probs)
    influence = compute_influence(normalize_matrix(lg.adjacency.float()), w) + w
    digest = hashlib.sha256(
        (lg.prompt + "|" + ",".join(map(str, lg.tokens.tolist()))).encode()).hexdigest()[:16]
    prov = Provenance(model=lg.model_name, revision=revision, dataset=digest, method=METHOD,
                      config={"prompt": lg.prompt, "dictionaries": lg.meta.get("dictionaries"),
                              "n_features": lg.n_features, "n_logits": lg.n_logits,
                              "pruned": pruned is not None})
    g = CircuitGraph(prov)
    ids = [_factfind_node(lg, i) for i in range(lg.n_nodes)]
    score: dict[str, float] = defaultdict(float)
    positions: dict[str, list[int]] = defaultdict(list)
    keep = node_mask.nonzero()[:, 0].tolist()
    pos_of = _positions(lg)
    for i in keep:
        nid = ids[i].id
        score[nid] += float(influence[i])
        if pos_of[i] not in positions[nid]:
            positions[nid].append(pos_of[i])
    for i in keep:
        node = ids[i]
        if node.id in g.graph:
            continue
        g.add_node(node, score=score[node.id], method=METHOD)
        attrs = g.graph.nodes[node.id]
        attrs["positions"] = ",".join(map(str, sorted(positions[node.id])))
        if node.kind in ("feature", "error"):
            unit = node.id.split("@")[0]
            attrs["label"] = (labels or {}).get(node.id, unit)
        elif node.kind == "embed":
            attrs["label"] = "".join(lg.token_strs[p] for p in sorted(positions[node.id]))
        else:
            attrs["tokens"] = json.dumps([[s, float(p)] for s, p in
                                          zip(lg.logit_strs, lg.logit_probs.tolist(),
                                              strict=True)])
            attrs["label"] = lg.logit_strs[0] if lg.logit_strs else ""
    weights: dict[tuple[str, str], float] = defaultdict(float)
    dst, src = edge_mask.nonzero(as_tuple=True)
    vals = lg.adjacency[dst, src].tolist()
    logit0 = lg.n_nodes - lg.n_logits
    for t, s, v in zip(dst.tolist(), src.tolist(), vals, strict=True):
        if not (node_mask[t] and node_mask[s]):
            continue
        weight = v * float(lg.logit_probs[t - logit0]) if t >= logit0 else v
        weights[(ids[s].id, ids[t].id)] += weight
    for (u, v), weight in weights.items():
        if u != v:
            g.add_edge(u, v, score=weight, method=METHOD)
    return g


def _positions(lg: LinearGraph) -> list[int]:
    out = lg.features[:, 1].tolist()
    out += [p for _ in range(lg.n_layers) for p in range(lg.n_pos)]
    out += list(range(lg.n_pos))
    out += [lg.n_pos - 1] * lg.n_logits
    return [int(p) for p in out]


# ----------------------------------------------------------------------------- circuit-tracer


def _process_token(token: str) -> str:
    """circuit-tracer's ``process_token``: newlines, tabs and returns made visible."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def circuit_tracer_graph(lg: LinearGraph, pruned: PruneResult | None = None, *,
                         slug: str = "factfind", node_threshold: float = 0.8) -> dict[str, Any]:
    """The graph as circuit-tracer 0.5's frontend JSON (a dict; module docstring): the nodes
    and links of ``pruned`` (default: circuit-tracer's own pruning at ``node_threshold`` and
    0.98), each node's influence being its cumulative influence rank, as circuit-tracer
    writes it."""
    if pruned is None:
        pruned = lg.prune(node_threshold=node_threshold)
    node_mask, edge_mask = _kept(lg, pruned)
    if not bool(edge_mask.any()):
        raise EmptyGraphError("the attribution graph has no edges to export (an empty prompt, "
                              "or pruned to nothing: raise node_threshold / edge_threshold)")
    cum = pruned.cumulative_scores
    L, P = lg.n_layers, lg.n_pos
    feature_ids = {f"{int(la)}_{int(f)}_{int(p)}" for la, p, f in lg.features.tolist()}
    nodes: dict[int, dict[str, Any]] = {}
    for i in node_mask.nonzero()[:, 0].tolist():
        base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                "reverse_ctx_idx": 0, "clerp": "", "influence": float(cum[i]),
                "activation": None}
        if i < lg.n_features:
            la, p, f = (int(x) for x in lg.features[i].tolist())
            nodes[i] = {**base, "node_id": f"{la}_{f}_{p}", "feature": _cantor(la, f),
                        "layer": str(la), "ctx_idx": p, "feature_type": "cross layer transcoder",
                        "jsNodeId": f"{la}_{f}-0", "activation": float(lg.activations[i])}
        elif i < lg.n_features + lg.n_errors:
            la, p = divmod(i - lg.n_features, P)
            nid = f"0_{la}_{p}"
            nodes[i] = {**base, "node_id": nid + ("e" if nid in feature_ids else ""),
                        "feature": -1, "layer": str(la), "ctx_idx": p,
                        "feature_type": "mlp reconstruction error", "jsNodeId": f"{la}_{p}-0"}
        elif i < lg.n_features + lg.n_errors + P:
            p = i - lg.n_features - lg.n_errors
            tok = int(lg.tokens[p])
            nodes[i] = {**base, "node_id": f"E_{tok}_{p}", "feature": p, "layer": "E",
                        "ctx_idx": p, "feature_type": "embedding", "jsNodeId": f"E_{tok}-{p}"}
        else:
            k = i - (lg.n_nodes - lg.n_logits)
            tok, prob = int(lg.logit_tokens[k]), float(lg.logit_probs[k])
            nodes[i] = {**base, "node_id": f"{L + 1}_{tok}_{P - 1}", "feature": tok,
                        "layer": str(L + 1), "ctx_idx": P - 1, "feature_type": "logit",
                        "token_prob": prob, "is_target_logit": k == 0,
                        "jsNodeId": f"L_{tok}-{P - 1}", "influence": None,
                        "clerp": f'Output "{_process_token(lg.logit_strs[k])}" (p={prob:.3f})'}
    dst, src = edge_mask.nonzero(as_tuple=True)
    weights = lg.adjacency[dst, src].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for s, t, w in zip(src.tolist(), dst.tolist(), weights, strict=True)
             if s in nodes and t in nodes]
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    transcoders = [f"factfind/{lg.model_name}/{lg.meta.get('dictionaries', 'dicts')}/"
                   f"L{la}.{lg.dictionary[la]}" for la in range(L)]
    scan = "custom-" + hashlib.sha256("-".join(transcoders).encode()).hexdigest()[:16]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": transcoders,
                "prompt_tokens": [_process_token(t) for t in lg.token_strs],
                "prompt": lg.prompt, "node_threshold": float(node_threshold),
                "schema_version": 1}
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q, "nodes": used, "links": links}


def to_circuit_tracer_json(lg: LinearGraph, folder: str | os.PathLike[str], *,
                           slug: str = "factfind", pruned: PruneResult | None = None,
                           node_threshold: float = 0.8) -> Path:
    """Write :func:`circuit_tracer_graph` as ``<folder>/<slug>.json`` and list it in
    ``<folder>/graph-metadata.json`` (what circuit-tracer's local server serves). Returns the
    graph file's path."""
    if not slug or any(c in slug for c in "/\\") or slug.startswith("."):
        raise ArgumentError(f"slug must be a plain file name, got {slug!r}")
    data = circuit_tracer_graph(lg, pruned, slug=slug, node_threshold=node_threshold)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{slug}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    meta_path = folder / "graph-metadata.json"
    listing = json.loads(meta_path.read_text()) if meta_path.exists() else {"graphs": []}
    listing["graphs"] = [g for g in listing.get("graphs", []) if g.get("slug") != slug]
    listing["graphs"].append(data["metadata"])
    tmp = meta_path.with_name(".graph-metadata.json.tmp")
    tmp.write_text(json.dumps(listing, indent=2))
    os.replace(tmp, meta_path)
    return path


__all__ = ["circuit_tracer_graph", "to_circuit_graph", "to_circuit_tracer_json"]
