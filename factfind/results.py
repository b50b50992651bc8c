"""Tidy result frames: one row per site and prompt, and their aggregates with confidence intervals.

Every analysis returns a :class:`pandas.DataFrame` with the columns of
:data:`factfind.types.RESULT_COLUMNS` (plus method-specific extras). Per-prompt rows keep the
raw numbers; :func:`aggregate` reduces them to one row per site with the mean, a 95% Student-t
confidence interval over prompts, and ``n``. Plots and reports only read these frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import stdtrit

from factfind.errors import DegenerateResultError
from factfind.types import RESULT_COLUMNS

SITE_COLUMNS = ("method", "component", "layer", "head", "neuron", "position", "role")
#: the columns that name a unit finer than a site where a frame has them (a dictionary's
#: features and error nodes: :func:`factfind.features.feature_atp`)
UNIT_COLUMNS = ("dictionary", "feature", "node")


def tidy(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """A frame with every result column present (missing ones as <NA>) in the canonical order,
    extra columns after them, and nullable integer dtypes for indices.

    Raises:
        DegenerateResultError: the rows have effects and not one of them is finite - a result
            that would look like a table and mean nothing (see :func:`check_effects`).
    """
    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows.copy()
    check_effects(df)
    for col in RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in ("layer", "head", "neuron", "position", "prompt", "n"):
        df[col] = pd.array(_numeric(df[col]).round(), dtype="Int64")
    for col in ("effect", "ci_low", "ci_high"):
        df[col] = _numeric(df[col])
    for col in ("method", "component", "role"):
        df[col] = df[col].astype("string")
    extra = [c for c in df.columns if c not in RESULT_COLUMNS]
    return pd.DataFrame(df[list(RESULT_COLUMNS) + extra]).reset_index(drop=True)


def check_effects(df: pd.DataFrame) -> None:
    """Refuse a frame whose ``effect`` column is present, non-empty and nowhere finite.

    A normalised effect such as activation patching's ``(patched - corrupt) / (clean -
    corrupt)`` is NaN or infinite when the clean and corrupt metrics are equal; when that holds
    for every prompt, every row is NaN and a report would plot nothing while looking complete.
    """
    if "effect" not in df.columns or len(df) == 0:
        return
    values = _numeric(df["effect"]).to_numpy()
    if np.isfinite(values).any():
        return
    method = str(df["method"].iloc[0]) if "method" in df.columns else "this analysis"
    raise DegenerateResultError(
        f"every effect of {method} is NaN or infinite ({len(df)} rows): usually the clean and "
        "corrupt prompts give the same metric (their answers share a first token, or the "
        "model does not know the facts), so a normalised effect divides by zero; keep facts "
        "the model knows (facts.known_by(model)) and pairs whose answers differ")


def t_quantile(count: Any, confidence: float = 0.95) -> Any:
    """Student's t quantile for a two-sided ``confidence`` interval of a mean of ``count``
    values (``count - 1`` degrees of freedom, at least 1), elementwise over arrays. From
    ``scipy.special`` (equal to ``scipy.stats.t.ppf``), which imports in a third of the time."""
    return stdtrit(np.maximum(np.asarray(count) - 1, 1), 0.5 + confidence / 2)


def _numeric(col: Any) -> pd.Series:
    """A float64 column with every missing marker (None, pd.NA, NaN) as NaN."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        # already numbers (numpy or nullable): no round trip through objects
        return pd.Series(col.to_numpy(dtype="float64", na_value=np.nan), index=col.index,
                         dtype="float64")
    values = col.astype("object").where(col.notna(), np.nan)
    return pd.Series(pd.to_numeric(values, errors="coerce"), index=col.index, dtype="float64")


def aggregate(df: pd.DataFrame, *, by: Sequence[str] = (*SITE_COLUMNS, *UNIT_COLUMNS),
              value: str = "effect",
              confidence: float = 0.95) -> pd.DataFrame:
    """Mean of ``value`` over prompts for each site, with a Student-t confidence interval.

    NaN values (e.g. a position that is padding for some prompt) are left out of both the mean
    and ``n``. With a single prompt the interval is NaN.
    """
    keys = [c for c in by if c in df.columns]
    work = df.copy()
    for c in keys:  # groupby drops NA keys unless told otherwise; keep them as real groups
        work[c] = work[c].astype("object").where(work[c].notna(), None)
    groups = work.groupby(keys, dropna=False, sort=False)[value]
    mean = groups.mean()
    count = groups.count()
    sem = groups.sem()
    half = sem * t_quantile(count, confidence)
    half[count < 2] = np.nan
    out = pd.DataFrame({value: mean, "ci_low": mean - half, "ci_high": mean + half, "n": count})
    out = out.reset_index()
    out["prompt"] = pd.NA
    return tidy(out)
