"""SAELens v6: one folder per dictionary, ``cfg.json`` + ``sae_weights.safetensors``.

SAELens (Bloom et al.; ``sae_lens/saes/sae.py`` ``save_model``) writes ``cfg.json`` from its
config dataclass - ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, ``metadata`` (``model_name``,
``hook_name``, and for transcoders ``hook_name_out``), ``d_out`` for transcoders, ``k`` and
``rescale_acts_by_decoder_norm`` for TopK - and the weights under their own names: ``W_enc``
``[d_in d_sae]``, ``b_enc``, ``W_dec`` ``[d_sae d_out]``, ``b_dec``, ``threshold`` (JumpReLU)
and ``W_skip`` ``[d_out d_in]`` (applied as ``x @ W_skip.T``). Its inference architectures map
onto factfind's kinds and activations:

==========================  ===================================  ============================
SAELens ``architecture``    factfind                             note
==========================  ===================================  ============================
standard                    SAE, relu
topk                        SAE, topk                            ``rescale_acts_by_decoder_
                                                                 norm`` is folded into W_enc,
                                                                 b_enc and W_dec (exact)
jumprelu                    SAE, jumprelu (batchtopk when the    SAELens saves a BatchTopK SAE
                            metadata says it was trained so)     as JumpReLU, one threshold
transcoder                  transcoder, relu
skip_transcoder             skip transcoder, relu
jumprelu_transcoder         transcoder, jumprelu
jumprelu_skip_transcoder    skip transcoder, jumprelu
==========================  ===================================  ============================

Gated, AbsTopK, temporal and matching-pursuit SAEs, ``normalize_activations`` other than
``none`` / ``expected_average_only_in`` (identity at inference in SAELens 6), and ``hook_z``
reshaping have no factfind equivalent and are refused with one line naming the file. A TopK
transcoder has no SAELens inference architecture, so saving one raises
:class:`~factfind.errors.FormatCapabilityError`.

**TransformerLens' weight processing.** SAELens trains on a TransformerLens model, whose
``from_pretrained`` folds each norm's weight into the next layer by default (``fold_ln``), so
``blocks.N.ln2.hook_normalized`` is the MLP input *without* the norm's weight (and bias), while
factfind's ``mlp_in`` is what the Hugging Face MLP reads, with it. ``metadata.
model_from_pretrained_kwargs`` records how the training model was loaded (``fold_ln: false``
means the hook is factfind's ``mlp_in``; SAELens' own default keeps ``center_writing_weights``
off, so its residual-stream hooks are the Hugging Face residual). A transcoder on that hook
without ``fold_ln: false`` loads with a warning and ``meta["tl_fold_ln"] = True``: fold the
weight in (``W_enc / w[:, None]``) if it was trained folded.

A set is saved one subfolder per dictionary, named by its hook (``blocks.5.hook_resid_post``),
as SAELens' own releases are; factfind's fields that SAELens cannot hold (a BatchTopK's ``k``,
the dictionary's ``meta``) ride in ``metadata.factfind``, which SAELens keeps and ignores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from factfind.errors import DictionaryFileError, FormatCapabilityError
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import files
from factfind.features.formats.hooks import parse_hf_hook, parse_tl_hook, tl_hook
from factfind.types import Component

log = logging.getLogger(__name__)

NAME = "saelens"
CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"

#: architecture -> (kind, activation)
ARCHITECTURES: dict[str, tuple[DictKind, Activation]] = {
    "standard": (DictKind.SAE, Activation.RELU),
    "topk": (DictKind.SAE, Activation.TOPK),
    "jumprelu": (DictKind.SAE, Activation.JUMPRELU),
    "transcoder": (DictKind.TRANSCODER, Activation.RELU),
    "skip_transcoder": (DictKind.SKIP_TRANSCODER, Activation.RELU),
    "jumprelu_transcoder": (DictKind.TRANSCODER, Activation.JUMPRELU),
    "jumprelu_skip_transcoder": (DictKind.SKIP_TRANSCODER, Activation.JUMPRELU),
}
_IDENTITY_NORMS = (None, "none", "expected_average_only_in")


def detect(folder: Path) -> bool:
    if not (folder / CFG).is_file() or (folder / "sae.safetensors").is_file():
        return False  # sparsify's folders have a cfg.json too
    if (folder / WEIGHTS).is_file():
        return True
    return '"d_sae"' in (folder / CFG).read_text(encoding="utf-8", errors="replace")[:4096]


def read(folder: Path, *, dtype: torch.dtype | None = None, **_: Any) -> list[Dictionary]:
    """The dictionary in one SAELens folder (see the module docstring for the mapping)."""
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    cfg = files.read_json(cfg_path)
    meta = files.section(cfg, "metadata") or cfg  # before v6 the fields were flat
    arch = str(cfg.get("architecture", "standard"))
    if arch == "standard" and str(cfg.get("activation_fn_str", cfg.get("activation_fn"))) \
            == "topk":  # pre-6 configs (and SAELens' sparsify conversions) said it this way
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise DictionaryFileError(f"{cfg_path}: SAELens architecture {arch!r} has no factfind "
                                  f"equivalent; factfind reads {', '.join(ARCHITECTURES)}",
                                  path=str(cfg_path))
    kind, act = ARCHITECTURES[arch]
    norm = cfg.get("normalize_activations")
    if norm not in _IDENTITY_NORMS:
        raise DictionaryFileError(f"{cfg_path}: normalize_activations={norm!r} rescales the "
                                  "input at run time, which a factfind Dictionary cannot "
                                  "express; fold it with SAELens and save again",
                                  path=str(cfg_path))
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise DictionaryFileError(f"{cfg_path}: reshape_activations="
                                  f"{cfg['reshape_activations']!r} (per-head z) has no factfind "
                                  "site", path=str(cfg_path))
    model_name = files.name_or_none(meta.get("model_name"))
    site = _site(meta, kind, cfg_path, model_name)
    t = files.read_safetensors(w_path)
    if "finetuning_scaling_factor" in t:
        raise DictionaryFileError(f"{w_path}: a finetuning_scaling_factor is not supported; "
                                  "fold it into W_dec with SAELens and save again",
                                  path=str(w_path))
    W_enc = files.tensor(t, w_path, "W_enc")
    b_enc = files.tensor(t, w_path, "b_enc")
    W_dec = files.tensor(t, w_path, "W_dec")
    b_dec = files.tensor(t, w_path, "b_dec")
    threshold = files.tensor(t, w_path, "threshold") if act is Activation.JUMPRELU else None
    W_skip = files.tensor(t, w_path, "W_skip") if kind is DictKind.SKIP_TRANSCODER else None
    if W_skip is not None:
        W_skip = W_skip.T  # SAELens applies x @ W_skip.T
    k = _int(cfg.get("k"), "k", cfg_path) if act is Activation.TOPK else None
    ours = files.section(meta, "factfind")
    if act is Activation.TOPK and cfg.get("rescale_acts_by_decoder_norm"):
        # encode scales pre-activations by ||W_dec row|| before TopK, decode divides by it:
        # the same as a dictionary whose W_enc, b_enc carry the norms and W_dec unit rows
        norms = W_dec.norm(dim=-1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        W_enc, b_enc = W_enc * norms, b_enc * norms
        W_dec = torch.where(norms[:, None] > 0, W_dec / safe[:, None], W_dec)
    if act is Activation.JUMPRELU and threshold is not None and threshold.numel() > 0 and \
            bool((threshold == threshold.flatten()[0]).all()):
        details = files.section(meta, "training_architecture_details")
        if meta.get("training_architecture") == "batchtopk" or \
                ours.get("activation") == Activation.BATCHTOPK:
            # SAELens saves a BatchTopK SAE for inference as JumpReLU with its one threshold
            act, threshold = Activation.BATCHTOPK, threshold.flatten()[0].clone()
            k = _int(ours.get("k") or details.get("k") or 1, "k", cfg_path)
    want = files.DTYPES.get(str(cfg.get("dtype", "")).removeprefix("torch."), dtype)
    tensors = files.cast(dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                              threshold=threshold, W_skip=W_skip), dtype or want)
    extra = files.section(ours, "meta")
    loaded = files.section(meta, "model_from_pretrained_kwargs")
    if not ours and kind is not DictKind.SAE and str(meta.get("hook_name", "")).endswith(
            "ln2.hook_normalized") and loaded.get("fold_ln", True) is not False:
        log.warning("%s reads blocks.%d.ln2.hook_normalized and does not say fold_ln=False: if "
                    "it was trained on a TransformerLens model with folded norms, its input "
                    "lacks the norm's weight that factfind's mlp_in includes", cfg_path, site.layer)
        extra["tl_fold_ln"] = True
    return [files.build(w_path, kind=kind, activation=act, layer=site.layer,
                        site=site.component, k=k,
                        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
                        model=model_name, meta=extra, **tensors)]


def _int(value: Any, key: str, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DictionaryFileError(f"{path}: {key} must be an integer, got {value!r}",
                                  path=str(path)) from None


def _site(meta: dict[str, Any], kind: DictKind, cfg_path: Path, model_name: str | None) -> Any:
    hook = meta.get("hook_name")
    if not isinstance(hook, str):
        raise DictionaryFileError(f"{cfg_path}: no metadata.hook_name, so the site it reads is "
                                  "unknown", path=str(cfg_path))
    hf = meta.get("hf_hook_name")
    if kind is DictKind.SAE:
        site = parse_tl_hook(hook, path=str(cfg_path))
        if site.component not in (Component.RESID_PRE, Component.RESID_POST,
                                  Component.MLP_OUT, Component.ATTN_OUT):
            raise DictionaryFileError(f"{cfg_path}: an SAE on {hook!r} ({site.component}) "
                                      "writes a site factfind does not splice", path=str(cfg_path))
        return site
    # transcoders read mlp_in; Gemma Scope 2's configs say hook_mlp_in for TransformerLens but
    # their hf_hook_name (pre_feedforward_layernorm.output) is the post-norm input
    site = parse_hf_hook(hf, path=str(cfg_path), model_name=model_name) \
        if isinstance(hf, str) and hook.endswith("hook_mlp_in") \
        else parse_tl_hook(hook, path=str(cfg_path))
    out = meta.get("hook_name_out")
    out_site = parse_tl_hook(out, path=str(cfg_path)) if isinstance(out, str) else None
    if site.component is not Component.MLP_IN or \
            (out_site is not None and out_site.component is not Component.MLP_OUT):
        raise DictionaryFileError(f"{cfg_path}: a transcoder from {hook!r} to {out!r}; factfind's "
                                  "transcoders read mlp_in and write mlp_out", path=str(cfg_path))
    return site


def write(dicts: Dictionaries, folder: Path) -> None:
    """One SAELens folder per dictionary under ``folder``, named by its hook."""
    for d in dicts.values():
        sub = folder / tl_hook(d.site, d.layer)
        if sub.exists():  # a transcoder and a skip transcoder at one layer
            sub = folder / f"{tl_hook(d.site, d.layer)}-{d.short}"
        sub.mkdir(parents=True)
        cfg, tensors = _to_saelens(d)
        files.write_safetensors(sub / WEIGHTS, tensors)
        files.write_json(sub / CFG, cfg)


def _to_saelens(d: Dictionary) -> tuple[dict[str, Any], dict[str, Any]]:
    act = d.activation
    if d.kind is not DictKind.SAE and act is Activation.TOPK:
        raise FormatCapabilityError(f"{d.name}: SAELens has no TopK transcoder architecture; "
                                    "save it as format='sparsify'")
    if d.kind is not DictKind.SAE and d.subtract_b_dec:
        raise FormatCapabilityError(f"{d.name}: SAELens transcoders do not subtract b_dec from "
                                    "their input (apply_b_dec_to_input), but this one does")
    arch = {(DictKind.SAE, Activation.RELU): "standard", (DictKind.SAE, Activation.TOPK): "topk"}
    saved_act = Activation.JUMPRELU if act in (Activation.JUMPRELU, Activation.BATCHTOPK) \
        else act
    name = arch.get((d.kind, saved_act)) or next(
        a for a, ka in ARCHITECTURES.items() if ka == (d.kind, saved_act))
    threshold = d.threshold
    if act is Activation.BATCHTOPK:  # as SAELens saves its own BatchTopK SAEs for inference
        assert threshold is not None
        threshold = threshold.reshape(()).expand(d.d_sae).clone()
    metadata: dict[str, Any] = {"model_name": d.model, "hook_name": tl_hook(d.site, d.layer),
                                "factfind": files.jsonable(d.config())}
    cfg: dict[str, Any] = {"architecture": name, "d_in": d.d_in, "d_sae": d.d_sae,
                           "dtype": files.dtype_name(d), "device": "cpu",
                           "apply_b_dec_to_input": bool(d.subtract_b_dec),
                           "normalize_activations": "none", "reshape_activations": "none"}
    if d.kind is not DictKind.SAE:
        cfg["d_out"] = d.d_out
        metadata["hook_name_out"] = tl_hook(Component.MLP_OUT, d.layer)
    if act is Activation.TOPK:
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    cfg["metadata"] = metadata
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec,
               "threshold": threshold,
               "W_skip": None if d.W_skip is None else d.W_skip.T}
    return cfg, tensors


__all__ = ["ARCHITECTURES", "NAME", "detect", "read", "write"]
