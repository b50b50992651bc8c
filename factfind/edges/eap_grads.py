"""EAP's receiver gradients from one forward and backward pass per integration point.

:mod:`factfind.edges.eap` scores an edge ``u -> v`` as ``(a_u(corrupt) - a_u(clean)) . dm/dx_v``,
where ``x_v`` is *v's own copy* of the residual stream. The residual stream is shared, so one
backward pass gives ``dm/dx`` summed over all of a layer's readers; this module separates them
with a few small per-layer computations on the saved activations instead of one detached copy of
the batch per receiver (:mod:`factfind.edges.eap_reference`, the slow reference):

* **a head at query role r** reads the stream through its query at the positions of ``r`` and
  its key and value at every position. From the backward pass we take ``dz_h = dm/dz_h`` (the
  head's output before ``W_O``) and recompute, from the saved queries, keys (rotary applied)
  and values, its attention ``A = softmax(scale q k^T + causal/padding mask)``. Masking ``dz_h``
  to the positions of ``r`` and back-propagating through this one head's attention by hand::

      dS   = A * (dA - rowsum(A * dA)),   dA = dz_h v_h^T
      dq_r = mask_r * scale dS k_h        (a query serves only its own position)
      dk_r = scale (mask_r * dS)^T q_h,   dv_r = (mask_r * A)^T dz_h

  gives the cotangents of *this* query head's query, key and value. With grouped-query
  attention a key-value head serves several query heads; working per query head (keys and
  values repeated, as in the ``k``/``v`` sites) gives each its own share. The rotary
  embedding's transpose, then the head's own slices of ``W_Q``, ``W_K``, ``W_V``
  (:meth:`~factfind.model.Model.W_QKV`) and then the vector-Jacobian product of the block's
  input norm at the saved residual take them to ``dm/dx_v [batch pos d_model]``.
* **the MLP** of layer ``l``: ``dm/dresid_pre - dm/dresid_post`` minus every head's share (the
  whole attention's vector-Jacobian product). In a sequential block this is
  ``g_post J_mlp``, in a parallel one too (both read ``resid_pre``).
* **the logits** read ``dm/dresid_post`` of the last layer.

This assumes attention is ``softmax(scale q.k + mask) v`` over the prompt (no logit
soft-capping, no sliding window shorter than the prompt), which holds for every registered
family; the tests check it against the reference on GPT-2, GPT-NeoX and grouped-query Llama,
Mistral and Qwen2 models.

Cost per integration point: one forward and backward pass (about 3 FE), plus per layer work of
order ``roles x batch x pos x d_model^2`` for the projections (a few tenths of an FE in all at
six roles), independent of the number of heads' copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.types import Component, Metric, SiteKey

if TYPE_CHECKING:
    from factfind.model import Model


def receiver_grads(model: Model, pb: PairBatch, masks: Tensor, metric: Metric,
                   embed: Tensor | None, *, extra: Sequence[SiteKey] = (),
                   cache: dict[int, Tensor] | None = None
                   ) -> tuple[list[Tensor], Tensor, Tensor, dict[SiteKey, Tensor]]:
    """Every receiver's input gradient at one point.

    Args:
        model: the model.
        pb: the batch (its clean prompts are run).
        masks: ``[R batch pos]`` float, one row per query role of the head receivers.
        metric: ``metric(logits, correct, wrong) -> [batch]``; its sum is differentiated.
        embed: input embeddings to run instead of the clean ones (an EAP-IG point), or None.
        extra: more sites to save (returned as the last value).
        cache: per-layer projection weights, kept between calls.

    Returns:
        Per layer the heads' gradients ``[R head batch pos d_model]``; the MLPs'
        ``[layer batch pos d_model]``; the logits' ``[batch pos d_model]``; the ``extra``
        activations.
    """
    L = model.n_layers
    save = [(c, layer) for layer in range(L) for c in (
        Component.RESID_PRE, Component.RESID_POST, Component.Z, Component.Q, Component.K,
        Component.V)]
    edits = {}
    if embed is not None:
        edits[(Component.EMBED, 0)] = lambda e: embed.to(e.device, e.dtype)

    def total(logits: Tensor) -> Tensor:
        return metric(logits, pb.correct, pb.wrong).sum()

    run = model.run(pb.clean, save=list(dict.fromkeys([*save, *extra])), metric=total,
                    edits=edits)
    acts, grads = run.acts, run.grads
    dtype = acts[(Component.RESID_PRE, 0)].dtype
    keys = pb.clean.attention_mask.to(acts[(Component.RESID_PRE, 0)].device).bool()
    heads, mlps = [], []
    masks = masks.to(keys.device, dtype)
    rest = 1 - masks.sum(0, keepdim=True)  # positions of no role (padding): the MLP needs them
    full = torch.cat([masks, rest]) if bool(rest.abs().max() > 0) else masks
    cache = {} if cache is None else cache
    for layer in range(L):
        pre = acts[(Component.RESID_PRE, layer)]
        g = _head_grads(model, layer, pre, acts[(Component.Q, layer)].to(dtype),
                        acts[(Component.K, layer)].to(dtype), acts[(Component.V, layer)],
                        grads[(Component.Z, layer)], full, keys, pb.clean.position_ids, cache)
        heads.append(g[:len(masks)])
        attn = g.sum((0, 1))
        mlps.append(grads[(Component.RESID_PRE, layer)] - grads[(Component.RESID_POST, layer)]
                    - attn)
    return heads, torch.stack(mlps), grads[(Component.RESID_POST, L - 1)], \
        {k: acts[k] for k in extra}


def _head_grads(model: Model, layer: int, resid: Tensor, q: Tensor, k: Tensor, v: Tensor,
                dz: Tensor, masks: Tensor, keys: Tensor, position_ids: Tensor,
                cache: dict[int, Tensor]) -> Tensor:
    """``[R head batch pos d_model]``: per role mask and query head, the gradient of
    ``<dz_h * mask, z_h>`` w.r.t. ``resid`` through head ``h`` alone (see the module
    docstring). ``q k v dz`` are ``[batch pos head d_head]``; ``keys`` ``[batch pos]`` bool."""
    (B, P), d, dt = q.shape[:2], resid.shape[-1], q.dtype
    scale = model.attn_scale(layer)
    causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & keys[:, None, None, :]
    scores = torch.einsum("bphe,bkhe->bhpk", q, k) * scale
    A = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
    dA = torch.einsum("bphe,bkhe->bhpk", dz, v)
    dS = A * (dA - (A * dA).sum(-1, keepdim=True))
    # a query serves its own position only: pull the unmasked dq back once, split it by role
    dq = torch.einsum("bhpk,bkhe->bphe", dS, k) * scale
    dk = torch.einsum("rbp,bhpk,bphe->rbkhe", masks, dS, q) * scale
    dv = torch.einsum("rbp,bhpk,bphe->rbkhe", masks, A, dz)
    dq, dk = model.rotary_transpose(layer, dq[None], dk, position_ids)
    # the norm's vector-Jacobian product (Model.attn_norm) folded into the projections: the
    # gain (and LayerNorm's centring) into W and 1/s into the cotangents
    gain, xh, s, centred = model.attn_norm(layer, resid)
    if layer not in cache:
        W = torch.cat(model.W_QKV(layer), -1).to(dt) * gain.to(dt)[None, :, None]
        cache[layer] = (W - W.mean(1, keepdim=True) if centred else W).contiguous()
    W = cache[layer]  # [head d_model 3*d_head]: q | k | v
    e = dq.shape[-1]
    inv = 1 / s[None, :, :, :, None]  # [1 B P 1 1]
    dq, dkv = dq[0] * inv[0], torch.cat([dk, dv], -1) * inv
    gq = torch.einsum("bphe,hde->hbpd", dq, W[..., :e]).reshape(-1, B * P, d)
    R = masks.shape[0]
    g = torch.empty(R, gq.shape[0], B, P, d, dtype=dt, device=q.device)
    # causal: role r's queries read keys and values up to its last position only
    ends = [int(m.sum(0).nonzero().max()) + 1 if bool(m.any()) else 0 for m in masks]
    for r, end in enumerate(ends):
        g[r, :, :, end:] = 0
        if end:
            g[r, :, :, :end] = torch.einsum("bphe,hde->hbpd", dkv[r, :, :end], W[..., e:])
        idx = masks[r].reshape(-1).nonzero()[:, 0]
        g[r].view(-1, B * P, d).index_add_(1, idx, gq[:, idx])
        if end:  # the norm's rank-one term: minus xh * mean(g * xh)
            x = xh[:, :end]
            c = torch.einsum("hbpd,bpd->hbp", g[r, :, :, :end], x) / d
            g[r, :, :, :end] -= c[..., None] * x[None]
    return g
