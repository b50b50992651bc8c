"""Weight and norm views of a model: plain tensors read off its modules, no tracing.

The analyses need a model's weights in one convention across families - projections as ``[in,
out]``, per head where heads exist - and the few pieces of its forward pass that become *linear*
once a norm's denominator is frozen at a run's own value: the final norm (direct logit
attribution), the post norms of Gemma 2/3 and OLMo 2 (each head's and neuron's exact share of
what enters the residual stream); each attention layer as a function of its projections (EAP's
receiver gradients) is :mod:`factfind.model.attention`. This module holds those views;
:mod:`factfind.model.adapter` holds the traced run (the only nnsight user) and mixes them in,
so ``model.W_O(3)`` and ``model.run(...)`` live on one :class:`~factfind.model.Model`.

Shapes use the fixed dimension names of :mod:`factfind.types`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from factfind.model.architectures import ArchSpec, _get


class WeightViews:
    """Weight, norm, softcap and rotary views over ``self.hf`` (mixed into
    :class:`~factfind.model.Model`, which sets the attributes below)."""

    hf: Any
    spec: ArchSpec
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int

    # -- weights (read-only views in the [in, out] convention) ---------------------------------

    def _block_hf(self, layer: int) -> Any:
        return _get(self.hf, self.spec.blocks)[layer]

    def _weight(self, module: Any) -> Tensor:
        """Weight as ``[in, out]`` for Linear and Conv1D alike."""
        return module.weight if self.spec.conv1d else module.weight.T

    def W_O(self, layer: int) -> Tensor:
        """Output projection per head: ``[head d_head d_model]``."""
        w = self._weight(_get(self._block_hf(layer), self.spec.attn_out_proj))
        return w.reshape(self.n_heads, self.d_head, self.d_model)

    def b_O(self, layer: int) -> Tensor:
        """Output-projection bias ``[d_model]`` (zeros when the family has none)."""
        return _bias(_get(self._block_hf(layer), self.spec.attn_out_proj), self.d_model)

    def W_out(self, layer: int) -> Tensor:
        """MLP output weight ``[neuron d_model]``."""
        return self._weight(_get(self._block_hf(layer), self.spec.mlp_out_proj))

    def b_out(self, layer: int) -> Tensor:
        """MLP output bias ``[d_model]`` (zeros when the family has none)."""
        return _bias(_get(self._block_hf(layer), self.spec.mlp_out_proj), self.d_model)

    @property
    def W_U(self) -> Tensor:
        """Unembedding ``[d_model d_vocab]``."""
        return _get(self.hf, self.spec.unembed).weight.T

    @property
    def b_U(self) -> Tensor:
        return _bias(_get(self.hf, self.spec.unembed), self.d_vocab)

    def final_norm_scale(self, resid: Tensor) -> Tensor:
        """The final norm's denominator for a residual ``[... d_model]``, shape ``[... 1]``."""
        norm = _get(self.hf, self.spec.final_norm)
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        x = resid.float()
        if self.spec.norm_kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().to(resid.dtype)

    def final_norm_frozen(self, x: Tensor, scale: Tensor, *, bias: bool = True) -> Tensor:
        """The final norm as a *linear* map with its scale frozen (for direct logit attribution).

        ``x`` is one additive component of the final residual ``[... d_model]``; ``scale`` comes
        from :meth:`final_norm_scale` on the clean run. Centring (LayerNorm) is linear, so the
        components' results sum to the normalised residual when ``bias`` is given to exactly
        one of them.
        """
        norm = _get(self.hf, self.spec.final_norm)
        if self.spec.norm_kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        gain = norm.weight + 1.0 if self.spec.norm_kind == "gemma_rmsnorm" else norm.weight
        out = x / scale * gain
        nb = getattr(norm, "bias", None)
        if bias and nb is not None:
            out = out + nb
        return out

    # -- post norms, softcaps and parallel blocks (see the module doc) -------------------------

    @property
    def parallel(self) -> bool:
        """Whether attention and MLP read the same block input (GPT-J; GPT-NeoX with
        ``use_parallel_residual``)."""
        return self.spec.parallel or bool(getattr(self.hf.config, "use_parallel_residual", False))

    def attn_write_scale(self, layer: int, z: Tensor) -> Tensor:
        """The attention post norm frozen at this ``z [... head d_head]``: ``[... d_model]``
        with ``attn_out = (z @ W_O + b_O) * scale``; all ones in families without a post norm."""
        if self.spec.attn_post_norm is None:
            return torch.ones(*z.shape[:-2], self.d_model, dtype=z.dtype, device=z.device)
        pre = torch.einsum("...hd,hdm->...m", z, self.W_O(layer).to(z.dtype)) + self.b_O(layer)
        return self._post_scale(self.spec.attn_post_norm, layer, pre)

    def mlp_write_scale(self, layer: int, neurons: Tensor) -> Tensor:
        """The MLP post norm frozen at these ``neurons [... neuron]``: ``[... d_model]`` with
        ``mlp_out = (neurons @ W_out + b_out) * scale``; all ones without a post norm."""
        if self.spec.mlp_post_norm is None:
            return torch.ones(*neurons.shape[:-1], self.d_model, dtype=neurons.dtype,
                              device=neurons.device)
        pre = neurons @ self.W_out(layer).to(neurons.dtype) + self.b_out(layer)
        return self._post_scale(self.spec.mlp_post_norm, layer, pre)

    def _post_scale(self, path: str, layer: int, pre: Tensor) -> Tensor:
        norm = _get(self._block_hf(layer), path)
        x = pre.float()
        rms = (x.pow(2).mean(-1, keepdim=True) + _eps(norm)).sqrt()
        return (_gain(norm, self.spec.norm_kind).float() / rms).to(pre.dtype)

    def head_out(self, layer: int, z: Tensor) -> Tensor:
        """Each head's write into the residual stream, ``[... head d_model]`` from ``z [... head
        d_head]``: ``z[h] @ W_O[h]`` times the run's frozen post-norm scale (module doc); the
        heads sum to ``attn_out - b_O`` exactly."""
        out = torch.einsum("...hd,hdm->...hm", z, self.W_O(layer).to(z.dtype))
        if self.spec.attn_post_norm is None:
            return out
        return out * self.attn_write_scale(layer, z)[..., None, :]

    def z_grad(self, layer: int, z: Tensor, grad_attn_out: Tensor) -> Tensor:
        """``dM/dz [... head d_head]`` (float) from ``dM/d attn_out [... d_model]`` at ``z``:
        through ``W_O`` and, in post-norm families, through the post norm with its real
        (input-dependent) scale."""
        W = self.W_O(layer)
        g = grad_attn_out
        if self.spec.attn_post_norm is not None:
            norm = _get(self._block_hf(layer), self.spec.attn_post_norm)
            with torch.enable_grad():
                pre = torch.einsum("...hd,hdm->...m", z.detach().to(W.dtype), W) + self.b_O(layer)
                pre.requires_grad_(True)
                g = torch.autograd.grad(norm(pre), pre, g.to(pre.dtype))[0]
        return torch.einsum("...m,hdm->...hd", g.float(), W.float())

    @property
    def final_logit_softcap(self) -> float | None:
        """``cap`` when the logits pass ``cap * tanh(logits / cap)`` (Gemma 2/3), else None."""
        if not self.spec.final_softcap:
            return None
        return getattr(self.hf.config, "final_logit_softcapping", None)

    def softcap_logits(self, logits: Tensor) -> Tensor:
        """Raw (pre-softcap) logits to the model's output logits (identity without a cap)."""
        cap = self.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def attn_softcap(self, layer: int) -> float | None:
        """``cap`` when attention scores pass ``cap * tanh(s / cap)`` (Gemma 2), else None."""
        if not self.spec.attn_softcap:
            return None
        return getattr(_get(self._block_hf(layer), self.spec.attn), "attn_logit_softcapping",
                       None)

    def attn_logits(self, layer: int, qk: Tensor) -> Tensor:
        """Pre-mask attention scores from raw ``q . k``: times :meth:`attn_scale`, then the
        family's softcap if any."""
        s = qk * self.attn_scale(layer)
        cap = self.attn_softcap(layer)
        return s if cap is None else cap * torch.tanh(s / cap)

    def attn_scale(self, layer: int) -> float:
        """The factor on ``q . k`` before the softmax (``1/sqrt(d_head)`` in most families)."""
        return float(_get(self._block_hf(layer), self.spec.attn).scaling)

    @torch.no_grad()
    def _queries_keys(self, layer: int, args: Any, kwargs: Any) -> tuple[Tensor, Tensor]:
        """Queries and keys ``[batch pos head d_head]`` (q/k norms and rotary applied; key-value
        heads repeated), recomputed from the attention module's input with its own weights."""
        import importlib

        attn = _get(self._block_hf(layer), self.spec.attn)
        hidden = args[0] if args else kwargs["hidden_states"]
        b, p = hidden.shape[:2]
        dh, layout = self.d_head, self.spec.values_layout
        if layout == "c_attn":
            out = attn.c_attn(hidden)
            q = out[..., :self.d_model].reshape(b, p, self.n_heads, dh)
            k = out[..., self.d_model:2 * self.d_model].reshape(b, p, self.n_heads, dh)
        elif layout == "neox":
            out = attn.query_key_value(hidden).reshape(b, p, self.n_heads, 3 * dh)
            q, k = out[..., :dh], out[..., dh:2 * dh]
        else:
            if layout == "fused":  # Phi-3: [q | k | v] with key-value heads
                out = attn.qkv_proj(hidden)
                nq, nk = self.n_heads * dh, self.n_kv_heads * dh
                q, k = out[..., :nq], out[..., nq:nq + nk]
            else:
                q, k = attn.q_proj(hidden), attn.k_proj(hidden)
            q_norm: Any = getattr(attn, "q_norm", None)
            k_norm: Any = getattr(attn, "k_norm", None)
            whole = q_norm is not None and q_norm.weight.numel() == q.shape[-1]
            if q_norm is not None and whole:  # OLMo 2: over the whole projection
                q, k = q_norm(q), k_norm(k)
            q = q.reshape(b, p, self.n_heads, dh)
            k = k.reshape(b, p, self.n_kv_heads, dh)
            if q_norm is not None and not whole:  # Qwen3, Gemma 3: per head
                q, k = q_norm(q), k_norm(k)
        rope = kwargs.get("position_embeddings") if _rotates(attn) else None
        if rope is not None and self.spec.rotary == "gptj":
            q, k = _gptj_rotary(attn, q, *rope), _gptj_rotary(attn, k, *rope)
        elif rope is not None:
            module = importlib.import_module(type(attn).__module__)
            cos, sin = rope
            qr, kr = module.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = qr.transpose(1, 2), kr.transpose(1, 2)
        k = k.repeat_interleave(self.n_heads // k.shape[2], dim=2)
        return q, k

    def _split_values(self, out: Tensor) -> Tensor:
        """The value vectors ``[batch pos head d_head]`` from the values module's output."""
        b, p = out.shape[:2]
        dh = self.d_head
        layout = self.spec.values_layout
        if layout == "c_attn":
            v = out[..., 2 * self.d_model:].reshape(b, p, self.n_heads, dh)
        elif layout == "neox":
            v = out.reshape(b, p, self.n_heads, 3 * dh)[..., 2 * dh:]
        else:
            if layout == "fused":  # Phi-3: [q | k | v]
                out = out[..., (self.n_heads + self.n_kv_heads) * dh:]
            v = out.reshape(b, p, self.n_kv_heads, dh)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2)
        return v

    # -- per-head reading of the residual stream (EAP's receiver gradients) -------------------

    def W_QKV(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value projections per *query* head, each ``[head d_model d_head]``
        (the ``[in, out]`` convention; key-value heads repeated for grouped-query attention,
        as in the ``k``/``v`` sites). Biases are left out: they carry no gradient."""
        q, k, v = self.qkv(layer)[0].split(self.d_head, -1)
        return q, k, v

    def qkv(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(W [head d_model 3*d_head], b [head 3*d_head])``: per query head its query, key
        and value projections and their biases side by side (zeros where a family has none;
        key-value heads repeated), from separate, fused (Phi-3) or interleaved (GPT-2,
        NeoX) modules."""
        attn = _get(self._block_hf(layer), self.spec.attn)
        H, K, e, d = self.n_heads, self.n_kv_heads, self.d_head, self.d_model
        layout = self.spec.values_layout
        if layout == "neox":  # per head [q | k | v]
            m = attn.query_key_value
            return (self._weight(m).reshape(d, H, 3 * e).transpose(0, 1),
                    _bias(m, 3 * H * e).reshape(H, 3 * e))
        if layout == "c_attn":  # [q | k | v], each [head d_head]
            ws = self._weight(attn.c_attn).split(H * e, -1)
            bs = _bias(attn.c_attn, 3 * H * e).split(H * e)
        elif layout == "fused":  # Phi-3: [q | k | v] with key-value heads
            sizes = [H * e, K * e, K * e]
            ws = self._weight(attn.qkv_proj).split(sizes, -1)
            bs = _bias(attn.qkv_proj, sum(sizes)).split(sizes)
        else:
            mods = (attn.q_proj, attn.k_proj, attn.v_proj)
            ws = tuple(self._weight(m) for m in mods)
            bs = tuple(_bias(m, w.shape[1]) for m, w in zip(mods, ws, strict=True))
        parts_w, parts_b = [], []
        for w, bb in zip(ws, bs, strict=True):
            n = w.shape[1] // e  # query heads, or key-value heads (repeated per query head)
            parts_w.append(w.reshape(d, n, e).transpose(0, 1).repeat_interleave(H // n, 0))
            parts_b.append(bb.reshape(n, e).repeat_interleave(H // n, 0))
        return torch.cat(parts_w, -1), torch.cat(parts_b, -1)

    def _unembed_columns(self, h: Tensor, columns: Tensor) -> Tensor:
        """``[rows k]``: the logits of token ids ``columns [rows k]`` for the final norm's
        outputs ``h [rows d_model]`` (unembedding rows gathered, one dot product each)."""
        unembed = _get(self.hf, self.spec.unembed)
        w = unembed.weight[columns]  # [rows k d_model]
        out = torch.einsum("rd,rkd->rk", h.to(w.dtype), w)
        bias = getattr(unembed, "bias", None)
        return out if bias is None else out + bias[columns]


def _gptj_rotary(attn: Any, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """GPT-J's rotary embedding on ``x [batch pos head d_head]``: interleaved pairs, on the first
    ``rotary_dim`` features only."""
    import importlib

    module = importlib.import_module(type(attn).__module__)
    rot = attn.rotary_dim or x.shape[-1]
    x_rot = module.apply_rotary_pos_emb(x[..., :rot], sin, cos)
    return torch.cat([x_rot, x[..., rot:]], dim=-1)


def _rotates(attn: Any) -> bool:
    """Whether the attention module rotates its queries and keys: all but the global layers
    of a hybrid EXAONE 4 (a sliding window configured, this layer not sliding)."""
    return not (getattr(attn, "is_sliding", True) is False
                and getattr(attn, "sliding_window", None) is not None)


def _eps(norm: Any) -> float:
    return getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)


def _gain(norm: Any, kind: str) -> Tensor:
    """A norm's multiplicative gain: ``1 + w`` for Gemma's RMSNorm, else ``w``."""
    return norm.weight + 1.0 if kind == "gemma_rmsnorm" else norm.weight


def _bias(module: Any, size: int) -> Tensor:
    b = getattr(module, "bias", None)
    if b is None:
        w = module.weight
        return torch.zeros(size, dtype=w.dtype, device=w.device)
    return b
