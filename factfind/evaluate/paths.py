"""Proportion explained: a circuit graph as a hypothesis about *paths* (Goldowsky-Dill et al.
2023, "Localizing Model Behavior with Path Patching").

Node ablation (:mod:`factfind.evaluate.engine`) asks whether a *set of components* suffices.
A graph says more: which component reads which. Edge-level path patching tests that: the model
runs with every edge of the graph ``H`` carrying the clean (recomputed) value of its sender and
every edge outside it the corrupt value, and the proportion explained is
``(m(H) - m(corrupt)) / (m(clean) - m(corrupt))``: 1 for the complete graph, 0 for the empty
one. For the graph induced by a node set it equals resample faithfulness on the pairs; the
tests check that.

The run goes layer by layer on the corrupt stream: each node of ``H`` is recomputed from the
corrupt residual stream plus what its incoming edges' senders change in it, one copy of the
batch per head node, each copy resuming the cached corrupt run at its layer; the logits read
the corrupt final stream plus the changes of their incoming edges. A sender's "value along
``H``" is its head's ``z`` or its MLP's neurons as recomputed (corrupt where nothing in ``H``
feeds it). What a receiver's senders change is
:func:`~factfind.edges.placement.set_changes` of those values against the corrupt run: by
linearity a sum of per-unit writes, except through a post norm (Gemma 2/3, OLMo 2, EXAONE 4),
which divides by the rms of a whole sublayer's output: there the change is the sublayer's
write with the senders' units along ``H`` and every other unit corrupt, minus its corrupt
write. :func:`proportion_explained_reference` is the literal recipe, one forward per
receiver with every upstream site pinned; the tests hold the two equal on every family.

Example::

    proportion_explained(model, pairs, prune(eap_graph, top_n=30))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.data.batch import encode_pairs
from factfind.edges.placement import Placed, is_parallel, node_mask, set_changes, unit_mask
from factfind.evaluate.engine import CircuitLike, circuit_nodes
from factfind.graph import ENDPOINTS, CircuitGraph, Node, feeds, stage
from factfind.metrics import logit_diff, share
from factfind.model.incremental import first_position
from factfind.types import Component, Metric, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.model.incremental import Prefix


def _edges(model: Model, circuit: CircuitLike, roles: Sequence[str]) -> set[tuple[Node, Node]]:
    """The graph's edges, or for a node set the edges it induces with every embedding and the
    logits."""
    parallel = is_parallel(model)
    if isinstance(circuit, CircuitGraph) and circuit.graph.number_of_edges():
        return {(circuit.node(u), circuit.node(v)) for u, v in circuit.graph.edges}
    inner = circuit_nodes(model, circuit, roles)
    nodes = sorted(inner) + [Node("embed", -1, None, r) for r in roles] + [
        Node("logits", model.n_layers, None, "final")]
    return {(u, v) for u in nodes for v in nodes if feeds(u, v, parallel)}


@validated
def proportion_explained(model: Model, pairs: FactPairs, circuit: CircuitLike, *,
                         metric: Metric | None = None, batch_size: int = 16) -> float:
    """The proportion of the clean-corrupt effect a path hypothesis explains (Goldowsky-Dill et
    al. 2023): ``(m(H) - m(corrupt)) / (m(clean) - m(corrupt))``, where ``m(H)`` runs the model
    with every edge of the graph ``H`` carrying its sender's value in this run (computed from
    the clean input along ``H``'s paths) and every other edge its sender's corrupt value.

    Args:
        circuit: a :class:`~factfind.graph.CircuitGraph` (its edges), or nodes (the edges they
            induce, with the embeddings and the logits).

    Returns:
        The proportion (1 for the complete graph, 0 for the empty one).
    """
    return _proportion(model, pairs, circuit, metric or logit_diff, batch_size,
                       _edge_patched_metric)


@validated
def proportion_explained_reference(model: Model, pairs: FactPairs, circuit: CircuitLike, *,
                                   metric: Metric | None = None, batch_size: int = 16) -> float:
    """:func:`proportion_explained` by the literal recipe (slow, exact reference): one forward
    per receiver node, on the corrupt input, with every head's ``z``, every MLP's neurons and
    the embeddings upstream of the receiver pinned to their corrupt values except the units
    and positions of the receiver's senders in ``H``, pinned to their values along ``H``; the
    model itself then computes the receiver (post norms, softcaps and all). The logits are one
    more such forward with the senders into the logits."""
    return _proportion(model, pairs, circuit, metric or logit_diff, batch_size,
                       _edge_patched_metric_reference)


def _proportion(model: Model, pairs: FactPairs, circuit: CircuitLike, metric: Metric,
                batch_size: int, m_of_h: Any) -> float:
    pb_all = encode_pairs(model, pairs)
    roles = pb_all.clean.roles_present()
    edges = _edges(model, circuit, roles)
    n = len(pairs)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        clean, bad = pb_all.clean.take(idx), pb_all.corrupt.take(idx)
        correct, wrong = pb_all.correct[idx], pb_all.wrong[idx]
        m_h = m_of_h(model, clean, bad, edges, correct, wrong, metric)
        m_c = metric(model.run(clean).logits, correct, wrong)
        m_k = metric(model.run(bad).logits, correct, wrong)
        sums += torch.stack([m_h.double().sum(), m_c.double().sum(), m_k.double().sum()]).cpu()
    m_h, m_c, m_k = (float(x) / n for x in sums)
    return share(m_h, m_k, m_c, what="the proportion explained")


def _record(along: dict[SiteKey, Tensor], p: Placed, value: Tensor, model: Model) -> None:
    """Write a recomputed node's values (its units at its positions, from ``value``, the
    node's own run of its site) into the table of every unit's value along ``H``. Nodes
    recorded later win where they overlap (a neuron node over its MLP node)."""
    m = unit_mask(model, p).to(value.device)
    shape = (*m.shape, *([1] * (value.dim() - m.dim())))
    along[p.key] = torch.where(m.reshape(shape), value, along[p.key])


def _edge_patched_metric(model: Model, clean: TokenBatch, bad: TokenBatch,
                         edges: set[tuple[Node, Node]], correct: Tensor, wrong: Tensor,
                         metric: Metric) -> Tensor:
    """``m(H)`` per prompt: layer by layer, each node of ``H`` recomputed from the corrupt
    stream plus what its incoming edges' senders change in it.

    ``along`` holds every head's ``z`` and every MLP's neurons at their values along ``H``
    (corrupt where no node of ``H`` recomputed them). A receiver's senders change the stream
    by :func:`~factfind.edges.placement.set_changes` of ``along`` against the corrupt run with
    those senders' units: per layer, a sum of per-unit writes, or in post-norm families the
    layer's write with the senders' units along ``H`` and the rest corrupt, minus the corrupt
    write (the norm divides by the rms of the mix, so per-unit writes at any frozen scale are
    not exact there)."""
    L, parallel = model.n_layers, is_parallel(model)
    labels = clean.role_labels()
    keys = [(Component.EMBED, 0)] + [(c, layer) for layer in range(L) for c in (
        Component.Z, Component.MLP_OUT, Component.NEURONS, Component.RESID_PRE,
        Component.ATTN_OUT, Component.RESID_POST)]
    prefix = model.base_run(bad, save=keys)  # the corrupt run, resumable at any layer
    ref = prefix.acts
    cl = model.run(clean, save=[(Component.EMBED, 0)]).acts
    along = {k: ref[k] for k in keys if k[0] in (Component.Z, Component.NEURONS)}
    along[(Component.EMBED, 0)] = cl[(Component.EMBED, 0)]
    placed: dict[Node, Placed] = {}
    cache: dict[Any, Tensor] = {}  # set_changes' per-layer terms; a layer is final when read

    def place(n: Node) -> Placed:
        if n not in placed:
            placed[n] = Placed(n.kind, n.layer, n.index, node_mask(clean, n.role, labels))
        return placed[n]

    into: dict[Node, list[Node]] = {}
    for u, v in edges:
        into.setdefault(v, []).append(u)

    def incoming(v: Node, below: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The senders' change to the stream ``v`` reads: ``(into resid_pre, into attn_out)``,
        the second only from heads of ``v``'s own layer (sequential MLP receivers)."""
        x = torch.zeros_like(ref[(Component.RESID_PRE, 0)])
        y = torch.zeros_like(x)
        senders = [place(u) for u in into.get(v, []) if stage(u.kind, u.layer, parallel) < below
                   and (u.kind == "embed" or u in into)]  # no inputs in H: its corrupt value
        for kind, layer, d in set_changes(model, along, ref, senders, cache):
            if kind == "head" and layer == v.layer and v.kind in ("mlp", "neuron"):
                y = y + d.to(y.dtype)
            else:
                x = x + d.to(x.dtype)
        return x, y

    for layer in range(L):
        here = sorted({v for v in into if v.kind not in ENDPOINTS and v.layer == layer})
        heads = [v for v in here if v.kind in ("head", "attn")]
        mlps = [v for v in here if v.kind in ("mlp", "neuron")]
        # sequential blocks: the MLP reads this layer's heads, so they run first
        for stage_nodes in ([heads + mlps] if parallel else [heads, mlps]):
            if stage_nodes:
                _run_stage(model, prefix, layer, stage_nodes, place, incoming, along)
    final = Node("logits", L, None, "final")
    x = ref[(Component.RESID_POST, L - 1)] + incoming(final, (L, 3))[0]
    logits = model.run_from(prefix, start=(L - 1, prefix.n_pos - 1),  # the last norm only
                            edits={(Component.RESID_POST, L - 1): _constant(x)}).logits
    return metric(logits, correct, wrong)


def _run_stage(model: Model, prefix: Prefix, layer: int, here: list[Node], place: Any,
               incoming: Any, along: dict[SiteKey, Tensor]) -> None:
    """Recompute the nodes ``here`` of one layer (one copy of the batch per head node, one per
    neuron index, one for all MLP nodes) and record their values along ``H``. The copies
    resume the corrupt run at this layer and at the first position their inputs change
    (:meth:`~factfind.model.Model.run_from`): nothing before either differs from it."""
    parallel = is_parallel(model)
    ref = prefix.acts
    copies: list[list[Node]] = [[v] for v in here if v.kind in ("head", "attn")]
    mlps = [v for v in here if v.kind == "mlp"]
    if mlps:
        copies.append(mlps)
    for k in sorted({v.index or 0 for v in here if v.kind == "neuron"}):
        copies.append([v for v in here if v.kind == "neuron" and v.index == k])
    pre, mid = [], []
    for group in copies:
        x = ref[(Component.RESID_PRE, layer)].clone()
        y = ref[(Component.ATTN_OUT, layer)].clone()
        for v in group:
            dx, dy = incoming(v, stage(v.kind, layer, parallel))
            if v.kind in ("head", "attn"):
                x = x + dx
            else:  # MLPs act per position: only this node's positions change
                mask = place(v).mask[..., None].to(x.device, x.dtype)
                x = x + dx * mask
                y = y + dy * mask
        pre.append(x)
        mid.append(y)
    n = len(copies)
    x, y = torch.cat(pre), torch.cat(mid)
    changed = x != ref[(Component.RESID_PRE, layer)].repeat(n, 1, 1)
    edits: dict[Any, Any] = {(Component.RESID_PRE, layer): _constant(x)}
    if not parallel:  # the MLP reads resid_pre + attn_out: pin the attention output too
        edits[(Component.ATTN_OUT, layer)] = _constant(y)
        changed |= y != ref[(Component.ATTN_OUT, layer)].repeat(n, 1, 1)
    if not bool(changed.any()):  # no sender changes anything: the corrupt values stand
        return
    p0 = first_position(changed)
    B = prefix.enc["input_ids"].shape[0]
    run = model.run_from(prefix, start=(layer, p0), reps=n, edits=edits, save=[
        (Component.Z, layer), (Component.NEURONS, layer)]).acts
    for c, group in enumerate(copies):
        for v in group:
            p = place(v)
            value = ref[p.key].clone()
            value[:, p0:] = run[p.key][c * B:(c + 1) * B].to(value.dtype)
            _record(along, p, value, model)


def _edge_patched_metric_reference(model: Model, clean: TokenBatch, bad: TokenBatch,
                                   edges: set[tuple[Node, Node]], correct: Tensor,
                                   wrong: Tensor, metric: Metric) -> Tensor:
    """``m(H)`` per prompt by the literal recipe: receivers in forward order, one forward of
    the corrupt input each, every site upstream of the receiver pinned (corrupt values, the
    receiver's senders' units at their values along ``H``)."""
    L, parallel = model.n_layers, is_parallel(model)
    labels = clean.role_labels()
    every = [(Component.EMBED, 0)] + [(c, layer) for layer in range(L)
                                      for c in (Component.Z, Component.NEURONS)]
    corrupt = model.run(bad, save=every).acts
    along = dict(corrupt)
    along[(Component.EMBED, 0)] = model.run(clean, save=[(Component.EMBED, 0)]).acts[
        (Component.EMBED, 0)]
    site_stage = {k: stage({Component.EMBED: "embed", Component.Z: "head"}.get(k[0], "mlp"),
                           -1 if k[0] is Component.EMBED else k[1], parallel) for k in every}

    def placed(n: Node) -> Placed:
        return Placed(n.kind, n.layer, n.index, node_mask(clean, n.role, labels))

    into: dict[Node, list[Node]] = {}
    for u, v in edges:
        into.setdefault(v, []).append(u)
    order = sorted(into, key=lambda v: stage(v.kind, v.layer, parallel))
    logits = None
    for v in order:
        below = stage(v.kind, v.layer, parallel)
        pinned = {k: corrupt[k].clone() for k in every if site_stage[k] < below}
        for u in into[v]:
            p = placed(u)
            m = unit_mask(model, p).to(pinned[p.key].device)
            pinned[p.key][m] = along[p.key][m]  # this sender's units at its positions
        edits = {k: _constant(val) for k, val in pinned.items()}
        if v.kind == "logits":
            logits = model.run(bad, edits=edits).logits
            continue
        p = placed(v)
        _record(along, p, model.run(bad, edits=edits, save=[p.key]).acts[p.key], model)
    if logits is None:  # nothing reaches the logits: the corrupt run
        logits = model.run(bad).logits
    return metric(logits, correct, wrong)


def _constant(value: Tensor):
    def edit(act: Tensor) -> Tensor:
        return value.to(act.device, act.dtype)
    return edit


__all__ = ["proportion_explained", "proportion_explained_reference"]
