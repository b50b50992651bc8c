"""The counterfactual feature graph: EAP-IG with feature and error nodes as senders and receivers.

:func:`~factfind.features.linear_graph.linear_graph` reads *one prompt* through transcoder features
with everything but the residual path frozen. This module builds the other view the Sparse Feature
Circuits recipe (Marks et al. 2024) calls for: a graph over clean/corrupt *pairs*, scored against
a counterfactual metric, whose edges are attribution-patching estimates with integrated gradients
(EAP-IG, Hanna et al. 2024) and whose nodes are dictionary features and error nodes.

**Nodes.** The feature and error nodes you pass (typically the strongest of
:func:`~factfind.features.attribution.feature_atp` with ``steps``), one token-embedding node per
position role (``embed@subject_last``) and the metric's node ``logits@final``. Every MLP with a
transcoder is made of nodes (its features and its error), so an edge between two nodes is the
effect that does *not* pass through another MLP: it runs through the residual stream and the
attention layers, which are not nodes (:mod:`.feature_edges_model` builds that model, with
every transcoded MLP frozen at the run's own output). Attention is live: patterns, q/k norms
and post norms move with the input, as in EAP-IG.

**Edges.** As in EAP, an edge ``u -> v`` is scored

    effect(u -> v) = (w_u(corrupt) - w_u(clean)) . mean_k d(metric through v)/d w_u (x_k)

where ``w_u`` is what ``u`` writes into the stream (a feature ``a_u W_dec[u]`` at the positions
of its role, an error node its error vector, an embedding node the token embeddings), and the
gradient flows from ``u``'s write to ``v``'s read through the MLP-frozen model only, and then
through ``v`` and everything downstream of it: ``d(metric through v)/d w_u = dM/da_v . da_v/dread
. dread/dw_u`` for a feature receiver (``dM/da_v = W_dec[v] . dM/dmlp_out`` in the live model,
``da_v/dread = 1[a_v > 0] W_enc[:, v]``), ``dM/derr . (J_mlp - J_transcoder)`` for an error
receiver, and the metric itself for the logits. The gradients are averaged over EAP-IG's points
``x_k = x_corrupt + k/m (x_clean - x_corrupt)``, ``k = 1..m``, on the input embeddings
(``steps=0``: EAP, at the clean input only), exactly as :func:`~factfind.edges.eap.eap_ig` does
for heads and MLPs. Senders and receivers sit at position roles; a role with several tokens sums
them. Edges are averaged over the prompts where both roles exist.

**Cross-position edges split over heads.** An edge between different positions can only cross
through attention. :func:`split_edge_heads` splits it exactly by the head that took each path's
*last* step onto the receiver's position (the same rule as
:meth:`~factfind.features.linear_graph.LinearGraph.split_heads`): the head shares plus the
same-position ``local`` part sum to the edge. circuit-tracer cannot split its edges by head (its
issue #53).

**Cost.** Per batch: two endpoint forwards; per integration point one forward and backward of
the model (the gradients at every MLP output), a rebuild of the run with its MLPs frozen (about
a forward without MLPs) and one batched backward pass through it per ``chunk`` receivers (a
fraction of a forward each: no MLP, no unembedding), then one dot product per sender and
receiver at the roles' positions. So a graph over ``T`` receivers costs about ``m (3 + c T)``
FE with ``c`` the MLP-free backward's share of a forward (``benchmarks/bench_feature_edges.py``).
``reference=True`` runs the literal recipe instead - per receiver and point, one run of the
real model with every transcoded MLP's output detached into a leaf and autograd from the
receiver's read to the leaves - which the tests hold equal.

Example::

    nodes = ff.feature_atp(model, pairs, dicts, steps=10).nlargest(100, "score")
    edges = ff.feature_edges(model, pairs, dicts, nodes, steps=5)
    graph = ff.to_graph(edges, model, pairs)             # feature, error, embed, logits nodes
    heads = ff.split_edge_heads(model, pairs, dicts, edges.nlargest(10, "score"))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, NotFoundError
from factfind.features.attribution import _checked, _role_masks
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.features.feature_edges_model import (
    batched_grad,
    by_head,
    mlp_frozen_stream,
    stream_sites,
    stream_tangents,
)
from factfind.graph.node import Node
from factfind.localize.patching import DEFAULT_ROLES
from factfind.model.architectures import _get
from factfind.model.attention import AttentionMismatchError
from factfind.results import t_quantile
from factfind.types import Component, Metric, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

log = logging.getLogger(__name__)

#: EAP-IG points when none are asked for (as the fact-finding run's EAP-IG)
DEFAULT_STEPS = 5
#: receivers per batched backward pass
DEFAULT_CHUNK = 32


# ----------------------------------------------------------------------------- the nodes


@dataclass(frozen=True)
class _Unit:
    """A node of the graph: ``kind`` embed / feature / error / logits; ``layer`` -1 for the
    embeddings (they write ``x_0``), the model's depth for the logits."""

    id: str
    kind: str
    layer: int
    role: Role
    dictionary: str | None = None
    feature: int | None = None


def _units(model: Model, ds: Dictionaries, nodes: Any) -> list[_Unit]:
    """The feature and error nodes named by ``nodes`` (a frame with a ``node`` column, or ids),
    checked against the dictionaries: a typed one-line error names the first bad id."""
    if isinstance(nodes, pd.DataFrame):
        if "node" not in nodes.columns:
            raise ArgumentError("nodes must be node ids or a feature-attribution frame with a "
                                "'node' column (ff.feature_atp); got columns "
                                f"{', '.join(map(str, nodes.columns))}")
        ids = [str(x) for x in nodes["node"]]
    elif isinstance(nodes, str):
        ids = [nodes]
    else:
        ids = [str(x) for x in nodes]
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ArgumentError("nodes is empty: pass the feature and error nodes to connect (e.g. "
                            "feature_atp(...).nlargest(100, 'score'))")
    out = []
    for i in ids:
        try:
            n = Node.parse(i, n_layers=model.n_layers)
        except ArgumentError as err:
            raise NotFoundError(f"node {i!r} names no feature or error node: {err}") from None
        if n.kind not in ("feature", "error"):
            raise NotFoundError(f"node {i!r} is a {n.kind} node; feature_edges connects feature "
                                "and error nodes (ids like 'L5.tc.f1234@final', "
                                "'L5.tc.err@final'; embeddings and logits are added)")
        name = f"L{n.layer}.{n.dictionary}"
        if name not in ds:
            raise NotFoundError(f"node {i!r} names dictionary {name}, which is not among the "
                                f"dictionaries given ({', '.join(ds)})")
        d = ds[name]
        if d.kind is DictKind.SAE:
            raise ArgumentError(f"node {i!r}: {name} is an SAE; feature_edges needs transcoders "
                                "(the MLPs they replace become the graph's nodes)")
        if n.kind == "feature" and not 0 <= int(n.index or 0) < d.d_sae:
            raise NotFoundError(f"node {i!r} names feature {n.index} of {name}, which has "
                                f"{d.d_sae}")
        if n.role == "all":
            raise ArgumentError(f"node {i!r} sits at every position; feature_edges needs nodes "
                                "at position roles")
        out.append(_Unit(i, n.kind, n.layer, Role(n.role), name,
                         None if n.kind == "error" else int(n.index or 0)))
    return out


@dataclass
class _Graph:
    """The senders (embeddings, then the nodes) and receivers (the nodes, then the logits),
    their roles and the leaf each sender writes (``-1``: ``x_0``; ``l``: ``mlp_out[l]``)."""

    senders: list[_Unit]
    receivers: list[_Unit]
    roles: list[Role]
    frozen: set[int]  # every layer with a transcoder: its MLP is made of nodes


def _graph(model: Model, ds: Dictionaries, units: list[_Unit], roles: Sequence[Role | str]
           ) -> _Graph:
    embed_roles = [Role(r) for r in roles]
    all_roles = list(dict.fromkeys(embed_roles + [u.role for u in units] + [Role.FINAL]))
    units = sorted(units, key=lambda u: (u.layer, u.dictionary or "", u.feature is None,
                                         u.feature or 0, all_roles.index(u.role)))
    senders = [_Unit(f"embed@{r}", "embed", -1, r) for r in embed_roles] + units
    receivers = [*units, _Unit("logits@final", "logits", model.n_layers, Role.FINAL)]
    frozen = {d.layer for d in ds.values() if d.kind is not DictKind.SAE}
    return _Graph(senders, receivers, all_roles, frozen)


# ----------------------------------------------------------------------------- the batch


@dataclass
class _Writes:
    """One batch's sender writes at the roles' positions: per leaf (``-1`` or a layer) the
    senders writing there and their writes ``[S N d]`` at the ``N`` selected positions."""

    sel: Tensor          # [batch pos] bool: the positions of any role
    pos_b: Tensor        # [N] the prompt of each selected position
    masks: Tensor        # [role batch pos] float
    by_leaf: dict[int, tuple[list[int], Tensor]]
    emb: tuple[Tensor, Tensor]  # the clean and corrupt input embeddings (EAP-IG's ends)


def _endpoint_writes(model: Model, ds: Dictionaries, g: _Graph, pb: PairBatch, masks: Tensor
                     ) -> _Writes:
    """``w_u(corrupt) - w_u(clean)`` for every sender, from one run of each side."""
    emb = (Component.EMBED, 0)
    sites = [emb, *stream_sites(model)]
    clean = model.run(pb.clean, save=sites).acts
    bad = model.run(pb.corrupt, save=sites).acts
    sel = masks.sum(0).gt(0)
    pos_b = sel.nonzero(as_tuple=True)[0]
    w = masks[:, sel]  # [role N]
    diffs: dict[str, Tensor] = {}  # per dictionary: [N d_sae] activation and [N d] error diffs
    errs: dict[str, Tensor] = {}
    for name in {u.dictionary for u in g.senders if u.dictionary}:
        d = ds[name]
        a, e = [], []
        for run in (clean, bad):
            x = run[(Component.MLP_IN, d.layer)][sel]
            y = run[(Component.MLP_OUT, d.layer)][sel]
            acts = d.encode(x)
            a.append(acts)
            e.append(y.to(d.W_dec.dtype) - d.decode(acts))
        diffs[name], errs[name] = a[1] - a[0], e[1] - e[0]
    x0 = (Component.RESID_PRE, 0)
    d_emb = (bad[x0] - clean[x0])[sel].float()
    by_leaf: dict[int, tuple[list[int], list[Tensor]]] = {}
    for s, u in enumerate(g.senders):
        wr = w[g.roles.index(u.role)][:, None].float()  # [N 1]
        if u.kind == "embed":
            vec = d_emb * wr
        else:
            assert u.dictionary is not None
            d = ds[u.dictionary]
            if u.kind == "error":
                vec = errs[u.dictionary].float() * wr
            else:
                assert u.feature is not None
                vec = (diffs[u.dictionary][:, u.feature, None].float() * wr
                       * d.W_dec[u.feature].float())
        leaf = u.layer if u.kind != "embed" else -1
        idx, vecs = by_leaf.setdefault(leaf, ([], []))
        idx.append(s)
        vecs.append(vec)
    return _Writes(sel, pos_b, masks, {k: (i, torch.stack(v)) for k, (i, v) in
                                       by_leaf.items()}, (clean[emb], bad[emb]))


def _receiver_cotangents(model: Model, ds: Dictionaries, g: _Graph, rec: Sequence[int],
                         reads: Tensor, g_out: Tensor, masks: Tensor) -> Tensor:
    """``[T batch pos d]``: what receivers ``rec`` (all at one layer) read from the stream at
    its MLP input, weighted by the metric's gradient through them (module docstring)."""
    units = [g.receivers[t] for t in rec]
    d = ds[units[0].dictionary or ""]
    x = reads.detach()
    acts = d.encode(x)  # [B P F] at this point
    g_dec = g_out.to(d.W_dec.dtype)
    out = []
    err_cot: Tensor | None = None
    for u in units:
        m = masks[g.roles.index(u.role)][..., None].to(x.dtype)  # [B P 1]
        if u.kind == "feature":
            assert u.feature is not None
            coef = (g_dec @ d.W_dec[u.feature]) * (acts[..., u.feature] != 0)  # [B P]
            out.append(m * coef[..., None].to(x.dtype) * d.W_enc[:, u.feature].to(x.dtype))
        else:
            if err_cot is None:
                err_cot = _error_cotangent(model, d, x, g_out, acts)
            out.append(m * err_cot)
    return torch.stack(out)


def _error_cotangent(model: Model, d: Dictionary, x: Tensor, g_out: Tensor, acts: Tensor
                     ) -> Tensor:
    """``(J_mlp - J_features)^T g_out`` at MLP input ``x``: the gradient an error node's read
    passes back (the error is the MLP minus the features' write; a skip path is its own)."""
    blk = model._block_hf(d.layer)
    with torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        y = _get(blk, model.spec.mlp)(xi)
        if model.spec.mlp_post_norm:
            y = _get(blk, model.spec.mlp_post_norm)(y)
        (j_mlp,) = torch.autograd.grad(y, xi, g_out.to(y.dtype))
    active = (acts != 0).to(d.W_dec.dtype)
    j_feat = ((g_out.to(d.W_dec.dtype) @ d.W_dec.T) * active) @ d.W_enc.T
    return (j_mlp - j_feat.to(j_mlp.dtype)).to(x.dtype)


def _points(emb_clean: Tensor, emb_bad: Tensor, steps: int) -> list[Tensor]:
    """EAP-IG's points on the input embeddings (EAP: the clean input)."""
    if steps == 0:
        return [emb_clean]
    return [emb_bad + k / steps * (emb_clean - emb_bad) for k in range(1, steps + 1)]


def _point_run(model: Model, pb: PairBatch, point: Tensor, metric: Metric | None
               ) -> tuple[dict[Any, Tensor], dict[Any, Tensor], Tensor]:
    """The live model at one point: the stream's sites, the metric's gradients at every MLP
    output and the metric ``[batch]``."""
    store: dict[str, Tensor] = {}

    def fn(lg: Tensor) -> Tensor:
        m = pb.measure(lg, 1, metric, answers=metric is None)
        store["m"] = m.detach()
        return m.sum()

    run = model.run(pb.clean, save=stream_sites(model),
                    edits={(Component.EMBED, 0): lambda e: point.to(e.dtype)},
                    metric=fn, logits=pb.answer_ids() if metric is None else "final")
    return run.acts, run.grads, store["m"]


def _fast_point(model: Model, ds: Dictionaries, g: _Graph, pb: PairBatch, wr: _Writes,
                point: Tensor, metric: Metric | None, chunk: int) -> Tensor:
    """``[T S batch]`` one point's edge gradients dotted with the writes."""
    acts, grads, m = _point_run(model, pb, point, metric)
    stream = mlp_frozen_stream(model, acts, pb, g.frozen, metric, expect=m)
    B = pb.clean.input_ids.shape[0]
    out = torch.zeros(len(g.receivers), len(g.senders), B, dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for t, u in enumerate(g.receivers):
        by_layer.setdefault(u.layer, []).append(t)
    L = model.n_layers
    for layer, rec in sorted(by_layer.items()):
        leaves = stream.leaves(layer if layer < L else None)
        layers = stream.leaf_layers(layer if layer < L else None)
        for c0 in range(0, len(rec), chunk):
            part = rec[c0:c0 + chunk]
            if layer == L:  # the logits: the metric's own gradient
                got = torch.autograd.grad(stream.metric.sum(), leaves, retain_graph=True,
                                          allow_unused=True)
                G = [torch.zeros_like(x)[None] if gr is None else gr[None]
                     for x, gr in zip(leaves, got, strict=True)]
            else:
                cot = _receiver_cotangents(model, ds, g, part, stream.reads[layer],
                                           grads[(Component.MLP_OUT, layer)], wr.masks)
                G = batched_grad(stream.reads[layer], leaves, cot.to(stream.reads[layer].dtype))
            _dot(out, part, G, layers, wr)
    return out


def _dot(out: Tensor, rec: Sequence[int], G: Sequence[Tensor], layers: Sequence[int],
         wr: _Writes) -> None:
    """Add ``w_u . G_v`` (per prompt) into ``out [T S batch]`` for receivers ``rec`` with leaf
    gradients ``G`` (``[T batch pos d]`` per leaf of ``layers``)."""
    B = out.shape[2]
    for Gl, leaf in zip(G, layers, strict=True):
        if leaf not in wr.by_leaf:
            continue
        idx, W = wr.by_leaf[leaf]
        e = torch.einsum("tnd,snd->tsn", Gl[:, wr.sel].double(), W.double())  # [T S N]
        per_b = torch.zeros(*e.shape[:2], B, dtype=torch.float64).index_add_(
            2, wr.pos_b.cpu(), e.cpu())
        out[torch.tensor(list(rec))[:, None], torch.tensor(idx)[None, :]] += per_b


# ----------------------------------------------------------------------------- the reference


def _reference_point(model: Model, ds: Dictionaries, g: _Graph, pb: PairBatch, wr: _Writes,
                     point: Tensor, metric: Metric | None) -> Tensor:
    """:func:`_fast_point` the literal way: per receiver, one run of the real model (nnsight)
    with the stream entering block 0 and every transcoded MLP's output detached into leaves,
    and autograd from the receiver's read (its feature through the encoder, its error through
    the MLP module and the transcoder, or the metric) to the leaves."""
    _, grads, _ = _point_run(model, pb, point, metric)
    B = pb.clean.input_ids.shape[0]
    out = torch.zeros(len(g.receivers), len(g.senders), B, dtype=torch.float64)
    for t in range(len(g.receivers)):
        keys, G = _reference_receiver(model, ds, g, pb, wr, point, metric, grads, t)
        _dot(out, [t], G, keys, wr)
    return out


def _reference_receiver(model: Model, ds: Dictionaries, g: _Graph, pb: PairBatch, wr: _Writes,
                        point: Tensor, metric: Metric | None, grads: dict[Any, Tensor], t: int
                        ) -> tuple[list[int], list[Tensor]]:
    """One receiver's leaf gradients ``[1 batch pos d]`` (and the leaves' layers) by autograd
    on one run of the real model with the leaves detached."""
    u = g.receivers[t]
    leaves: dict[int, Tensor] = {}
    store: dict[str, Tensor] = {}

    def leaf(y: Tensor, k: int) -> Tensor:
        leaves[k] = y.detach().clone().requires_grad_(True)
        return leaves[k]

    def fn(lg: Tensor) -> Tensor:  # keep the live metric; the run's own gradient is unused
        store["m"] = pb.measure(lg, 1, metric, answers=metric is None)
        return store["m"].sum() * 0

    edits: dict[Any, Any] = {(Component.EMBED, 0): lambda e: point.to(e.dtype),
                             (Component.RESID_PRE, 0): lambda y: leaf(y, -1)}
    for k in sorted(g.frozen):
        edits[(Component.MLP_OUT, k)] = lambda y, k=k: leaf(y, k)
    save = [(Component.MLP_IN, u.layer)] if u.kind != "logits" else []
    run = model.run(pb.clean, save=save, edits=edits, metric=fn, keep_graph=True,
                    logits=pb.answer_ids() if metric is None else "final")
    if u.kind == "logits":
        scalar = store["m"].sum()
    else:
        assert run.live is not None and u.dictionary is not None
        x = run.live[(Component.MLP_IN, u.layer)]
        d = ds[u.dictionary]
        mask = wr.masks[g.roles.index(u.role)].to(x.dtype)
        g_out = grads[(Component.MLP_OUT, u.layer)].to(d.W_dec.dtype)
        if u.kind == "feature":
            assert u.feature is not None
            a = d.encode(x)[..., u.feature]
            scalar = (mask * (g_out @ d.W_dec[u.feature]) * a).sum()
        else:
            blk = model._block_hf(u.layer)
            y = _get(blk, model.spec.mlp)(x)
            if model.spec.mlp_post_norm:
                y = _get(blk, model.spec.mlp_post_norm)(y)
            err = y.to(d.W_dec.dtype) - d.decode(d.encode(x))
            scalar = (mask[..., None] * g_out * err).sum()
    keys = [k for k in sorted(leaves) if k < u.layer]
    got = torch.autograd.grad(scalar, [leaves[k] for k in keys], allow_unused=True)
    return keys, [torch.zeros_like(leaves[k])[None] if gr is None else gr[None]
                  for k, gr in zip(keys, got, strict=True)]


# ----------------------------------------------------------------------------- the API


def _present(masks: Tensor) -> Tensor:
    return masks.sum(-1).gt(0).cpu()  # [role batch]


@validated
def feature_edges(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    nodes: pd.DataFrame | Iterable[str],
    *,
    steps: int = DEFAULT_STEPS,
    roles: Sequence[Role | str] = DEFAULT_ROLES,
    metric: Metric | None = None,
    batch_size: int = 8,
    chunk: int = DEFAULT_CHUNK,
    reference: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """EAP (``steps=0``) or EAP-IG scores of every edge between ``nodes``, the embeddings and
    the logits (module docstring).

    Args:
        model: the model the dictionaries were trained on.
        pairs: clean/corrupt pairs (or their :class:`~factfind.data.batch.PairBatch`).
        dicts: transcoders (or skip transcoders); every MLP with one is frozen into nodes.
        nodes: the feature and error nodes to connect: ids (``L5.tc.f1234@subject_last``,
            ``L5.tc.err@final``) or a feature-attribution frame (its ``node`` column).
        steps: EAP-IG points on the input embeddings (0: EAP at the clean input).
        roles: the roles of the embedding senders (``embed@<role>``).
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference).
        batch_size: prompts per forward; chunk: receivers per batched backward pass.
        reference: the literal per-receiver recipe on the real model (slow; what the tests
            hold the fast path equal to).
        progress: a progress bar over prompts.

    Returns:
        One row per edge from a sender upstream of its receiver: the edge-result columns
        ``method`` (``feature-eap-ig/<m>`` or ``feature-eap``), ``sender``, ``receiver``,
        ``effect`` (mean over the prompts where both roles exist), ``n``, then ``ci_low``,
        ``ci_high`` (95% Student-t) and ``score = |effect|``. Feed it to ``ff.to_graph``.

    Raises:
        ArgumentError, NotFoundError: empty ``nodes``, an id that names no feature or error
            node of ``dicts``, dictionaries of another model, ``steps < 0``.
    """
    if steps < 0:
        raise ArgumentError(f"steps must be >= 0 (0: EAP), got {steps}")
    if chunk < 1:
        raise ArgumentError(f"chunk must be a positive integer, got {chunk}")
    ds = _checked(dicts, model)
    g = _graph(model, ds, _units(model, ds, nodes), roles)
    T, S = len(g.receivers), len(g.senders)
    s1 = torch.zeros(T, S, dtype=torch.float64)
    s2 = torch.zeros(T, S, dtype=torch.float64)
    count = torch.zeros(T, S, dtype=torch.float64)
    batches = list(pair_batches(model, pairs, batch_size))
    n_all = sum(len(pb.correct) for _, pb in batches)
    bar = tqdm(total=n_all, desc="feature edges", unit="prompt", disable=not progress)
    use_ref = reference
    for _, pb in batches:
        masks = _role_masks(pb.clean, g.roles, model.device)
        wr = _endpoint_writes(model, ds, g, pb, masks)
        points = _points(*wr.emb, steps)
        per = torch.zeros(T, S, len(pb.correct), dtype=torch.float64)
        for point in points:
            if not use_ref:
                try:
                    per += _fast_point(model, ds, g, pb, wr, point, metric, chunk)
                    continue
                except AttentionMismatchError as err:
                    log.warning("feature edges on %s fall back to the reference: %s",
                                model.spec.name, err)
                    use_ref = True
            per += _reference_point(model, ds, g, pb, wr, point, metric)
        per /= len(points)
        both = _both(g, _present(masks))  # [T S B]
        s1 += (per * both).sum(-1)
        s2 += (per.pow(2) * both).sum(-1)
        count += both.sum(-1)
        bar.update(len(pb.correct))
    bar.close()
    return _frame(g, s1, s2, count, f"feature-eap-ig/{steps}" if steps else "feature-eap")


def _both(g: _Graph, present: Tensor) -> Tensor:
    """``[T S batch]``: the receiver's and the sender's roles both exist in the prompt."""
    r = torch.stack([present[g.roles.index(u.role)] for u in g.receivers]).double()
    s = torch.stack([present[g.roles.index(u.role)] for u in g.senders]).double()
    return r[:, None] * s[None]


def _upstream(g: _Graph) -> Tensor:
    """``[T S]`` bool: the sender writes before the receiver reads."""
    r = torch.tensor([u.layer for u in g.receivers])
    s = torch.tensor([u.layer for u in g.senders])
    return s[None] < r[:, None]


def _frame(g: _Graph, s1: Tensor, s2: Tensor, count: Tensor, method: str) -> pd.DataFrame:
    keep = _upstream(g) & (count > 0)
    t_idx, s_idx = keep.nonzero(as_tuple=True)
    n = count[t_idx, s_idx].numpy()
    mean = (s1[t_idx, s_idx] / count[t_idx, s_idx]).numpy()
    var = np.where(n > 1, (s2[t_idx, s_idx].numpy() - n * mean ** 2) / np.maximum(n - 1, 1),
                   np.nan)
    counts, where = np.unique(n, return_inverse=True)
    half = np.sqrt(np.maximum(var, 0) / n) * np.asarray(t_quantile(counts))[where]
    df = pd.DataFrame({
        "method": method,
        "sender": [g.senders[i].id for i in s_idx.tolist()],
        "receiver": [g.receivers[i].id for i in t_idx.tolist()],
        "effect": mean, "n": n.astype(int), "ci_low": mean - half, "ci_high": mean + half,
    })
    df["score"] = df["effect"].abs()
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- head split


@validated
def split_edge_heads(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    edges: pd.DataFrame | Iterable[tuple[str, str]],
    *,
    steps: int = DEFAULT_STEPS,
    metric: Metric | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Split edges of :func:`feature_edges` over the attention heads that carry them.

    Each path from the sender's write to the receiver's read that changes position takes one
    *last* step onto the receiver's position, through one head ``(layer, head)``
    (:func:`~factfind.features.feature_edges_model.by_head`); the rest of the edge is ``local``
    (paths that never leave the receiver's position: only possible when the two share a role).
    Per edge, ``local + sum(share) = edge`` exactly.

    Args:
        edges: ``(sender, receiver)`` id pairs, or an edge frame (its ``sender`` and ``receiver``
            columns), e.g. ``feature_edges(...).nlargest(10, "score")``.
        steps, metric, batch_size: as for :func:`feature_edges` (use the same values).

    Returns:
        One row per edge and head with a non-zero share: ``sender``, ``receiver``, ``layer``,
        ``head``, ``share`` (mean over prompts), ``local``, ``edge`` (the edge's effect, equal to
        :func:`feature_edges`' over the same prompts) and ``n``.

    Cost: per receiver, position and point, one pass down the MLP-frozen model per layer with
    every head batched (about ``layers x heads`` backward passes per receiver).
    """
    if isinstance(edges, pd.DataFrame):
        missing = [c for c in ("sender", "receiver") if c not in edges.columns]
        if missing:
            raise ArgumentError(f"edges needs columns sender, receiver; missing "
                                f"{', '.join(missing)}")
        pairs_ids = list(zip(edges["sender"].astype(str), edges["receiver"].astype(str),
                             strict=True))
    else:
        pairs_ids = [(str(a), str(b)) for a, b in edges]
    if not pairs_ids:
        raise ArgumentError("edges is empty: pass (sender, receiver) pairs to split")
    ds = _checked(dicts, model)
    ids = [i for e in pairs_ids for i in e if not i.startswith(("embed@", "logits@"))]
    embed_roles = [i.split("@", 1)[1] for e in pairs_ids for i in e if i.startswith("embed@")]
    g = _graph(model, ds, _units(model, ds, ids) if ids else [],
               list(dict.fromkeys(embed_roles)) or [Role.FINAL])
    s_of = {u.id: i for i, u in enumerate(g.senders)}
    t_of = {u.id: i for i, u in enumerate(g.receivers)}
    for s, t in pairs_ids:
        if s not in s_of:
            raise NotFoundError(f"edge {s}->{t}: {s} is not a sender (a feature, error or "
                                "embedding node)")
        if t not in t_of:
            raise NotFoundError(f"edge {s}->{t}: {t} is not a receiver (a feature, error or "
                                "logits node)")
        if not g.senders[s_of[s]].layer < g.receivers[t_of[t]].layer:
            raise ArgumentError(f"edge {s}->{t}: the sender does not write before the "
                                "receiver reads")
    acc: dict[tuple[str, str, int, int], float] = {}
    local: dict[tuple[str, str], float] = {}
    cnt: dict[tuple[str, str], int] = {}
    batches = list(pair_batches(model, pairs, batch_size))
    bar = tqdm(total=sum(len(pb.correct) for _, pb in batches), desc="head split",
               unit="prompt", disable=not progress)
    for _, pb in batches:
        masks = _role_masks(pb.clean, g.roles, model.device)
        wr = _endpoint_writes(model, ds, g, pb, masks)
        present = _present(masks)
        points = _points(*wr.emb, steps)
        for point in points:
            _split_point(model, ds, g, pb, wr, point, metric, pairs_ids, s_of, t_of,
                         acc, local, 1 / len(points))
        for s, t in pairs_ids:
            both = present[g.roles.index(g.senders[s_of[s]].role)] & \
                present[g.roles.index(g.receivers[t_of[t]].role)]
            cnt[(s, t)] = cnt.get((s, t), 0) + int(both.sum())
        bar.update(len(pb.correct))
    bar.close()
    rows = []
    for (s, t, layer, head), v in acc.items():
        n = cnt[(s, t)]
        if v != 0 and n:
            rows.append({"sender": s, "receiver": t, "layer": layer, "head": head,
                         "share": v / n, "local": local.get((s, t), 0.0) / n, "n": n})
    have = {(r["sender"], r["receiver"]) for r in rows}
    for s, t in dict.fromkeys(pairs_ids):  # an edge no head carries: its local part alone
        if (s, t) not in have and cnt[(s, t)]:
            rows.append({"sender": s, "receiver": t, "layer": pd.NA, "head": pd.NA,
                         "share": 0.0, "local": local.get((s, t), 0.0) / cnt[(s, t)],
                         "n": cnt[(s, t)]})
    df = pd.DataFrame(rows, columns=["sender", "receiver", "layer", "head", "share", "local",
                                     "n"])
    df["layer"], df["head"] = df["layer"].astype("Int64"), df["head"].astype("Int64")
    total = df.groupby(["sender", "receiver"])["share"].transform("sum")
    df["edge"] = total + df["local"]
    return df.sort_values(["sender", "receiver", "layer", "head"]).reset_index(drop=True)


def _split_point(model: Model, ds: Dictionaries, g: _Graph, pb: PairBatch, wr: _Writes,
                 point: Tensor, metric: Metric | None, pairs_ids: list[tuple[str, str]],
                 s_of: dict[str, int], t_of: dict[str, int],
                 acc: dict[tuple[str, str, int, int], float],
                 local: dict[tuple[str, str], float], weight: float) -> None:
    acts, grads, m = _point_run(model, pb, point, metric)
    stream = mlp_frozen_stream(model, acts, pb, g.frozen, metric, expect=m)
    L = model.n_layers
    tangents: dict[str, tuple[Tensor, list[Tensor]]] = {}  # per sender: its write, what it does

    def moved(s_id: str) -> tuple[Tensor, list[Tensor]]:
        if s_id not in tangents:
            s = s_of[s_id]
            leaf = g.senders[s].layer if g.senders[s].kind != "embed" else -1
            idx, W = wr.by_leaf[leaf]
            w = torch.zeros_like(stream.x[0])  # the sender's write, [batch pos d]
            w[wr.sel] = W[idx.index(s)].to(w.dtype)
            tangents[s_id] = w, stream_tangents(stream, leaf, w)
        return tangents[s_id]

    for t_id in dict.fromkeys(t for _, t in pairs_ids):
        t = t_of[t_id]
        u = g.receivers[t]
        senders = [s for s, tt in pairs_ids if tt == t_id]
        if u.kind == "logits":
            (cot,) = torch.autograd.grad(stream.metric.sum(), stream.x[L], retain_graph=True)
            mask = torch.zeros(cot.shape[:2], dtype=torch.bool, device=cot.device)
            mask[:, -1] = True
        else:
            c = _receiver_cotangents(model, ds, g, [t], stream.reads[u.layer],
                                     grads[(Component.MLP_OUT, u.layer)], wr.masks)[0]
            (cot,) = torch.autograd.grad(stream.reads[u.layer], stream.read_at[u.layer],
                                         c.to(stream.reads[u.layer].dtype), retain_graph=True)
            mask = wr.masks[g.roles.index(u.role)].bool()
        for query, on in _query_slots(mask):
            cq = cot * on[:, None, None]
            loc, cross = by_head(stream, u.layer, cq, query)
            leaf_layers = stream.leaf_layers(u.layer if u.layer < L else None)
            for s_id in senders:
                s = s_of[s_id]
                leaf = g.senders[s].layer if g.senders[s].kind != "embed" else -1
                w, dx = moved(s_id)  # the write, and what it does to each x_k
                j = leaf_layers.index(leaf)
                local[(s_id, t_id)] = local.get((s_id, t_id), 0.0) + weight * float(
                    (loc[j].double() * w.double()).sum())
                for layer, v in cross:
                    per_head = torch.einsum("hbpd,bpd->h", v.double(), dx[layer].double())
                    for h, val in enumerate(per_head.tolist()):
                        key = (s_id, t_id, layer, h)
                        acc[key] = acc.get(key, 0.0) + weight * val


def _query_slots(mask: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The receiver's positions one at a time: per slot ``j``, each row's ``j``-th position of
    the role (``query [batch]``) and whether the row has one (``on [batch]``)."""
    B, P = mask.shape
    pos = torch.arange(P, device=mask.device).expand(B, P)
    order = torch.where(mask, pos, P).sort(-1).values  # positions of the role first
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    return [(order[:, j].clamp(max=P - 1), (order[:, j] < P).to(torch.float32))
            for j in range(k)]


__all__ = ["DEFAULT_STEPS", "feature_edges", "split_edge_heads"]
