"""Streaming and resumable sweeps: datasets of any size, in chunks, on disk.

A sweep over 10,000 facts should neither hold 10,000 facts' results in memory nor start over
when the machine is preempted at fact 9,000. :func:`stream` runs any per-prompt analysis
(``activation_patching``, ``causal_tracing``, ``attention_knockout``, ...) on one chunk of the
dataset at a time and appends that chunk's tidy table to a folder of parquet files - one file
per chunk, written under a temporary name and renamed into place (atomic), so a file that
exists is complete, with its size and sha256 in a sidecar (``_chunk-*.parquet.time.json``)
that every read checks: a chunk damaged on disk is moved into the cache's quarantine folder
and computed again (:mod:`factfind.integrity`). The folder is a
:class:`~factfind.cache.RunCache` step keyed by the model, the dataset, the analysis and its
options: rerunning the same call *resumes* - finished chunks are checked (size and hash, not
parsed) and skipped, never recomputed, and only the chunk that was in flight when the run died
is lost.

Memory is flat in the number of prompts: a chunk's activations and table are freed once its
file is written, and :meth:`StreamResult.aggregate` reduces the stored tables to per-site means
with confidence intervals by merging per-chunk running statistics (Chan et al.'s parallel
variance), never loading more than one chunk. ``benchmarks/bench_streaming.py`` measures the
peak RSS for 1,000 and 10,000 prompts.

Example::

    facts = ff.load_facts("organism:sport")                       # 14,400 prompts
    pairs = facts.corrupt(model, seed=0)
    res = stream(ff.activation_patching, model, pairs, out="runs", chunk=500,
                 components=["resid_pre"], positions=["subject_last"], progress=False)
    res.aggregate()           # per-site means over every prompt, one chunk in memory at a time
    res.read(columns=["layer", "prompt", "effect"])                # or the whole table
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from factfind.cache import RunCache, chunk_files, read_chunk
from factfind.errors import ArgumentError
from factfind.results import SITE_COLUMNS, t_quantile, tidy

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model

log = logging.getLogger(__name__)

#: Where the analyses lived in v0.1, before the subpackages: a streamed run is keyed by the
#: analysis' module, and keying on the old name lets runs cached before the move resume.
V01_MODULES = {
    "factfind.localize.patching": "factfind.patching",
    "factfind.localize.tracing": "factfind.tracing",
    "factfind.localize.knockout": "factfind.knockout",
    "factfind.localize.ablation": "factfind.ablation",
    "factfind.localize.dla": "factfind.dla",
    "factfind.localize.probing": "factfind.probing",
    "factfind.localize.subspace": "factfind.subspace",
    "factfind.attribute.atp": "factfind.atp",
    "factfind.attribute.exact": "factfind.attribution",
    "factfind.attribute.verification": "factfind.verification",
    "factfind.attribute.neurons": "factfind.neurons",
    "factfind.edges.path_patching": "factfind.pathpatch",
    "factfind.edges.edge_patching": "factfind.pathpatch_edges",
    "factfind.edges.eap": "factfind.eap",
    "factfind.concepts.representation": "factfind.representation",
    "factfind.concepts.polysemanticity": "factfind.polysemanticity",
    "factfind.concepts.superposition": "factfind.superposition",
}


@dataclass(frozen=True)
class StreamResult:
    """A streamed analysis's results: a folder of parquet chunk files (a parquet dataset).

    Attributes:
        path: the folder; ``pd.read_parquet(path)`` reads it whole.
        n: prompts in the dataset.
        computed: first prompt of each chunk computed by this call.
        reused: first prompt of each chunk found finished on disk (not recomputed).
    """

    path: Path
    n: int
    computed: tuple[int, ...]
    reused: tuple[int, ...]

    def files(self) -> list[Path]:
        return chunk_files(self.path)

    def chunks(self, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """Each chunk's table in prompt order, one at a time, each verified against the size
        and sha256 recorded when it was written
        (a damaged chunk raises :class:`~factfind.errors.CacheCorruptError` after moving it
        into the cache's quarantine folder; rerunning :func:`stream` computes it again)."""
        for path in self.files():
            yield read_chunk(path, columns)

    def read(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The whole table (memory grows with the dataset: prefer :meth:`aggregate`)."""
        parts = list(self.chunks(columns))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def aggregate(self, *, by: Sequence[str] = SITE_COLUMNS, value: str = "effect",
                  confidence: float = 0.95) -> pd.DataFrame:
        """:func:`factfind.results.aggregate` over all chunks, one chunk in memory at a time:
        per group the count, mean and sum of squared deviations of ``value`` are merged chunk
        by chunk, then turned into the mean with a Student-t interval (NaN values skipped)."""
        total: pd.DataFrame | None = None
        keys: list[str] = []
        for part in self.chunks():
            keys = [c for c in by if c in part.columns]
            total = _merge(total, _moments(part, keys, value))
        if total is None:
            raise ArgumentError(f"no chunks in {self.path}")
        n, mean = total["n"], total["mean"]
        sem = np.sqrt(total["m2"] / np.maximum(n - 1, 1) / np.maximum(n, 1))
        half = sem * t_quantile(n, confidence)
        half[n < 2] = np.nan
        mean = mean.where(n > 0, np.nan)
        out = pd.DataFrame({value: mean, "ci_low": mean - half, "ci_high": mean + half,
                            "n": n}).reset_index()
        for c in keys:
            col = pd.Series(out[c], dtype="object")
            out[c] = col.where(col != _NA, None)
        out["prompt"] = pd.NA
        return tidy(out)


_NA = "\0NA"  # a group key standing for a missing value (groupby would drop NA keys)


def _moments(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Per group: count, mean and sum of squared deviations of the non-NaN ``value``s."""
    work = df[[*keys, value]].copy()
    for c in keys:  # NA keys are real groups (e.g. head for non-head sites)
        col = pd.Series(work[c], dtype="object")
        work[c] = col.where(col.notna(), _NA)
    g = work.groupby(keys, sort=False)[value]
    count = pd.Series(g.count(), dtype=float)
    mean = pd.Series(g.mean(), dtype=float)
    m2 = pd.Series(g.var(ddof=0), dtype=float) * count
    return pd.DataFrame({"n": count, "mean": mean.fillna(0.0), "m2": m2.fillna(0.0)})


def _merge(a: pd.DataFrame | None, b: pd.DataFrame) -> pd.DataFrame:
    """Chan, Golub & LeVeque's pairwise update of (count, mean, M2) per group."""
    if a is None:
        return b
    a, b = a.align(b, join="outer", fill_value=0.0)
    n = a["n"] + b["n"]
    delta = b["mean"] - a["mean"]
    safe = n.where(n > 0, 1.0)
    mean = a["mean"] + delta * b["n"] / safe
    m2 = a["m2"] + b["m2"] + delta ** 2 * a["n"] * b["n"] / safe
    return pd.DataFrame({"n": n, "mean": mean, "m2": m2})


def stream(
    analysis: Callable[..., pd.DataFrame],
    model: Model,
    data: FactDataset | FactPairs,
    *,
    out: str | Path | RunCache = "runs",
    chunk: int = 500,
    name: str | None = None,
    progress: bool = True,
    **options: Any,
) -> StreamResult:
    """Run ``analysis(model, data[start:stop], **options)`` chunk by chunk, appending each
    chunk's table to parquet on disk; a rerun resumes where a killed one stopped.

    Args:
        analysis: a per-prompt analysis returning a tidy frame with a ``prompt`` column
            (activation patching, causal tracing, attention knockout, DLA, ablation, ...).
        model: the model.
        data: the facts (or pairs) - any length; only one chunk is analysed at a time.
        out: a results directory (a :class:`~factfind.cache.RunCache` keyed by model and
            dataset is opened in it) or an open cache.
        chunk: prompts per chunk (and per file); memory grows with it, not with the dataset.
        name: the step's name (default the analysis function's).
        progress: a progress bar over prompts.
        options: passed to ``analysis`` (and part of the step's key: other options, other
            files). ``remote=...`` runs each chunk as one remote session.

    Returns:
        A :class:`StreamResult` (the folder, and which chunks were computed or reused).
    """
    if len(data) == 0:
        raise ArgumentError("no prompts to stream: the dataset is empty")
    step = name or re.sub(r"[^A-Za-z0-9_-]", "_", getattr(analysis, "__name__", "analysis"))
    cache = out if isinstance(out, RunCache) else RunCache.open(
        out, model=model.fingerprint(), revision=model.revision,
        dataset=data.fingerprint())
    module = V01_MODULES.get(analysis.__module__, analysis.__module__)
    params = {"analysis": f"{module}.{step}",
              "options": json.loads(json.dumps(options, sort_keys=True, default=str))}
    n = len(data)
    before = len(cache.computed)

    def compute(start: int, stop: int) -> pd.DataFrame:
        df = analysis(model, data[start:stop], **options)
        if "prompt" not in df.columns:
            raise ArgumentError(f"{step} returned no 'prompt' column: stream needs per-prompt rows")
        df["prompt"] = df["prompt"] + start  # global prompt indices
        return df

    bar = tqdm(total=n, desc=f"{step} (streaming)", unit="prompt", disable=not progress)

    def tick(k: int) -> None:
        bar.update(k)

    folder = cache.stream(step, n, compute, chunk=chunk, params=params, progress=tick)
    bar.close()
    done = [c for c in cache.computed[before:] if c.startswith(f"{step}[")]
    computed = tuple(int(c[len(step) + 1:-1]) for c in done)
    reused = tuple(s for s in range(0, n, chunk) if s not in computed)
    if reused:
        log.info("%s: resumed, %d of %d chunks already on disk", step, len(reused),
                 len(reused) + len(computed))
    return StreamResult(folder, n, computed, reused)
