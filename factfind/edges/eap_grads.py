"""EAP's receiver gradients from one forward and backward pass per integration point.

:mod:`factfind.edges.eap` scores an edge ``u -> v`` as ``(a_u(corrupt) - a_u(clean)) . dm/dx_v``,
where ``x_v`` is *v's own copy* of the residual stream. The residual stream is shared, so one
backward pass gives ``dm/dx`` summed over all of a layer's readers; this module separates them
with a few small per-layer computations on the saved activations instead of one detached copy of
the batch per receiver (:mod:`factfind.edges.eap_reference`, the slow reference):

* **a head at query role r** reads the stream through its query at the positions of ``r`` and
  its key and value at every position. Its receiver gradient is the gradient of ``<dz_h *
  mask_r, z_h>`` with respect to ``x`` through head ``h`` alone, where ``dz_h = dm/dz_h`` comes
  from the backward pass (``z`` is the output projection's input, so ``dz`` already carries
  everything downstream: the output projection, a post norm with its real scale, the rest of
  the model). The way from ``x`` to ``z_h`` splits in two
  (:class:`~factfind.model.attention.LayerAttention`):

  - the *linear* part: the block's input norm (``x -> c / s``; linear but for its scale ``s``)
    and the projections ``y = (c / s) W + b``, per query head;
  - the *head space* part ``y -> z``: q/k norms, rotary embedding, scale, softcap, the causal,
    padding and sliding-window mask, softmax, ``z = A v``, recomputed from the saved block
    input (a few hundredths of a layer's forward). Its vector-Jacobian product with cotangent
    ``dz * mask_r`` gives the cotangent ``dy`` of each head's own projections (keys and values
    repeated per query head, so under grouped-query attention each query head gets its own
    share): the softmax attention is pulled back by hand (every role at once, on a leading
    dimension), the q/k norms and the rotary embedding - maps of one position, whatever the
    family makes of them - by autograd (the queries once: a query serves its own position
    only; the keys once per role, batched). The recomputed ``z`` is checked against the
    model's (:class:`~factfind.model.attention.AttentionMismatchError` otherwise): whatever
    the family does, the gradients are those of the model.

  Back in the residual stream, ``dx = (W dy - xh (xh . W dy) / d) / s`` with ``xh = c / s``
  (the input norm's vector-Jacobian product, centred for LayerNorm; ``W dy`` alone without an
  input norm). ``W`` is the same at every integration point, so ``sum_points dy / s`` is kept
  in head space and taken to ``d_model`` once per batch, and only the rank-one terms
  (``xh (xh . W dy)``, one number per role, head and token) are kept per point. A
  whole-projection q/k norm (OLMo 2) couples the heads through its scale ``s_q = rms(y_q)``:
  it enters the recomputation as a separate input per head, and its cotangent ``beta`` adds
  ``beta y_q / (F s_q)`` to every head's ``dy_q`` - one more rank-one term per point.
* **the MLP** of layer ``l``: ``dm/dresid_pre - dm/dresid_post`` minus every head's share (the
  whole attention's vector-Jacobian product). In a sequential block this is
  ``g_post J_mlp``, in a parallel one too (both read ``resid_pre``).
* **the logits** read ``dm/dresid_post`` of the last layer.

The tests check the result against the reference for every family factfind supports
(:data:`factfind.testing.models.FAMILIES` and the derived ones), EAP and EAP-IG, with sliding
windows shorter than the prompt.

Cost per integration point: one forward and backward pass (about 3 FE), plus per layer one
projection of the normalised input (``batch x pos x d_model x (heads + 2 kv_heads) d_head``,
what the layer's own projections cost) and the head-space pull-back for every role; once per
batch, the
projection of the summed cotangents to ``d_model`` (``roles x batch x pos x heads x 3 d_head
x d_model``), independent of the number of points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.metrics import logit_diff
from factfind.model.attention import AttentionMismatchError, LayerAttention, layer_attention
from factfind.types import Component, Metric, SiteKey

if TYPE_CHECKING:
    from factfind.model import Model


STACK_ROWS = 32
"""Integration points are stacked on the batch dimension up to this many rows per forward and
backward pass (fewer passes; on a CPU a stacked pass costs less per row, since each pass
re-reads every weight)."""


def receiver_grads(model: Model, pb: PairBatch, masks: Tensor, metric: Metric, *,
                   base: Tensor | None = None, alphas: Sequence[float] = (1.0,),
                   extra: Sequence[SiteKey] = (), cache: dict[Any, Any] | None = None
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
        cache: per-layer attention pieces and projection weights, kept between calls.

    Returns:
        Per layer the heads' gradients ``[R head batch pos d_model]``; the MLPs'
        ``[layer batch pos d_model]``; the logits' ``[batch pos d_model]``; the ``extra``
        activations.

    Raises:
        AttentionMismatchError: a layer's attention, recomputed from its projections, is not
            the model's (an attention variant :mod:`factfind.model.attention` does not know).

    Cost: per point one forward and backward pass (about 3 FE; less stacked) plus, per layer,
    one projection of the normalised input (``batch x pos x d_model x (heads + 2 kv_heads)
    d_head``) and the head-space recomputation and its pull-back for every role (``roles x
    batch x heads x pos^2 x d_head``); once, the projection of the summed
    cotangents to ``d_model`` (``roles x batch x pos x heads x 2 d_head x d_model``, plus the
    queries once) - the pull-back to the residual stream is linear in the cotangents, so it
    is paid once per batch, not once per point.
    """
    if extra and alphas[0] != 1:
        raise ValueError("extra activations come from the clean point: alphas[0] must be 1")
    L = model.n_layers
    save = [(c, layer) for layer in range(L)
            for c in (Component.RESID_PRE, Component.RESID_POST, Component.Z)]
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
    # the logit difference needs two logits per row, not the whole unembedding (and its
    # backward: a tenth of the pass on Gemma-3-270M's 262k-token vocabulary)
    answers = metric is logit_diff
    # real tokens of no role (none when the roles partition the prompt): the MLP's share needs
    # the whole attention's; padding queries feed nothing (dz = 0 there), so they need no row
    rest = (1 - masks.sum(0, keepdim=True)) * keys.to(masks.device)
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
            if answers:  # the two answers' logits only
                return (logits[:, 0] - logits[:, 1]).float().sum()
            return metric(logits, correct, wrong).sum()

        run = model.run(batch, save=list(dict.fromkeys([*save, *(extra if c0 == 0 else [])])),
                        metric=total, edits=edits,
                        logits=pb.answer_ids(c) if answers else "final")
        acts, grads = run.acts, run.grads
        dev = acts[(Component.RESID_PRE, 0)].device
        dt = torch.promote_types(acts[(Component.RESID_PRE, 0)].dtype, torch.float32)
        if c0 == 0:
            saved = {k: acts[k][:B] for k in extra}

        def rep(t: Tensor, dev: torch.device = dev, c: int = c) -> Tensor:  # copy-major rows
            return t.to(dev).repeat(*([1] * (t.dim() - 2)), c, 1)

        for layer in range(L):
            _accumulate(model, layer, state[layer], acts[(Component.RESID_PRE, layer)],
                        acts[(Component.Z, layer)], grads[(Component.Z, layer)],
                        rep(full).to(dt), rep(keys), rep(pb.clean.position_ids), cache,
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
    for layer in range(L):
        g = _project(model, layer, state[layer], full, cache)
        state[layer] = {}
        heads.append(g[:len(masks)].to(mlps.dtype))
        mlps[layer] -= g.sum((0, 1)).to(mlps.dtype)  # the whole attention's share of dm/dresid_pre
    return heads, mlps, logits, saved


def _attention(model: Model, layer: int, cache: dict[Any, Any], dt: torch.dtype
               ) -> tuple[LayerAttention, Tensor, Tensor]:
    """Layer ``layer``'s :class:`~factfind.model.attention.LayerAttention`, its projections
    ``W [head d_model 3*d_head]`` in ``dt`` (centred for LayerNorm: the input norm's
    vector-Jacobian product centres, and ``xh W`` is the same since ``xh`` is centred) and
    the distinct ones as one ``[d_model (heads + 2 kv_heads) d_head]`` matrix (each key-value
    head once); cached."""
    if ("att", layer) not in cache:
        att = layer_attention(model, layer)
        W = att.W.to(dt)
        W = (W - W.mean(1, keepdim=True) if att.centred else W).contiguous()
        e, group = model.d_head, model.n_heads // model.n_kv_heads
        parts = (W[..., :e], W[::group, :, e:2 * e], W[::group, :, 2 * e:])
        flat = torch.cat([w.permute(1, 0, 2).flatten(1) for w in parts], -1).contiguous()
        cache[("att", layer)] = (att, W, flat)
    return cache[("att", layer)]


def _project_input(model: Model, xh: Tensor, flat: Tensor) -> Tensor:
    """``xh W`` per query head ``[batch pos head 3*d_head]`` from ``xh [batch pos d_model]``:
    one product with the distinct projections (:func:`_attention`), the key-value heads then
    repeated per query head."""
    (N, P, d), H, K, e = xh.shape, model.n_heads, model.n_kv_heads, model.d_head
    Y = (xh.reshape(N * P, d) @ flat).reshape(N, P, H + 2 * K, e)
    q, k, v = Y.split([H, K, K], 2)
    if K != H:
        k, v = k.repeat_interleave(H // K, 2), v.repeat_interleave(H // K, 2)
    return torch.cat([q, k, v], -1)


def _accumulate(model: Model, layer: int, acc: dict[str, Any], resid: Tensor, z: Tensor,
                dz: Tensor, masks: Tensor, keys: Tensor, position_ids: Tensor,
                cache: dict[Any, Any], weight: float, c: int = 1) -> None:
    """Add ``c`` stacked points' share of layer ``layer``'s head cotangents to ``acc``.

    Per role (``masks [R c*batch pos]``, the last one possibly the positions of no role) and
    query head, the cotangent ``dy`` of the head's own projections, in three steps:

    1. the softmax attention, by hand (``dz`` masked to the role's queries)::

           dS   = A * (dA - rowsum(A * dA)) (* the softcap's slope),   dA = dz v^T
           dq   = scale dS k                 (every role at once: a query serves its own
                                              position, so a role's share is its positions')
           dk_r = scale (mask_r * dS)^T q,   dv_r = (mask_r * A)^T dz

    2. the q/k norms and the rotary embedding (maps of one position) by autograd: once for the
       queries, once per role, batched, for the keys;
    3. the recomputed ``z = A v`` is checked against the model's ``z``.

    ``acc`` keeps, summed over points, ``dy / s`` (the queries summed over roles, taken apart
    again in :func:`_project`), and per point the rank-one terms ``(coefficient [R batch pos
    head], vector [batch pos d_model])``: the input norm's ``-(dy . y0) / (d s)`` on ``xh``
    (``y0 = xh W``, the projections without biases) and a whole-projection q/k norm's.
    ``resid`` ``[c*batch pos d_model]``, ``z`` and ``dz`` ``[c*batch pos head d_head]``
    (copy-major); ``keys`` ``[c*batch pos]`` bool."""
    dt = masks.dtype
    att, W, flat = _attention(model, layer, cache, dt)
    (CB, P, d), H, e = resid.shape, model.n_heads, model.d_head
    B, R = CB // c, masks.shape[0]
    xh, s = att.normalise(resid.to(dt))
    Y = _project_input(model, xh, flat)  # xh W: no biases
    y = Y + att.b.to(dt)
    scales = att.qk_scales(y)
    # a padding query's scores are all masked (a constant row: no gradient to q or k); its
    # dz is zero in a real run anyway (it feeds nothing), zero it for the pull-back to hold
    v, dz = y[..., 2 * e:], dz.to(dt) * keys[..., None, None]
    with torch.enable_grad():
        yq, yk = (y[..., i * e:(i + 1) * e].detach().requires_grad_(True) for i in (0, 1))
        sq, sk = ((t.expand(CB, P, H, 1).clone().requires_grad_(True) for t in scales)
                  if scales is not None else (None, None))
        q, k = att.local(yq, yk, position_ids, None if sq is None or sk is None else (sq, sk))
    A, slope = att.pattern(q.detach(), k.detach(), keys)
    A = A.to(dt)
    att.check(torch.einsum("bhpk,bkhe->bphe", A, v), z, keys)
    dA = torch.einsum("bphe,bkhe->bhpk", dz, v)
    dS = A * (dA - (A * dA).sum(-1, keepdim=True))
    if slope is not None:
        dS = dS * slope.to(dt)
    dS = dS * att.scale
    m = masks[:, :, None, :, None]  # [R CB 1 P 1]
    dk = torch.matmul((m * dS).transpose(-1, -2), q.detach().transpose(1, 2)[None])
    dv = torch.matmul((m * A).transpose(-1, -2), dz.transpose(1, 2)[None])  # [R CB H P e]
    dk, dv = dk.transpose(2, 3), dv.transpose(2, 3)  # [R CB P H e]
    with torch.enable_grad():
        dq = torch.einsum("bhpk,bkhe->bphe", dS, k.detach())
        got_q = torch.autograd.grad(q, [yq, *([sq] if sq is not None else [])], dq,
                                    retain_graph=True)
        got_k = torch.autograd.grad(k, [yk, *([sk] if sk is not None else [])], dk,
                                    is_grads_batched=True)
    dyq, dyk = got_q[0], got_k[0]  # [CB P H e], [R CB P H e]
    role = masks[..., None]  # [R CB P 1]
    dot = (role * (dyq * Y[..., :e]).sum(-1)[None] + (dyk * Y[..., e:2 * e]).sum(-1)
           + (dv * Y[..., 2 * e:]).sum(-1))  # [R CB P H]: (W dy) . xh
    inv = weight / s  # [CB P 1]
    terms: list[tuple[Tensor, Tensor]] = []
    if scales is not None:
        group = H // model.n_kv_heads
        betas = (role * got_q[1][..., 0][None], got_k[1][..., 0])  # [R CB P H] each
        for i, beta in enumerate(betas):  # the scale of the queries' norm, then the keys'
            part, step = slice(i * e, (i + 1) * e), 1 if i == 0 else group
            ds = y[..., ::step, part] / ((H // step) * e * scales[i])  # d s / d y, distinct heads
            dot = dot + beta * (ds * Y[..., ::step, part]).sum((-1, -2))[None, ..., None]
            terms.append((beta * inv[None], torch.einsum("bphe,hde->bpd", ds,
                                                          W[::step, :, part])))
    if att.has_norm:
        terms.append((-dot * (inv / d)[None], xh))
    inv = inv[..., None]
    parts = {"q": (dyq * inv).reshape(c, B, P, H, e).sum(0),
             "k": (dyk * inv).reshape(R, c, B, P, H, e).sum(1),
             "v": (dv * inv).reshape(R, c, B, P, H, e).sum(1)}
    for name, x in parts.items():
        if name in acc:
            acc[name].add_(x)
        else:
            acc[name] = x
    for coef, vec in terms:
        acc.setdefault("coef", []).append(coef.reshape(R, c, B, P, H).transpose(0, 1))
        acc.setdefault("vec", []).append(vec.reshape(c, B, P, d))


def _project(model: Model, layer: int, acc: dict[str, Any], masks: Tensor,
             cache: dict[Any, Any]) -> Tensor:
    """``[R head batch pos d_model]``: the summed head cotangents of :func:`_accumulate` taken
    to the residual stream: the head's projections, then the rank-one terms."""
    _, W, _ = _attention(model, layer, cache, acc["k"].dtype)
    e = model.d_head
    g = torch.einsum("rbphe,hde->rhbpd", acc["k"], W[..., e:2 * e])
    g += torch.einsum("rbphe,hde->rhbpd", acc["v"], W[..., 2 * e:])
    gq = torch.einsum("bphe,hde->hbpd", acc["q"], W[..., :e])
    g += masks.to(g.device, g.dtype)[:, None, :, :, None] * gq[None]
    if "coef" in acc:  # [K R B P H], [K B P d]
        g += torch.einsum("krbph,kbpd->rhbpd", torch.cat(acc["coef"]), torch.cat(acc["vec"]))
    return g


__all__ = ["STACK_ROWS", "AttentionMismatchError", "receiver_grads"]
