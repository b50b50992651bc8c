"""Feature splitting across widths, and superposition as features per dimension.

**Feature splitting** (Bricken et al. 2023, "Towards monosemanticity", section "Feature
splitting"; Templeton et al. 2024): a dictionary twice as wide does not add unrelated
features, it splits some of the narrow one's features into finer ones - a "base" feature for
a sport becomes one per sport. :func:`feature_splitting` finds, for each feature of a wide
dictionary, its *parent* in a narrow one at the same site: the narrow feature whose decoder
row is closest (cosine), and asks whether the parent fires wherever the child does
(*co-activation* ``P(parent fires | child fires)`` on the same tokens). A wide feature is a
**child** when both reach their thresholds (decoder cosine ``>= min_cos``, co-activation
``>= min_coactivation``); a narrow feature with two or more children has **split**.

**Superposition as features per dimension** (Elhage et al. 2022 count features against
dimensions; here the count is what a sparse code needs). A site of ``d`` dimensions that holds
``F`` sparse features in superposition needs a dictionary of about ``F`` live features to
reconstruct it, however small ``d``. :func:`features_per_dimension` measures the explained
variance of dictionaries of several widths on the same activations and interpolates (in log
live features) the number of live features at which it reaches a fixed quality (``target``,
default 0.8): ``features_per_dim = live_at_target / d``. Beside it, ``pca_dims``: how many
principal directions a *dense* linear code needs for the same explained variance. On the planted
model (:mod:`factfind.testing.superposition`, ``F`` features in ``d`` dimensions) the ratio
lands near ``F / d``; above 1 a site holds more features than it has dimensions.

Example::

    x = site_activations(model, corpus, [("mlp_in", 3)])[("mlp_in", 3)]
    feature_splitting(tc_512, tc_2048, x)        # parent, child, cos, coactivation
    features_per_dimension([tc_512, tc_2048, tc_8192], x, y)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError
from factfind.features.dictionary import Dictionary
from factfind.results import tidy


def decoder_cosines(a: Dictionary | Tensor, b: Dictionary | Tensor) -> Tensor:
    """``[width_a width_b]`` cosines between two decoders' rows (or two ``[n d]`` matrices)."""
    wa = a.W_dec if isinstance(a, Dictionary) else a
    wb = b.W_dec if isinstance(b, Dictionary) else b
    if wa.shape[-1] != wb.shape[-1]:
        raise ArgumentError(f"decoders of different sites: rows of {wa.shape[-1]} and "
                            f"{wb.shape[-1]} dimensions")
    ua = wa.double() / wa.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    ub = wb.double() / wb.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return ua @ ub.T


def _fires(d: Dictionary, x: Tensor, chunk: int = 4096) -> Tensor:
    """``[tokens d_sae]`` bool: where each feature is active."""
    with torch.no_grad():
        return torch.cat([d.encode(x[i:i + chunk]) > 0 for i in range(0, len(x), chunk)])


def feature_splitting(narrow: Dictionary, wide: Dictionary, x: Tensor, *,
                      min_cos: float = 0.5, min_coactivation: float = 0.5) -> pd.DataFrame:
    """Each wide feature's parent among the narrow features, by decoder cosine and
    co-activation (module docstring).

    Args:
        narrow, wide: two dictionaries of the same kind and site (widths ``w_n < w_w``).
        x: ``[tokens d_in]`` activations of the site they read (e.g. from
            :func:`factfind.features.evaluation.site_activations`).
        min_cos, min_coactivation: the thresholds a child meets.

    Returns:
        One row per live wide feature, ``method="features/splitting"``: ``layer``,
        ``narrow``/``wide`` (names), ``narrow_width``, ``wide_width``, ``child`` (the wide
        feature), ``parent`` (the narrow feature of closest decoder), ``decoder_cos``,
        ``coactivation`` (``P(parent fires | child fires)``), ``child_density``,
        ``parent_density``, ``is_child``, ``siblings`` (children of the same parent) and
        ``effect`` = ``decoder_cos``. A feature that never fires on ``x`` is left out.
    """
    if x.dim() != 2 or x.shape[1] != narrow.d_in or wide.d_in != narrow.d_in:
        raise ArgumentError(f"x must be [tokens {narrow.d_in}] for {narrow.name} and "
                            f"{wide.name}, got {tuple(x.shape)} and d_in {wide.d_in}")
    if len(x) == 0:
        raise ArgumentError("x holds no tokens")
    cos = decoder_cosines(wide, narrow)  # [w_w w_n]
    best = cos.max(1)
    fn, fw = _fires(narrow, x).float(), _fires(wide, x).float()  # [tokens w]
    parent = best.indices
    both = (fw * fn[:, parent]).sum(0)  # [w_w]: tokens where child and its parent fire
    child_n = fw.sum(0)
    live = torch.nonzero(child_n > 0).flatten()
    coact = both / child_n.clamp(min=1)
    is_child = (best.values >= min_cos) & (coact >= min_coactivation)
    siblings = torch.zeros(narrow.d_sae, dtype=torch.long).index_add_(
        0, parent[is_child], torch.ones(int(is_child.sum()), dtype=torch.long))
    n = len(x)
    return tidy(pd.DataFrame({
        "method": "features/splitting", "layer": narrow.layer, "narrow": narrow.name,
        "wide": wide.name, "narrow_width": narrow.d_sae, "wide_width": wide.d_sae,
        "child": live.numpy(), "parent": parent[live].numpy(),
        "decoder_cos": best.values[live].numpy(), "effect": best.values[live].numpy(),
        "coactivation": coact[live].numpy(), "child_density": (child_n[live] / n).numpy(),
        "parent_density": (fn.sum(0)[parent[live]] / n).numpy(),
        "is_child": is_child[live].numpy(),
        "siblings": torch.where(is_child[live], siblings[parent[live]], 0).numpy(),
        "n": n}))


def splitting_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (narrow, wide) pair of :func:`feature_splitting`'s frame: how many wide features are
    children, how many narrow features have children, how many split (>= 2 children), and the
    mean children per parent."""
    rows = []
    nw = np.asarray(df["narrow_width"], dtype=int)
    ww = np.asarray(df["wide_width"], dtype=int)
    kid = np.asarray(df["is_child"], dtype=bool)
    parent = np.asarray(df["parent"], dtype=int)
    cos = np.asarray(df["decoder_cos"], dtype=float)
    for narrow, wide in sorted(set(zip(nw.tolist(), ww.tolist(), strict=True))):
        mine = (nw == narrow) & (ww == wide)
        kids = mine & kid
        _, per_parent = np.unique(parent[kids], return_counts=True)
        has = len(per_parent) > 0
        rows.append({"method": "features/splitting_summary", "narrow_width": narrow,
                     "wide_width": wide, "wide_live": int(mine.sum()),
                     "children": int(kids.sum()), "parents": len(per_parent),
                     "split": int((per_parent >= 2).sum()),
                     "effect": float(per_parent.mean()) if has else math.nan,
                     "max_children": int(per_parent.max()) if has else 0,
                     "mean_decoder_cos": float(cos[kids].mean()) if has else math.nan})
    return tidy(rows)


def _explained_variance(y: Tensor, y_hat: Tensor) -> float:
    total = (y - y.mean(0)).pow(2).sum()
    return float(1 - (y - y_hat).pow(2).sum() / total) if total > 0 else math.nan


def _pca_dims(y: Tensor, target: float) -> int:
    yc = y.double() - y.double().mean(0)
    s = torch.linalg.svdvals(yc) ** 2
    frac = torch.cumsum(s, 0) / s.sum()
    return int((frac < target - 1e-12).sum()) + 1


def features_per_dimension(dicts: Sequence[Dictionary], x: Tensor, y: Tensor | None = None, *,
                           target: float = 0.8) -> pd.DataFrame:
    """Superposition as the live features a sparse code needs per dimension at a fixed
    reconstruction quality (module docstring).

    Args:
        dicts: dictionaries of several widths (or ``k``) at one site.
        x: ``[tokens d_in]`` their input; y: ``[tokens d_out]`` their target (a transcoder's
            ``mlp_out``; default ``x``, an SAE's).
        target: the explained variance at which to read the number of live features.

    Returns:
        One row per dictionary, ``method="superposition/features_per_dim"``: ``dictionary``,
        ``width``, ``k``, ``live`` (features that fire on ``x``), ``explained_variance``,
        ``d``, ``live_per_dim``, ``effect`` = the explained variance; then one ``at_target``
        row: ``target``, ``live_at_target``
        (interpolated in log live features between the dictionaries that bracket ``target``;
        NaN when none reaches it or all do), ``effect`` = ``features_per_dim`` =
        ``live_at_target / d``, and ``pca_dims`` (principal directions for the same explained
        variance).
    """
    if not dicts:
        raise ArgumentError("features_per_dimension needs at least one dictionary")
    if not 0 < target < 1:
        raise ArgumentError(f"target must be an explained variance in (0, 1), got {target}")
    y = x if y is None else y
    d = y.shape[1]
    rows = []
    with torch.no_grad():
        for dd in sorted(dicts, key=lambda v: (v.d_sae, v.k or 0)):
            f = torch.cat([dd.encode(x[i:i + 4096]) for i in range(0, len(x), 4096)])
            y_hat = dd.decode(f) + (dd.skip(x) if dd.W_skip is not None else 0.0)
            live = int(((f > 0).sum(0) > 0).sum())
            rows.append({"method": "superposition/features_per_dim", "dictionary": dd.name,
                         "layer": dd.layer, "width": dd.d_sae, "k": dd.k, "live": live,
                         "explained_variance": _explained_variance(y.double(),
                                                                   y_hat.double()),
                         "d": d, "live_per_dim": live / d, "n": len(x)})
            rows[-1]["effect"] = rows[-1]["explained_variance"]
    pts = sorted((r["live"], r["explained_variance"]) for r in rows)
    at = math.nan
    for (l0, e0), (l1, e1) in itertools.pairwise(pts):
        if e0 < target <= e1 and l1 > l0 > 0:
            frac = (target - e0) / (e1 - e0)
            at = math.exp(math.log(l0) + frac * (math.log(l1) - math.log(l0)))
            break
    rows.append({"method": "superposition/features_per_dim", "dictionary": "at_target",
                 "target": target, "live_at_target": at, "d": d,
                 "effect": at / d if not math.isnan(at) else math.nan,
                 "features_per_dim": at / d if not math.isnan(at) else math.nan,
                 "pca_dims": _pca_dims(y, target), "n": len(x),
                 "layer": rows[0]["layer"]})
    return tidy(rows)


__all__ = ["decoder_cosines", "feature_splitting", "features_per_dimension",
           "splitting_summary"]
