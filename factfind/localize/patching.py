"""Activation patching: which activations carry the fact?

Run the model on a *clean* prompt ("Michael Jordan plays the sport of") and on a *corrupt* one
whose subject has the same number of tokens but another attribute ("Tiger Woods plays the sport
of"). Then rerun one of them with the activation at one site (a layer's residual stream,
attention or MLP output, or one head, at one token position or role) copied from the other:

* **denoising** (corrupt run, clean activation patched in) asks whether the site is
  *sufficient* to restore the fact: effect = ``(patched - corrupt) / (clean - corrupt)``;
* **noising** (clean run, corrupt activation patched in) asks whether it is *necessary*:
  effect = ``(clean - patched) / (clean - corrupt)``.

The metric is the logit difference between the clean and the corrupt attribute's first tokens
at the final position (Heimersheim & Nanda 2024, Zhang & Nanda 2024 on why). Effects near 1
mean the site alone carries (denoise) or is indispensable to (noise) the fact.

Speed comes from batching *sites*, not only prompts: for a chunk of S sites and B prompts one
forward runs S*B rows (the base prompts repeated S times), and at each ``(component, layer)``
one ``torch.where`` with a per-row mask writes the source activation into exactly the rows
and positions of the sites that patch there. :func:`activation_patching_reference` is the
plain loop - one site per forward - kept as the exact reference that tests compare against.

Example::

    pairs = facts.corrupt(model, seed=0)
    df = activation_patching(model, pairs, components=["resid_pre", "mlp_out"])
    aggregate(df)   # one row per (component, layer, role) with a 95% CI
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, encode_pairs
from factfind.errors import ArgumentError, OutOfRangeError
from factfind.model.incremental import OVERHEAD_ROWS, first_position, group_start, plan_groups
from factfind.results import tidy
from factfind.types import Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.model.incremental import Prefix
    from factfind.types import Remote


DEFAULT_ROLES: tuple[Role, ...] = (Role.SUBJECT_FIRST, Role.SUBJECT_LAST, Role.RELATION,
                                   Role.FINAL)
PATCHABLE = (Component.RESID_PRE, Component.RESID_POST, Component.ATTN_OUT, Component.MLP_OUT,
             Component.Z, Component.NEURONS, Component.EMBED)


@dataclass(frozen=True)
class PatchSite:
    """One patch: a component at a layer (one head for ``z``) at a role or absolute position."""

    component: Component
    layer: int
    position: Role | int
    head: int | None = None
    neuron: int | None = None

    @property
    def key(self) -> SiteKey:
        return (self.component, self.layer)












def enumerate_sites(model: Model, *, components: Iterable[str | Component],
                    positions: Iterable[Role | int | str], layers: Iterable[int] | None = None,
                    heads: bool = True) -> list[PatchSite]:
    """Every (component, layer[, head], position) site, validated against the model."""
    comps = [Component(c) for c in components]
    pos = [p if isinstance(p, int) else Role(p) for p in positions]
    layer_list = list(range(model.n_layers)) if layers is None else list(layers)
    sites = []
    for comp in comps:
        if comp not in PATCHABLE or comp in (Component.NEURONS,):
            raise ArgumentError(f"cannot patch {comp} here: choose from resid_pre, resid_post, "
                             "attn_out, mlp_out, z (per head), embed")
        for layer in layer_list:
            if not 0 <= layer < model.n_layers:
                raise OutOfRangeError(f"layer {layer} does not exist: {model.name} has "
                                 f"{model.n_layers} layers")
            if comp is Component.EMBED and layer != 0:
                continue
            head_list = range(model.n_heads) if comp is Component.Z and heads else [None]
            for head, p in itertools.product(head_list, pos):
                sites.append(PatchSite(comp, layer, p, head))
    return sites


def auto_chunk(model: Model, rows: int, n_pos: int, *, budget_bytes: int | None = None) -> int:
    """How many copies of a ``rows``-prompt batch fit in one forward, from free memory (a
    quarter of it: CUDA's free memory on GPUs, available RAM on the CPU), at most 256."""
    return model.rows_that_fit(model.activation_bytes(n_pos) * rows, budget_bytes=budget_bytes,
                               cap=256)


def _metric(logits: Tensor, pb: PairBatch, reps: int, metric: Metric | None = None) -> Tensor:
    # float32 whatever the model's dtype (bf16 logits would lose the difference's precision)
    return pb.measure(logits.float(), reps, metric)


def _patched_metrics(model: Model, base: TokenBatch, source: dict[SiteKey, Tensor],
                     sites: Sequence[PatchSite], pb: PairBatch,
                     metric: Metric | None = None) -> Tensor:
    """Metric ``[site batch]`` for each site patched alone, all sites in one forward."""
    n_sites = len(sites)
    edits = _site_edits(model, base, source, sites)
    m = pb.measure_run(lambda lg: model.run(base.repeat(n_sites), edits=edits, logits=lg).logits,
                       n_sites, metric)
    return m.reshape(n_sites, -1)


def site_start(base: TokenBatch, site: PatchSite) -> tuple[int, int]:
    """The first ``(layer, position)`` a site writes: where an incremental run starts."""
    layer = 0 if site.component is Component.EMBED else site.layer
    return layer, first_position(base.position_mask(site.position))


def _patched_metrics_from(model: Model, prefix: Prefix, base: TokenBatch,
                          source: dict[SiteKey, Tensor], sites: Sequence[PatchSite],
                          pb: PairBatch, metric: Metric | None = None) -> Tensor:
    """:func:`_patched_metrics` as one incremental forward (:meth:`~factfind.model.Model.
    run_from`) started at the sites' earliest layer and position."""
    starts = [site_start(base, s) for s in sites]
    start = group_start(starts, range(len(sites)))
    edits = _site_edits(model, base, source, sites)
    m = pb.measure_run(lambda lg: model.run_from(prefix, start=start, reps=len(sites),
                                                 edits=edits, logits=lg).logits,
                       len(sites), metric)
    return m.reshape(len(sites), -1)


def _site_edits(model: Model, base: TokenBatch, source: dict[SiteKey, Tensor],
                sites: Sequence[PatchSite]) -> dict[SiteKey, Callable[[Tensor], Tensor]]:
    """Per ``(component, layer)``, one masked write of the source activation into the rows
    (copy ``s`` of the base rows is site ``s``) and positions of the sites patched there."""
    n_sites, rows = len(sites), base.input_ids.shape[0]
    masks: dict[SiteKey, Tensor] = {}
    for s, site in enumerate(sites):
        pm = base.position_mask(site.position)  # [batch pos]
        if site.component is Component.Z:
            full = masks.setdefault(site.key, torch.zeros(n_sites, rows, pm.shape[1],
                                                          model.n_heads, dtype=torch.bool))
            if site.head is None:
                full[s] |= pm[..., None]
            else:
                full[s, :, :, site.head] |= pm
        else:
            full = masks.setdefault(site.key, torch.zeros(n_sites, rows, pm.shape[1],
                                                          dtype=torch.bool))
            full[s] |= pm
    edits = {}
    for key, m in masks.items():
        m = m.flatten(0, 1).to(model.device)
        src = source[key].repeat(n_sites, *([1] * (source[key].dim() - 1)))
        edits[key] = _where_edit(m, src)
    return edits


def _where_edit(mask: Tensor, src: Tensor):
    def edit(act: Tensor) -> Tensor:
        m = mask.reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        return torch.where(m, src.to(act.dtype), act)
    return edit


@validated
def activation_patching(
    model: Model,
    pairs: FactPairs,
    *,
    components: Iterable[str | Component] = ("resid_pre", "attn_out", "mlp_out"),
    positions: Iterable[Role | int | str] = DEFAULT_ROLES,
    layers: Iterable[int] | None = None,
    direction: str = "denoise",
    batch_size: int = 32,
    chunk: int | None = None,
    progress: bool = True,
    remote: Remote = None,
    incremental: bool = True,
    metric: Metric | None = None,
) -> pd.DataFrame:
    """Patch every site, batched, and return per-prompt effects (tidy frame).

    Args:
        model: the :class:`~factfind.model.Model`.
        pairs: clean/corrupt prompt pairs (``facts.corrupt(model)``).
        components: any of ``resid_pre, resid_post, attn_out, mlp_out, z`` (``z`` patches each
            head separately), ``embed``.
        positions: roles (``subject_first``, ``subject_last``, ``subject``, ``relation``,
            ``final``) or absolute token indices in the padded batch.
        layers: default all.
        direction: ``"denoise"`` (corrupt run, clean patched in) or ``"noise"``.
        batch_size: prompts per forward before stacking sites.
        chunk: sites stacked per forward (default: from free memory).
        remote: run the sweep's forwards as one nnsight session: ``"local"`` (serialised
            dry run) or ``True`` (NDIF); see :meth:`~factfind.model.Model.session`.
        incremental: start each stacked forward at its sites' first layer and position from
            the cached base run (:mod:`factfind.model.incremental`; local runs only). Cost: about
            ``(n_layers - layer) / n_layers * (P - position) / P`` of a forward per site, a
            quarter on average over every layer and position, plus one forward per batch.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference;
            e.g. :func:`factfind.metrics.prob_correct` for ROME's probability).

    Returns:
        Per (site, prompt) rows: ``effect`` (normalised, see module docstring), ``metric``
        (the patched metric), ``clean`` and ``corrupt`` metrics.
    """
    if direction not in ("denoise", "noise"):
        raise ArgumentError(f"direction must be 'denoise' or 'noise', not {direction!r}")
    sites = enumerate_sites(model, components=components, positions=positions, layers=layers)
    return _run_patching(model, pairs, sites, direction=direction, batch_size=batch_size,
                         chunk=chunk, progress=progress, remote=remote,
                         incremental=incremental, metric=metric)


@validated
def activation_patching_reference(
    model: Model, pairs: FactPairs, *,
    components: Iterable[str | Component] = ("resid_pre", "attn_out", "mlp_out"),
    positions: Iterable[Role | int | str] = DEFAULT_ROLES, layers: Iterable[int] | None = None,
    direction: str = "denoise", metric: Metric | None = None,
) -> pd.DataFrame:
    """The slow exact reference: one site per forward, a plain loop that writes the source
    activation by direct index assignment, row by row (no masks, no stacking of sites).

    It runs the same padded batch as :func:`activation_patching`, so the two agree to float
    precision; that padding does not change results is tested on the adapter itself.
    """
    sites = enumerate_sites(model, components=components, positions=positions, layers=layers)
    rows: list[dict[str, Any]] = []
    pb = encode_pairs(model, pairs)
    keys = sorted({s.key for s in sites})
    clean, corrupt = model.run(pb.clean, save=keys), model.run(pb.corrupt, save=keys)
    m_clean = _metric(clean.logits, pb, 1, metric).tolist()
    m_corrupt = _metric(corrupt.logits, pb, 1, metric).tolist()
    base, src = (pb.corrupt, clean.acts) if direction == "denoise" else (pb.clean, corrupt.acts)
    for site in sites:
        where = [m.nonzero()[:, 0].tolist() for m in base.position_mask(site.position)]

        def put(a: Tensor, site: PatchSite = site, where: list[list[int]] = where) -> Tensor:
            a = a.clone()
            for b, cols in enumerate(where):
                for p in cols:
                    if site.head is None:
                        a[b, p] = src[site.key][b, p]
                    else:
                        a[b, p, site.head] = src[site.key][b, p, site.head]
            return a

        patched = _metric(model.run(base, edits={site.key: put}).logits, pb, 1, metric).tolist()
        for b, m in enumerate(patched):
            diff = m - m_corrupt[b] if direction == "denoise" else m_clean[b] - m
            rows.append({
                "method": f"activation_patching/{direction}",
                "component": "head_out" if site.component is Component.Z else str(site.component),
                "layer": site.layer, "head": site.head,
                "position": site.position if isinstance(site.position, int) else None,
                "role": str(site.position) if isinstance(site.position, Role) else None,
                "prompt": b, "effect": diff / (m_clean[b] - m_corrupt[b]) if where[b]
                else float("nan"), "metric": m, "clean": m_clean[b], "corrupt": m_corrupt[b],
            })
    return tidy(rows)


def _patching_sweep(model: Model, pb_all: PairBatch, sites: list[PatchSite], *, direction: str,
                    batch_size: int, chunk: int | None,
                    progress: Callable[[int], Any] | None = None,
                    incremental: bool = False, metric: Metric | None = None) -> list[Tensor]:
    """The model-side half of :func:`activation_patching`: every forward of the sweep, and only
    the numbers the table needs - per prompt batch a ``[2 + site, batch]`` tensor (clean
    metric, corrupt metric, then each site's patched metric). Runs as one nnsight session
    (possibly remote, see :meth:`~factfind.model.Model.session`), so it uses torch only."""
    keys = sorted({s.key for s in sites})
    out: list[Tensor] = []
    n = pb_all.correct.shape[0]
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        pb = PairBatch(pb_all.clean.take(idx), pb_all.corrupt.take(idx), pb_all.correct[idx],
                       pb_all.wrong[idx])
        denoise = direction == "denoise"
        prefix = None
        if incremental:  # the base side keeps what patched runs resume from
            prefix = model.base_run(pb.corrupt if denoise else pb.clean)
        clean = model.run(pb.clean, save=keys) if denoise or not incremental else None
        corrupt = model.run(pb.corrupt, save=keys) if not denoise or not incremental else None
        lg_clean = clean.logits if clean is not None else prefix.logits  # type: ignore[union-attr]
        lg_corrupt = corrupt.logits if corrupt is not None else prefix.logits  # type: ignore[union-attr]
        m_clean = _metric(lg_clean, pb, 1, metric)
        m_corrupt = _metric(lg_corrupt, pb, 1, metric)
        base = pb.corrupt if denoise else pb.clean
        src = (clean if denoise else corrupt).acts  # type: ignore[union-attr]
        size = chunk or auto_chunk(model, len(m_clean), pb.clean.input_ids.shape[1])
        parts = [m_clean[None], m_corrupt[None]]
        if prefix is None:
            groups = [list(range(c0, min(len(sites), c0 + size)))
                      for c0 in range(0, len(sites), size)]
        else:
            starts = [site_start(base, s) for s in sites]
            groups = plan_groups(starts, n_layers=model.n_layers, n_pos=base.input_ids.shape[1],
                                 max_size=size, overhead=OVERHEAD_ROWS / len(m_clean))
        patched = torch.empty(len(sites), len(m_clean))
        for group in groups:
            chosen = [sites[i] for i in group]
            if prefix is None:
                got = _patched_metrics(model, base, src, chosen, pb, metric)
            else:
                got = _patched_metrics_from(model, prefix, base, src, chosen, pb, metric)
            patched[group] = got.detach().cpu().to(patched.dtype)
            if progress is not None:
                progress(len(group) * len(m_clean))
        out.append(torch.cat([*(x.detach().cpu() for x in parts), patched]))
    return out


def _run_patching(model: Model, pairs: FactPairs, sites: list[PatchSite], *, direction: str,
                  batch_size: int, chunk: int | None, progress: bool,
                  remote: Remote = None, incremental: bool = True,
                  metric: Metric | None = None) -> pd.DataFrame:
    pb_all = encode_pairs(model, pairs)
    bar = tqdm(total=len(pairs) * len(sites), desc=f"patching ({direction})",
               disable=not progress, unit="site")
    metrics = model.session(_patching_sweep, model, pb_all, sites,
                            direction=direction, batch_size=batch_size, chunk=chunk,
                            progress=bar.update, remote=remote,
                            incremental=incremental and not remote, metric=metric)
    bar.close()
    frames: list[pd.DataFrame] = []
    for k, block in enumerate(metrics):
        start = k * batch_size
        base = (pb_all.corrupt if direction == "denoise" else pb_all.clean).take(
            slice(start, start + block.shape[1]))
        m_clean, m_corrupt, patched = block[0], block[1], block[2:]
        if direction == "denoise":
            effect = (patched - m_corrupt) / (m_clean - m_corrupt)
        else:
            effect = (m_clean - patched) / (m_clean - m_corrupt)
        valid = torch.stack([base.position_mask(s.position).any(-1) for s in sites])
        effect = torch.where(valid, effect, torch.nan)
        nb = block.shape[1]
        frames.append(pd.DataFrame({
            "method": f"activation_patching/{direction}",
            "component": _per_site([_component_name(x) for x in sites], nb),
            "layer": _per_site([x.layer for x in sites], nb),
            "head": _per_site([x.head for x in sites], nb),
            "position": _per_site([x.position if isinstance(x.position, int) else None
                                   for x in sites], nb),
            "role": _per_site([str(x.position) if isinstance(x.position, Role) else None
                               for x in sites], nb),
            "prompt": np.tile(np.arange(start, start + nb), len(sites)),
            "effect": effect.reshape(-1).numpy(),
            "metric": patched.reshape(-1).numpy(),
            "clean": np.tile(m_clean.numpy(), len(sites)),
            "corrupt": np.tile(m_corrupt.numpy(), len(sites)),
        }))
    return tidy(pd.concat(frames, ignore_index=True))


def _per_site(values: list[Any], n: int) -> list[Any]:
    """Each site's value repeated for its ``n`` prompts (site-major, like the metrics)."""
    return [v for v in values for _ in range(n)]


def _component_name(site: PatchSite) -> str:
    return "head_out" if site.component is Component.Z else str(site.component)
