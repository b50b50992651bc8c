"""Reading and writing the files the formats are made of, each failure one typed line naming
the file: a missing file, a truncated safetensors, bad JSON or YAML, a broken ``.npz``, a tensor
that is not there, shapes that do not fit together (:class:`~factfind.errors.DictionaryFileError`).
Writes go to a temporary sibling first and are renamed into place, so a killed save never
leaves a half-written dictionary behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from factfind.errors import ArgumentError, DictionaryFileError
from factfind.features.dictionary import Dictionary

#: dtype names as the formats write them (SAELens' cfg ``dtype``)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                  "float16": torch.float16, "bfloat16": torch.bfloat16}


def _exists(path: Path, what: str) -> None:
    if not path.is_file():
        raise DictionaryFileError(f"{path}: {what} is missing (a partial download or copy? "
                                  "fetch the whole folder again)", path=str(path))


def read_json(path: Path, what: str = "the config") -> dict[str, Any]:
    _exists(path, what)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DictionaryFileError(f"{path}: {what} is not valid JSON ({e})",
                                  path=str(path)) from None
    if not isinstance(data, dict):
        raise DictionaryFileError(f"{path}: {what} must be a JSON object, got "
                                  f"{type(data).__name__}", path=str(path))
    return data


def read_yaml(path: Path, what: str = "the config") -> dict[str, Any]:
    import yaml

    _exists(path, what)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DictionaryFileError(f"{path}: {what} is not valid YAML "
                                  f"({str(e).splitlines()[0]})", path=str(path)) from None
    if not isinstance(data, dict):
        raise DictionaryFileError(f"{path}: {what} must be a YAML mapping, got "
                                  f"{type(data).__name__}", path=str(path))
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _exists(path, "the weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DictionaryFileError(f"{path}: the weights file is corrupt or truncated "
                                  f"({str(e).splitlines()[0][:120]}); download it again",
                                  path=str(path)) from None


def read_npz(path: Path) -> dict[str, Tensor]:
    _exists(path, "the weights file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise DictionaryFileError(f"{path}: the .npz weights file is corrupt or truncated "
                                  f"({str(e).splitlines()[0][:120]}); download it again",
                                  path=str(path)) from None


def tensor(tensors: Mapping[str, Tensor], path: Path, *names: str) -> Tensor:
    """The first of ``names`` in ``tensors``, or a typed error naming the file and the keys."""
    for name in names:
        if name in tensors:
            return tensors[name]
    raise DictionaryFileError(f"{path}: tensor {names[0]!r} is missing (the file holds "
                              f"{', '.join(sorted(tensors)) or 'nothing'})", path=str(path))


def build(path: Path, **fields: Any) -> Dictionary:
    """A :class:`Dictionary` from a file's fields; a shape or value the type refuses becomes a
    :class:`DictionaryFileError` naming the file."""
    try:
        return Dictionary(**fields)
    except ArgumentError as e:
        raise DictionaryFileError(f"{path}: {e}", path=str(path)) from None


def section(data: Any, key: str) -> dict[str, Any]:
    """``data[key]`` when it is a mapping (a config's ``metadata``, ``factfind`` block), else
    ``{}``: configs are read defensively, a wrong type never escapes as a ``TypeError``."""
    value = data.get(key) if isinstance(data, dict) else None
    return dict(value) if isinstance(value, dict) else {}


def name_or_none(value: Any) -> str | None:
    """A config's model name: a string, else ``None``."""
    return value if isinstance(value, str) and value else None


def cast(tensors: dict[str, Tensor | None], dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return tensors
    return {k: (None if v is None else v.to(dtype)) for k, v in tensors.items()}


def dtype_name(d: Dictionary) -> str:
    return str(d.W_enc.dtype).removeprefix("torch.")


def contiguous(tensors: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """Tensors ready for ``safetensors``: on the CPU, contiguous, ``None`` dropped."""
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if v is not None}


def write_safetensors(path: Path, tensors: Mapping[str, Tensor | None],
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file(contiguous(tensors), str(path), metadata=metadata)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")


def jsonable(value: Any) -> Any:
    """``value`` if JSON can hold it (a dictionary's ``meta``), else its string."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return {k: jsonable(v) for k, v in value.items()} if isinstance(value, dict) \
            else str(value)


@contextmanager
def atomic_folder(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not overwrite:
        raise ArgumentError(f"{path} exists and is not empty; pass overwrite=True to replace "
                            "it, or save to a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["DTYPES", "atomic_folder", "build", "cast", "name_or_none", "read_json", "read_npz",
           "read_safetensors", "read_yaml", "section", "tensor", "write_json",
           "write_safetensors"]
