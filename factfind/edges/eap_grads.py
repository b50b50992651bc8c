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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.types import Component, Metric, SiteKey

if TYPE_CHECKING:
    from factfind.model import Model


STACK_ROWS = 32
"""Integration points are stacked on the batch dimension up to this many rows per forward and
backward pass (fewer passes; on a CPU a stacked pass costs less per row, since each pass
re-reads every weight)."""


def receiver_grads(model: Model, pb: PairBatch, masks: Tensor, metric: Metric, *,
                   base: Tensor | None = None, alphas: Sequence[float] = (1.0,),
                   extra: Sequence[SiteKey] = (), cache: dict[Any, Tensor] | None = None
                   ) -> tuple[list[Tensor], Tensor, Tensor, dict[SiteKey, Tensor]]:
    """Every receiver's input gradient, averaged over integration points.

    Args:
        model: the model.
        pb: the batch (its clean prompts are run).
        masks: ``[R batch pos]`` float, one row per query role of the head receivers.
        metric: ``metric(logits, correct, wrong) -> [batch]``; its sum is differentiated.
        base: the input embeddings the points start from (EAP-IG: the corrupt run's), or
            None (every point is the clean input).
        alphas: the points ``base + alpha (clean - base)`` (``alpha = 1``: the clean input
            itself); the gradients are averaged over them. Up to :data:`STACK_ROWS` rows of
            points run stacked in one forward and backward pass.
        extra: more sites to save from the clean point's run (returned as the last value;
            ``alphas[0]`` must then be 1).
        cache: per-layer projection weights, kept between calls.

    Returns:
        Per layer the heads' gradients ``[R head batch pos d_model]``; the MLPs'
        ``[layer batch pos d_model]``; the logits' ``[batch pos d_model]``; the ``extra``
        activations.

    Cost: per point one forward and backward pass (about 3 FE; less stacked) plus, per layer,
    the head's attention pulled back in head space (``roles x batch x heads x pos^2 x
    d_head``) and one projection of the normalised input (``batch x pos x d_model x 3 heads
    d_head``, a third of the layer's forward); once, the projection of the summed cotangents
    to ``d_model`` (``roles x batch x pos x heads x 2 d_head x d_model``) - the pull-back to
    the residual stream is linear in the cotangents, so it is paid once per batch, not once
    per point.
    """
    if extra and alphas[0] != 1:
        raise ValueError("extra activations come from the clean point: alphas[0] must be 1")
    L = model.n_layers
    save = [(c, layer) for layer in range(L) for c in (
        Component.RESID_PRE, Component.RESID_POST, Component.Z, Component.Q, Component.K,
        Component.V)]
    cache = {} if cache is None else cache
    weight = 1 / len(alphas)
    B = pb.clean.input_ids.shape[0]
    per = max(1, STACK_ROWS // B)
    state: list[dict[str, Any]] = [{} for _ in range(L)]
    mlps: Tensor | None = None
    logits: Tensor | None = None
    saved: dict[SiteKey, Tensor] = {}
    keys = pb.clean.attention_mask.bool()
    masks = masks.float()
    rest = 1 - masks.sum(0, keepdim=True)  # positions of no role (padding): the MLP needs them
    full = torch.cat([masks, rest]) if bool(rest.abs().max() > 0) else masks
    for c0 in range(0, len(alphas), per):
        chunk = list(alphas[c0:c0 + per])
        c = len(chunk)
        batch = pb.clean.repeat(c) if c > 1 else pb.clean
        correct, wrong = pb.correct.repeat(c), pb.wrong.repeat(c)
        edits = {}
        if base is not None and any(a != 1 for a in chunk):
            a = torch.tensor(chunk).repeat_interleave(B)

            def point(e: Tensor, a: Tensor = a, c: int = c) -> Tensor:
                b = base.to(e.device, e.dtype).repeat(c, 1, 1)
                w = a.to(e.device, e.dtype)[:, None, None]
                return torch.where(w == 1, e, b + w * (e - b))
            edits[(Component.EMBED, 0)] = point

        def total(logits: Tensor, correct: Tensor = correct, wrong: Tensor = wrong) -> Tensor:
            return metric(logits, correct, wrong).sum()

        run = model.run(batch, save=list(dict.fromkeys([*save, *(extra if c0 == 0 else [])])),
                        metric=total, edits=edits)
        acts, grads = run.acts, run.grads
        dtype = acts[(Component.RESID_PRE, 0)].dtype
        dev = acts[(Component.RESID_PRE, 0)].device
        if c0 == 0:
            saved = {k: acts[k][:B] for k in extra}

        def rep(t: Tensor, dev: torch.device = dev, c: int = c) -> Tensor:  # copy-major rows
            return t.to(dev).repeat(*([1] * (t.dim() - 2)), c, 1)

        for layer in range(L):
            _accumulate(model, layer, state[layer], acts[(Component.RESID_PRE, layer)],
                        acts[(Component.Q, layer)].to(dtype), acts[(Component.K, layer)].to(dtype),
                        acts[(Component.V, layer)], grads[(Component.Z, layer)],
                        rep(full).to(dtype), rep(keys), rep(pb.clean.position_ids), cache,
                        weight, c)
        g_mlp = torch.stack([grads[(Component.RESID_PRE, layer)]
                             - grads[(Component.RESID_POST, layer)] for layer in range(L)])
        g_mlp = g_mlp.reshape(L, c, B, *g_mlp.shape[2:]).sum(1)
        g_logits = grads[(Component.RESID_POST, L - 1)]
        g_logits = g_logits.reshape(c, B, *g_logits.shape[1:]).sum(0)
        if mlps is None or logits is None:
            mlps, logits = g_mlp * weight, g_logits * weight
        else:
            mlps.add_(g_mlp, alpha=weight)
            logits.add_(g_logits, alpha=weight)
        del run, acts, grads
    assert mlps is not None and logits is not None
    heads = []
    full = full.to(mlps.device, mlps.dtype)
    for layer in range(L):
        g = _project(model, layer, state[layer], full, pb.clean.position_ids, cache)
        state[layer] = {}
        heads.append(g[:len(masks)])
        mlps[layer] -= g.sum((0, 1))  # the whole attention's share of dm/dresid_pre
    return heads, mlps, logits, saved


def _accumulate(model: Model, layer: int, acc: dict[str, Any], resid: Tensor, q: Tensor,
                k: Tensor, v: Tensor, dz: Tensor, masks: Tensor, keys: Tensor,
                position_ids: Tensor, cache: dict[Any, Tensor], weight: float, c: int = 1
                ) -> None:
    """Add ``c`` stacked points' share of layer ``layer``'s head cotangents to ``acc``, in
    head space.

    Per role mask and query head, the gradient of ``<dz_h * mask, z_h>`` w.r.t. ``resid``
    through head ``h`` alone (see the module docstring) is ``(W_h c - xh (xh . W_h c)) / s``
    with ``c`` the head's query/key/value cotangents (rotary transposed), ``W_h`` its
    projections (the norm's gain and centring folded in), ``xh`` and ``s`` the norm's
    normalised input and scale. Summed over points that is ``W_h (sum c / s) - sum alpha xh``
    with ``alpha = (c . xh W_h) / (d s)``: ``acc`` keeps ``sum c / s`` (in rotary space; the
    transpose is linear and the same at every point) and each point's ``alpha`` and ``xh``.
    ``q k v dz`` are ``[c*batch pos head d_head]`` (copy-major); ``masks`` ``[R c*batch
    pos]``; ``keys`` ``[c*batch pos]`` bool."""
    (CB, P), d, dt = q.shape[:2], resid.shape[-1], q.dtype
    H, e = q.shape[2], q.shape[3]
    B = CB // c
    scale = model.attn_scale(layer)
    causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & keys[:, None, None, :]
    scores = torch.einsum("bphe,bkhe->bhpk", q, k) * scale
    A = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(-1)
    dA = torch.einsum("bphe,bkhe->bhpk", dz, v)
    dS = A * (dA - (A * dA).sum(-1, keepdim=True))
    # a query serves its own position only: its cotangent is split by role later (a mask)
    dq = torch.einsum("bhpk,bkhe->bphe", dS, k) * scale
    # a role's queries read keys and values at every position they attend to
    m = masks[:, :, None, :, None]  # [R CB 1 P 1]
    dk = torch.matmul((m * dS).transpose(-1, -2), q.transpose(1, 2)[None]) * scale
    dv = torch.matmul((m * A).transpose(-1, -2), dz.transpose(1, 2)[None])  # [R CB H P e]
    dk, dv = dk.transpose(2, 3), dv.transpose(2, 3)  # [R CB P H e]
    gain, xh, s, centred = model.attn_norm(layer, resid)
    if layer not in cache:
        W = torch.cat(model.W_QKV(layer), -1).to(dt) * gain.to(dt)[None, :, None]
        cache[layer] = (W - W.mean(1, keepdim=True) if centred else W).contiguous()
        cache[("flat", layer)] = cache[layer].permute(1, 0, 2).reshape(d, -1).contiguous()
    # xh projected per head (the query/key/value the normalised input makes, without biases)
    Y = (xh.reshape(CB * P, d).to(dt) @ cache[("flat", layer)]).reshape(CB, P, H, 3 * e)
    yq, yk = model.rotary(layer, Y[..., :e], Y[..., e:2 * e], position_ids)
    inv = (weight / s).to(dt)  # [CB P 1]
    alpha = masks[..., None] * (dq * yq).sum(-1) + (dk * yk).sum(-1) + (dv * Y[..., 2 * e:]
                                                                        ).sum(-1)
    R = alpha.shape[0]
    alpha = (alpha * (inv / d)).reshape(R, c, B, P, H).transpose(0, 1)
    acc.setdefault("alpha", []).append(alpha)  # [c R B P H]
    acc.setdefault("xh", []).append(xh.to(dt).reshape(c, B, P, d))
    inv = inv[..., None]
    for name, x in (("q", (dq * inv)[None]), ("k", dk * inv), ("v", dv * inv)):
        x = x.reshape(x.shape[0], c, B, *x.shape[2:]).sum(1)
        if name in acc:
            acc[name].add_(x)
        else:
            acc[name] = x


def _project(model: Model, layer: int, acc: dict[str, Any], masks: Tensor,
             position_ids: Tensor, cache: dict[Any, Tensor]) -> Tensor:
    """``[R head batch pos d_model]``: the summed head cotangents of :func:`_accumulate` taken
    to the residual stream: rotary transpose, the head's projections, the norm's rank-one
    term."""
    dq, dk = model.rotary_transpose(layer, acc["q"], acc["k"], position_ids)
    W = cache[layer]  # [head d_model 3*d_head]: q | k | v
    e = dq.shape[-1]
    g = torch.einsum("rbphe,hde->rhbpd", torch.cat([dk, acc["v"]], -1), W[..., e:])
    gq = torch.einsum("bphe,hde->hbpd", dq[0], W[..., :e])
    g += masks[:, None, :, :, None] * gq[None]
    alpha, xh = torch.cat(acc["alpha"]), torch.cat(acc["xh"])  # [K R B P H], [K B P d]
    g -= torch.einsum("krbph,kbpd->rhbpd", alpha, xh)
    return g
