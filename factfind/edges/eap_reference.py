"""The slow reference for EAP's receiver gradients: one detached copy of the batch per receiver.

:mod:`factfind.edges.eap` needs, for every *receiver* ``v`` (a head at one query role, an MLP, the
logits), the gradient of the metric with respect to ``v``'s own copy of the residual stream, so
that the gradient flows through ``v`` only. This module gets it the literal way, with detaching
edits instead of new adapter hooks. For a layer ``l``, in a copy of the batch where every head's
``z`` but one head at one query role is detached (values unchanged, gradients blocked), the
gradient at the block's input minus the gradient at its output is exactly the gradient through
that head plus the gradient through the layer's MLP; a copy with every head detached gives the
MLP's share alone (in GPT-2-style sequential blocks the MLP reads the stream *after* the heads,
and the difference still works: ``g_pre - g_post = g_post J_mlp + g_mid J_head``). One backward
pass over all copies stacked gives every receiver's gradient.

Cost: one forward and backward pass per receiver copy - ``layers x (1 + heads x roles)``, plus
``layers x d_mlp`` with neurons - per integration point (about 1,650 copies on a 30-layer model
with 9 heads and 6 roles). :mod:`factfind.edges.eap_grads` gets the same gradients (not the
neurons') from one pass; this path stays as its reference (``edge_attribution(...,
reference=True)``) and serves ``neurons=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.types import Component, Metric

if TYPE_CHECKING:
    from factfind.model import Model


@dataclass(frozen=True)
class Receiver:
    """One copy of the batch: the reader whose input gradient it isolates."""

    kind: str  # "mlp"/"neuron" (every role), "head" (one query role), "logits"
    layer: int
    index: int | None = None
    role: int | None = None  # index into TOKEN_ROLES, for heads


def receivers(model: Model, roles: Sequence[int], neurons: bool) -> list[Receiver]:
    """Every receiver but the logits, layer by layer."""
    out = []
    for layer in range(model.n_layers):
        out.append(Receiver("mlp", layer))
        out += [Receiver("head", layer, h, r) for h in range(model.n_heads) for r in roles]
        if neurons:
            out += [Receiver("neuron", layer, n) for n in range(model.d_mlp)]
    return out


def _grad_edits(model: Model, recv: Sequence[Receiver], labels: Tensor, B: int,
                embed: Tensor | None) -> dict[Any, Any]:
    """Edits that detach, per copy, every reader of its layer but the live one."""
    P, H = labels.shape[1], model.n_heads
    edits: dict[Any, Any] = {}
    for layer in range(model.n_layers):
        live_z = torch.ones(len(recv), B, P, H, dtype=torch.bool)
        live_n = torch.ones(len(recv), B, P, model.d_mlp, dtype=torch.bool)
        touched_n = False
        for c, r in enumerate(recv):
            if r.layer != layer:
                continue
            live_z[c] = False
            if r.kind == "head":
                live_z[c, :, :, r.index] = labels == r.role
            elif r.kind == "neuron":
                live_n[c] = False
                live_n[c, :, :, r.index] = True
                touched_n = True
        edits[(Component.Z, layer)] = _detach_where(live_z.flatten(0, 1))
        if touched_n:
            edits[(Component.NEURONS, layer)] = _detach_where(live_n.flatten(0, 1))
    if embed is not None:
        edits[(Component.EMBED, 0)] = (lambda e: embed.repeat(len(recv), 1, 1).to(e.dtype))
    return edits


def _detach_where(live: Tensor):
    def edit(act: Tensor) -> Tensor:
        m = live.to(act.device).reshape(*live.shape, *([1] * (act.dim() - live.dim())))
        return torch.where(m, act, act.detach())
    return edit


def input_grads(model: Model, pb: PairBatch, recv: Sequence[Receiver], labels: Tensor,
                metric: Metric, embed: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradient of the summed metric w.r.t. each receiver's own input ``[copy batch pos d]``
    and w.r.t. the logits' input ``[batch pos d]``. ``recv`` must hold the MLP copy of every
    layer whose heads it holds (see :func:`with_mlps`)."""
    B, L = len(pb.correct), model.n_layers
    save = [(c, layer) for layer in range(L) for c in (Component.RESID_PRE, Component.RESID_POST)]
    C = len(recv)

    def total(logits: Tensor) -> Tensor:
        return metric(logits, pb.correct.repeat(C), pb.wrong.repeat(C)).sum()

    run = model.run(pb.clean.repeat(C), save=save, metric=total,
                    edits=_grad_edits(model, recv, labels, B, embed))
    g = {k: v.reshape(C, B, *v.shape[1:]) for k, v in run.grads.items()}
    through = torch.stack([g[(Component.RESID_PRE, r.layer)][c] - g[(Component.RESID_POST,
                                                                     r.layer)][c]
                           for c, r in enumerate(recv)])
    mlp_of = {r.layer: c for c, r in enumerate(recv) if r.kind == "mlp"}
    for c, r in enumerate(recv):
        if r.kind == "head":  # the head's copy also carries its layer's MLP; take it away
            through[c] = through[c] - through[mlp_of[r.layer]]
    return through, g[(Component.RESID_POST, L - 1)][0]


def with_mlps(chunk: Sequence[Receiver]) -> list[Receiver]:
    """The chunk plus the MLP copy of every layer whose heads it holds (needed to subtract)."""
    out = list(chunk)
    for layer in sorted({r.layer for r in chunk if r.kind == "head"}):
        if Receiver("mlp", layer) not in out:
            out.append(Receiver("mlp", layer))
    return out
