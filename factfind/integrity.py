"""Verified files: every cached entry is checked when read, healed when damaged, and a failed
write ends in one line.

A long run meets the faults of a real disk: a node lost mid-write leaves a truncated file, a
scratch disk returns garbage, a quota fills. factfind's caches (step results and streamed
chunks in :mod:`factfind.cache`, dequantized checkpoints in
:mod:`factfind.model.checkpoints`, the organism's checkpoint) all go through the three
functions here:

* :func:`write_verified` writes an entry to a temporary file beside it, records its size and
  sha256 in a small JSON *sidecar* (by default ``<name>.time.json``, the file that also keeps
  what the entry cost to compute), and moves the entry into place with ``os.replace``. A write
  that fails (no space, permission denied, a read-only file system) removes its temporary
  file and raises :class:`~factfind.errors.CacheWriteError`, one line naming the path, the
  bytes it needed and the fix.
* :func:`read_verified` checks an entry against its sidecar (size, then sha256) and reads it;
  an entry whose check or read fails is moved into a ``quarantine/`` folder of the cache
  (:func:`quarantine`: never deleted), one warning names it, and ``rebuild()`` makes it anew
  (or :class:`~factfind.errors.CacheCorruptError` says what to do where nothing can rebuild
  it). :data:`QUARANTINED` lists every entry this process moved aside, for a run's
  provenance.
* :func:`check` is the check alone (``None``, or the reason the entry fails).

Several processes may share a cache: writes and quarantines of one folder hold an exclusive
``flock`` on the folder (:func:`folder_lock`), so an entry and its sidecar always change
together, and a reader that sees a mismatch re-checks under the lock before it quarantines
anything (the entry may have just been replaced). A temporary file found while holding the
lock belongs to a writer that died (``kill -9`` mid-write) and is removed.

Cost: one sha256 pass over the bytes written and over the bytes read (about 1.5 GB/s on one
core: a few milliseconds for a step's table, under a second for a 500 MB checkpoint).

Example::

    from factfind.integrity import read_verified, write_verified

    write_verified(path, lambda tmp: safetensors.torch.save_file(tensors, tmp),
                   root=cache_root)
    tensors = read_verified(path, safetensors.torch.load_file, root=cache_root,
                            rebuild=lambda: train_and_save(path))
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from factfind.errors import CacheCorruptError, CacheWriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder locks (one writer at a time)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

T = TypeVar("T")

SIDECAR_SUFFIX = ".time.json"
"""The sidecar of ``<name>`` is ``<name>.time.json``: the entry's size and sha256 (and, for a
computed result, the seconds it took)."""

QUARANTINE = "quarantine"
"""The folder, inside a cache's root, that damaged entries are moved into."""

_ELSEWHERE = "write to another folder"


@dataclass(frozen=True)
class Quarantined:
    """An entry moved aside: where it was, where it is now, and why."""

    path: Path
    moved_to: Path
    reason: str


QUARANTINED: list[Quarantined] = []
"""Every entry this process moved into a quarantine folder, in order (a run's provenance
counts them)."""


def sidecar_of(path: str | os.PathLike[str]) -> Path:
    """The default sidecar of an entry: ``<name>.time.json`` beside it."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def digest(path: str | os.PathLike[str]) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def sha256_of(data: bytes) -> str:
    """The sha256 hex digest of bytes in memory (what :func:`write_verified` records)."""
    return hashlib.sha256(data).hexdigest()


def read_record(sidecar: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in a sidecar, or ``None`` if it is missing or unreadable."""
    try:
        got = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def check(path: str | os.PathLike[str], *, sidecar: str | os.PathLike[str] | None = None,
          record: dict[str, Any] | None = None) -> str | None:
    """Whether an entry is what was written: ``None`` if its size and sha256 equal its
    sidecar's record, else the reason (a missing entry, size or hash differ).

    An entry without a record (its sidecar is missing or unreadable, or was written before
    records had a hash) passes here: it can only be checked by reading it, which
    :func:`read_verified` always does.

    Args:
        path: the entry.
        sidecar: its sidecar (default :func:`sidecar_of`).
        record: the record if already read (then ``sidecar`` is not read).
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return "missing"
    rec = record if record is not None else read_record(
        Path(sidecar) if sidecar is not None else sidecar_of(p))
    if rec is None or "sha256" not in rec:
        return None
    if size != rec.get("size"):
        return f"size {size} bytes, recorded {rec.get('size')}"
    got = digest(p)[1]
    if got != rec["sha256"]:
        return f"sha256 {got[:12]}..., recorded {str(rec['sha256'])[:12]}..."
    return None


def verified_by_record(path: str | os.PathLike[str], *,
                       sidecar: str | os.PathLike[str] | None = None) -> bool:
    """Whether the entry has a record with a hash (else only a read can check it)."""
    rec = read_record(Path(sidecar) if sidecar is not None else sidecar_of(path))
    return rec is not None and "sha256" in rec


# --- locks -------------------------------------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # folder -> (fd, depth) of the flocks this process holds
_THREADS = threading.RLock()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (re-entrant within this process). Writers and
    quarantines of a cache folder hold it, so an entry and its sidecar change together."""
    key = os.path.realpath(folder)
    with _THREADS:
        fd, depth = _HELD.get(key, (-1, 0))
        if depth == 0 and fcntl is not None:
            fd = os.open(key, os.O_RDONLY)
            with contextlib.suppress(OSError):  # a file system without flock: no lock
                fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD.pop(key)
            if depth > 1:
                _HELD[key] = (fd, depth - 1)
            elif fd >= 0:
                os.close(fd)  # releases the flock


# --- writes ------------------------------------------------------------------------------------

_ERRNO_WORDS = (  # errors raised by non-Python writers (safetensors, tokenizers) as text
    (errno.ENOSPC, ("no space left", "storagefull", "os error 28")),
    (errno.EDQUOT, ("quota exceeded", "os error 122")),
    (errno.EACCES, ("permission denied", "os error 13")),
    (errno.EROFS, ("read-only file system", "os error 30")),
)


def errno_of(err: BaseException) -> int | None:
    """The disk errno behind ``err``: an OSError's, or one named in another writer's message
    (safetensors and tokenizers raise their own errors); ``None`` if it is not a disk error."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    text = str(err).lower()
    for code, words in _ERRNO_WORDS:
        if any(w in text for w in words):
            return code
    return None


def write_error(path: str | os.PathLike[str], err: BaseException, *, needed: int | None,
                elsewhere: str = _ELSEWHERE, kept: str = "", at_least: bool = False
                ) -> CacheWriteError:
    """The one-line :class:`CacheWriteError` for a failed write of ``path``: the path, the
    bytes the write needed (``at_least``: a lower bound, what a writer had written when it
    failed), the cause and the fix (``elsewhere`` says how to write to another folder, e.g.
    ``"pass --cache DIR on another file system"``; ``kept`` what still stands)."""
    code = errno_of(err)
    where = Path(path).parent
    while not where.exists() and where.parent != where:  # the folder that refused it
        where = where.parent
    size = "" if needed is None else f" ({'at least ' if at_least else ''}{needed:,} bytes)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        cause = "no space left on the device" if code == errno.ENOSPC else "disk quota exceeded"
        amount = "space" if needed is None else f"at least {needed:,} bytes"
        fix = f"free {amount} on the file system of {where}, or {elsewhere}"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied ({where} is not writable by this user)"
        fix = f"make {where} writable, or {elsewhere}"
    elif code == errno.EROFS:
        cause = f"{where} is on a read-only file system"
        fix = elsewhere
    else:
        cause = f"{type(err).__name__}: {err}"
        fix = f"check {where}, or {elsewhere}"
    tail = f"; {kept}" if kept else ""
    return CacheWriteError(f"cannot write {path}{size}: {cause}. Fix: {fix}{tail}.",
                           path=str(path), needed=needed, errno=code)


def _sweep(folder: Path, name: str) -> None:
    """Remove temporary files of ``name`` left by a writer that died (called under the folder
    lock, which every writer holds while its temporary file exists)."""
    for stale in folder.glob(f".{glob_escape(name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_tmp(folder: Path, name: str, data: bytes | Callable[[Path], None],
               written: list[int] | None = None) -> Path:
    """Write ``data`` (bytes, or ``writer(tmp_path)``) to a temporary file in ``folder``,
    flushed to disk; the caller moves or removes it. On failure the temporary file is removed
    and its size at that moment appended to ``written``."""
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if isinstance(data, bytes):
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            data(tmp)
            with open(tmp, "rb") as f:  # on disk before it gets its final name
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as its root
    except BaseException:
        if written is not None and tmp.exists():
            written.append(tmp.stat().st_size)
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[Path], None], *,
                 needed: int | None = None, elsewhere: str = _ELSEWHERE, kept: str = "",
                 ) -> Path:
    """Write ``data`` (bytes, or ``writer(tmp_path)`` that writes a file) to ``path`` through a
    temporary sibling and ``os.replace``: a reader sees the old file or the new one, never half
    of one. No sidecar (see :func:`write_verified`).

    Raises:
        CacheWriteError: the write failed (no space, permission denied, read-only); no
            temporary file is left and an existing ``path`` is as it was.
    """
    p = Path(path)
    size = len(data) if isinstance(data, bytes) else needed
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(p.parent):
            _sweep(p.parent, p.name)
            tmp = _write_tmp(p.parent, p.name, data)
            try:
                os.replace(tmp, p)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except Exception as err:
        if errno_of(err) is None:
            raise
        raise write_error(p, err, needed=size, elsewhere=elsewhere, kept=kept) from err
    return p


def write_verified(path: str | os.PathLike[str], data: bytes | Callable[[Path], None], *,
                   sidecar: str | os.PathLike[str] | None = None,
                   meta: dict[str, Any] | None = None, needed: int | None = None,
                   elsewhere: str = _ELSEWHERE, kept: str = "") -> dict[str, Any]:
    """Write an entry and the sidecar that lets every later read verify it.

    Under the folder's lock: the bytes go to a temporary file (``data`` itself, or what
    ``writer(tmp_path)`` writes there, e.g. ``safetensors.torch.save_file``), are flushed to
    disk and hashed; the sidecar ``{"size", "sha256", **meta}`` is written (atomically), then
    the entry is moved into place. A run killed between the two leaves a sidecar without its
    entry, which reads as "not cached"; an existing entry is replaced.

    Args:
        path: the entry.
        data: its bytes, or a function writing the file at the path it is given.
        sidecar: where the record goes (default :func:`sidecar_of`).
        meta: more JSON fields for the record (e.g. the seconds the entry took to compute).
        needed: the size to report if a writer function fails (bytes: their length).
        elsewhere: the fix that writes to another folder, for the error message.
        kept: what still stands after a failed write, for the error message.

    Returns:
        The record written to the sidecar.

    Raises:
        CacheWriteError: no space, permission denied, read-only: one line naming the path, the
            bytes needed and the fix; no temporary file is left, an existing entry is kept.
    """
    p = Path(path)
    side = Path(sidecar) if sidecar is not None else sidecar_of(p)
    size = len(data) if isinstance(data, bytes) else needed
    tmp: Path | None = None
    written: list[int] = []
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(p.parent):
            _sweep(p.parent, p.name)
            _sweep(side.parent, side.name)
            try:
                tmp = _write_tmp(p.parent, p.name, data, written)
                if isinstance(data, bytes):
                    record = {"size": len(data), "sha256": sha256_of(data)}
                else:
                    n, sha = digest(tmp)
                    record = {"size": n, "sha256": sha}
                    size = n
                record.update(meta or {})
                side_tmp = _write_tmp(side.parent, side.name,
                                      json.dumps(record, sort_keys=True).encode())
                os.replace(side_tmp, side)
                os.replace(tmp, p)
                _fsync_dir(p.parent)
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
    except Exception as err:
        if errno_of(err) is None:
            raise
        at_least = size is None and bool(written)
        raise write_error(p, err, needed=written[0] if at_least else size, elsewhere=elsewhere,
                          kept=kept, at_least=at_least) from err
    return record


# --- reads ------------------------------------------------------------------------------------

def quarantine(path: str | os.PathLike[str], *, reason: str,
               sidecar: str | os.PathLike[str] | None = None,
               root: str | os.PathLike[str] | None = None) -> Path:
    """Move a damaged entry (a file or a folder) and its sidecar into ``<root>/quarantine/``,
    keeping their path below ``root`` under a folder named by the time and process, log one
    warning naming it, and note it in :data:`QUARANTINED`. Nothing is deleted.

    Args:
        path: the entry.
        reason: why it failed (logged and recorded).
        sidecar: its sidecar, if it has one (moved with it).
        root: the cache's root (default the entry's folder).

    Returns:
        Where the entry is now.

    Raises:
        CacheCorruptError: the entry cannot be moved (a read-only cache); it is left as it is.
    """
    p = Path(path)
    base = Path(root) if root is not None else p.parent
    try:
        rel = p.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path(p.name)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    target = base / QUARANTINE / stamp / rel
    n = 0
    while target.exists() or target.is_symlink():  # never replace an earlier quarantined one
        n += 1
        target = base / QUARANTINE / f"{stamp}.{n}" / rel
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
        if sidecar is not None and Path(sidecar).exists():
            os.replace(sidecar, target.with_name(Path(sidecar).name))
    except OSError as err:
        raise CacheCorruptError(
            f"{p} is damaged ({reason}) and cannot be moved aside ({err.strerror or err}). "
            f"Fix: move it out of the cache yourself, or use another cache folder.",
            path=str(p), reason=reason) from None
    QUARANTINED.append(Quarantined(p, target, reason))
    log.warning("damaged cache entry %s (%s): moved to %s", p, reason, target)
    return target


def read_verified(path: str | os.PathLike[str], reader: Callable[[Path], T], *,
                  rebuild: Callable[[], T] | None = None,
                  sidecar: str | os.PathLike[str] | None = None,
                  root: str | os.PathLike[str] | None = None, fix: str = "") -> T:
    """Read an entry that :func:`write_verified` wrote, verified first.

    The entry's size and sha256 are checked against its sidecar, then ``reader(path)`` reads
    it. If the check or the read fails (a truncated or overwritten file, a zero-length file,
    bytes the reader rejects; an entry whose sidecar is missing is checked by the read alone),
    the entry is re-checked under the folder's lock
    (another process may have just replaced it), then moved into quarantine
    (:func:`quarantine`) and ``rebuild()`` makes it anew; it should write the entry again with
    :func:`write_verified` and return what ``reader`` would have.

    Args:
        path: the entry.
        reader: reads the entry's file.
        rebuild: makes the entry anew (``None``: it cannot be rebuilt here).
        sidecar: its sidecar (default :func:`sidecar_of`).
        root: the cache's root, where the quarantine folder is (default the entry's folder).
        fix: what the user should do when nothing can rebuild the entry (for the error).

    Returns:
        ``reader(path)``, or ``rebuild()`` for a missing or damaged entry.

    Raises:
        FileNotFoundError: the entry is missing and there is no ``rebuild``.
        CacheCorruptError: the entry is damaged and there is no ``rebuild`` (it has been moved
            into quarantine; the message names it and ``fix``).
    """
    p = Path(path)
    side = Path(sidecar) if sidecar is not None else sidecar_of(p)
    for attempt in range(2):
        try:
            seen = p.stat()
        except FileNotFoundError:
            if rebuild is None:
                raise
            return rebuild()
        reason = check(p, sidecar=side)
        if reason is None:
            try:
                return reader(p)
            except Exception as err:  # a read that fails: pyarrow, json, safetensors...
                reason = f"unreadable: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        with folder_lock(p.parent):
            try:
                now = p.stat()
            except FileNotFoundError:
                continue  # moved aside by another process meanwhile: read again
            replaced = (now.st_ino, now.st_size, now.st_mtime_ns) != (
                seen.st_ino, seen.st_size, seen.st_mtime_ns)
            if replaced and attempt == 0:
                continue  # another process wrote it meanwhile: check the new one
            moved = quarantine(p, reason=reason, sidecar=side, root=root)
        if rebuild is None:
            raise CacheCorruptError(
                f"{p} is damaged ({reason}); it was moved to {moved}. "
                f"Fix: {fix or 'rebuild it (rerun what wrote it)'}.",
                path=str(p), reason=reason, moved_to=str(moved))
        return rebuild()
    if rebuild is None:  # pragma: no cover - only when two processes race twice
        raise FileNotFoundError(p)
    return rebuild()


def check_folder(folder: str | os.PathLike[str], files: dict[str, dict[str, Any]]
                 ) -> str | None:
    """Whether a folder's files match a manifest ``{relative name: {"size", "sha256"}}``:
    ``None``, or the first file that differs and how (a checkpoint folder's check)."""
    root = Path(folder)
    for name, rec in sorted(files.items()):
        reason = check(root / name, record=rec)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def manifest(folder: str | os.PathLike[str], *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{relative name: {"size", "sha256"}}`` for every file below ``folder`` (sorted), less
    the names in ``skip``: what :func:`check_folder` checks."""
    root = Path(folder)
    out: dict[str, Any] = {}
    for f in sorted(root.rglob("*")):
        name = f.relative_to(root).as_posix()
        if f.is_file() and name not in skip:
            size, sha = digest(f)
            out[name] = {"size": size, "sha256": sha}
    return out


def safetensors_incomplete(path: Path) -> str | None:
    """Whether a safetensors file is shorter or longer than its own header says (a read of
    its first bytes: the 8-byte header length, the JSON header with each tensor's byte
    offsets); ``None`` when it is whole."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return f"size {size} bytes, shorter than its header"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__})"
    if 8 + n + end != size:
        return f"size {size} bytes, its header says {8 + n + end}"
    return None


__all__ = ["QUARANTINE", "QUARANTINED", "SIDECAR_SUFFIX", "Quarantined", "atomic_write",
           "check", "check_folder", "digest", "errno_of", "folder_lock", "manifest",
           "quarantine", "read_record", "read_verified", "safetensors_incomplete", "sha256_of",
           "sidecar_of", "verified_by_record", "write_error", "write_verified"]
