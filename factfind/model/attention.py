"""One attention layer as a plain function of its heads' projections, for every family.

An attention layer reads the residual stream ``x`` and writes ``z`` (the input of its output
projection), one query head at a time. Across the registered families the forward is::

    xn = norm(x) = gain * c / s (+ bias)     input norm: c = x (RMSNorm) or x - mean(x)
                                             (LayerNorm), s = sqrt(mean(c^2) + eps);
                                             OLMo 2 / EXAONE 4 blocks have none (xn = x)
    y_q, y_k, y_v = xn W_Q + b_Q, ...        per query head (key-value heads repeated); one
                                             fused matrix in GPT-2, NeoX and Phi-3
    q, k = qk_norm(y_q), qk_norm(y_k)        per head (Qwen3, Gemma 3, EXAONE 4) or over the
                                             whole projection (OLMo 2)
    q, k = rotary(q), rotary(k)              rotate-half (Llama...), partial (NeoX, Phi-3),
                                             interleaved (GPT-J), per layer type (Gemma 3),
                                             none on EXAONE 4's global layers
    S = softcap(scale q . k)                 cap * tanh(. / cap) in Gemma 2
    A = softmax(S + mask)                    causal, padding, and a sliding window where the
                                             layer has one (Mistral, Gemma 2/3, ...)
    z = A v

Everything after the projections is *per query head*: with the key-value heads repeated, head
``h``'s ``z`` depends on its own ``y_q[h], y_k[h], y_v[h]`` only - except through a
whole-projection q/k norm, whose scale ``s_q = rms(y_q over every head)`` couples them.
:class:`LayerAttention` exposes the pieces in that form: :meth:`~LayerAttention.normalise`
(``c / s`` and ``s``), ``W`` and ``b`` (``y = (c / s) W + b``, the gain folded in),
:meth:`~LayerAttention.local` (the q/k norms and the rotary embedding: maps of one position,
the whole-norm scales an input of their own) and :meth:`~LayerAttention.pattern` (``A``), so
that a caller can differentiate through one head alone (EAP's receiver gradients,
:mod:`factfind.edges.eap_grads`). :meth:`~LayerAttention.recompute` chains them from the
residual stream; the tests check it against the model's own ``z`` for every family.

Example::

    att = layer_attention(model, 3)
    z = att.recompute(resid_pre, attention_mask, position_ids)   # == run.acts[(Z, 3)]
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.errors import FactfindError
from factfind.model.architectures import _get
from factfind.model.weights import _gptj_rotary, _rotates

if TYPE_CHECKING:
    from factfind.model import Model


class AttentionMismatchError(FactfindError, ValueError):
    """A layer's attention recomputed from its projections differs from the model's own
    (the model does something :class:`LayerAttention` does not know about)."""


Rope = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``rope(q, k, position_ids) -> (q, k)`` on ``[batch pos head d_head]``."""


@dataclass
class LayerAttention:
    """Layer ``layer``'s attention in the pieces of the module docstring.

    Attributes:
        W: ``[head d_model 3*d_head]``, per query head its query, key and value projections
            (``[in, out]``; key-value heads repeated) with the input norm's gain folded in.
        b: ``[head 3*d_head]``: the projections' biases plus the input norm's bias projected
            (zeros where a family has neither), so ``y = normalise(x)[0] @ W[h] + b[h]``.
        centred: the input norm subtracts the mean (LayerNorm).
        has_norm: the block normalises the attention's input (False: OLMo 2, EXAONE 4).
    """

    model: Model
    layer: int
    W: Tensor
    b: Tensor
    eps: float
    centred: bool
    has_norm: bool
    q_norm: Any
    k_norm: Any
    whole: bool  # the q/k norms span the whole projection (OLMo 2), not one head
    rope: Rope | None
    scale: float
    softcap: float | None
    window: int | None

    @property
    def n_kv(self) -> int:
        return self.model.n_kv_heads

    def normalise(self, resid: Tensor) -> tuple[Tensor, Tensor]:
        """``(c / s [batch pos d_model], s [batch pos 1])`` of the input norm at ``resid``
        (``(resid, 1)`` without one); its vector-Jacobian product is ``dx = (gw - (c/s)
        mean(gw * c/s)) / s`` with ``gw`` the cotangent of ``c / s`` (centred for LayerNorm)."""
        if not self.has_norm:
            return resid, torch.ones_like(resid[..., :1])
        x = resid - resid.mean(-1, keepdim=True) if self.centred else resid
        s = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        return x / s, s

    def project(self, xh: Tensor) -> Tensor:
        """``y [batch pos head 3*d_head]`` (q | k | v per query head) from ``xh = c / s``."""
        d, (H, _, f) = xh.shape[-1], self.W.shape
        W = self.W.to(xh.dtype).permute(1, 0, 2).reshape(d, H * f)
        y = (xh.reshape(-1, d) @ W).reshape(*xh.shape[:-1], H, f)
        return y + self.b.to(xh.dtype)

    def qk_scales(self, y: Tensor) -> tuple[Tensor, Tensor] | None:
        """A whole-projection q/k norm's scales ``s_q, s_k [... pos 1 1]`` at ``y`` (the rms
        over every query head, and over the distinct key heads), or ``None`` (per-head norms
        or none)."""
        if not self.whole:
            return None
        e, group = self.model.d_head, self.model.n_heads // self.n_kv

        def rms(t: Tensor, norm: Any) -> Tensor:
            return (t.float().pow(2).mean(-1) + _eps(norm)).sqrt()[..., None, None].to(y.dtype)

        return (rms(y[..., :e].flatten(-2), self.q_norm),
                rms(y[..., ::group, e:2 * e].flatten(-2), self.k_norm))

    def local(self, yq: Tensor, yk: Tensor, position_ids: Tensor,
              scales: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Queries and keys ``[batch pos head d_head]`` from their projections: the q/k norms
        and the rotary embedding, maps of one position (and head, but for a whole-projection
        norm's ``scales``, :meth:`qk_scales`, broadcastable to ``[batch pos head 1]``; pass
        them as an input of their own to differentiate through them per head)."""
        if self.q_norm is not None:
            if self.whole:
                assert scales is not None, "a whole-projection q/k norm needs its scales"
                H, e = yq.shape[-2:]
                yq = yq / scales[0] * _whole_gain(self.q_norm, H, e).to(yq.dtype)
                yk = yk / scales[1] * _whole_gain(self.k_norm, H, e).to(yk.dtype)
            else:
                yq, yk = self.q_norm(yq), self.k_norm(yk)
        if self.rope is not None:
            yq, yk = self.rope(yq, yk, position_ids)
        return yq, yk

    def pattern(self, q: Tensor, k: Tensor, keys: Tensor) -> tuple[Tensor, Tensor | None]:
        """The attention pattern ``A [batch head query key]`` (in ``float32`` at least) from
        queries and keys ``[batch pos head d_head]`` and the real tokens ``keys [batch pos]``;
        with a softcap also its slope ``d softcap(S) / dS = 1 - tanh^2`` (else ``None``), for
        a pull-back."""
        dt = torch.promote_types(q.dtype, torch.float32)
        S = torch.einsum("bphe,bkhe->bhpk", q.to(dt), k.to(dt)) * self.scale
        slope = None
        if self.softcap is not None:
            t = torch.tanh(S / self.softcap)
            S, slope = self.softcap * t, 1 - t * t
        P = S.shape[-1]
        pos = torch.arange(P, device=S.device)
        allowed = pos[None, :] <= pos[:, None]  # [query key]
        if self.window is not None:
            allowed = allowed & (pos[None, :] > pos[:, None] - self.window)
        allowed = allowed[None, None] & keys.bool()[:, None, None, :]
        return S.masked_fill(~allowed, torch.finfo(dt).min).softmax(-1), slope

    def heads(self, y: Tensor, keys: Tensor, position_ids: Tensor) -> Tensor:
        """``z [batch pos head d_head]`` from the projections ``y [batch pos head 3*d_head]``
        (per query head ``q | k | v`` before any q/k norm, :meth:`project`), the real tokens
        ``keys [batch pos]`` and ``position_ids [batch pos]``."""
        e = self.model.d_head
        q, k = self.local(y[..., :e], y[..., e:2 * e], position_ids, self.qk_scales(y))
        v = y[..., 2 * e:]
        A, _ = self.pattern(q, k, keys)
        return torch.einsum("bhpk,bkhe->bphe", A.to(v.dtype), v)

    def recompute(self, resid: Tensor, keys: Tensor, position_ids: Tensor) -> Tensor:
        """``z [batch pos head d_head]`` from the block's input ``resid [batch pos d_model]``."""
        return self.heads(self.project(self.normalise(resid)[0]), keys, position_ids)

    def check(self, z: Tensor, saved: Tensor, keys: Tensor) -> None:
        """Raise :class:`AttentionMismatchError` unless ``z`` (recomputed) equals the model's
        own ``saved`` at the real tokens' queries ``keys [batch pos]`` (padding queries read
        nothing and feed nothing)."""
        real = keys.bool()[..., None, None]
        err = float(((z.float() - saved.float()) * real).abs().max())
        top = float((saved.float() * real).abs().max())
        tol = 1e-3 if saved.dtype in (torch.float32, torch.float64) else 3e-2
        if not err <= tol * (1.0 + top):
            raise AttentionMismatchError(
                f"layer {self.layer}'s attention of {self.model.spec.name}, recomputed from its "
                f"projections, differs from the model's (max error {err:.3g} at |z| <= "
                f"{top:.3g}): pass reference=True for the per-receiver path")


def layer_attention(model: Model, layer: int) -> LayerAttention:
    """:class:`LayerAttention` of ``model``'s layer ``layer`` (weights read off its modules)."""
    spec = model.spec
    blk = _get(model.hf, spec.blocks)[layer]
    attn = _get(blk, spec.attn)
    W, b = model.qkv(layer)
    norm = next((getattr(blk, n) for n in ("input_layernorm", "ln_1") if hasattr(blk, n)), None)
    eps, centred = 0.0, spec.norm_kind == "layernorm"
    if norm is not None:
        gain = norm.weight + 1.0 if spec.norm_kind == "gemma_rmsnorm" else norm.weight
        bias = getattr(norm, "bias", None)
        if bias is not None:  # (gain c/s + bias) W + b = (c/s) (gain W) + (bias W + b)
            b = b + torch.einsum("d,hdf->hf", bias.to(W.dtype), W)
        W = W * gain.to(W.dtype)[None, :, None]
        eps = _eps(norm)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    whole = q_norm is not None and q_norm.weight.numel() == model.n_heads * model.d_head
    config = model.hf.config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] != "sliding_attention":
        window = None
    softcap = getattr(attn, "attn_logit_softcapping", None) if spec.attn_softcap else None
    return LayerAttention(
        model=model, layer=layer, W=W.detach(), b=b.detach(), eps=eps, centred=centred,
        has_norm=norm is not None, q_norm=q_norm, k_norm=k_norm, whole=whole,
        rope=_rope(model, layer, attn), scale=float(attn.scaling), softcap=softcap,
        window=window)


def _rope(model: Model, layer: int, attn: Any) -> Rope | None:
    """Layer ``layer``'s rotary embedding as ``rope(q, k, position_ids)``, or ``None``."""
    base = _get(model.hf, model.spec.blocks.rsplit(".", 1)[0])
    emb = getattr(base, "rotary_emb", None)
    if emb is None:
        return None
    if not _rotates(attn):  # EXAONE 4's global layers (its sliding layers rotate)
        return None
    module = importlib.import_module(type(attn).__module__)
    extra: dict[str, Any] = {}
    if "layer_type" in inspect.signature(emb.forward).parameters:  # Gemma 3: per layer type
        extra["layer_type"] = model.hf.config.layer_types[layer]
    gptj = model.spec.rotary == "gptj"

    def rope(q: Tensor, k: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        a, c = emb(q, position_ids.to(q.device), **extra)
        if gptj:  # GPT-J: (sin, cos), interleaved pairs on the first rotary_dim features
            return _gptj_rotary(attn, q, a, c), _gptj_rotary(attn, k, a, c)
        return module.apply_rotary_pos_emb(q, k, a, c, unsqueeze_dim=2)

    return rope


def _whole_gain(norm: Any, H: int, e: int) -> Tensor:
    """A whole-projection norm's gain ``[head d_head]`` per query head (key-value heads
    repeated)."""
    w = norm.weight.reshape(-1, e)
    return w.repeat_interleave(H // w.shape[0], 0)


def _eps(norm: Any) -> float:
    return getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)


__all__ = ["AttentionMismatchError", "LayerAttention", "layer_attention"]
