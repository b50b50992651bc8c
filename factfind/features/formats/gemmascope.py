"""Gemma Scope (``params.npz``) and Gemma Scope 2 (``params.safetensors`` + ``config.json``).

Google DeepMind's Gemma Scope (Lieberum et al. 2024) publishes JumpReLU SAEs and transcoders
(Rajamanoharan et al. 2024) for Gemma 2, one ``params.npz`` per dictionary under
``google/gemma-scope-2b-pt-{res,mlp,att,transcoders}/layer_{L}/width_16k/average_l0_{N}/``:
``W_enc`` ``[d_in d_sae]``, ``W_dec`` ``[d_sae d_out]``, ``b_enc``, ``b_dec``, ``threshold``.
The encoder reads ``x`` (no ``b_dec`` subtracted) and keeps ``pre`` where ``pre > threshold``.
The site is in the repository's name (``-res``: ``resid_post``, ``-mlp``: ``mlp_out``,
``-transcoders``: ``mlp_in -> mlp_out``; ``-att`` SAEs read the heads' ``z``, which factfind
has no site for), so a bare file needs ``site=``.

Gemma Scope 2 (Gemma 3) keeps one folder per dictionary under
``google/gemma-scope-2-{size}-{pt,it}/{resid_post,mlp_out,attn_out,transcoder}/
layer_{L}_width_{W}_l0_{size}[_affine]/``: ``params.safetensors`` with lower-case ``w_enc``
``[d_in d_sae]``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and, for the affine (skip)
transcoders, ``affine_skip_connection`` ``[d_in d_out]`` added as ``x @ A``; and a
``config.json`` whose ``hf_hook_point_in`` / ``hf_hook_point_out`` name the Hugging Face
modules (``model.layers.5.pre_feedforward_layernorm.output`` = factfind's ``mlp_in``). This is
what SAELens' ``gemma_3`` loader and circuit-tracer's ``load_gemma_scope_2_transcoder`` read.

``format="gemmascope"`` writes the Gemma Scope 2 layout; it holds JumpReLU dictionaries that do
not subtract ``b_dec`` (anything else raises :class:`~factfind.errors.FormatCapabilityError`).
Cross-layer transcoders (a 3-D ``w_dec``) are refused on reading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from factfind.errors import ArgumentError, DictionaryFileError, FormatCapabilityError
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import files
from factfind.features.formats.hooks import layer_from_path, parse_hf_hook
from factfind.types import Component

NAME = "gemmascope"
NPZ, SAFETENSORS, CONFIG = "params.npz", "params.safetensors", "config.json"
#: words in a Gemma Scope path -> the site its dictionaries read (None: z, refused)
_PATH_SITES: list[tuple[str, Component | None]] = [
    ("transcoder", Component.MLP_IN), ("resid_post", Component.RESID_POST),
    ("mlp_out", Component.MLP_OUT), ("attn_out", None),
    ("-res", Component.RESID_POST), ("-mlp", Component.MLP_OUT), ("-att", None)]
_DIR = {Component.RESID_POST: "resid_post", Component.MLP_OUT: "mlp_out",
        Component.MLP_IN: "transcoder"}


def detect(folder: Path) -> bool:
    return (folder / NPZ).is_file() or (folder / SAFETENSORS).is_file() or \
        ((folder / CONFIG).is_file() and "jump_relu" in _text(folder / CONFIG))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return ""


def read(folder: Path, *, dtype: torch.dtype | None = None, site: Any = None,
         layer: int | None = None, **_: Any) -> list[Dictionary]:
    """The dictionary in one Gemma Scope folder (or the ``params.*`` file itself)."""
    path = folder if folder.is_file() else \
        (folder / NPZ if (folder / NPZ).is_file() else folder / SAFETENSORS)
    return [read_file(path, dtype=dtype, site=site, layer=layer)]


def read_file(path: Path, *, dtype: torch.dtype | None = None, site: Any = None,
              layer: int | None = None, model: str | None = None) -> Dictionary:
    """One Gemma Scope ``params.npz`` or Gemma Scope 2 ``params.safetensors`` file."""
    t = files.read_npz(path) if path.suffix == ".npz" else files.read_safetensors(path)
    t = {k.lower(): v for k, v in t.items()}
    cfg_path = path.parent / CONFIG
    cfg = files.read_json(cfg_path) if cfg_path.is_file() else {}
    model = model or _model_name(cfg, path)
    where = str(path)
    comp, before = _site(path, cfg, site, model)
    layer = layer if layer is not None else layer_from_path(list(path.parts))
    if layer is None and isinstance(cfg.get("hf_hook_point_in"), str):
        layer = parse_hf_hook(cfg["hf_hook_point_in"], path=str(cfg_path), model_name=model).layer
    if layer is None:
        raise DictionaryFileError(f"{path}: no layer_N in the path and no config.json naming "
                                  "the hook; pass layer=", path=where)
    W_dec = files.tensor(t, path, "w_dec")
    if W_dec.dim() == 3:
        raise DictionaryFileError(f"{path}: a cross-layer transcoder (3-D w_dec) is not a "
                                  "factfind Dictionary", path=where)
    skip = t.get("affine_skip_connection")
    kind = DictKind.SAE if comp is not Component.MLP_IN else \
        (DictKind.SKIP_TRANSCODER if skip is not None else DictKind.TRANSCODER)
    if "scaling_factor" in t and not torch.allclose(t["scaling_factor"],
                                                    torch.ones_like(t["scaling_factor"])):
        raise DictionaryFileError(f"{path}: a scaling_factor other than 1 is not supported",
                                  path=where)
    tensors = files.cast(dict(
        W_enc=files.tensor(t, path, "w_enc"), b_enc=files.tensor(t, path, "b_enc"),
        W_dec=W_dec, b_dec=files.tensor(t, path, "b_dec"),
        threshold=files.tensor(t, path, "threshold"), W_skip=skip), dtype)
    ours = files.section(cfg, "factfind")
    meta = files.section(ours, "meta")
    if before and not ours:  # factfind's own files name factfind's site
        meta["hook_before_post_norm"] = True
    return files.build(path, kind=kind, activation=Activation.JUMPRELU, layer=layer, site=comp,
                       subtract_b_dec=False, model=model, meta=meta, **tensors)


def _site(path: Path, cfg: dict[str, Any], site: Any, model: str | None
          ) -> tuple[Component, bool]:
    if site is not None:
        try:
            return Component(site), False
        except ValueError:
            raise ArgumentError(f"site must be one of resid_post, mlp_out, mlp_in "
                                f"(transcoders), got {site!r}") from None
    hook = cfg.get("hf_hook_point_in")
    if isinstance(hook, str):
        s = parse_hf_hook(hook, path=str(path.parent / CONFIG), model_name=model or "gemma")
        return s.component, s.before_post_norm
    text = "/".join(path.parts[-5:])  # repo/layer_3/width_16k/average_l0_5/params.npz
    for word, comp in _PATH_SITES:
        if word in text:
            if comp is None:
                raise DictionaryFileError(f"{path}: Gemma Scope's attention SAEs read the "
                                          "heads' z, which factfind has no site for",
                                          path=str(path))
            return comp, False
    raise DictionaryFileError(f"{path}: the path does not say the site (res, mlp, transcoder); "
                              "pass site='resid_post', 'mlp_out' or 'mlp_in'", path=str(path))


def _model_name(cfg: dict[str, Any], path: Path) -> str | None:
    name = cfg.get("model_name")
    if isinstance(name, str):
        name = name.replace("-v3", "-3")
        if "270m" in name:  # as SAELens: the 270m model is published without -pt
            name = name.replace("-pt", "")
        return f"google/{name}" if name.startswith("gemma") else name
    for part in reversed(path.parts):  # gemma-scope-2b-pt-res -> google/gemma-2-2b
        m = re.match(r"^gemma-scope-(2-)?(\d+(?:\.\d+)?[mb])-(pt|it)", part)
        if m:
            family = "gemma-3" if m.group(1) else "gemma-2"
            return f"google/{family}-{m.group(2)}{'-it' if m.group(3) == 'it' else ''}"
    return None


def write(dicts: Dictionaries, folder: Path) -> None:
    """The Gemma Scope 2 layout: ``<site>/layer_{L}_width_{W}[_affine]/params.safetensors``
    with its ``config.json``."""
    for d in dicts.values():
        _check(d)
        sub = folder / _DIR[d.site] / \
            f"layer_{d.layer}_width_{d.d_sae}{'_affine' if d.W_skip is not None else ''}"
        sub.mkdir(parents=True)
        files.write_safetensors(sub / SAFETENSORS, {
            "w_enc": d.W_enc, "w_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec,
            "threshold": d.threshold, "affine_skip_connection": d.W_skip})
        mods = {Component.RESID_POST: "model.layers.{l}.output",
                Component.MLP_OUT: "model.layers.{l}.post_feedforward_layernorm.output",
                Component.MLP_IN: "model.layers.{l}.pre_feedforward_layernorm.output"}
        cfg: dict[str, Any] = {"architecture": "jump_relu", "model_name": d.model,
                               "hf_hook_point_in": mods[d.site].format(l=d.layer)}
        if d.kind is not DictKind.SAE:
            cfg["hf_hook_point_out"] = mods[Component.MLP_OUT].format(l=d.layer)
            cfg["affine_connection"] = d.W_skip is not None
        cfg["factfind"] = files.jsonable(d.config())
        files.write_json(sub / CONFIG, cfg)


def _check(d: Dictionary) -> None:
    if d.activation is not Activation.JUMPRELU:
        raise FormatCapabilityError(f"{d.name}: Gemma Scope holds JumpReLU dictionaries only, "
                                    f"this one is {d.activation}; save it as format='saelens'")
    if d.site not in _DIR:
        raise FormatCapabilityError(f"{d.name}: Gemma Scope has resid_post, mlp_out and "
                                    f"transcoder dictionaries, not {d.site}; save it as "
                                    "format='saelens'")
    if d.subtract_b_dec:
        raise FormatCapabilityError(f"{d.name}: Gemma Scope's encoders read x, but this one "
                                    "subtracts b_dec first; save it as format='saelens'")


__all__ = ["NAME", "detect", "read", "read_file", "write"]
