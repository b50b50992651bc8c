"""Architecture specs: where each site lives in one family of Hugging Face causal LMs.

factfind reaches inside a model by *role*, not by module name: the adapter
(:mod:`factfind.model`) asks an :class:`ArchSpec` for the dotted path of the blocks, the
embedding, the final norm, the unembedding and, per block, the attention and MLP modules and
their output projections, plus how the value vectors are laid out. GPT-2, GPT-NeoX/Pythia, GPT-J,
Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, Gemma, Gemma 2 and Gemma 3 (text) are registered
here; another family is one :func:`register_spec` call away. A family without a spec whose
module tree has the usual Llama layout (``model.layers[i].self_attn.o_proj``,
``mlp.down_proj``, ``model.norm``, ``lm_head``) gets one derived from its modules
(:func:`derive_spec`, checked numerically by :mod:`factfind.model` before use); any other
gets an :class:`UnsupportedArchitectureError` that says how to register one.

Extra norms. Gemma 2/3 normalise each sublayer's output before it joins the residual stream
(``post_attention_layernorm``, ``post_feedforward_layernorm``), OLMo 2 has only those post
norms; a spec names them in ``attn_post_norm`` / ``mlp_post_norm`` and the adapter reads
``attn_out`` / ``mlp_out`` *after* them (what enters the residual stream). Query/key norms
(Qwen3, Gemma 3 per head; OLMo 2 over the whole projection) need no spec field: the adapter
finds ``q_norm`` / ``k_norm`` on the attention module and tells the two kinds apart by size.

Example::

    register_spec(ArchSpec(name="olmo", model_types=("olmo",), norm_kind="layernorm",
                           blocks="model.layers", embed="model.embed_tokens",
                           final_norm="model.norm", unembed="lm_head", attn="self_attn",
                           attn_out_proj="self_attn.o_proj", mlp="mlp",
                           mlp_out_proj="mlp.down_proj"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArchSpec:
    """Where each site lives in one family of Hugging Face models.

    Paths are dotted attribute paths: ``blocks``, ``embed``, ``final_norm`` and ``unembed`` from
    the root ``*ForCausalLM`` module; the others relative to one block.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    attn_out_proj: str
    mlp: str
    mlp_out_proj: str
    norm_kind: str  # "layernorm" | "rmsnorm" | "gemma_rmsnorm" (x * (1 + w))
    conv1d: bool = False  # GPT-2 stores projections as Conv1D: weight is [in, out]
    values: str = "self_attn.v_proj"  # module whose output holds the value vectors
    # "separate" [.., kv*d_head] | "c_attn" [q|k|v] | "neox" | "fused" [q|k|v] with kv heads
    values_layout: str = "separate"
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"
    attn_post_norm: str | None = None  # block-relative norm applied to the attention output
    mlp_post_norm: str | None = None  # block-relative norm applied to the MLP output
    rotary: str = "hf"  # "hf": module's apply_rotary_pos_emb(q, k, cos, sin) | "gptj"
    attn_softcap: bool = False  # attention scores pass cap * tanh(s / cap) (Gemma 2)
    final_softcap: bool = False  # logits pass cap * tanh(logits / cap) (Gemma 2/3)
    parallel: bool = False  # attention and MLP read the same input (GPT-J; NeoX per config)
    derived: bool = False  # built by derive_spec, not written by hand


SPECS: dict[str, ArchSpec] = {}


def register_spec(spec: ArchSpec) -> ArchSpec:
    """Add an architecture: map its ``config.model_type`` values to module paths."""
    for model_type in spec.model_types:
        SPECS[model_type] = spec
    return spec


register_spec(ArchSpec(
    name="gpt2", model_types=("gpt2",), blocks="transformer.h", embed="transformer.wte",
    final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_out_proj="attn.c_proj",
    mlp="mlp", mlp_out_proj="mlp.c_proj", norm_kind="layernorm", conv1d=True,
    values="attn.c_attn", values_layout="c_attn",
    n_heads_attr="n_head", n_kv_heads_attr=None,
))
register_spec(ArchSpec(
    name="gpt_neox", model_types=("gpt_neox",), blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", unembed="lm_head|embed_out",
    attn="attention", attn_out_proj="attention.dense", mlp="mlp",
    mlp_out_proj="mlp.dense_4h_to_h", norm_kind="layernorm", n_kv_heads_attr=None,
    values="attention.query_key_value", values_layout="neox",
))
_LLAMA_PATHS: dict[str, Any] = dict(
    blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    unembed="lm_head", attn="self_attn", attn_out_proj="self_attn.o_proj", mlp="mlp",
    mlp_out_proj="mlp.down_proj",
)
register_spec(ArchSpec(
    name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), norm_kind="rmsnorm",
    **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="gemma", model_types=("gemma",), norm_kind="gemma_rmsnorm", **_LLAMA_PATHS
))
_POST_NORMS: dict[str, Any] = dict(attn_post_norm="post_attention_layernorm",
                                   mlp_post_norm="post_feedforward_layernorm")
register_spec(ArchSpec(
    name="gemma2", model_types=("gemma2",), norm_kind="gemma_rmsnorm", attn_softcap=True,
    final_softcap=True, **_POST_NORMS, **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="gemma3", model_types=("gemma3_text",), norm_kind="gemma_rmsnorm", final_softcap=True,
    **_POST_NORMS, **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="olmo2", model_types=("olmo2",), norm_kind="rmsnorm", **_POST_NORMS, **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="phi3", model_types=("phi3",), norm_kind="rmsnorm", values="self_attn.qkv_proj",
    values_layout="fused", **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="gptj", model_types=("gptj",), blocks="transformer.h", embed="transformer.wte",
    final_norm="transformer.ln_f", unembed="lm_head", attn="attn", attn_out_proj="attn.out_proj",
    mlp="mlp", mlp_out_proj="mlp.fc_out", norm_kind="layernorm", values="attn.v_proj",
    rotary="gptj", parallel=True, n_kv_heads_attr=None,
))


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no :class:`ArchSpec` and none can be derived."""


def spec_for(config: Any, model: Any = None) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face config, derived from the module tree when no
    spec is registered (:func:`derive_spec`; from ``model`` when given, else from a copy built
    on the meta device), or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type in SPECS:
        return SPECS[model_type]
    if model is None:
        model = _meta_model(config)
    return derive_spec(model)


_HOW = ("To add one, describe where its blocks, attention output projection and MLP output "
        "projection live: factfind.register_spec(factfind.ArchSpec(name=..., "
        "model_types=(...,), blocks=..., ...)).")


def _unsupported(model_type: Any, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"factfind has no architecture spec for model_type={model_type!r} and cannot derive "
        f"one: {why}. Supported: {', '.join(sorted(SPECS))}. {_HOW}")


def _meta_model(config: Any) -> Any:
    """The config's causal LM built on the meta device (no memory), for its module tree."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # any failure: not a known causal LM
        raise _unsupported(getattr(config, "model_type", None),
                           f"transformers cannot build it as a causal LM ({err})") from err


def derive_spec(model: Any) -> ArchSpec:
    """An :class:`ArchSpec` read off a causal LM with the usual Llama module layout.

    Requires ``model.layers`` (blocks), ``model.embed_tokens``, ``model.norm``, ``lm_head``,
    and per block ``self_attn.o_proj`` with ``q_proj/k_proj/v_proj`` (or a fused ``qkv_proj``)
    and ``mlp.down_proj``. Post norms are recognised by name: ``post_feedforward_layernorm``
    marks a post-norm block, whose attention post norm is ``post_attention_layernorm`` when the
    block also has a ``pre_feedforward_layernorm`` (Gemma 2 layout) or no
    ``input_layernorm`` (OLMo 2 layout). The norm kind is measured on the final norm's weights
    (``x / rms * w``, ``x / rms * (1 + w)`` or LayerNorm). The spec is only a hypothesis:
    :class:`factfind.model.Model` checks its site identities on one short forward pass before
    using it (:func:`check_spec`), and raises :class:`UnsupportedArchitectureError` if they fail.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    paths: dict[str, Any] = dict(blocks="model.layers", embed="model.embed_tokens",
                                 final_norm="model.norm", unembed="lm_head")
    for role, path in paths.items():
        if not _has(model, path):
            raise _unsupported(model_type, f"no {role} at {path!r} (not the usual layout)")
    block = _get(model, "model.layers")[0]
    for path in ("self_attn.o_proj", "mlp.down_proj"):
        if not _has(block, path):
            raise _unsupported(model_type, f"its blocks have no {path!r}")
    attn = block.self_attn
    if all(_has(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        values, layout = "self_attn.v_proj", "separate"
    elif _has(attn, "qkv_proj"):
        values, layout = "self_attn.qkv_proj", "fused"
    else:
        raise _unsupported(model_type, "its attention has neither q_proj/k_proj/v_proj nor "
                                       "qkv_proj")
    post: dict[str, Any] = {}
    if _has(block, "post_feedforward_layernorm"):
        gemma_like = _has(block, "pre_feedforward_layernorm")
        olmo_like = not _has(block, "input_layernorm")
        if not (_has(block, "post_attention_layernorm") and (gemma_like or olmo_like)):
            raise _unsupported(model_type, "its blocks have a post_feedforward_layernorm but "
                                           "no recognisable attention post norm")
        post = dict(attn_post_norm="post_attention_layernorm",
                    mlp_post_norm="post_feedforward_layernorm")
    norm_kind = _norm_kind(_get(model, "model.norm"), model_type)
    return ArchSpec(
        name=f"{model_type} (derived)", model_types=(str(model_type),), norm_kind=norm_kind,
        attn="self_attn", attn_out_proj="self_attn.o_proj", mlp="mlp",
        mlp_out_proj="mlp.down_proj", values=values, values_layout=layout,
        attn_softcap=getattr(attn, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(config, "final_logit_softcapping", None) is not None,
        parallel=bool(getattr(config, "use_parallel_residual", False)), derived=True,
        **post, **paths,
    )


def _has(root: Any, path: str) -> bool:
    try:
        _get(root, path)
    except AttributeError:
        return False
    return True


def _norm_kind(norm: Any, model_type: Any) -> str:
    """``"layernorm"``, ``"rmsnorm"`` or ``"gemma_rmsnorm"``, measured on the norm itself (on
    the meta device: guessed from the class name)."""
    import torch

    w = getattr(norm, "weight", None)
    if w is None or w.ndim != 1:
        raise _unsupported(model_type, f"its final norm {type(norm).__name__} has no gain vector")
    if w.is_meta:
        return "layernorm" if isinstance(norm, torch.nn.LayerNorm) else "rmsnorm"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.shape[0], generator=g) * 3 + 1).to(w.dtype).to(w.device)
    with torch.no_grad():
        y = norm(x).float()
    xf = x.float()
    b = getattr(norm, "bias", None)
    shift = 0.0 if b is None else b.float()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    rms = (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    cen = xf - xf.mean(-1, keepdim=True)
    std = (cen.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    candidates = {"rmsnorm": xf / rms * w.float(), "gemma_rmsnorm": xf / rms * (1 + w.float()),
                  "layernorm": cen / std * w.float() + shift}
    for kind, ref in candidates.items():
        if torch.allclose(y, ref, atol=1e-3, rtol=1e-3):
            return kind
    raise _unsupported(model_type, f"its final norm {type(norm).__name__} is neither LayerNorm "
                                   "nor RMSNorm (x / rms * w or x / rms * (1 + w))")


def _get(root: Any, path: str) -> Any:
    """Follow a dotted path; ``a|b`` tries alternatives (module names that changed between
    transformers releases, e.g. GPT-NeoX's ``embed_out`` became ``lm_head``)."""
    options = path.split("|")
    for option in options:
        node = root
        try:
            for part in option.split("."):
                node = getattr(node, part)
        except AttributeError:
            if option == options[-1]:
                raise
            continue
        return node
    raise AttributeError(path)


def check_spec(model: Any) -> ArchSpec:
    """Test a derived spec on one short forward pass of ``model`` (a
    :class:`factfind.model.Model`) before trusting it, and measure whether its blocks are
    parallel. Checks, on 6 tokens: the adapter's logits equal the model's own forward; per
    layer ``sum_h head_out + b_O == attn_out``, ``mlp_out`` from the neurons, ``resid_pre +
    attn_out + mlp_out == resid_post``, and the next block reads ``resid_post``; the frozen final
    norm reproduces the logits. A block is parallel when editing ``attn_out`` leaves that
    block's ``mlp_out`` unchanged. Cost: 3 forward passes of 6 tokens.

    Returns:
        The spec, with ``parallel`` as measured.

    Raises:
        UnsupportedArchitectureError: naming the first identity that fails (e.g. Granite's
            ``residual_multiplier`` scales what enters the residual stream).
    """
    import dataclasses

    import torch

    from factfind.types import Component as C

    spec = model.spec
    model_type = spec.model_types[0]
    ids = (torch.arange(6) % (model.d_vocab - 1) + 1)[None].to(model.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    L = model.n_layers
    sites = (C.RESID_PRE, C.HEAD_OUT, C.ATTN_OUT, C.NEURONS, C.MLP_OUT, C.RESID_POST)
    try:
        run = model.run(batch, save=[(c, layer) for layer in range(L) for c in sites],
                        logits="all")
        with torch.no_grad():
            ref = model.hf(**batch).logits
        bumped = model.run(batch, save=[(C.MLP_OUT, 0)],
                           edits={(C.ATTN_OUT, 0): lambda x: x + x.abs().mean()})
    except Exception as err:  # whatever broke: not the usual layout
        raise _unsupported(model_type, f"a forward pass through the derived sites failed "
                                       f"({type(err).__name__}: {err})") from err
    tol = 1e-3 if model.dtype in (torch.float32, torch.float64) else 3e-2

    def require(what: str, got: Any, want: Any) -> None:
        err = float((got.float() - want.float()).abs().max())
        if not err <= tol * (1.0 + float(want.float().abs().max())):
            raise _unsupported(model_type, f"with the derived spec {what} fails (max error "
                                           f"{err:.3g}): the model computes something the "
                                           "usual layout does not")

    a = run.acts
    require("logits == the model's own forward", run.logits, ref)
    for layer in range(L):
        heads = a[(C.HEAD_OUT, layer)].sum(-2) + model.b_O(layer)
        require(f"sum_h head_out + b_O == attn_out at layer {layer}", heads,
                a[(C.ATTN_OUT, layer)])
        n = a[(C.NEURONS, layer)]
        mlp = (n @ model.W_out(layer) + model.b_out(layer)) * model.mlp_write_scale(layer, n)
        require(f"neurons @ W_out + b_out == mlp_out at layer {layer}", mlp,
                a[(C.MLP_OUT, layer)])
        post = a[(C.RESID_PRE, layer)] + a[(C.ATTN_OUT, layer)] + a[(C.MLP_OUT, layer)]
        require(f"resid_pre + attn_out + mlp_out == resid_post at layer {layer}", post,
                a[(C.RESID_POST, layer)])
        if layer + 1 < L:
            require(f"resid_post[{layer}] == resid_pre[{layer + 1}]", a[(C.RESID_POST, layer)],
                    a[(C.RESID_PRE, layer + 1)])
    last = a[(C.RESID_POST, L - 1)]
    normed = model.final_norm_frozen(last, model.final_norm_scale(last))
    require("the final norm and unembedding reproduce the logits",
            model.softcap_logits(normed @ model.W_U + model.b_U), run.logits)
    parallel = bool(torch.equal(bumped.acts[(C.MLP_OUT, 0)], a[(C.MLP_OUT, 0)]))
    return dataclasses.replace(spec, parallel=parallel)
