"""Summaries of result frames for :class:`~factfind.report.Table` s: :func:`site_label`,
:func:`top_units` (strongest units by mean effect) and :func:`accuracy_table` (top-1 accuracy
with Wilson 95% intervals).
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from factfind.errors import ArgumentError
from factfind.report.document import _missing
from factfind.report.figures import _aggregate, _by_magnitude


def columns(df: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """The named columns of ``df`` that exist, in the order named (a table shows what a frame
    has, whichever analysis made it)."""
    return pd.DataFrame(df[[c for c in cols if c in df.columns]]).reset_index(drop=True)


def site_label(row: Mapping[str, Any]) -> str:
    """A compact name for a result row, in the style of :attr:`factfind.types.Site.name`:
    ``L3.h2@final``, ``L4.n311@subject_last``, ``L5.mlp_out@pos7``."""
    def ok(key: str) -> bool:
        return not _missing(row.get(key))

    if ok("head"):
        unit = f"h{int(row['head'])}"
    elif ok("neuron"):
        unit = f"n{int(row['neuron'])}"
    else:
        unit = str(row.get("component", "site"))
    where = ""
    if ok("role"):
        where = f"@{row['role']}"
    elif ok("position"):
        where = f"@pos{int(row['position'])}"
    layer = f"L{int(row['layer'])}." if ok("layer") else ""
    return f"{layer}{unit}{where}"


def top_units(df: pd.DataFrame, unit: str, *, k: int = 20, value: str = "effect") -> pd.DataFrame:
    """The ``k`` heads (``unit="head"``) or neurons (``unit="neuron"``) of largest ``|value|``, one
    row per (method, component, layer, unit, role), with a ``site`` label first."""
    if unit not in ("head", "neuron"):
        raise ArgumentError(f"unit must be 'head' or 'neuron', got {unit!r}")
    rows = df.loc[df[unit].notna().to_numpy()] if unit in df.columns else df.iloc[0:0]
    keys = [c for c in ("method", "component", "layer", unit, "role", "position")
            if c in rows.columns]
    if rows.empty:
        return pd.DataFrame(columns=["site", *keys, value])
    agg = _by_magnitude(_aggregate(rows, keys, value), value).head(k)
    agg.insert(0, "site", [site_label(r) for r in agg.to_dict("records")])
    agg = agg.dropna(axis=1, how="all").reset_index(drop=True)
    return agg


def accuracy_table(df: pd.DataFrame, *, by: str | Sequence[str] | None = "relation",
                   correct: str = "correct") -> pd.DataFrame:
    """Accuracy per group of a per-prompt frame with a boolean ``correct`` column, with a Wilson
    95% interval; the last row (``all``) pools every prompt.

    Example::

        >>> accuracy_table(pd.DataFrame({"relation": ["a", "a", "b"], "correct": [1, 0, 1]}))
          relation  n  n_correct  accuracy  ci_low  ci_high
        ...
    """
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    ok = df[correct].to_numpy(dtype=bool)

    def row(idx: np.ndarray, names: Sequence[Any]) -> dict[str, Any]:
        n, c = len(idx), int(ok[idx].sum())
        lo, hi = _wilson(c, n)
        return {**dict(zip(keys, names, strict=True)), "n": n, "n_correct": c,
                "accuracy": c / n if n else math.nan, "ci_low": lo, "ci_high": hi}

    rows = []
    if keys:
        for names, idx in df.groupby(keys, sort=True, dropna=False).indices.items():
            rows.append(row(idx, names if isinstance(names, tuple) else (names,)))
    rows.append(row(np.arange(len(df)), ["all"] * len(keys)))
    return pd.DataFrame(rows)


def _wilson(c: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = c / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


