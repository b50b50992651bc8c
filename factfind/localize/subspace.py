"""Subspace patching: does the part of an activation along a few directions carry the fact?

Activation patching (:mod:`factfind.localize.patching`) copies a *whole* activation from one run
into another. If a concept is represented *linearly* - as a direction, or a few directions, in the
activation space - then copying only the activation's component in that subspace should move
the answer as much as copying everything (Geiger et al. 2023, distributed alignment search;
Wu et al. 2023, "Interpretability at scale"; Makelov et al. 2023 warn that a subspace patch can
also act through a dormant pathway, so compare it with the full patch, never read it alone).

For a base run (the corrupt prompt when *denoising*) with activation ``a`` at a site and the
source run (the clean prompt) with ``a'``, a patch of the subspace spanned by the columns of a
basis ``B`` (``[d k]``) writes

    a  <-  a + P (a' - a),        P = Q Q^T,  Q an orthonormal basis of span(B)      (rank k)

so the component of ``a`` in the subspace becomes ``a'``'s and the orthogonal complement stays
``a``'s. ``B = None`` is the full patch (``P = I``). A basis may be shared by every pair
(``[d k]``, e.g. the span of all attribute directions) or chosen per pair (``[pair d k]``, e.g.
the rank-1 direction from the corrupt to the clean attribute). Patches of one site at several
token positions of a role apply the same projection at each.

The metric is the logit difference ``logit[clean attribute] - logit[corrupt attribute]`` at
the final position, and ``effect`` is normalised as in :mod:`factfind.localize.patching`: denoising
``(patched - corrupt) / (clean - corrupt)``, noising ``(clean - patched) / (clean - corrupt)``.
:func:`patch_ratio` divides each subspace patch's mean change by the full patch's at the same
site: 1 means the subspace carries everything the activation does.

Many patches run in one forward: the base prompts are stacked once per patch and a per-row
projection is applied at each site (the stacking of :mod:`factfind.localize.patching`).
:func:`subspace_patching_reference` is the plain loop - one pair and one patch per forward,
the projector built as ``B pinv(B)`` - that the tests compare against.

Example::

    pairs = facts.corrupt(model, seed=0)
    dirs = torch.randn(model.d_model, 3)
    df = subspace_patching(model, pairs, [
        SubspacePatch("full", "resid_post", 1, "subject_last"),
        SubspacePatch("random-3", "resid_post", 1, "subject_last", basis=dirs)])
    patch_ratio(df)      # one row per subspace: its mean change over the full patch's
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.data.batch import PairBatch, encode_pairs, pair_batches
from factfind.errors import ArgumentError, check_mode
from factfind.model.incremental import OVERHEAD_ROWS, first_position, plan_groups
from factfind.results import tidy
from factfind.types import DIRECTIONS, Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

FULL = "full"


@dataclass(frozen=True, eq=False)
class SubspacePatch:
    """Patch the component of one site's activation that lies in ``span(basis)``.

    Attributes:
        label: a name for the subspace (``"full"`` by convention for the full patch).
        component: a writable component with a vector per position (``resid_pre``,
            ``resid_post``, ``attn_out``, ``mlp_out``, ``neurons``, ``embed``).
        layer: the layer.
        role: the token positions patched.
        basis: ``[d k]`` shared by all pairs, ``[pair d k]`` one per pair, or ``None`` for the
            whole activation. Columns need not be orthonormal; a zero column adds nothing.
        info: extra columns for the result rows (e.g. ``{"source": "probe"}``).
    """

    label: str
    component: Component | str
    layer: int
    role: Role | str
    basis: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component(self.component))
        object.__setattr__(self, "role", Role(self.role))
        if self.component not in _VECTOR_SITES:
            raise ArgumentError(f"subspace patch {self.label!r}: cannot patch {self.component}; "
                             f"choose from {', '.join(map(str, _VECTOR_SITES))}")
        if self.basis is not None and self.basis.dim() not in (2, 3):
            raise ArgumentError(f"subspace patch {self.label!r}: basis must be [d k] or "
                             f"[pair d k], got shape {tuple(self.basis.shape)}")

    @property
    def key(self) -> SiteKey:
        return (Component(self.component), self.layer)

    @property
    def rank(self) -> int | None:
        """The basis' number of columns (``None`` for the full patch)."""
        return None if self.basis is None else int(self.basis.shape[-1])


_VECTOR_SITES = (Component.EMBED, Component.RESID_PRE, Component.RESID_POST,
                 Component.ATTN_OUT, Component.MLP_OUT, Component.NEURONS)


def orthonormal(basis: Tensor, *, rtol: float = 1e-6) -> Tensor:
    """An orthonormal basis ``[... d k]`` of each column span (SVD; directions whose singular
    value is below ``rtol`` of the largest become zero columns, so they project to nothing)."""
    u, s, _ = torch.linalg.svd(basis.double(), full_matrices=False)
    keep = s > rtol * s.amax(-1, keepdim=True).clamp(min=1e-300)
    return (u * keep[..., None, :]).float()


def _check_sizes(model: Model, patches: Sequence[SubspacePatch], n_pairs: int) -> None:
    for p in patches:
        d = model.d_mlp if p.component is Component.NEURONS else model.d_model
        if p.basis is None:
            continue
        if p.basis.shape[-2] != d:
            raise ArgumentError(f"subspace patch {p.label!r}: basis has {p.basis.shape[-2]} rows "
                             f"but {p.component} has {d} dimensions")
        if p.basis.dim() == 3 and p.basis.shape[0] != n_pairs:
            raise ArgumentError(f"subspace patch {p.label!r}: a per-pair basis for "
                             f"{p.basis.shape[0]} pairs, but there are {n_pairs}")


def _projection_edit(mask: Tensor, src: Tensor, q: Tensor, full: Tensor):
    """Edit ``a -> a + mask * P_row (src - a)``; rows with ``full`` copy ``src`` outright.

    Shapes: ``mask [rows pos]``, ``src [rows pos d]``, ``q [rows d k]``, ``full [rows]``.
    """
    def edit(act: Tensor) -> Tensor:
        delta = src.to(act.dtype) - act  # [rows pos d]
        qq = q.to(act.dtype)
        proj = torch.einsum("rtk,rdk->rtd", torch.einsum("rtd,rdk->rtk", delta, qq), qq)
        upd = torch.where(full[:, None, None], delta, proj)
        return act + mask[..., None].to(act.dtype) * upd
    return edit


def _stacked_edits(model: Model, base: Any, source: dict[SiteKey, Tensor],
                   patches: Sequence[SubspacePatch], rows: slice) -> dict[SiteKey, Any]:
    """One edit per site for ``len(patches)`` stacked copies of the base batch."""
    n, b = len(patches), base.input_ids.shape[0]
    dev = model.device
    by_key: dict[SiteKey, list[int]] = {}
    for i, p in enumerate(patches):
        by_key.setdefault(p.key, []).append(i)
    edits = {}
    for key, idx in by_key.items():
        d = source[key].shape[-1]
        k = max([patches[i].rank or 1 for i in idx])
        mask = torch.zeros(n, b, base.input_ids.shape[1], dtype=torch.bool)
        q = torch.zeros(n, b, d, k)
        full = torch.zeros(n, b, dtype=torch.bool)
        for i in idx:
            p = patches[i]
            mask[i] = base.position_mask(Role(p.role))
            if p.basis is None:
                full[i] = True
                continue
            basis = p.basis.float().cpu()
            basis = basis[rows] if basis.dim() == 3 else basis.expand(b, *basis.shape)
            q[i, :, :, :basis.shape[-1]] = orthonormal(basis)
        src = source[key].repeat(n, *([1] * (source[key].dim() - 1)))
        edits[key] = _projection_edit(mask.flatten(0, 1).to(dev), src,
                                      q.flatten(0, 1).to(dev), full.flatten().to(dev))
    return edits


def _rows(patch: SubspacePatch, start: int, patched: Tensor, clean: Tensor, corrupt: Tensor,
          direction: str) -> list[dict[str, Any]]:
    total = clean - corrupt
    change = patched - corrupt if direction == "denoise" else clean - patched
    out = []
    for j in range(len(patched)):
        out.append({"method": f"subspace_patching/{direction}", "component": str(patch.component),
                    "layer": patch.layer, "role": str(patch.role), "prompt": start + j,
                    "effect": float(change[j] / total[j]) if total[j] != 0 else float("nan"),
                    "subspace": patch.label, "rank": patch.rank, "change": float(change[j]),
                    "metric_patched": float(patched[j]), "metric_clean": float(clean[j]),
                    "metric_corrupt": float(corrupt[j]), **patch.info})
    return out


@validated
def subspace_patching(
    model: Model,
    pairs: FactPairs | PairBatch,
    patches: Sequence[SubspacePatch],
    *,
    direction: str = "denoise",
    batch_size: int = 16,
    max_rows: int = 512,
    incremental: bool = True,
    metric: Metric | None = None,
) -> pd.DataFrame:
    """Patch each subspace alone, every patch of a chunk in one forward (module docstring).

    Cost: three forwards per pair batch, then per patch about ``(n_layers - l) / n_layers *
    (P - p) / P`` of a forward (``l`` its layer, ``p`` its role's first position;
    :mod:`factfind.model.incremental`), or a full stacked forward with ``incremental=False``.

    Args:
        pairs: clean and corrupt prompts.
        patches: the subspaces; give a ``"full"`` patch at each site for :func:`patch_ratio`.
        direction: ``"denoise"`` (corrupt run, clean activations; default) or ``"noise"``.
        max_rows: at most this many rows (patches x prompts) per forward.
        incremental: resume each stacked forward from the cached base run.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference).

    Returns:
        One row per (patch, prompt): ``method="subspace_patching/<direction>"``, component,
        layer, role, prompt, ``effect`` (normalised), ``subspace`` (the label), ``rank``,
        ``change`` (the metric's change towards the source run), the clean, corrupt and patched
        metrics, and each patch's ``info``.
    """
    check_mode(direction, "direction", DIRECTIONS)
    pb = pairs if isinstance(pairs, PairBatch) else encode_pairs(model, pairs)
    _check_sizes(model, patches, len(pb.correct))
    keys = sorted({p.key for p in patches})
    rows: list[list[dict[str, Any]]] = [[] for _ in patches]  # patch-major, then prompt
    for start, b in pair_batches(model, pb, batch_size):
        base, src = b.base_and_source(direction)
        n = len(b.correct)
        prefix = model.base_run(base) if incremental else None
        denoise = direction == "denoise"
        clean = b.measure(prefix.logits if prefix is not None and not denoise
                          else model.run(b.clean).logits, 1, metric).cpu()
        source_run = model.run(src, save=keys)
        corrupt = b.measure(prefix.logits if prefix is not None and denoise
                            else model.run(b.corrupt).logits, 1, metric).cpu()
        per = max(1, max_rows // n)
        if prefix is None:
            plan = [list(range(c0, min(len(patches), c0 + per)))
                    for c0 in range(0, len(patches), per)]
        else:  # each patch resumes at its layer and its role's first position
            starts = [(0 if p.component is Component.EMBED else p.layer,
                       first_position(base.position_mask(Role(p.role)))) for p in patches]
            plan = plan_groups(starts, n_layers=model.n_layers, n_pos=base.input_ids.shape[1],
                               max_size=per, overhead=OVERHEAD_ROWS / n)
        for idx in plan:
            chunk = [patches[i] for i in idx]
            edits = _stacked_edits(model, base, source_run.acts, chunk, slice(start, start + n))
            if prefix is None:
                out = model.run(base.repeat(len(chunk)), edits=edits)
            else:
                resume = (min(starts[i][0] for i in idx), min(starts[i][1] for i in idx))
                out = model.run_from(prefix, start=resume, reps=len(chunk), edits=edits)
            m = b.measure(out.logits, len(chunk), metric).cpu().reshape(len(chunk), n)
            for j, (i, p) in enumerate(zip(idx, chunk, strict=True)):
                rows[i].extend(_rows(p, start, m[j], clean, corrupt, direction))
    return tidy([r for per_patch in rows for r in per_patch])


@validated
def subspace_patching_reference(model: Model, pairs: FactPairs, patches: Sequence[SubspacePatch],
                                *, direction: str = "denoise", metric: Metric | None = None
                                ) -> pd.DataFrame:
    """The slow exact reference of :func:`subspace_patching`: one pair and one patch per
    forward, the projector computed as ``B pinv(B)`` (the identity for the full patch)."""
    check_mode(direction, "direction", DIRECTIONS)
    _check_sizes(model, patches, len(pairs))
    rows: list[dict[str, Any]] = []
    for p, i in itertools.product(patches, range(len(pairs))):  # patch-major, then prompt
        pb = encode_pairs(model, pairs[i:i + 1])
        base, src = pb.base_and_source(direction)
        clean = pb.measure(model.run(pb.clean).logits, 1, metric).cpu()
        corrupt = pb.measure(model.run(pb.corrupt).logits, 1, metric).cpu()
        a_src = model.run(src, save=[p.key]).acts[p.key][0]  # [pos d]
        d = a_src.shape[-1]
        if p.basis is None:
            proj = torch.eye(d)
        else:
            basis = (p.basis[i] if p.basis.dim() == 3 else p.basis).double().cpu()
            proj = (basis @ torch.linalg.pinv(basis)).float()
        pos = base.position_mask(Role(p.role))[0].nonzero().flatten().tolist()

        def edit(act: Tensor, a_src: Tensor = a_src, proj: Tensor = proj,
                 pos: list[int] = pos) -> Tensor:
            out = act.clone()
            for t in pos:
                out[0, t] = act[0, t] + proj.to(act) @ (a_src[t] - act[0, t])
            return out

        patched = pb.measure(model.run(base, edits={p.key: edit}).logits, 1, metric).cpu()
        rows.extend(_rows(p, i, patched, clean, corrupt, direction))
    return tidy(rows)


def patch_ratio(df: pd.DataFrame, *, by: Sequence[str] = ("component", "layer", "role")
                ) -> pd.DataFrame:
    """Each subspace's mean metric change over the full patch's at the same site.

    ``ratio = mean(change | subspace) / mean(change | full)`` (a ratio of means, stable when a
    prompt's full change is near zero); ``effect`` is the subspace's mean normalised effect and
    ``full_effect`` the full patch's. The full patch is the row labelled ``"full"`` with the
    same ``by`` values (e.g. ``by=("group", "layer", "role")`` with a ``group`` info column to
    compare a neuron-space patch with the full ``mlp_out`` patch).

    Returns:
        One row per (``by``, subspace, extra columns): ``method="subspace_patching/ratio"``,
        ``effect``, ``full_effect``, ``ratio``, ``rank``, ``n``.
    """
    site = list(by)
    fixed = set(tidy([]).columns) | {"subspace", "rank", "change", "metric_patched",
                                     "metric_clean", "metric_corrupt"}
    keys = list(dict.fromkeys(["component", "layer", "role", *site, "subspace",
                               *(c for c in df.columns if c not in fixed)]))
    work = df.copy()
    for c in keys:
        work[c] = work[c].astype("object").where(work[c].notna(), None)
    full = work[work["subspace"] == FULL].groupby(site, dropna=False).agg(
        full_change=("change", "mean"), full_effect=("effect", "mean")).reset_index()
    if full.empty:
        raise ArgumentError("patch_ratio needs a 'full' patch at each site")
    sub = work.groupby(keys, dropna=False, sort=False).agg(
        change=("change", "mean"), effect=("effect", "mean"), rank=("rank", "first"),
        n=("prompt", "nunique")).reset_index()
    out = sub.merge(full, on=site, how="left")
    lacking = np.asarray(out["full_change"].isna(), dtype=bool)
    if lacking.any():
        missing = out.loc[lacking, site].iloc[0].to_dict()
        raise ArgumentError(f"patch_ratio: no 'full' patch at {missing}")
    out["ratio"] = out["change"] / out["full_change"]
    out["method"] = "subspace_patching/ratio"
    return tidy(out.drop(columns=["full_change"]))
