"""Architecture specs: where each site lives in one family of Hugging Face causal LMs.

factfind reaches inside a model by *role*, not by module name: the adapter
(:mod:`factfind.model`) asks an :class:`ArchSpec` for the dotted path of the blocks, the
embedding, the final norm, the unembedding and, per block, the attention and MLP modules and
their output projections, plus how the value vectors are laid out. GPT-2, GPT-NeoX/Pythia,
Llama, Mistral, Qwen2 and Gemma are registered here; another family is one
:func:`register_spec` call away, and an unknown ``config.model_type`` gets an error that says
how.

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
    values_layout: str = "separate"  # "separate" [.., kv*d_head] | "c_attn" [q|k|v] | "neox"
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str | None = "num_key_value_heads"


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
    name="llama", model_types=("llama", "mistral", "qwen2"), norm_kind="rmsnorm", **_LLAMA_PATHS
))
register_spec(ArchSpec(
    name="gemma", model_types=("gemma",), norm_kind="gemma_rmsnorm", **_LLAMA_PATHS
))


class UnsupportedArchitectureError(ValueError):
    """The model's ``config.model_type`` has no :class:`ArchSpec`."""


def spec_for(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face config, or a clear error."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS:
        raise UnsupportedArchitectureError(
            f"factfind has no architecture spec for model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(SPECS))}. To add one, describe where its blocks, attention "
            "output projection and MLP output projection live: factfind.register_spec("
            "factfind.ArchSpec(name=..., model_types=(...,), blocks=..., ...))."
        )
    return SPECS[model_type]


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
