"""On-disk result cache: a re-run skips finished work and a killed run resumes.

A run's results live in a directory named by a hash of everything that determines them: the
model (name, revision, config fingerprint), the dataset fingerprint and the run's configuration.
Inside it, each analysis step is a file - a tidy table as parquet, anything else as JSON - and a
long step over many prompts can be split into chunks, one file each, so a run killed midway
loses at most the chunk in flight. Every file is written to a temporary name and moved into
place with ``os.replace`` (atomic on POSIX), so a reader never sees half a file, and an
existing result is never overwritten: a finished step is simply loaded.

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


@dataclass
class RunCache:
    """A directory of step results for one (model, dataset, configuration).

    Attributes:
        root: the run directory.
        key: what the directory's name hashes (written to ``run.json``).
        hits / computed: names of steps served from disk / computed in this process.
    """

    root: Path
    key: dict[str, Any]
    hits: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)

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
            return pd.read_parquet(path)
        df = compute()
        _write_table(path, df)
        self.computed.append(name)
        return df

    def json(self, name: str, compute: Callable[[], Any], *,
             params: dict[str, Any] | None = None) -> Any:
        """Like :meth:`table` for JSON-able values."""
        path = self._path(name, params, ".json")
        if path.exists():
            self.hits.append(name)
            return json.loads(path.read_text())
        value = compute()
        atomic_write_bytes(path, json.dumps(value, sort_keys=True, indent=2,
                                            default=str).encode())
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
            else:
                _write_table(path, compute(start, min(n, start + chunk)))
                self.computed.append(f"{name}[{start}]")
            if progress is not None:
                progress(min(n, start + chunk) - start)
        return folder

    def files(self) -> Sequence[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())
