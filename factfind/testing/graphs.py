"""Synthetic circuit graphs of any size, for testing and timing what draws them.

:func:`synthetic_graph` builds a :class:`~factfind.graph.CircuitGraph` shaped like an
attribution graph of a deep model: heads and neurons spread over ``n_layers`` layers and the
five token roles, the embeddings and the logits, and edges that always run forward in the
forward pass, with heavy-tailed effects (a few strong edges, many weak ones) as EAP-IG finds.
Same arguments, same graph.

Example::

    g = synthetic_graph(n_nodes=10_000, n_edges=50_000, n_layers=80)   # the explorer's benchmark
"""

from __future__ import annotations

import numpy as np

from factfind.errors import ArgumentError
from factfind.graph import CircuitGraph, Node, Provenance
from factfind.types import Role

ROLES = tuple(str(r) for r in (Role.SUBJECT_FIRST, Role.SUBJECT, Role.SUBJECT_LAST,
                               Role.RELATION, Role.FINAL))


def synthetic_graph(n_nodes: int = 200, n_edges: int = 800, *, n_layers: int = 12,
                    n_heads: int = 8, seed: int = 0) -> CircuitGraph:
    """A forward-only scored graph with exactly ``n_nodes`` nodes and ``n_edges`` edges.

    Per layer, heads at the final token and at the last subject token come first (up to
    ``n_heads`` each), then neurons at every role; ``embed@<role>`` and ``logits@final``
    are among the ``n_nodes``. Every node touches at least one edge.

    Raises:
        ArgumentError: fewer nodes than the endpoints and one per layer, or more edges than
            a forward graph of that many nodes can hold, or fewer than one per node.
    """
    n_inner = n_nodes - len(ROLES) - 1
    if n_layers < 1 or n_inner < n_layers:
        raise ArgumentError(f"a synthetic graph needs n_layers >= 1 and n_nodes >= n_layers + "
                            f"{len(ROLES) + 1}, got n_nodes={n_nodes}, n_layers={n_layers}")
    if not n_nodes <= n_edges <= n_nodes * (n_nodes - 1) // 4:
        raise ArgumentError(f"n_edges must lie in [n_nodes, n_nodes^2/4], got {n_edges}")
    rng = np.random.default_rng(seed)
    per_layer = np.full(n_layers, n_inner // n_layers)
    per_layer[: n_inner % n_layers] += 1
    nodes: list[Node] = [Node("embed", -1, None, r) for r in ROLES]
    for layer, count in enumerate(per_layer.tolist()):
        heads = [Node("head", layer, h, role) for role in ("final", "subject_last")
                 for h in range(n_heads)][:count]
        neurons = [Node("neuron", layer, i // len(ROLES), ROLES[i % len(ROLES)])
                   for i in range(count - len(heads))]
        nodes += heads + neurons
    nodes.append(Node("logits", n_layers, None, "final"))
    layer = np.array([n.layer for n in nodes])
    order = np.argsort(layer, kind="stable")  # senders must precede receivers
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[order] = np.arange(len(nodes))
    first_of = {int(v): int(np.searchsorted(layer[order], v)) for v in np.unique(layer)}
    after = np.array([first_of.get(int(v) + 1, len(nodes)) if v < n_layers else len(nodes)
                      for v in layer])  # first rank of a later layer
    # every node touches an edge: each sends to a random later node (the logits receive)
    senders: list[int] = []
    receivers: list[int] = []
    for i in range(len(nodes) - 1):
        lo = after[i]
        j = order[rng.integers(lo, len(nodes))] if lo < len(nodes) else None
        if j is not None:
            senders.append(i)
            receivers.append(int(j))
    seen = set(zip(senders, receivers, strict=True))
    while len(seen) < n_edges:
        i = int(rng.integers(0, len(nodes)))
        if after[i] >= len(nodes):
            continue
        j = int(order[rng.integers(after[i], len(nodes))])
        seen.add((i, j))
    edges = sorted(seen)
    effect = rng.standard_t(2, size=len(edges)) * 0.05
    g = CircuitGraph(Provenance(model=f"synthetic-{n_layers}l", revision=None,
                                dataset=f"seed{seed}", method="synthetic"))
    out = np.zeros(len(nodes))
    for (i, _), e in zip(edges, effect.tolist(), strict=True):
        out[i] += e
    for node, score in zip(nodes, out.tolist(), strict=True):
        g.add_node(node, score=score)
    ids = [n.id for n in nodes]
    g.graph.add_edges_from(
        (ids[i], ids[j], {"score": e, "abs_score": abs(e), "sign": int(np.sign(e)),
                          "method": "synthetic"})
        for (i, j), e in zip(edges, effect.tolist(), strict=True))
    return g


__all__ = ["synthetic_graph"]
