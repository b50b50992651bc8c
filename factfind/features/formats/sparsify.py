"""EleutherAI's sparsify: one folder per hook point, ``cfg.json`` + ``sae.safetensors``.

sparsify (``sparsify/sparse_coder.py``, ``SparseCoder.save_to_disk``) trains TopK SAEs and
(skip) transcoders (Gao et al. 2024; Paulo et al. 2025) and saves each as a folder named by
the module it hooks - ``layers.3`` (the block's output: ``resid_post``), ``layers.3.mlp``
(for an SAE the MLP's output, for a transcoder its input -> output), ``h.3.mlp`` on GPT-2.
``cfg.json`` is its ``SparseCoderConfig`` plus ``d_in``: ``num_latents`` (or
``expansion_factor``), ``k``, ``activation`` (``topk``; ``groupmax`` is refused),
``transcode``, ``skip_connection``. The weights are the module's state dict:
``encoder.weight`` ``[d_sae d_in]``, ``encoder.bias``, ``W_dec`` ``[d_sae d_in]``, ``b_dec``
and ``W_skip`` ``[d_in d_in]`` applied as ``x @ W_skip.mT``. An SAE encodes ``x - b_dec``; a
transcoder encodes ``x``. The activation is ``topk(relu(pre))``, factfind's ``topk``.

EleutherAI publishes its SmolLM2-135M skip transcoders this way
(``EleutherAI/skip-transcoder-SmolLM2-135M-...``: ``layers.N.mlp`` folders). sparsify can only
express TopK dictionaries whose output width is their input width, and an SAE only at a module
output (no ``resid_pre``); anything else raises :class:`~factfind.errors.FormatCapabilityError`.
factfind's own fields ride in ``cfg.json`` under ``factfind`` (sparsify drops extra fields).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from factfind.errors import DictionaryFileError, FormatCapabilityError
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import files
from factfind.features.formats.hooks import parse_hf_hook
from factfind.types import Component

NAME = "sparsify"
CFG, WEIGHTS = "cfg.json", "sae.safetensors"
_MODULE = {Component.RESID_POST: "layers.{l}", Component.MLP_OUT: "layers.{l}.mlp",
           Component.ATTN_OUT: "layers.{l}.self_attn", Component.MLP_IN: "layers.{l}.mlp"}


def detect(folder: Path) -> bool:
    if not (folder / CFG).is_file():
        return False
    if (folder / WEIGHTS).is_file():
        return True
    text = (folder / CFG).read_text(encoding="utf-8", errors="replace")[:4096]
    return not (folder / "sae_weights.safetensors").is_file() and \
        ("num_latents" in text or "expansion_factor" in text) and "d_sae" not in text


def read(folder: Path, *, dtype: torch.dtype | None = None, **_: Any) -> list[Dictionary]:
    """The dictionary in one sparsify hook-point folder."""
    cfg_path, w_path = folder / CFG, folder / WEIGHTS
    cfg = files.read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk" or cfg.get("signed"):
        signed = " (signed)" if cfg.get("signed") else ""
        raise DictionaryFileError(f"{cfg_path}: sparsify activation {cfg.get('activation')!r}"
                                  f"{signed} has no factfind equivalent; factfind reads topk",
                                  path=str(cfg_path))
    try:
        d_in = int(cfg["d_in"])
        d_sae = int(cfg.get("num_latents") or d_in * int(cfg["expansion_factor"]))
        k = int(cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise DictionaryFileError(f"{cfg_path}: cfg.json lacks a valid {e} (d_in, num_latents "
                                  "or expansion_factor, k)", path=str(cfg_path)) from None
    run_cfg = folder.parent / "config.json"
    model = None
    if run_cfg.is_file():  # sparsify's run config beside the hook points, if it reads
        try:
            model = files.name_or_none(files.read_json(run_cfg).get("model"))
        except DictionaryFileError:
            model = None
    ours = files.section(cfg, "factfind")
    model = model or files.name_or_none(ours.get("model"))
    transcode = bool(cfg.get("transcode", False))
    name, where = folder.name, str(folder)
    if transcode:
        src = parse_hf_hook(name, path=where, model_name=model, io="input")
        dst = parse_hf_hook(name, path=where, model_name=model, io="output")
        if src.component is not Component.MLP_IN or dst.component is not Component.MLP_OUT:
            raise DictionaryFileError(f"{where}: a transcoder on {name!r} maps {src.component} "
                                      f"to {dst.component}; factfind's transcoders read mlp_in "
                                      "and write mlp_out (hook the MLP module)", path=where)
        site, kind = src, DictKind.SKIP_TRANSCODER if cfg.get("skip_connection") \
            else DictKind.TRANSCODER
    else:
        site, kind = parse_hf_hook(name, path=where, model_name=model), DictKind.SAE
    t = files.read_safetensors(w_path)
    W_skip = files.tensor(t, w_path, "W_skip") if kind is DictKind.SKIP_TRANSCODER else None
    tensors = files.cast(dict(
        W_enc=files.tensor(t, w_path, "encoder.weight").T,
        b_enc=files.tensor(t, w_path, "encoder.bias"),
        W_dec=files.tensor(t, w_path, "W_dec"),
        b_dec=files.tensor(t, w_path, "b_dec"),
        W_skip=None if W_skip is None else W_skip.mT), dtype)
    if tuple(tensors["W_enc"].shape) != (d_in, d_sae):
        raise DictionaryFileError(f"{w_path}: encoder.weight is "
                                  f"{tuple(tensors['W_enc'].T.shape)}, but cfg.json says "
                                  f"[{d_sae} {d_in}] (num_latents, d_in)", path=str(w_path))
    meta = files.section(ours, "meta")
    if site.before_post_norm and not ours:  # factfind's own files name factfind's site
        meta["hook_before_post_norm"] = True
    return [files.build(w_path, kind=kind, activation=Activation.TOPK, layer=site.layer,
                        site=site.component, k=k, subtract_b_dec=not transcode, model=model,
                        meta=meta, **tensors)]


def write(dicts: Dictionaries, folder: Path) -> None:
    """One sparsify folder per dictionary, named by the module it hooks (``layers.3.mlp``)."""
    seen: dict[str, str] = {}
    for d in dicts.values():
        _check(d)
        hook = _MODULE[d.site].format(l=d.layer)
        if hook in seen:
            raise FormatCapabilityError(f"{d.name} and {seen[hook]} both hook {hook!r}; sparsify "
                                        "keeps one dictionary per hook point: save them to two "
                                        "folders")
        seen[hook] = d.name
        sub = folder / hook
        sub.mkdir(parents=True)
        transcode = d.kind is not DictKind.SAE
        files.write_safetensors(sub / WEIGHTS, {
            "encoder.weight": d.W_enc.T, "encoder.bias": d.b_enc, "W_dec": d.W_dec,
            "b_dec": d.b_dec, "W_skip": None if d.W_skip is None else d.W_skip.T})
        files.write_json(sub / CFG, {
            "activation": "topk", "expansion_factor": max(1, d.d_sae // d.d_in),
            "normalize_decoder": True, "num_latents": d.d_sae, "k": d.k, "multi_topk": False,
            "skip_connection": d.kind is DictKind.SKIP_TRANSCODER, "transcode": transcode,
            "d_in": d.d_in, "factfind": files.jsonable(d.config())})
    if dicts.model:
        files.write_json(folder / "config.json", {"model": dicts.model,
                                                  "hookpoints": list(seen)})


def _check(d: Dictionary) -> None:
    if d.activation is not Activation.TOPK:
        raise FormatCapabilityError(f"{d.name}: sparsify holds TopK dictionaries only, this one "
                                    f"is {d.activation}; save it as format='saelens'")
    if d.site not in _MODULE:
        raise FormatCapabilityError(f"{d.name}: sparsify hooks module outputs, which {d.site} is "
                                    "not; save it as format='saelens'")
    if d.d_out != d.d_in:
        raise FormatCapabilityError(f"{d.name}: sparsify's b_dec and W_skip have d_in "
                                    f"dimensions, but this one writes {d.d_out} from {d.d_in}")
    if d.subtract_b_dec is not (d.kind is DictKind.SAE):
        raise FormatCapabilityError(f"{d.name}: sparsify's SAEs encode x - b_dec and its "
                                    f"transcoders x, but this {d.kind} has "
                                    f"subtract_b_dec={d.subtract_b_dec}")


__all__ = ["NAME", "detect", "read", "write"]
