"""Influence pruning and the replacement and completeness scores of an attribution graph, as
circuit-tracer computes them (``circuit_tracer/graph.py``: ``normalize_matrix``,
``compute_influence``, ``prune_graph``, ``compute_graph_scores``).

The graph is a square adjacency ``A[target, source]`` over the nodes in circuit-tracer's order:
active features, error nodes (layer-major, then position), token embeddings, logits. Rows of
sources that read nothing (errors, embeddings) are zero.

* **Influence.** Normalise each row of ``|A|`` to sum to 1 (a target's inputs as shares), and
  weight the logits by their probabilities ``w``. A node's influence on the output is the sum
  over all paths of the products of shares: ``w (Â + Â² + Â³ + ...)``; the graph is acyclic, so
  the series ends after at most depth terms.
* **Pruning.** Keep the nodes holding ``node_threshold`` (0.8) of the total influence (tokens
  and logits always), then the edges holding ``edge_threshold`` (0.98) of the edge influence
  ``Â[t, s] * (influence[t] + w[t])`` of the node-pruned graph; then drop, repeatedly, feature
  and error nodes left without an outgoing edge and features without an incoming one.
* **Replacement score**: of the influence that tokens and error nodes have on the logits, the
  share that is the tokens' (1 when everything flows through features).
* **Completeness score**: over all nodes, weighted by their influence plus logit weight, the
  share of each node's normalised inputs that does not come from error nodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from factfind.errors import ArgumentError, DegenerateResultError


def normalize_matrix(matrix: Tensor) -> Tensor:
    """``|A|`` with each row scaled to sum to 1 (rows of zeros stay zero)."""
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(A: Tensor, logit_weights: Tensor, max_iter: int = 1000) -> Tensor:
    """``w A + w A² + ...`` (exact for an acyclic graph: the terms reach zero)."""
    current = logit_weights @ A
    influence = current.clone()
    iterations = 0
    while current.any():
        if iterations >= max_iter:
            raise DegenerateResultError(f"influence did not converge after {iterations} "
                                        "iterations: the adjacency has a cycle")
        current = current @ A
        influence += current
        iterations += 1
    return influence


def find_threshold(scores: Tensor, threshold: float) -> Tensor:
    """The score above which the kept scores hold ``threshold`` of the total."""
    sorted_scores = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    index = min(int(torch.searchsorted(cumulative, threshold)), len(cumulative) - 1)
    return sorted_scores[index]


class PruneResult(NamedTuple):
    node_mask: Tensor          # [n] bool, nodes kept
    edge_mask: Tensor          # [n n] bool, edges kept (target, source)
    cumulative_scores: Tensor  # [n] each node's cumulative influence rank (0..1)


def logit_weights(n: int, logit_probs: Tensor) -> Tensor:
    w = torch.zeros(n, dtype=torch.float32)
    w[n - len(logit_probs):] = logit_probs.float()
    return w


def prune_graph(adjacency: Tensor, *, n_features: int, n_tokens: int, logit_probs: Tensor,
                node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's ``prune_graph`` on ``adjacency [n n]`` (see the module docstring)."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= float(t) <= 1.0:
            raise ArgumentError(f"{name} must be between 0 and 1, got {t}")
    A = adjacency.float()
    n = A.shape[0]
    n_logits = len(logit_probs)
    w = logit_weights(n, logit_probs)
    node_influence = compute_influence(normalize_matrix(A), w)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_matrix(pruned)
    influence = compute_influence(normalized, w) + w
    edge_scores = normalized * influence[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    old = node_mask.clone()
    node_mask[:-n_logits - n_tokens] &= edge_mask[:, :-n_logits - n_tokens].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)
    while not torch.all(node_mask == old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_logits - n_tokens] &= edge_mask[:, :-n_logits - n_tokens].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
    sorted_scores, order = torch.sort(node_influence, descending=True)
    cumulative = torch.cumsum(sorted_scores, dim=0) / torch.sum(sorted_scores)
    final = torch.zeros_like(node_influence)
    final[order] = cumulative
    return PruneResult(node_mask, edge_mask, final)


def graph_scores(adjacency: Tensor, *, n_features: int, n_errors: int, n_tokens: int,
                 logit_probs: Tensor) -> tuple[float, float]:
    """circuit-tracer's ``compute_graph_scores``: ``(replacement, completeness)``."""
    A = adjacency.float()
    n = A.shape[0]
    error_start, error_end = n_features, n_features + n_errors
    token_end = error_end + n_tokens
    w = logit_weights(n, logit_probs)
    normalized = normalize_matrix(A)
    influence = compute_influence(normalized, w)
    token_inf = influence[error_end:token_end].sum()
    error_inf = influence[error_start:error_end].sum()
    if float(token_inf + error_inf) <= 0:
        raise DegenerateResultError("no influence reaches the logits from tokens or errors: "
                                    "the graph has no path from the input to the output")
    replacement = token_inf / (token_inf + error_inf)
    non_error = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    out = influence + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)


__all__ = ["PruneResult", "compute_influence", "find_threshold", "graph_scores", "logit_weights",
           "normalize_matrix", "prune_graph"]
