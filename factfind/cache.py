"""On-disk result cache: a re-run skips finished work and a killed run resumes.

A run's results live in a directory named by a hash of everything that determines them: the
model (name, revision, config fingerprint), the dataset fingerprint and the run's configuration.
Inside it, each analysis step is a file - a tidy table as parquet, anything else as JSON - and a
long step over many prompts can be split into chunks, one file each, so a run killed midway
loses at most the chunk in flight. Every file is written to a temporary name and moved into
place with ``os.replace`` (atomic on POSIX), so a reader never sees half a file, and an
existing result is never overwritten: a finished step is simply loaded.

Each computed result (a step, or a chunk of a chunked step) is stored with the wall and CPU
seconds it took (a small JSON beside it, written just before the result), so a resumed run still
knows what its cached steps cost: :meth:`RunCache.timing_table` lists every step this process
touched, with its seconds and whether it was computed now or served from the cache.

Example::

    cache = RunCache.open("runs", model=model.fingerprint(), dataset=facts.fingerprint(),
                          config={"seed": 0})
    trace = cache.table("causal_tracing", lambda: causal_tracing(model, facts))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from factfind.errors import ArgumentError

log = logging.getLogger(__name__)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chunk_files(folder: Path) -> list[Path]:
    """The finished chunk files of a chunked step, in order (temporary files left by a killed
    writer start with a dot and are not among them)."""
    return sorted(folder.glob("chunk-*.parquet"))


def _write_table(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        with open(tmp, "rb") as f:  # on disk before it gets its final name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


@dataclass
class RunCache:
    """A directory of step results for one (model, dataset, configuration).

    Attributes:
        root: the run directory.
        key: what the directory's name hashes (written to ``run.json``).
        hits / computed: names of steps served from disk / computed in this process.
        times: each step this process touched, in order, with its cost (:class:`StepTime`).
    """

    root: Path
    key: dict[str, Any]
    hits: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    times: dict[str, StepTime] = field(default_factory=dict)

    def _timed(self, step: str, path: Path, compute: Callable[[], Any],
               write: Callable[[Path, Any], None], *, chunk: bool = False) -> Any:
        """``compute()`` timed, its seconds then its result written (both atomically)."""
        clock = _Clock()
        value = compute()
        took = clock.elapsed()
        atomic_write_bytes(_time_path(path, chunk=chunk), json.dumps(took).encode())
        write(path, value)
        self._note(step, took, computed=True, spent=clock.elapsed()["seconds"])
        return value

    def _note(self, step: str, took: dict[str, float] | None, *, computed: bool,
              spent: float) -> None:
        self.times.setdefault(step, StepTime(step)).add(took, computed=computed, spent=spent)

    def _hit(self, step: str, path: Path, load: Callable[[Path], Any], *,
             chunk: bool = False) -> Any:
        start = time.perf_counter()
        value = load(path)
        self._note(step, _read_time(_time_path(path, chunk=chunk)), computed=False,
                   spent=time.perf_counter() - start)
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
        """The run directory under ``base`` for this key (created if new)."""
        root = Path(base) / _digest(key)[:16]
        root.mkdir(parents=True, exist_ok=True)
        meta = root / "run.json"
        if not meta.exists():
            atomic_write_bytes(meta, json.dumps(key, sort_keys=True, indent=2,
                                                default=str).encode())
        return cls(root, key)

    def _path(self, name: str, params: dict[str, Any] | None, suffix: str) -> Path:
        tag = f"-{_digest(params)[:10]}" if params else ""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ArgumentError(f"step names are letters, digits, '-' and '_': {name!r}")
        return self.root / f"{name}{tag}{suffix}"

    def table(self, name: str, compute: Callable[[], pd.DataFrame], *,
              params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The step's table from disk, or computed, saved and returned."""
        path = self._path(name, params, ".parquet")
        if path.exists():
            self.hits.append(name)
            log.info("cache hit: %s", path.name)
            return self._hit(name, path, pd.read_parquet)
        df = self._timed(name, path, compute, _write_table)
        self.computed.append(name)
        return df

    def json(self, name: str, compute: Callable[[], Any], *,
             params: dict[str, Any] | None = None) -> Any:
        """Like :meth:`table` for JSON-able values."""
        path = self._path(name, params, ".json")
        if path.exists():
            self.hits.append(name)
            return self._hit(name, path, lambda p: json.loads(p.read_text()))
        value = self._timed(name, path, compute, lambda p, v: atomic_write_bytes(
            p, json.dumps(v, sort_keys=True, indent=2, default=str).encode()))
        self.computed.append(name)
        return value

    def chunked(self, name: str, n: int, compute: Callable[[int, int], pd.DataFrame], *,
                chunk: int, params: dict[str, Any] | None = None,
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """A step over ``n`` items computed in chunks of ``chunk``; each chunk's table is saved
        as soon as it is done, so a killed run recomputes only unfinished chunks.

        ``compute(start, stop)`` returns the rows for items ``start..stop-1``; a ``prompt``
        column, if present, must use global indices. The chunks are loaded and concatenated;
        use :meth:`stream` to leave them on disk (memory flat in ``n``).
        """
        folder = self.stream(name, n, compute, chunk=chunk, params=params, progress=progress)
        parts = [pd.read_parquet(path) for path in chunk_files(folder)]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def stream(self, name: str, n: int, compute: Callable[[int, int], pd.DataFrame], *,
               chunk: int, params: dict[str, Any] | None = None,
               progress: Callable[[int], None] | None = None) -> Path:
        """Like :meth:`chunked`, but return the folder of chunk files (a parquet dataset that
        ``pd.read_parquet(folder)`` reads whole) without holding any chunk past its write:
        finished chunks are skipped without being read."""
        if chunk < 1:
            raise ArgumentError("chunk must be >= 1")
        folder = self._path(name, dict(params or {}, chunk=chunk, n=n), "")
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, n, chunk):
            path = folder / f"chunk-{start:08d}.parquet"
            if path.exists():
                self.hits.append(f"{name}[{start}]")
                self._hit(name, path, lambda p: None, chunk=True)
            else:
                self._timed(name, path, lambda s=start: compute(s, min(n, s + chunk)),
                            _write_table, chunk=True)
                self.computed.append(f"{name}[{start}]")
            if progress is not None:
                progress(min(n, start + chunk) - start)
        return folder

    def files(self) -> Sequence[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())
