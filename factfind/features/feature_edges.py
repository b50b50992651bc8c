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
through attention. :func:`~factfind.features.feature_edge_heads.split_edge_heads` splits it
exactly by the head that took each path's *last* step onto the receiver's position (the rule of
:meth:`~factfind.features.linear_graph.LinearGraph.split_heads`): the head shares plus the
same-position ``local`` part sum to the edge. circuit-tracer cannot split its edges by head (its
issue #53).

**Cost.** Per batch: two endpoint forwards; per integration point one forward and backward of
the model (the gradients at every MLP output), a rebuild of the run with its MLPs frozen (about
a forward without MLPs) and one batched backward pass through it per ``chunk`` receivers (a
fraction of a forward each: no MLP, no unembedding), then one dot product per sender and
receiver at the roles' positions. So a graph over ``T`` receivers costs about ``m (3 + c T)``
FE with ``c`` the MLP-free backward's share of a forward (``benchmarks/bench_feature_edges.py``).
``reference=True`` runs the literal recipe instead (:mod:`.feature_edges_reference`: per
receiver and point, one run of the real model with every transcoded MLP's output detached into a
leaf and autograd from the receiver's read to the leaves), which the tests hold equal. The nodes,
the senders' writes and the receivers' reads that both paths and the head split share are in
:mod:`.feature_edges_batch`.

Example::

    nodes = ff.feature_atp(model, pairs, dicts, steps=10).nlargest(100, "score")
    edges = ff.feature_edges(model, pairs, dicts, nodes, steps=5)
    graph = ff.to_graph(edges, model, pairs)             # feature, error, embed, logits nodes
    heads = ff.split_edge_heads(model, pairs, dicts, edges.nlargest(10, "score"))
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError
from factfind.features.attribution import _checked, _role_masks
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.feature_edge_heads import DEFAULT_STEPS, split_edge_heads
from factfind.features.feature_edges_batch import (
    EdgeGraph,
    Writes,
    add_dots,
    edge_graph,
    endpoint_writes,
    frozen_at_point,
    ig_points,
    node_units,
    receiver_cotangents,
    roles_present,
)
from factfind.features.feature_edges_model import batched_grad
from factfind.features.feature_edges_reference import reference_point
from factfind.localize.patching import DEFAULT_ROLES
from factfind.model.attention import AttentionMismatchError
from factfind.results import t_quantile
from factfind.types import Component, Metric, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

log = logging.getLogger(__name__)

#: receivers per batched backward pass
DEFAULT_CHUNK = 32


def _fast_point(model: Model, ds: Dictionaries, g: EdgeGraph, pb: PairBatch, wr: Writes,
                point: Tensor, metric: Metric | None, chunk: int) -> Tensor:
    """``[T S batch]`` one point's edge gradients dotted with the writes."""
    stream, grads = frozen_at_point(model, g, pb, point, metric)
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
                cot = receiver_cotangents(model, ds, g, part, stream.reads[layer],
                                          grads[(Component.MLP_OUT, layer)], wr.masks)
                G = batched_grad(stream.reads[layer], leaves, cot.to(stream.reads[layer].dtype))
            add_dots(out, part, G, layers, wr)
    return out


# ----------------------------------------------------------------------------- the API


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
    g = edge_graph(model, ds, node_units(model, ds, nodes), roles)
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
        wr = endpoint_writes(model, ds, g, pb, masks)
        points = ig_points(*wr.emb, steps)
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
            per += reference_point(model, ds, g, pb, wr, point, metric)
        per /= len(points)
        both = _both(g, roles_present(masks))  # [T S B]
        s1 += (per * both).sum(-1)
        s2 += (per.pow(2) * both).sum(-1)
        count += both.sum(-1)
        bar.update(len(pb.correct))
    bar.close()
    return _frame(g, s1, s2, count, f"feature-eap-ig/{steps}" if steps else "feature-eap")


def _both(g: EdgeGraph, present: Tensor) -> Tensor:
    """``[T S batch]``: the receiver's and the sender's roles both exist in the prompt."""
    r = torch.stack([present[g.roles.index(u.role)] for u in g.receivers]).double()
    s = torch.stack([present[g.roles.index(u.role)] for u in g.senders]).double()
    return r[:, None] * s[None]


def _upstream(g: EdgeGraph) -> Tensor:
    """``[T S]`` bool: the sender writes before the receiver reads."""
    r = torch.tensor([u.layer for u in g.receivers])
    s = torch.tensor([u.layer for u in g.senders])
    return s[None] < r[:, None]


def _frame(g: EdgeGraph, s1: Tensor, s2: Tensor, count: Tensor, method: str) -> pd.DataFrame:
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


__all__ = ["DEFAULT_STEPS", "feature_edges", "split_edge_heads"]
