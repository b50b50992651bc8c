"""On-disk result cache: a re-run skips finished work and a killed run resumes.

A run's results live in a directory named by a hash of everything that determines them: the
model (name, revision, config fingerprint), the dataset fingerprint and the run's configuration.
Inside it, each analysis step is a file - a tidy table as parquet, anything else as JSON - and a
long step over many prompts can be split into chunks, one file each, so a run killed midway
loses at most the chunk in flight. Every file is written to a temporary name and moved into
place with ``os.replace`` (atomic on POSIX), so a reader never sees half a file, and an
existing good result is never overwritten: a finished step is simply loaded. Two runs may
share a cache folder at once (writes of a folder hold its lock).

Each computed result (a step, or a chunk of a chunked step) is stored with the wall and CPU
seconds it took and its size and sha256 (a small JSON *sidecar* beside it, ``<name>.time.json``,
written just before the result; :mod:`factfind.integrity`), so a resumed run still knows what
its cached steps cost (:meth:`RunCache.timing_table`), and every read is verified: a result
whose size or hash differs from its sidecar's, or that fails to parse (the only check of one
whose sidecar is missing) is moved into ``<cache>/quarantine/`` (never deleted), named in one
warning, and computed again; :attr:`RunCache.rebuilt` lists those steps for the run's
provenance. A write that fails (a full disk, a folder without write permission) raises
:class:`~factfind.errors.CacheWriteError`, one line naming the file, the bytes it needed and
the fix; the steps finished before it stay cached, so the next run resumes.

Example::

    cache = RunCache.open("runs", model=model.fingerprint(), dataset=facts.fingerprint(),
                          config={"seed": 0})
    trace = cache.table("causal_tracing", lambda: causal_tracing(model, facts))
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from factfind.errors import ArgumentError, CacheCorruptError
from factfind.integrity import (
    QUARANTINED,
    atomic_write,
    check,
    quarantine,
    read_verified,
    verified_by_record,
    write_error,
    write_verified,
)

log = logging.getLogger(__name__)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


ELSEWHERE = "pass --cache DIR on another file system (RunCache.open(DIR))"
"""The fix a failed cache write names: another cache folder."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``
    (:func:`factfind.integrity.atomic_write`; a failure raises a one-line
    :class:`~factfind.errors.CacheWriteError` and leaves no temporary file)."""
    atomic_write(path, data, elsewhere=ELSEWHERE)


def chunk_files(folder: Path) -> list[Path]:
    """The finished chunk files of a chunked step, in order (temporary files left by a killed
    writer start with a dot and are not among them)."""
    return sorted(folder.glob("chunk-*.parquet"))


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_chunk(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One chunk file of a streamed step, verified against its sidecar first.

    Raises:
        CacheCorruptError: the chunk is damaged (it is moved into the cache's quarantine
            folder; rerunning the call that streamed it computes it again).
    """
    reason = check(path, sidecar=_time_path(path, chunk=True))
    if reason is None:
        try:
            return pd.read_parquet(path, columns=list(columns) if columns else None)
        except Exception as err:  # pyarrow's errors on bad bytes are not OSErrors only
            reason = f"unreadable: {type(err).__name__}: {err}"
    root = path.parent.parent.parent  # <cache>/<run>/<step folder>/chunk-*.parquet
    moved = quarantine(path, reason=reason, sidecar=_time_path(path, chunk=True), root=root)
    raise CacheCorruptError(f"{path} is damaged ({reason}); it was moved to {moved}. Fix: "
                            "rerun the call that streamed it, which computes that chunk again.",
                            path=str(path), reason=reason, moved_to=str(moved))


def _time_path(path: Path, *, chunk: bool = False) -> Path:
    """Where the seconds of the result at ``path`` are kept. A chunk's starts with ``_`` so that
    a reader of the chunk folder as a parquet dataset skips it (pyarrow ignores ``_``/``.``)."""
    return path.with_name(f"{'_' if chunk else ''}{path.name}.time.json")


def _read_time(path: Path) -> dict[str, float] | None:
    """The stored seconds of a result (``None`` for one cached before times were kept)."""
    try:
        got = json.loads(path.read_text())
        return {"seconds": float(got["seconds"]), "cpu_seconds": float(got["cpu_seconds"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _Clock:
    """Wall (``perf_counter``) and process CPU seconds since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.wall,
                "cpu_seconds": time.process_time() - self.cpu}


@dataclass
class StepTime:
    """One step's cost: ``seconds`` / ``cpu_seconds`` of computing it (summed over its chunks;
    for cached results, as measured when they were computed; ``None`` where unknown), how many
    of its ``chunks`` this process computed (``computed``) and how long this process spent on
    it (``this_run``: the computing, or the loading of cached results)."""

    step: str
    seconds: float | None = 0.0
    cpu_seconds: float | None = 0.0
    chunks: int = 0
    computed: int = 0
    this_run: float = 0.0

    def add(self, took: dict[str, float] | None, *, computed: bool, spent: float) -> None:
        self.chunks += 1
        self.computed += int(computed)
        self.this_run += spent
        if took is None or self.seconds is None or self.cpu_seconds is None:
            self.seconds = self.cpu_seconds = None
        else:
            self.seconds += took["seconds"]
            self.cpu_seconds += took["cpu_seconds"]

    @property
    def status(self) -> str:
        if self.computed == self.chunks:
            return "computed"
        if self.computed == 0:
            return "cached"
        return f"resumed ({self.computed} of {self.chunks} chunks computed)"


_MISSING = object()  # a step not (or no longer) on disk


@dataclass
class RunCache:
    """A directory of step results for one (model, dataset, configuration).

    Attributes:
        root: the run directory.
        key: what the directory's name hashes (written to ``run.json``).
        hits / computed: names of steps served from disk / computed in this process.
        times: each step this process touched, in order, with its cost (:class:`StepTime`).
        rebuilt: steps (``name`` or ``name[start]`` for a chunk) whose cached result failed
            its check, was moved into ``<base>/quarantine/`` and was computed again.
    """

    root: Path
    key: dict[str, Any]
    hits: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    times: dict[str, StepTime] = field(default_factory=dict)
    rebuilt: list[str] = field(default_factory=list)

    @property
    def base(self) -> Path:
        """The cache folder that holds this run's directory (and the quarantine folder)."""
        return self.root.parent

    def _kept(self) -> str:
        done = len(self.hits) + len(self.computed)
        return (f"the {done} steps finished so far stay cached in {self.root} and the next "
                "run resumes from them") if done else ""

    def _timed(self, step: str, path: Path, compute: Callable[[], Any],
               encode: Callable[[Any], bytes], *, chunk: bool = False) -> Any:
        """``compute()`` timed; its result written with a sidecar holding its seconds, size
        and sha256 (:func:`~factfind.integrity.write_verified`)."""
        clock = _Clock()
        value = compute()
        took = clock.elapsed()
        write_verified(path, encode(value), sidecar=_time_path(path, chunk=chunk), meta=took,
                       elsewhere=ELSEWHERE, kept=self._kept())
        self._note(step, took, computed=True, spent=clock.elapsed()["seconds"])
        return value

    def _note(self, step: str, took: dict[str, float] | None, *, computed: bool,
              spent: float) -> None:
        self.times.setdefault(step, StepTime(step)).add(took, computed=computed, spent=spent)

    def _hit(self, step: str, label: str, path: Path, load: Callable[[Path], Any], *,
             chunk: bool = False) -> Any:
        """The verified result at ``path`` (``_MISSING`` if it is not there, or was damaged
        and has been quarantined: the caller computes it)."""
        start = time.perf_counter()
        side = _time_path(path, chunk=chunk)
        moved = len(QUARANTINED)
        value = read_verified(path, load, sidecar=side, root=self.base,
                              rebuild=lambda: _MISSING)
        if value is _MISSING:
            if len(QUARANTINED) > moved:
                self.rebuilt.append(label)
            return _MISSING
        self.hits.append(label)
        self._note(step, _read_time(side), computed=False, spent=time.perf_counter() - start)
        return value

    def timing_table(self) -> pd.DataFrame:
        """One row per step this process touched, in order: ``step``, ``seconds`` and
        ``cpu_seconds`` of computing it (kept from when it was computed for cached steps; NaN
        if that predates stored times), ``status`` (computed / cached / resumed) and
        ``this_run_seconds`` (what this process spent on it: computing or loading)."""
        rows = [{"step": t.step, "seconds": t.seconds, "cpu_seconds": t.cpu_seconds,
                 "status": t.status, "this_run_seconds": t.this_run}
                for t in self.times.values()]
        return pd.DataFrame(rows, columns=["step", "seconds", "cpu_seconds", "status",
                                           "this_run_seconds"]).astype(
            {"seconds": float, "cpu_seconds": float, "this_run_seconds": float})

    @classmethod
    def open(cls, base: str | Path, **key: Any) -> RunCache:
        """The run directory under ``base`` for this key (created if new).

        Raises:
            CacheWriteError: ``base`` cannot be created or written (one line: the path and
                the fix).
        """
        root = Path(base) / _digest(key)[:16]
        meta = root / "run.json"
        text = json.dumps(key, sort_keys=True, indent=2, default=str).encode()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(meta, err, needed=len(text), elsewhere=ELSEWHERE) from err
        if not meta.exists():
            atomic_write_bytes(meta, text)
        return cls(root, key)

    def _path(self, name: str, params: dict[str, Any] | None, suffix: str) -> Path:
        tag = f"-{_digest(params)[:10]}" if params else ""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ArgumentError(f"step names are letters, digits, '-' and '_': {name!r}")
        return self.root / f"{name}{tag}{suffix}"

    def table(self, name: str, compute: Callable[[], pd.DataFrame], *,
              params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The step's table from disk (verified), or computed, saved and returned."""
        path = self._path(name, params, ".parquet")
        df = self._hit(name, name, path, pd.read_parquet)
        if df is not _MISSING:
            log.info("cache hit: %s", path.name)
            return df
        df = self._timed(name, path, compute, _parquet_bytes)
        self.computed.append(name)
        return df

    def json(self, name: str, compute: Callable[[], Any], *,
             params: dict[str, Any] | None = None) -> Any:
        """Like :meth:`table` for JSON-able values."""
        path = self._path(name, params, ".json")
        value = self._hit(name, name, path, lambda p: json.loads(p.read_text()))
        if value is not _MISSING:
            return value
        value = self._timed(name, path, compute, lambda v: json.dumps(
            v, sort_keys=True, indent=2, default=str).encode())
        self.computed.append(name)
        return value

    def chunked(self, name: str, n: int, compute: Callable[[int, int], pd.DataFrame], *,
                chunk: int, params: dict[str, Any] | None = None,
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """A step over ``n`` items computed in chunks of ``chunk``; each chunk's table is saved
        as soon as it is done, so a killed run recomputes only unfinished chunks.

        ``compute(start, stop)`` returns the rows for items ``start..stop-1``; a ``prompt``
        column, if present, must use global indices. The chunks are loaded (each verified) and
        concatenated; use :meth:`stream` to leave them on disk (memory flat in ``n``).
        """
        folder = self.stream(name, n, compute, chunk=chunk, params=params, progress=progress)
        parts = [read_chunk(path) for path in chunk_files(folder)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def stream(self, name: str, n: int, compute: Callable[[int, int], pd.DataFrame], *,
               chunk: int, params: dict[str, Any] | None = None,
               progress: Callable[[int], None] | None = None) -> Path:
        """Like :meth:`chunked`, but return the folder of chunk files (a parquet dataset that
        ``pd.read_parquet(folder)`` reads whole) without holding any chunk past its write:
        finished chunks are checked (size and sha256 against their sidecars) without being
        parsed; a damaged one is quarantined and computed again."""
        if chunk < 1:
            raise ArgumentError("chunk must be >= 1")
        folder = self._path(name, dict(params or {}, chunk=chunk, n=n), "")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(folder, err, needed=None, elsewhere=ELSEWHERE,
                              kept=self._kept()) from err
        for start in range(0, n, chunk):
            path = folder / f"chunk-{start:08d}.parquet"
            label = f"{name}[{start}]"
            if self._hit(name, label, path, _checked, chunk=True) is _MISSING:
                self._timed(name, path, lambda s=start: compute(s, min(n, s + chunk)),
                            _parquet_bytes, chunk=True)
                self.computed.append(label)
            if progress is not None:
                progress(min(n, start + chunk) - start)
        return folder

    def files(self) -> Sequence[Path]:
        """Every file of the run directory (quarantined entries are outside it)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def _checked(path: Path) -> bool:
    """The "reader" of a finished chunk while streaming: its size and hash matched its record,
    so nothing is parsed; a chunk without a hashed record (its sidecar is missing, or predates
    hashes) is checked by reading its parquet metadata and columns."""
    if not verified_by_record(path, sidecar=_time_path(path, chunk=True)):
        pd.read_parquet(path)
    return True
