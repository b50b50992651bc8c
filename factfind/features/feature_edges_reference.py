"""The literal reference of :func:`~factfind.features.feature_edges.feature_edges`.

Per receiver and integration point, one run of the real model (through the adapter) with the
stream entering block 0 and every transcoded MLP's output detached into leaves (the values the
model's own, the gradients stopped there), then autograd from the receiver's read - its feature
through the encoder, its error through the MLP module and the transcoder, or the metric - to the
leaves; the leaf gradients dotted with the senders' writes are the edges. Nothing is shared
with the fast path's rebuilt model (:mod:`.feature_edges_model`) but the writes and the metric's
gradients at the MLP outputs, so the tests that hold the two equal check the rebuild, the
batched backward pass and the receivers' cotangents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.features.dictionary import Dictionaries
from factfind.features.feature_edges_batch import EdgeGraph, Writes, add_dots, point_run
from factfind.model.architectures import _get
from factfind.types import Component, Metric

if TYPE_CHECKING:
    from factfind.model import Model


def reference_point(model: Model, ds: Dictionaries, g: EdgeGraph, pb: PairBatch, wr: Writes,
                     point: Tensor, metric: Metric | None) -> Tensor:
    """:func:`_fast_point` the literal way: per receiver, one run of the real model (nnsight)
    with the stream entering block 0 and every transcoded MLP's output detached into leaves,
    and autograd from the receiver's read (its feature through the encoder, its error through
    the MLP module and the transcoder, or the metric) to the leaves."""
    _, grads, _ = point_run(model, pb, point, metric)
    B = pb.clean.input_ids.shape[0]
    out = torch.zeros(len(g.receivers), len(g.senders), B, dtype=torch.float64)
    for t in range(len(g.receivers)):
        keys, G = reference_receiver(model, ds, g, pb, wr, point, metric, grads, t)
        add_dots(out, [t], G, keys, wr)
    return out


def reference_receiver(model: Model, ds: Dictionaries, g: EdgeGraph, pb: PairBatch, wr: Writes,
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


