"""The field's hook-point names, mapped onto factfind's sites.

Each format names the activation a dictionary reads (and, for a transcoder, writes) in its own
vocabulary:

* **TransformerLens names** (SAELens' ``metadata.hook_name``, circuit-tracer's
  ``feature_input_hook``): ``blocks.5.hook_resid_post``, ``blocks.5.hook_mlp_out``,
  ``blocks.5.ln2.hook_normalized`` (the MLP's input, after its norm) ...;
* **Hugging Face module paths** (sparsify's hookpoint folders such as ``layers.3.mlp``, Gemma
  Scope 2's ``hf_hook_point_in`` such as ``model.layers.5.pre_feedforward_layernorm.output``):
  a module's output, or its input with ``.input``. GPT-2 says ``h.3.mlp``, GPT-NeoX
  ``gpt_neox.layers.3.mlp``; the prefixes before ``layers`` / ``h`` are dropped.

factfind's sites (``factfind.types.Component``) are defined on the residual stream as it is
summed: ``mlp_in`` is what the MLP reads (after its pre-norm), ``mlp_out`` and ``attn_out`` are
what enters the residual stream (after a post norm where the family has one: Gemma 2/3,
OLMo 2). A name that means something else - the residual before the MLP's norm
(``hook_resid_mid``, TransformerLens' ``hook_mlp_in``), the attention heads' ``z``, the
embedding - raises :class:`~factfind.errors.UnknownHookError` naming the file and the hook.

A Hugging Face module's *output* for ``mlp`` / ``self_attn`` precedes the post norm of the
families that have one; :class:`HookSite` marks it (``before_post_norm``) so that
``load_dictionaries(..., model=...)`` can refuse it on such a model.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from factfind.errors import UnknownHookError
from factfind.types import Component

C = Component


class HookSite(NamedTuple):
    """Where a hook name points: the factfind component and layer, and whether it is a module
    output that comes before the family's post norm (then it is factfind's site only on
    families without one)."""

    component: Component
    layer: int
    before_post_norm: bool = False


#: TransformerLens hook (after ``blocks.{layer}.``) -> (component, before the post norm)
TL_HOOKS: dict[str, tuple[Component, bool]] = {
    "hook_resid_pre": (C.RESID_PRE, False),
    "hook_resid_post": (C.RESID_POST, False),
    "hook_mlp_out": (C.MLP_OUT, False),
    "hook_attn_out": (C.ATTN_OUT, False),
    "ln2.hook_normalized": (C.MLP_IN, False),
    "mlp.hook_in": (C.MLP_IN, False),     # circuit-tracer's wrapper around the MLP module
    "mlp.hook_out": (C.MLP_OUT, True),
}
#: TransformerLens hooks factfind has no site for, and why
TL_REFUSED: dict[str, str] = {
    "hook_resid_mid": "the residual stream before the MLP's norm",
    "hook_mlp_in": "the residual stream before the MLP's norm (TransformerLens' hook_mlp_in)",
    "attn.hook_z": "the attention heads' z (per-head values)",
    "hook_z": "the attention heads' z (per-head values)",
    "attn.hook_result": "per-head outputs",
}
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF = re.compile(r"^(?:.*?\.)?(?:layers|h)\.(\d+)(?:\.(.+))?$")

SITES_TEXT = ("resid_pre, resid_post, attn_out, mlp_out for SAEs; mlp_in -> mlp_out for "
              "transcoders")


def parse_tl_hook(name: str, *, path: str) -> HookSite:
    """``blocks.5.hook_resid_post`` -> ``HookSite(resid_post, 5)``; anything else raises
    :class:`UnknownHookError` naming ``path``."""
    m = _TL.match(str(name))
    if not m:
        raise UnknownHookError(f"{path}: hook {name!r} is not a TransformerLens block hook "
                               f"(blocks.N.hook_...); factfind reads {SITES_TEXT}", path=path)
    layer, rest = int(m.group(1)), m.group(2)
    if rest in TL_HOOKS:
        comp, before = TL_HOOKS[rest]
        return HookSite(comp, layer, before)
    why = TL_REFUSED.get(rest, "no factfind site")
    raise UnknownHookError(f"{path}: hook {name!r} is {why}; factfind reads {SITES_TEXT}",
                           path=path)


def parse_hf_hook(name: str, *, path: str, model_name: str | None = None,
                  io: str = "output") -> HookSite:
    """A Hugging Face module path (``model.layers.3.mlp``, ``h.3``, ``layers.5.
    pre_feedforward_layernorm.output``) -> :class:`HookSite`. ``io`` is the side of the module
    meant when the name has no ``.input`` / ``.output`` suffix; ``model_name`` tells Gemma's
    and OLMo's ``post_attention_layernorm`` (a post norm) from Llama's (the MLP's pre-norm)."""
    name = str(name)
    side = io
    for suffix in (".input", ".output"):
        if name.endswith(suffix):
            name, side = name.removesuffix(suffix), suffix[1:]
    m = _HF.match(name)
    if not m:
        raise UnknownHookError(f"{path}: hookpoint {name!r} is not a block module "
                               "(layers.N[.module] or h.N[.module]); factfind reads "
                               f"{SITES_TEXT}", path=path)
    layer, module = int(m.group(1)), m.group(2) or ""
    post_norm_family = any(f in (model_name or "").lower() for f in ("gemma", "olmo"))
    table: dict[tuple[str, str], tuple[Component, bool]] = {
        ("", "output"): (C.RESID_POST, False),
        ("", "input"): (C.RESID_PRE, False),
        ("mlp", "input"): (C.MLP_IN, False),
        ("mlp", "output"): (C.MLP_OUT, True),
        ("pre_feedforward_layernorm", "output"): (C.MLP_IN, False),
        ("post_feedforward_layernorm", "output"): (C.MLP_OUT, False),
        ("ln_2", "output"): (C.MLP_IN, False),                      # GPT-2
        ("post_attention_layernorm", "output"):                     # Llama: the MLP's pre-norm
            (C.ATTN_OUT, False) if post_norm_family else (C.MLP_IN, False),
    }
    for attn in ("self_attn", "attn", "attention"):
        table[(attn, "output")] = (C.ATTN_OUT, True)
    if (module, side) in table:
        comp, before = table[(module, side)]
        return HookSite(comp, layer, before)
    why = ("the attention heads' z (per-head values)" if module.endswith(("o_proj", "c_proj",
                                                                          "dense", "out_proj"))
           and side == "input" else "no factfind site")
    raise UnknownHookError(f"{path}: hookpoint {name!r} ({side} of {module or 'the block'}) is "
                           f"{why}; factfind reads {SITES_TEXT}", path=path)


def tl_hook(component: Component, layer: int) -> str:
    """factfind site -> TransformerLens hook name (``mlp_in`` -> ``ln2.hook_normalized``)."""
    names = {C.RESID_PRE: "hook_resid_pre", C.RESID_POST: "hook_resid_post",
             C.MLP_OUT: "hook_mlp_out", C.ATTN_OUT: "hook_attn_out",
             C.MLP_IN: "ln2.hook_normalized"}
    return f"blocks.{layer}.{names[Component(component)]}"


def layer_from_path(parts: list[str]) -> int | None:
    """The layer a Gemma Scope path names (``layer_12`` or ``layer_12_width_16k...``)."""
    for part in reversed(parts):
        m = re.match(r"^layer_(\d+)(?:_|$)", part)
        if m:
            return int(m.group(1))
    return None


__all__ = ["TL_HOOKS", "HookSite", "layer_from_path", "parse_hf_hook", "parse_tl_hook",
           "tl_hook"]
