"""The field's dictionary formats, in and out: SAELens, sparsify, circuit-tracer, Gemma Scope.

Sparse dictionaries trained elsewhere come in four layouts, one short module each:

* :mod:`.saelens` - a SAELens v6 folder, ``cfg.json`` + ``sae_weights.safetensors`` (SAEs of
  every activation, transcoders, skip transcoders);
* :mod:`.sparsify` - EleutherAI's sparsify, ``cfg.json`` + ``sae.safetensors`` per hook point
  (TopK SAEs and (skip) transcoders; EleutherAI's SmolLM2-135M skip transcoders);
* :mod:`.circuit_tracer` - circuit-tracer's transcoder set, ``config.yaml`` + one safetensors
  file per layer;
* :mod:`.gemmascope` - Gemma Scope's ``params.npz`` and Gemma Scope 2's ``params.safetensors``
  (JumpReLU SAEs and (affine skip) transcoders).

:func:`load_dictionaries` finds the layout itself (a folder of one dictionary, a folder of
many, a transcoder set) and maps each format's hook names onto factfind's sites
(:mod:`.hooks`); :func:`save_dictionaries` (also ``Dictionaries.save``) writes any of them
back, refusing with :class:`~factfind.errors.FormatCapabilityError` what a format cannot express.
Reading and writing are exact: a dictionary saved and loaded again has the same tensors and
fields, and encode/decode of SAELens', sparsify's and circuit-tracer's own code on their own
files match factfind's to 1e-5 (``tests/test_features_formats.py``, goldens written by the
libraries in ``tests/data/formats/``).

A name that is not a local path is looked up on the Hugging Face hub (``owner/repo`` or
``owner/repo/subfolder``, and Gemma Scope's SAELens release names such as
``gemma-scope-2-270m-pt-transcoders/transcoder/layer_5_width_16k_l0_small``); where the hub
cannot be reached that fails with one :class:`~factfind.errors.HubUnavailableError` line that
says what to download. Loading reads only the files (no forward pass); its cost is the size of
the weights.

Example::

    dicts = ff.load_dictionaries("/models/skip-transcoder-SmolLM2-135M", model=model)
    dicts.save("/tmp/as-saelens", format="saelens")
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from factfind.errors import ArgumentError, DictionaryFileError, WrongTypeError
from factfind.features.dictionary import SAVERS, Dictionaries, Dictionary
from factfind.features.formats import circuit_tracer, gemmascope, saelens, sparsify

log = logging.getLogger(__name__)

#: format name -> module (``detect``, ``read``, ``write``)
FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (saelens, sparsify, circuit_tracer,
                                                      gemmascope)}
_MAX_DEPTH = 5


def load_dictionaries(source: str | os.PathLike[str], *, model: Any = None,
                      format: str | None = None, site: str | None = None,
                      layer: int | None = None, dtype: torch.dtype | None = None,
                      revision: str | None = None) -> Dictionaries:
    """Load sparse dictionaries from a folder, a file or a hub name, in any of :data:`FORMATS`.

    Args:
        source: a folder (one dictionary, or a tree of them: a SAELens release, a sparsify run
            with one folder per hook point, a circuit-tracer set), a ``params.npz`` /
            ``params.safetensors`` file, or a hub name (``EleutherAI/<repo>``,
            ``google/gemma-scope-2-270m-pt/transcoder/layer_5_width_16k_l0_small``,
            ``gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5``).
        model: a factfind ``Model``: checks that every dictionary fits it (``Dictionaries.
            check``) and that no hook reads a module output that comes before the family's post
            norm; names the set after it when the files do not.
        format: ``"saelens"``, ``"sparsify"``, ``"circuit_tracer"`` or ``"gemmascope"``; found
            from the files when ``None``.
        site: the site of Gemma Scope files whose path does not say it (``"resid_post"``,
            ``"mlp_out"``, ``"mlp_in"`` for transcoders).
        layer: the layer of such a file when its path has no ``layer_N``.
        dtype: cast the weights (default: as stored, or the config's ``dtype``).
        revision: the hub revision of a hub name.

    Returns:
        :class:`~factfind.features.Dictionaries`, keyed ``L5.tc`` etc.

    Raises:
        DictionaryFileError: a missing or corrupt file, bad JSON/YAML, mismatched shapes (the
            message names the file); UnknownHookError: a hook with no factfind site;
            HubUnavailableError: a hub name while the hub cannot be reached; ArgumentError: a
            dictionary that does not fit ``model``.

    Example::

        dicts = load_dictionaries("tests/data/formats/saelens/topk")
        dicts.at(1, "rpre").encode(x)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise WrongTypeError(f"source must be a path or hub name, got {type(source).__name__}")
    if not str(source).strip():
        raise ArgumentError("source is empty: pass a folder, a file or a hub name")
    if format is not None and format not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(map(repr, FORMATS))}, got "
                            f"{format!r}")
    from factfind.features.formats.hub import resolve

    path = resolve(source, revision=revision)
    if path.is_file():
        if format not in (None, gemmascope.NAME) or path.suffix not in (".npz", ".safetensors"):
            raise DictionaryFileError(f"{path}: pass the folder that holds it (a single file is "
                                      "a Gemma Scope params.npz / params.safetensors)",
                                      path=str(path))
        found = [(gemmascope, path)]
    else:
        found = _find(path, format)
    fetch = _hub_fetcher(revision)
    out: list[Dictionary] = []
    origin: dict[str, Path] = {}
    for module, folder in found:
        for d in module.read(folder, dtype=dtype, site=site, layer=layer, fetch=fetch):
            if d.name in origin:  # e.g. a release with several widths or L0s per layer
                raise DictionaryFileError(f"{path}: two dictionaries for {d.name}, in "
                                          f"{origin[d.name]} and {folder}; load one folder "
                                          "per set (one dictionary per layer and site)",
                                          path=str(path))
            origin[d.name] = folder
            out.append(d)
    model_name = getattr(model, "name", None)
    dicts = Dictionaries(out, model=next((d.model for d in out if d.model), model_name),
                         meta={"source": str(source), "format": found[0][0].NAME})
    if model is not None:
        _check_model(dicts, model)
    log.info("loaded %d dictionaries (%s) from %s", len(dicts), found[0][0].NAME, source)
    return dicts


def _find(root: Path, format: str | None) -> list[tuple[ModuleType, Path]]:
    """Every dictionary folder under ``root`` (a transcoder set counts as one), one format."""
    modules = [FORMATS[format]] if format else list(FORMATS.values())
    found: list[tuple[ModuleType, Path]] = []

    def walk(folder: Path, depth: int) -> None:
        hit = next((m for m in modules if m.detect(folder)), None)
        if hit is not None:
            found.append((hit, folder))
            return
        if depth < _MAX_DEPTH:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()
                              and not p.name.startswith(".")):
                walk(sub, depth + 1)

    if not root.is_dir():
        raise DictionaryFileError(f"{root}: no such folder or file", path=str(root))
    walk(root, 0)
    if not found:
        looked = "; ".join(f"{n}: {d}" for n, d in _LOOKED_FOR.items()
                           if format in (None, n))
        raise DictionaryFileError(f"{root}: no dictionary files found (looked for {looked})",
                                  path=str(root))
    names = {m.NAME for m, _ in found}
    if len(names) > 1:
        raise DictionaryFileError(f"{root}: holds dictionaries in several formats "
                                  f"({', '.join(sorted(names))}); pass format= or one folder",
                                  path=str(root))
    return found


_LOOKED_FOR = {
    "saelens": "cfg.json + sae_weights.safetensors",
    "sparsify": "cfg.json + sae.safetensors",
    "circuit_tracer": "config.yaml",
    "gemmascope": "params.npz or params.safetensors",
}


def _hub_fetcher(revision: str | None) -> Any:
    def fetch(uri: str) -> Path:
        from factfind.features.formats.hub import fetch_file

        return fetch_file(uri, revision=revision)
    return fetch


def _check_model(dicts: Dictionaries, model: Any) -> None:
    dicts.check(model)
    spec = getattr(model, "spec", None)
    post_norm = spec is not None and (getattr(spec, "mlp_post_norm", None) or
                                      getattr(spec, "attn_post_norm", None))
    for d in dicts.values():
        if post_norm and d.meta.get("hook_before_post_norm"):
            raise ArgumentError(f"{d.name} was trained on a module output before "
                                f"{model.name}'s post norm, but factfind's {d.out_site} is "
                                "after it: the dictionary does not fit this family's site")


def save_dictionaries(dicts: Dictionaries | Dictionary, path: str | os.PathLike[str], *,
                      format: str = "saelens", overwrite: bool = False) -> Path:
    """Write ``dicts`` to the folder ``path`` in ``format`` (see :data:`FORMATS`).

    The folder is written beside ``path`` and renamed into place, so a failed save leaves
    nothing behind. Returns the folder.

    Raises:
        FormatCapabilityError: a dictionary the format cannot express (the message names a
            format that can); ArgumentError: an unknown format, or ``path`` exists and
            ``overwrite`` is False.

    Example::

        save_dictionaries(dicts, "/tmp/tc", format="circuit_tracer")
    """
    if format not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(map(repr, FORMATS))}, got "
                            f"{format!r}")
    if isinstance(dicts, Dictionary):
        dicts = Dictionaries([dicts])
    if not isinstance(dicts, Dictionaries):
        raise WrongTypeError(f"save_dictionaries takes Dictionaries, got {type(dicts).__name__}")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ArgumentError(f"path must be a folder path, got {path!r}")
    from factfind.features.formats.files import atomic_folder

    with atomic_folder(Path(path), overwrite=overwrite) as tmp:
        FORMATS[format].write(dicts, tmp)
    log.info("saved %d dictionaries as %s to %s", len(dicts), format, path)
    return Path(path)


SAVERS["save"] = save_dictionaries

__all__ = ["FORMATS", "load_dictionaries", "save_dictionaries"]
