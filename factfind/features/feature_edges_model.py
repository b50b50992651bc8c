"""The model with its MLPs frozen: what an edge of the counterfactual feature graph flows through.

In :func:`~factfind.features.feature_edges.feature_edges` every MLP that has a transcoder is made
of graph nodes - its features and its error - so the *direct* effect of one node on another
may not pass through any MLP: only through the residual stream and the attention layers, which
are not nodes. :class:`MlpFrozenStream` rebuilds one run of a batch as a plain torch function
with exactly that shape::

    x_0 = the stream entering block 0 (a leaf: the embedding senders write here)
    mid_l = x_l + attn_l(x_l)                        attention live: patterns, norms, post norm
    read_l = norm_mlp(mid_l)                         what layer l's transcoder reads (mlp_in)
    x_{l+1} = mid_l + c_l                            c_l = the run's own mlp_out (a leaf: the
                                                     features and error of layer l write here)
    metric = m(unembed(norm_final(x_L)))

(parallel blocks read ``x_l`` for both attention and MLP: ``read_l = norm_mlp(x_l)``, ``x_{l+1} =
x_l + attn_l(x_l) + c_l``). An MLP without a transcoder is not a node: it stays live, computed by
the model's own module. The attention of every family comes from
:class:`~factfind.model.attention.LayerAttention` (q/k norms, rotary variants, softcap, sliding
windows, grouped-query heads), its output projection and post norm from the model's weights and
modules. The reads and the metric are checked against the model's own run before use.

With the graph of this function at hand, the gradient of a receiver's read with respect to the
leaves is every sender's direct-effect gradient at once, and a batch of receivers is one batched
backward pass (``is_grads_batched``). :meth:`MlpFrozenStream.by_head` walks the layers down by
hand to split a receiver's gradient by the attention head that last moved it onto the receiver's
position (see :func:`~factfind.features.feature_edges.split_edge_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.features.linear_graph_model import norm_paths
from factfind.model.architectures import _get
from factfind.model.attention import AttentionMismatchError, LayerAttention, layer_attention
from factfind.types import Component

if TYPE_CHECKING:
    from factfind.data.batch import PairBatch
    from factfind.model import Model
    from factfind.types import Metric


def stream_sites(model: Model) -> list[tuple[Component, int]]:
    """The sites a run must save for :func:`mlp_frozen_stream`."""
    L = model.n_layers
    return [(Component.RESID_PRE, 0)] + [(c, layer) for layer in range(L)
                                         for c in (Component.MLP_IN, Component.MLP_OUT)]


@dataclass
class MlpFrozenStream:
    """One batch's run with its transcoded MLPs frozen (module docstring), as an autograd graph.

    Attributes:
        x: ``x[l]`` the stream entering block ``l`` (``x[0]`` a leaf), ``x[L]`` the last block's
            output; ``[batch pos d_model]``.
        consts: per frozen layer its ``mlp_out`` leaf ``c_l``.
        reads: per layer what its MLP reads (``mlp_in``), a function of the leaves.
        read_at: per layer the stream tensor that ``reads[l]`` normalises (``mid_l``, or
            ``x_l`` in parallel blocks).
        head_writes: per layer ``[batch pos head d_model]``, each head's ``z_h W_O[h]`` before
            the output bias and any post norm (they sum to the attention's pre-norm output).
        attn_pre: per layer that sum plus the bias; ``attn_write``: what enters the stream.
        metric: ``[batch]`` the metric of the run.
    """

    x: list[Tensor]
    consts: dict[int, Tensor]
    reads: list[Tensor]
    read_at: list[Tensor]
    head_writes: list[Tensor]
    attn_pre: list[Tensor]
    attn_write: list[Tensor]
    metric: Tensor
    parallel: bool
    keys: Tensor
    pos_ids: Tensor
    model: Any

    def leaves(self, layer: int | None) -> list[Tensor]:
        """``x[0]`` and the constants upstream of layer ``layer``'s read (``None``: of the
        metric)."""
        top = len(self.x) if layer is None else layer
        return [self.x[0]] + [c for k, c in sorted(self.consts.items()) if k < top]

    def leaf_layers(self, layer: int | None) -> list[int]:
        """The layer of each of :meth:`leaves` (-1 for ``x[0]``)."""
        top = len(self.x) if layer is None else layer
        return [-1] + [k for k in sorted(self.consts) if k < top]


def mlp_frozen_stream(model: Model, acts: dict[Any, Tensor], pb: PairBatch, frozen: set[int],
                      metric: Metric | None, *, check: bool = True,
                      expect: Tensor | None = None) -> MlpFrozenStream:
    """Rebuild a run (its saved :func:`stream_sites` ``acts``, on the clean batch's tokens and
    positions) with the MLPs of ``frozen`` layers as leaves. With ``check``, every layer's read
    and (given ``expect``, the run's metric) the metric must equal the run's, or
    :class:`~factfind.model.attention.AttentionMismatchError` is raised."""
    tb = pb.clean
    keys = tb.attention_mask.bool().to(model.device)
    pos_ids = tb.position_ids.to(model.device)
    x0 = acts[(Component.RESID_PRE, 0)].detach().clone().requires_grad_(True)
    consts = {k: acts[(Component.MLP_OUT, k)].detach().clone().requires_grad_(True)
              for k in sorted(frozen)}
    xs, reads, read_at, hws, pres, writes = _blocks(model, x0, consts, keys, pos_ids)
    if check:
        for layer, read in enumerate(reads):
            _check(f"layer {layer}'s MLP input", read, acts[(Component.MLP_IN, layer)], keys,
                   model)
    m = _metric(model, xs[-1], pb, metric)
    if check and expect is not None:
        _check("the metric", m, expect.to(m.device), None, model)
    return MlpFrozenStream(xs, consts, reads, read_at, hws, pres, writes, m,
                           bool(model.parallel), keys, pos_ids, model)


def _blocks(model: Model, x0: Tensor, consts: dict[int, Tensor], keys: Tensor, pos_ids: Tensor
            ) -> tuple[list[Tensor], ...]:
    """The blocks with attention live and the MLPs of ``consts``' layers replaced by those
    tensors: ``(x, reads, read_at, head_writes, attn_pre, attn_write)`` per layer."""
    blocks = _get(model.hf, model.spec.blocks)
    _, mlp_norm_path = norm_paths(model)
    parallel = bool(model.parallel)
    xs, reads, read_at, hws, pres, writes = [x0], [], [], [], [], []
    x = x0
    for layer in range(model.n_layers):
        blk = blocks[layer]
        att: LayerAttention = layer_attention(model, layer)
        z = att.recompute(x, keys, pos_ids)
        hw = torch.einsum("bphe,hem->bphm", z, model.W_O(layer).to(z.dtype))
        pre = hw.sum(2) + model.b_O(layer).to(z.dtype)
        post = model.spec.attn_post_norm
        aw = _get(blk, post)(pre) if post else pre
        hws.append(hw)
        pres.append(pre)
        writes.append(aw)
        at = x if parallel else x + aw
        read = _get(blk, mlp_norm_path)(at) if mlp_norm_path else at
        read_at.append(at)
        reads.append(read)
        c = consts.get(layer)
        if c is None:  # not a node: the MLP stays live
            c = _get(blk, model.spec.mlp)(read)
            if model.spec.mlp_post_norm:
                c = _get(blk, model.spec.mlp_post_norm)(c)
        x = x + aw + c if parallel else at + c
        xs.append(x)
    return xs, reads, read_at, hws, pres, writes


def stream_tangents(stream: MlpFrozenStream, leaf: int, tangent: Tensor) -> list[Tensor]:
    """``[x_k tangents]``: how the stream entering each block moves when leaf ``leaf`` (-1:
    ``x_0``; ``l``: layer ``l``'s MLP output) moves by ``tangent [batch pos d]`` - a
    Jacobian-vector product through the MLP-frozen model (forward-mode autograd: one pass of
    the blocks with dual numbers)."""
    import torch.autograd.forward_ad as fwad

    x0 = stream.x[0].detach()
    with fwad.dual_level(), torch.no_grad():
        dual = lambda v, k: fwad.make_dual(v, tangent.to(v.dtype) if k == leaf
                                           else torch.zeros_like(v))
        consts = {k: dual(c.detach(), k) for k, c in stream.consts.items()}
        xs = _blocks(stream.model, dual(x0, -1), consts, stream.keys, stream.pos_ids)[0]
        out = []
        for x in xs:
            t = fwad.unpack_dual(x).tangent
            out.append(torch.zeros_like(x0) if t is None else t.clone())
    return out


def _metric(model: Model, resid: Tensor, pb: PairBatch, metric: Metric | None) -> Tensor:
    """``[batch]`` the metric from the last block's output (final norm, unembedding, softcap)."""
    h = _get(model.hf, model.spec.final_norm)(resid)[:, -1]
    if metric is None:  # the two answers' logits only
        lg = model._unembed_columns(h, pb.answer_ids().to(h.device))
        if model.final_logit_softcap is not None:
            lg = model.softcap_logits(lg)
        return pb.measure(lg, 1, None, answers=True)
    lg = _get(model.hf, model.spec.unembed)(h)
    if model.final_logit_softcap is not None:
        lg = model.softcap_logits(lg)
    return pb.measure(lg, 1, metric)


def _check(what: str, got: Tensor, want: Tensor, keys: Tensor | None, model: Model) -> None:
    g, w = got.detach().float(), want.detach().float().to(got.device)
    if keys is not None:
        g, w = g * keys[..., None], w * keys[..., None]
    err = float((g - w).abs().max()) if g.numel() else 0.0
    top = float(w.abs().max()) if w.numel() else 0.0
    if not err <= 1e-3 * (1.0 + top):
        raise AttentionMismatchError(
            f"{what} of {model.spec.name}, rebuilt with its MLPs frozen, differs from the "
            f"model's run (max error {err:.3g} at |value| <= {top:.3g}): pass reference=True")


def batched_grad(outputs: Tensor, inputs: Sequence[Tensor], cotangents: Tensor
                 ) -> list[Tensor]:
    """``[T *input.shape]`` per input: the gradients of ``<cotangents[t], outputs>`` for each of
    the ``T`` cotangents, in one batched backward pass (the graph is kept)."""
    got = torch.autograd.grad(outputs, list(inputs), cotangents, retain_graph=True,
                              allow_unused=True, is_grads_batched=True)
    return [torch.zeros(cotangents.shape[0], *x.shape, dtype=x.dtype, device=x.device)
            if g is None else g for x, g in zip(inputs, got, strict=True)]


def by_head(stream: MlpFrozenStream, top: int, cot: Tensor, query: Tensor,
            ) -> tuple[list[Tensor], list[tuple[int, Tensor]]]:
    """Split a receiver's gradient by the head that last moved it onto the receiver's position.

    ``cot [batch pos d_model]`` is the receiver's cotangent at ``read_at[top]`` (at ``x[L]`` for
    the metric, ``top = L``), at one position per row, ``query [batch]``. Going down the layers,
    the *local* gradient - what reached the stream at the query position without ever leaving
    it - is pulled back through each attention layer head by head: what head ``h`` of layer
    ``k`` sends to *other* positions is its cross-position cotangent on ``x_k`` (whatever a
    path does below ``x_k``, its last step onto the query position was that head's), and what
    it keeps at the query position stays local. Every path from another position takes exactly
    one such last step, so for any change ``dw`` of a leaf, with ``dx_k`` the change it makes
    in ``x_k`` (:func:`stream_tangents`),

        <full gradient, dw> = <local gradient, dw> + sum over (k, h) of <cross_kh, dx_k>.

    Returns the local gradient per leaf of ``stream.leaves(top)`` (``[batch pos d]``, zero off
    the query position) and, per layer ``k`` below the read, the heads' cross-position
    cotangents on ``x_k`` (``[head batch pos d]``).
    """
    B, P, _ = cot.shape
    L = len(stream.x) - 1
    at_q = torch.zeros(B, P, 1, dtype=cot.dtype, device=cot.device)
    at_q[torch.arange(B, device=cot.device), query.to(cot.device)] = 1.0
    g = cot * at_q
    leaves = stream.leaves(top if top < L else None)
    local = {id(t): torch.zeros_like(t) for t in leaves}
    cross: list[tuple[int, Tensor]] = []
    # a read of mid_top passes layer top's attention; a read of x_top (parallel, logits) not
    first = top if (top < L and not stream.parallel) else top - 1
    H = stream.head_writes[0].shape[2]
    for k in range(first, -1, -1):
        if k < top and k in stream.consts:  # g is at x_{k+1}, which c_k writes into
            local[id(stream.consts[k])] += g
        gp = g if stream.attn_write[k] is stream.attn_pre[k] else torch.autograd.grad(
            stream.attn_write[k], stream.attn_pre[k], g, retain_graph=True)[0]
        eye = torch.eye(H, dtype=gp.dtype, device=gp.device)
        cots = eye[:, None, None, :, None] * gp[None, :, :, None, :]  # [H B P H d]
        (v,) = batched_grad(stream.head_writes[k], [stream.x[k]], cots)  # [H B P d]
        cross.append((k, v * (1 - at_q[None])))
        g = g + (v * at_q[None]).sum(0)
    local[id(stream.x[0])] += g
    return [local[id(t)] for t in leaves], cross
