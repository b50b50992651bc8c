"""The local replacement model of one prompt: the model made linear in its residual stream.

Circuit-tracer's attribution graphs (Ameisen et al. 2025, "Circuit Tracing"; Hanna, Piotrowski
et al. 2025, ``circuit-tracer``) read a prompt's computation through transcoder features. They
first make the model *linear in its residual stream* at that prompt, by freezing everything
that is not:

* every **attention pattern** at the prompt's own value (so the query/key path, the softmax,
  rotary embeddings, softcapped scores and the q/k norms of Qwen 3, Gemma 3 and OLMo 2 drop
  out: attention becomes the fixed linear map ``x -> A (x W_V) W_O`` per head);
* every **norm's denominator** at the prompt's own value: the attention and MLP input norms,
  the final norm, and the post norms of Gemma 2/3 and OLMo 2 (a frozen RMSNorm is
  ``x -> gain * x / s``; a frozen LayerNorm also centres ``x``, which is linear);
* every **MLP**, replaced by its layer's transcoder: the features' activations are *frozen
  nodes* (a source writes ``a_s * W_dec[s]``; a target reads its pre-activation ``W_enc[:, t] .
  mlp_in``), the transcoder's error ``mlp_out - transcoder(mlp_in)`` is a frozen *error node*
  per layer and position, and a skip transcoder's ``mlp_in @ W_skip`` stays a linear path.

What remains is linear, so the effect of any source on any target is a product of the source's
write, the Jacobian of the frozen residual path and the target's read: the *direct effect*
``A[t, s] = a_s * (W_dec[s] . J . W_enc[:, t])``. :class:`FrozenRun` holds the frozen pieces of
one prompt's run and three maps over them:

* :meth:`FrozenRun.forward` pushes a perturbation of the residual stream up the frozen model
  (a Jacobian-vector product: what a single-source intervention does; the slow reference);
* :meth:`FrozenRun.backward` pulls a batch of target reads down it (the transposed map, written
  by hand: one pass per batch of targets gives every source's edge into each target);
* :meth:`FrozenRun.backward_by_head` does the same while tagging each cross-position path by the
  attention head that last moved it onto the target's position (its *arrival head*), so each
  edge splits exactly into head shares.

Shapes: ``pos`` is the prompt's length, ``B`` a batch of targets; everything is ``[B pos
d_model]`` in the run's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from factfind.model.architectures import UnsupportedArchitectureError, _get

#: where to read each off: sources write into the stream leaving a block, feature targets read
#: the MLP's input (after its norm), embeddings are the stream entering block 0
Reader = Callable[[int, Tensor], None]


@dataclass
class FrozenNorm:
    """A norm with its denominator frozen at a run: ``x -> gain * c(x) / s`` with ``c`` the
    centring of a LayerNorm (identity for RMSNorm) and ``s [pos 1]`` the run's own scale. Its
    ``bias`` (LayerNorm) is kept only for :meth:`affine`, the faithfulness check."""

    gain: Tensor          # [d_model]
    inv_s: Tensor         # [pos 1]
    centred: bool
    bias: Tensor | None = None

    def linear(self, x: Tensor) -> Tensor:
        """The frozen norm's linear part on ``x [... pos d_model]``."""
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return x * self.inv_s * self.gain

    def transpose(self, g: Tensor) -> Tensor:
        """The transpose of :meth:`linear` (a vector-Jacobian product)."""
        g = g * self.gain * self.inv_s
        return g - g.mean(-1, keepdim=True) if self.centred else g

    def affine(self, x: Tensor) -> Tensor:
        """The frozen norm with its bias: equals the real norm at the run's own input."""
        out = self.linear(x)
        return out if self.bias is None else out + self.bias


def frozen_norm(module: Any, kind: str, x: Tensor) -> FrozenNorm:
    """``module`` (a LayerNorm or an RMSNorm of any family) frozen at its input ``x [pos
    d_model]``."""
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    centred = kind == "layernorm"
    xf = x.double()
    c = xf - xf.mean(-1, keepdim=True) if centred else xf
    s = (c.pow(2).mean(-1, keepdim=True) + float(eps)).sqrt()
    gain = module.weight.double() + 1.0 if kind == "gemma_rmsnorm" else module.weight.double()
    bias = getattr(module, "bias", None)
    return FrozenNorm(gain=gain.to(x.dtype), inv_s=(1.0 / s).to(x.dtype), centred=centred,
                      bias=None if bias is None else bias.detach().to(x.dtype))


def norm_paths(model: Any) -> tuple[str | None, str | None]:
    """Block-relative paths of the attention-input and MLP-input norms (``None`` where a family
    has none: OLMo 2 normalises only outputs). Gemma 2/3 call their attention *post* norm
    ``post_attention_layernorm`` and their MLP input norm ``pre_feedforward_layernorm``; Llama
    and GPT-NeoX call the MLP input norm ``post_attention_layernorm``; GPT-J's parallel block
    has one norm for both."""
    blk = model._block_hf(0)

    def has(name: str) -> bool:
        return getattr(blk, name, None) is not None

    attn = next((p for p in ("input_layernorm", "ln_1") if has(p)), None)
    if model.spec.attn_post_norm == "post_attention_layernorm":
        mlp = "pre_feedforward_layernorm" if has("pre_feedforward_layernorm") else None
    else:
        mlp = next((p for p in ("post_attention_layernorm", "ln_2") if has(p)), None)
        if mlp is None and model.parallel:
            mlp = attn  # GPT-J: attention and MLP read one normalised stream
    return attn, mlp


@dataclass
class FrozenRun:
    """The frozen pieces of one prompt's run (see the module docstring), one entry per layer.

    Attributes:
        patterns: ``[head q k]`` attention patterns.
        attn_scale: ``[pos d_model]`` the attention post norm frozen (ones without one).
        norm_attn, norm_mlp: the input norms frozen (``None`` where the family has none).
        norm_final: the final norm frozen at the last block's output.
        W_V: ``[head d_model d_head]`` (key-value heads repeated), W_O ``[head d_head
            d_model]``.
        W_skip: ``[d_model d_model]`` a skip transcoder's linear path, or ``None``.
        parallel: attention and MLP read one stream (GPT-NeoX, GPT-J).
        group: query heads per key-value head (grouped-query attention; 1 otherwise): the
            transposed value path sums a group's heads before its one ``W_V``.
    """

    patterns: list[Tensor]
    attn_scale: list[Tensor]
    norm_attn: list[FrozenNorm | None]
    norm_mlp: list[FrozenNorm | None]
    norm_final: FrozenNorm
    W_V: list[Tensor]
    W_O: list[Tensor]
    W_skip: list[Tensor | None]
    parallel: bool
    group: int = 1

    @property
    def n_layers(self) -> int:
        return len(self.patterns)

    def narrow(self, n: int) -> FrozenRun:
        """The frozen model of the first ``n`` positions (causal attention: a target at a
        position ``< n`` reads nothing from later ones, so its pass can stop there)."""
        if n >= self.patterns[0].shape[-1]:
            return self

        def cut(x: FrozenNorm | None) -> FrozenNorm | None:
            return None if x is None else FrozenNorm(x.gain, x.inv_s[:n], x.centred, x.bias)

        final = cut(self.norm_final)
        assert final is not None
        return FrozenRun([p[:, :n, :n] for p in self.patterns], [s[:n] for s in self.attn_scale],
                         [cut(x) for x in self.norm_attn], [cut(x) for x in self.norm_mlp],
                         final, self.W_V, self.W_O, self.W_skip, self.parallel, self.group)

    def to(self, dtype: torch.dtype) -> FrozenRun:
        """A copy in ``dtype`` (float64 for exactness checks)."""
        def n(x: FrozenNorm | None) -> FrozenNorm | None:
            return None if x is None else FrozenNorm(
                x.gain.to(dtype), x.inv_s.to(dtype), x.centred,
                None if x.bias is None else x.bias.to(dtype))
        final = n(self.norm_final)
        assert final is not None
        return FrozenRun([p.to(dtype) for p in self.patterns],
                         [s.to(dtype) for s in self.attn_scale],
                         [n(x) for x in self.norm_attn], [n(x) for x in self.norm_mlp], final,
                         [w.to(dtype) for w in self.W_V], [w.to(dtype) for w in self.W_O],
                         [None if w is None else w.to(dtype) for w in self.W_skip],
                         self.parallel, self.group)

    # ------------------------------------------------------------------ the linear pieces

    def _attn(self, layer: int, x: Tensor) -> Tensor:
        """Frozen attention's write for a stream perturbation ``x [B pos d]``."""
        na = self.norm_attn[layer]
        xn = x if na is None else na.linear(x)
        v = torch.einsum("bkd,hde->bkhe", xn, self.W_V[layer])
        z = torch.einsum("hqk,bkhe->bqhe", self.patterns[layer], v)
        out = torch.einsum("bqhe,hed->bqd", z, self.W_O[layer])
        return out * self.attn_scale[layer]

    def _attn_heads_t(self, layer: int, g: Tensor) -> Tensor:
        """The transpose of :meth:`_attn` per head, before the input norm: ``[B pos head
        d_model]`` from ``g [B pos d]`` (what head h's value path pulls back to each key)."""
        go = g * self.attn_scale[layer]
        gz = torch.einsum("bqd,hed->bqhe", go, self.W_O[layer])
        return gz

    def _attn_t(self, layer: int, g: Tensor) -> Tensor:
        gz = self._attn_heads_t(layer, g)
        gv = torch.einsum("hqk,bqhe->bkhe", self.patterns[layer], gz)
        G = self.group
        if G > 1:  # the heads of a key-value group share one W_V: sum them first
            b, k, H, e = gv.shape
            gv = gv.reshape(b, k, H // G, G, e).sum(3)
            gx = torch.einsum("bkje,jde->bkd", gv, self.W_V[layer][::G])
        else:
            gx = torch.einsum("bkhe,hde->bkd", gv, self.W_V[layer])
        na = self.norm_attn[layer]
        return gx if na is None else na.transpose(gx)

    def _skip(self, layer: int, x: Tensor) -> Tensor | None:
        w = self.W_skip[layer]
        if w is None:
            return None
        nm = self.norm_mlp[layer]
        return (x if nm is None else nm.linear(x)) @ w

    def _mlp_in_t(self, layer: int, g_in: Tensor) -> Tensor:
        """Pull a gradient on ``mlp_in`` back to the stream the MLP reads."""
        nm = self.norm_mlp[layer]
        return g_in if nm is None else nm.transpose(g_in)

    def mlp_in(self, layer: int, x: Tensor) -> Tensor:
        """``mlp_in``'s linear response to the stream the MLP reads."""
        nm = self.norm_mlp[layer]
        return x if nm is None else nm.linear(x)

    # ------------------------------------------------------------------ forward (reference)

    def forward(self, delta_pre0: Tensor | None, writes: dict[int, Tensor], *,
                until: int) -> list[Tensor]:
        """Push a perturbation up the frozen model: ``delta_pre0 [B pos d]`` added to the stream
        entering block 0 and ``writes[l] [B pos d]`` added to the stream leaving block ``l``
        (a feature's or error's write). Returns the perturbation of the stream each MLP reads,
        for layers ``0..until`` (``until == n_layers`` appends the final stream)."""
        ref = delta_pre0 if delta_pre0 is not None else next(iter(writes.values()))
        r = torch.zeros_like(ref) if delta_pre0 is None else delta_pre0
        reads: list[Tensor] = []
        for layer in range(min(until + 1, self.n_layers)):
            a = self._attn(layer, r)
            if self.parallel:
                reads.append(r)
                s = self._skip(layer, r)
                r = r + a + (0 if s is None else s)
            else:
                mid = r + a
                reads.append(mid)
                s = self._skip(layer, mid)
                r = mid + (0 if s is None else s)
            if layer in writes:
                r = r + writes[layer]
        if until >= self.n_layers:
            reads.append(r)
        return reads

    # ------------------------------------------------------------------ backward (fast)

    def backward(self, start: int, inject: Callable[[int, Tensor], Tensor], read: Reader,
                 g_final: Tensor) -> None:
        """Pull target reads down the frozen model from layer ``start``.

        Args:
            start: the highest layer a target of the batch reads (``n_layers`` for logits).
            inject: ``inject(layer, g_mlp_in) -> g_mlp_in`` adds the reads of the batch's
                feature targets at ``layer``'s MLP input (``[B pos d]``).
            read: called as ``read(layer, g)`` with the gradient on the stream leaving block
                ``layer`` (where layer ``layer``'s features and errors write), and as
                ``read(-1, g)`` with the gradient on the stream entering block 0 (the
                embeddings).
            g_final: ``[B pos d]`` the gradient on the final stream (logit targets; zeros
                otherwise).
        """
        g = g_final
        for layer in range(min(start, self.n_layers - 1), -1, -1):
            read(layer, g)
            if self.parallel:
                g_in = inject(layer, self._skip_t(layer, g))
                g = g + self._attn_t(layer, g) + self._mlp_in_t(layer, g_in)
            else:
                g_in = inject(layer, self._skip_t(layer, g))
                g = g + self._mlp_in_t(layer, g_in)
                g = g + self._attn_t(layer, g)
        read(-1, g)

    def _skip_t(self, layer: int, g: Tensor) -> Tensor:
        """The skip path's transpose onto ``mlp_in`` (zeros for a plain transcoder)."""
        w = self.W_skip[layer]
        return torch.zeros_like(g) if w is None else g @ w.T

    def backward_by_head(self, start: int, pos: int, g_in: Tensor | None, g_final: Tensor | None,
                         read: Callable[[int, Tensor, Tensor], None]) -> list[tuple[int, int]]:
        """:meth:`backward` for one target at position ``pos``, split by arrival head.

        The gradient that has not yet left the target's position (``untagged``, one ``[d]``
        vector per layer) moves only along that position: the residual, the skip path and each
        head's attention to its own position. Whatever a head ``(l, h)`` moves to another
        position becomes a *tagged* gradient ``[pos d]`` of its own and is pulled down the
        whole frozen model from there. Every path from a source at another position reaches
        the target through exactly one last cross-position step, so the tags partition the
        edge: ``edge = untagged + sum over tags`` at every source, with ``untagged`` zero at
        other positions.

        Args:
            start: the target's layer (``n_layers`` for a logit).
            pos: the target's position.
            g_in: ``[d]`` the target's read of ``mlp_in[start]`` (a feature), or ``None``.
            g_final: ``[d]`` the gradient on the final stream at ``pos`` (a logit), or ``None``.
            read: ``read(layer, untagged [1 pos d], tagged [n_tags pos d])`` at every layer's
                output stream (``-1``: the embeddings); the tags so far, in creation order.

        Returns:
            The tags ``(layer, head)`` in the order of ``tagged``'s rows.
        """
        ref = g_in if g_in is not None else g_final
        assert ref is not None
        n_pos = self.patterns[0].shape[-1]
        d = ref.shape[-1]
        u = torch.zeros(1, n_pos, d, dtype=ref.dtype, device=ref.device)
        if g_final is not None:
            u[0, pos] = g_final
        tagged = torch.zeros(0, n_pos, d, dtype=ref.dtype, device=ref.device)
        tags: list[tuple[int, int]] = []
        for layer in range(min(start, self.n_layers - 1), -1, -1):
            read(layer, u, tagged)
            inj = (lambda lay, gi: gi) if not (layer == start and g_in is not None) else \
                (lambda lay, gi: _put(gi, pos, g_in))
            if tagged.shape[0]:
                t_in = self._skip_t(layer, tagged)
                if self.parallel:
                    tagged = tagged + self._attn_t(layer, tagged) + self._mlp_in_t(layer, t_in)
                else:
                    tagged = tagged + self._mlp_in_t(layer, t_in)
                    tagged = tagged + self._attn_t(layer, tagged)
            u_in = inj(layer, self._skip_t(layer, u))
            if self.parallel:
                u_attn_from = u
                u = u + self._mlp_in_t(layer, u_in)
            else:
                u = u + self._mlp_in_t(layer, u_in)
                u_attn_from = u
            stay, moved = self._split_heads_t(layer, u_attn_from, pos)
            u = u + stay
            if moved.shape[0]:
                tagged = torch.cat([tagged, moved])
                tags += [(layer, h) for h in range(moved.shape[0])]
        read(-1, u, tagged)
        return tags

    def _split_heads_t(self, layer: int, u: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """The attention transpose of the untagged gradient ``u [1 pos d]`` (non-zero at
        ``pos`` only), split into what each head keeps at ``pos`` (summed: ``[1 pos d]``) and
        what each head moves to other positions (``[head pos d]``, one new tag per head)."""
        gz = self._attn_heads_t(layer, u)[0, pos]          # [head d_head]
        row = self.patterns[layer][:, pos, :]               # [head k]
        keep = row.clone()
        keep[:, :pos] = 0
        keep[:, pos + 1:] = 0
        move = row - keep
        gx_h = torch.einsum("he,hde->hd", gz, self.W_V[layer])   # [head d]
        na = self.norm_attn[layer]
        moved = move[:, :, None] * gx_h[:, None, :]              # [head k d]
        stayed = (keep[:, :, None] * gx_h[:, None, :]).sum(0, keepdim=True)
        if na is not None:
            moved, stayed = na.transpose(moved), na.transpose(stayed)
        return stayed, moved


def _put(g: Tensor, pos: int, value: Tensor) -> Tensor:
    g = g.clone()
    g[:, pos] += value
    return g


def capture(model: Any, batch: Any, dicts: Any, *, skip_check: bool = False
            ) -> tuple[FrozenRun, dict[str, Any]]:
    """One forward of ``model`` on a one-prompt ``batch`` that records what the frozen model
    needs, and the nodes' values: per layer the transcoder's input and feature activations, the
    true MLP output and the error, the embeddings, the final stream and the raw logits.

    The norms are frozen from the streams they read, and each frozen MLP input norm is checked
    against the MLP input the run saw (a family whose norms this module mislocates fails here
    in one line rather than giving wrong edges).

    Returns:
        ``(frozen, values)``; ``values`` holds ``mlp_in``, ``mlp_out`` (lists of ``[pos d]``),
        ``embed [pos d]`` (the stream entering block 0: token plus position embeddings),
        ``final [pos d]``, ``logits [d_vocab]`` (pre-softcap, final position).
    """
    from factfind.types import Component as C

    L = model.n_layers
    save = [(C.RESID_PRE, 0)]
    for layer in range(L):
        save += [(C.RESID_PRE, layer), (C.ATTN_OUT, layer), (C.MLP_IN, layer),
                 (C.MLP_OUT, layer), (C.PATTERN, layer), (C.Z, layer)]
    save.append((C.RESID_POST, L - 1))
    run = model.run(batch, save=save)
    acts = {k: v[0] for k, v in run.acts.items()}
    logits = (run.logits_raw if run.logits_raw is not None else run.logits)[0]
    attn_path, mlp_path = norm_paths(model)
    kind = model.spec.norm_kind
    norm_attn: list[FrozenNorm | None] = []
    norm_mlp: list[FrozenNorm | None] = []
    patterns, scales, W_V, W_O = [], [], [], []
    for layer in range(L):
        blk = model._block_hf(layer)
        pre = acts[(C.RESID_PRE, layer)]
        mid = pre if model.parallel else pre + acts[(C.ATTN_OUT, layer)]
        norm_attn.append(None if attn_path is None else
                         frozen_norm(_get(blk, attn_path), kind, pre))
        nm = None if mlp_path is None else frozen_norm(_get(blk, mlp_path), kind, mid)
        norm_mlp.append(nm)
        if not skip_check:
            got = mid if nm is None else nm.affine(mid)
            want = acts[(C.MLP_IN, layer)]
            tol = 1e-3 * float(want.abs().max()) + 1e-5
            if float((got - want).abs().max()) > tol:
                raise UnsupportedArchitectureError(
                    f"{model.spec.name}: the frozen MLP input norm of layer {layer} "
                    f"({mlp_path}) does not reproduce the run's mlp_in; the linearised graph "
                    "does not know this family's norm layout")
        patterns.append(acts[(C.PATTERN, layer)].detach())
        scales.append(model.attn_write_scale(layer, acts[(C.Z, layer)]).detach())
        W_V.append(model.W_QKV(layer)[2].detach())
        W_O.append(model.W_O(layer).detach())
    final_resid = acts[(C.RESID_POST, L - 1)]
    norm_final = frozen_norm(_get(model.hf, model.spec.final_norm), kind, final_resid)
    W_skip = []
    for layer in range(L):
        d = _transcoder_at(dicts, layer)
        W_skip.append(None if d.W_skip is None else d.W_skip.detach().to(final_resid.dtype))
    frozen = FrozenRun(patterns, scales, norm_attn, norm_mlp, norm_final, W_V, W_O, W_skip,
                       model.parallel, model.n_heads // model.n_kv_heads)
    values = {"out_logits": run.logits[0],
              "mlp_in": [acts[(C.MLP_IN, layer)] for layer in range(L)],
              "mlp_out": [acts[(C.MLP_OUT, layer)] for layer in range(L)],
              "embed": acts[(C.RESID_PRE, 0)], "final": final_resid, "logits": logits,
              "resid_pre": [acts[(C.RESID_PRE, layer)] for layer in range(L)]}
    return frozen, values


def _transcoder_at(dicts: Any, layer: int) -> Any:
    return next(d for d in dicts.values() if d.layer == layer)


__all__ = ["FrozenNorm", "FrozenRun", "capture", "frozen_norm", "norm_paths"]
