"""circuit-tracer's transcoder set: ``config.yaml`` + one safetensors file per layer.

circuit-tracer (Ameisen et al. 2025; Hanna, Piotrowski et al.) builds attribution graphs over
a *transcoder set*: one per-layer transcoder (PLT) for every layer from 0 up, all of one width.
Version 0.5 describes a set with a ``config.yaml`` - ``model_kind: transcoder_set``,
``model_name``, ``feature_input_hook`` / ``feature_output_hook`` (TransformerLens hooks
relative to a block: ``mlp.hook_in`` -> ``hook_mlp_out``), ``scan``, and ``transcoders``, a
list of per-layer file paths or ``hf://`` URIs, index = layer (absent: ``layer_{i}.safetensors``
beside the config, which is what ``TranscoderSet.to_safetensors`` and its cache write). Earlier
versions listed ``{id, layer, filepath}`` records; both are read.

A layer's file (``SingleLayerTranscoder.to_safetensors``) holds ``W_enc`` ``[d_sae d_model]``
(applied as ``F.linear(x, W_enc, b_enc)``), ``W_dec`` ``[d_sae d_model]``, ``b_enc``,
``b_dec``, ``activation_function.threshold`` for JumpReLU (ReLU without it) and ``W_skip``
``[d_model d_model]`` applied as ``x @ W_skip.T``. Files of Gemma Scope (``.npz``) and Gemma
Scope 2 (lower-case ``w_enc``...) in a set are read as :mod:`.gemmascope` reads them, as
circuit-tracer's own ``load_gemma_scope_transcoder`` / ``load_gemma_scope_2_transcoder`` do.

``hook_resid_mid`` (the residual before the MLP's norm, which circuit-tracer's Llama ReLU
transcoders read) is not factfind's ``mlp_in`` and is refused; so are cross-layer transcoders.
Saving needs transcoders (ReLU or JumpReLU) at layers 0..n-1 of one width and kind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from factfind.errors import DictionaryFileError, FormatCapabilityError
from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import files, gemmascope
from factfind.features.formats.hooks import parse_tl_hook
from factfind.types import Component

NAME = "circuit_tracer"
CONFIG = "config.yaml"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"
THRESHOLD = "activation_function.threshold"


def detect(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def read(folder: Path, *, dtype: torch.dtype | None = None, fetch: Any = None,
         **_: Any) -> list[Dictionary]:
    """Every layer's transcoder of the set described by ``folder/config.yaml``; ``fetch``
    resolves ``hf://`` URIs (the hub)."""
    cfg_path = folder / CONFIG
    cfg = files.read_yaml(cfg_path)
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise DictionaryFileError(f"{cfg_path}: model_kind {kind!r}; factfind reads per-layer "
                                  "transcoder sets (cross-layer transcoders are not a factfind "
                                  "Dictionary)", path=str(cfg_path))
    for key, want in (("feature_input_hook", Component.MLP_IN),
                      ("feature_output_hook", Component.MLP_OUT)):
        hook = cfg.get(key)
        if not isinstance(hook, str):
            raise DictionaryFileError(f"{cfg_path}: {key} is missing", path=str(cfg_path))
        got = parse_tl_hook(f"blocks.0.{hook}", path=str(cfg_path)).component
        if got is not want:
            raise DictionaryFileError(f"{cfg_path}: {key} {hook!r} is {got}; factfind's "
                                      f"transcoders read mlp_in and write mlp_out",
                                      path=str(cfg_path))
    model = files.name_or_none(cfg.get("model_name"))
    metas = files.section(files.section(cfg, "factfind"), "meta")
    out = []
    for layer, path in _layer_files(folder, cfg, fetch):
        if path.suffix == ".npz" or _is_gemmascope_2(path):
            d = gemmascope.read_file(path, dtype=dtype, site=Component.MLP_IN, layer=layer,
                                     model=model)
        else:
            d = _read_layer(path, layer, dtype, model)
        d.meta.update(files.section(metas, str(layer)))
        out.append(d)
    if [d.layer for d in out] != list(range(len(out))):
        raise DictionaryFileError(f"{cfg_path}: a transcoder set needs one file per layer from "
                                  f"0 up, got layers {[d.layer for d in out]}", path=str(cfg_path))
    return out


def _layer_files(folder: Path, cfg: dict[str, Any], fetch: Any) -> list[tuple[int, Path]]:
    listed = cfg.get("transcoders")
    if listed is None:
        found = {int(m.group(1)): p for p in folder.glob("layer_*.safetensors")
                 if (m := re.match(r"^layer_(\d+)\.safetensors$", p.name))}
        if not found:
            raise DictionaryFileError(f"{folder / CONFIG}: no transcoders list and no "
                                      "layer_N.safetensors beside it", path=str(folder / CONFIG))
        return sorted(found.items())
    if not isinstance(listed, list) or not listed:
        raise DictionaryFileError(f"{folder / CONFIG}: transcoders must be a non-empty list",
                                  path=str(folder / CONFIG))
    out = []
    for i, item in enumerate(listed):
        if isinstance(item, dict):  # circuit-tracer <= 0.2: {id, layer, filepath}
            layer, ref = item.get("layer", i), str(item.get("filepath", ""))
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise DictionaryFileError(f"{folder / CONFIG}: transcoders[{i}].layer must be "
                                          f"an integer >= 0, got {layer!r}",
                                          path=str(folder / CONFIG))
        else:
            layer, ref = i, str(item)
        if ref.startswith("hf://"):
            if fetch is None:
                raise DictionaryFileError(f"{folder / CONFIG}: {ref} is on the hub", path=ref)
            path = fetch(ref)
        else:
            path = Path(ref) if Path(ref).is_absolute() else folder / ref
        out.append((layer, path))
    return sorted(out)


def _is_gemmascope_2(path: Path) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return "w_enc" in f.keys()  # noqa: SIM118 - safe_open has no __contains__
    except Exception:
        return False


def _read_layer(path: Path, layer: int, dtype: torch.dtype | None, model: Any) -> Dictionary:
    t = files.read_safetensors(path)
    if "log_thresholds" in t:
        raise DictionaryFileError(f"{path}: log_thresholds are not read by circuit-tracer "
                                  "either; store activation_function.threshold", path=str(path))
    b_enc, b_dec = files.tensor(t, path, "b_enc"), files.tensor(t, path, "b_dec")
    d_sae, d_model = b_enc.shape[0], b_dec.shape[0]
    W_enc, W_dec = files.tensor(t, path, "W_enc"), files.tensor(t, path, "W_dec")
    # 0.5 stores both [d_sae d_model]; older files stored W_dec as [d_model d_sae]
    if W_dec.dim() == 2 and tuple(W_dec.shape) == (d_model, d_sae) and d_model != d_sae:
        W_dec = W_dec.T
    if W_enc.dim() != 2 or tuple(W_enc.shape) != (d_sae, d_model):
        raise DictionaryFileError(f"{path}: W_enc is {tuple(W_enc.shape)}, but b_enc and b_dec "
                                  f"say [{d_sae} {d_model}] (d_transcoder, d_model)",
                                  path=str(path))
    threshold = t.get(THRESHOLD, t.get("threshold"))
    skip = t.get("W_skip")
    tensors = files.cast(dict(W_enc=W_enc.T, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                              threshold=threshold, W_skip=None if skip is None else skip.T),
                         dtype)
    return files.build(path, kind=DictKind.TRANSCODER if skip is None
                       else DictKind.SKIP_TRANSCODER,
                       activation=Activation.RELU if threshold is None else Activation.JUMPRELU,
                       layer=layer, site=Component.MLP_IN, subtract_b_dec=False, model=model,
                       **tensors)


def write(dicts: Dictionaries, folder: Path) -> None:
    """``config.yaml`` + ``layer_{i}.safetensors``, as circuit-tracer's cache writes them."""
    import yaml

    ds = list(dicts.values())
    for d in ds:
        if d.kind is DictKind.SAE:
            raise FormatCapabilityError(f"{d.name}: circuit-tracer's sets hold transcoders, not "
                                        "SAEs; save it as format='saelens'")
        if d.activation not in (Activation.RELU, Activation.JUMPRELU):
            raise FormatCapabilityError(f"{d.name}: circuit-tracer loads ReLU and JumpReLU "
                                        f"transcoders, this one is {d.activation}; save it as "
                                        "format='sparsify' (TopK) or 'saelens'")
        if d.subtract_b_dec:
            raise FormatCapabilityError(f"{d.name}: circuit-tracer's transcoders read x, but "
                                        "this one subtracts b_dec first")
    layers = [d.layer for d in ds]
    if layers != list(range(len(ds))):
        raise FormatCapabilityError(f"circuit-tracer needs one transcoder at every layer from 0 "
                                    f"up, this set has layers {layers}")
    if len({(d.d_sae, d.kind, d.activation) for d in ds}) != 1:
        raise FormatCapabilityError("circuit-tracer's set has one width, kind and activation "
                                    "for all layers; these differ: "
                                    f"{sorted({(d.d_sae, str(d.kind)) for d in ds})}")
    folder.mkdir(parents=True, exist_ok=True)
    for d in ds:
        files.write_safetensors(folder / f"layer_{d.layer}.safetensors", {
            "W_enc": d.W_enc.T, "W_dec": d.W_dec, "b_enc": d.b_enc, "b_dec": d.b_dec,
            THRESHOLD: d.threshold, "W_skip": None if d.W_skip is None else d.W_skip.T})
    model = dicts.model or ds[0].model
    cfg = {"model_kind": "transcoder_set", "model_name": model,
           "feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK,
           "scan": f"{str(model).split('/')[-1]}/factfind-{ds[0].short}-{ds[0].d_sae}",
           "factfind": {"meta": {str(d.layer): files.jsonable(d.meta) for d in ds if d.meta}}}
    (folder / CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


__all__ = ["NAME", "detect", "read", "write"]
