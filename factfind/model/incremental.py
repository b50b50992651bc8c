"""Incremental patched runs: pay only for what an intervention changes.

A patch written into layer ``L`` at token position ``p`` cannot change anything *before* it:

* every layer below ``L`` sees the base run's activations (the patch is not there yet), so a
  patched forward can **start at block** ``L`` from the base run's cached residual stream
  ``resid_pre[L]``;
* attention is causal, so positions before ``p`` are unchanged at *every* layer: their keys and
  values are the base run's, and only positions ``p..P-1`` need recomputing (queries at those
  positions read the cached keys/values of the earlier ones);
* the metric reads the logits at the final position only, so the unembedding runs there alone.

A patched forward therefore costs about ``(n_layers - L) / n_layers * (P - p) / P`` of a full
one; averaged over a sweep of every layer and position that is about a quarter (the site's layer
and position halve the work on average). Sites are grouped so that one stacked forward shares a
start: :func:`plan_groups` bins sites into tiles of layers × positions, starts each tile's
forward at its minimum layer and position, and picks the tile shape that prices cheapest.

The adapter (:meth:`factfind.model.Model.base_run`, :meth:`~factfind.model.Model.run_from`)
runs the model; this module holds the parts that need no backend: the cached base run
(:class:`Prefix`), the cache layer that serves the base run's keys and values to the patched
rows (:class:`PrefixLayer`), edits lifted to full-length activations, and the planner.

Exactness: the incremental forward does the same arithmetic on the recomputed positions as a
full forward (the same weights, positions, masks and keys/values), so results agree with the
plain-loop references to float rounding (tests: <= 1e-5 on every family of
:data:`factfind.testing.models.FAMILIES` and the derived ones, post norms, q/k norms,
softcapping, biases, fused projections, parallel blocks and grouped-query attention included;
left-padded, patches at position 0 and at the final position: ``tests/test_incremental.py``,
``tests/test_fast_paths_families.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from factfind.errors import ArgumentError
from factfind.types import Component, SiteKey

Edit = Callable[[Tensor], Tensor]

OVERHEAD_ROWS = 2.5
"""The planner's price of one more forward, in base-row equivalents per layer it runs: a
forward re-reads the weights of every layer it runs, which on a CPU costs about as much as
computing 2-3 prompt rows through them (measured on SmolLM2-135M, 1 thread: a forward of 2
rows × 12 tokens costs as much as 1.1 rows of a 64-row forward). Callers pass
``overhead=OVERHEAD_ROWS / rows_per_site``."""

POSITION_FLOOR = 0.25
"""The share of a layer's per-row cost that does not shrink with fewer query positions
(attention over every key, the output projection at the final position, per-row overhead)."""


class PrefixLayer(DynamicLayer):
    """A keys/values cache layer holding the base run's first ``p0`` positions, shared by
    ``reps`` stacked copies of the base rows (copy-major, as
    :func:`factfind.localize.patching.repeat`).

    ``update`` returns the cached prefix followed by the new positions' keys/values *without*
    storing them, so a patched forward holds no more key/value memory than a plain one.
    """

    def __init__(self, keys: Tensor, values: Tensor, reps: int) -> None:
        super().__init__()
        self.keys, self.values, self.reps = keys, values, reps
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        k = self.keys.to(key_states.dtype).repeat(self.reps, 1, 1, 1)
        v = self.values.to(value_states.dtype).repeat(self.reps, 1, 1, 1)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


@dataclass
class Resume:
    """What :meth:`~factfind.model.Model.run` needs to run incrementally: the keys/values
    cache the attention layers read (and, for a base run, fill), and the residual stream
    ``resid [rows pos d_model]`` that replaces the output of every block before ``layer``."""

    cache: Any
    layer: int = 0
    resid: Tensor | None = None


@dataclass
class Prefix:
    """A base run kept for incremental patched runs (:meth:`~factfind.model.Model.base_run`).

    Attributes:
        enc: ``input_ids``, ``attention_mask``, ``position_ids`` ``[batch pos]``.
        resid: every block's input ``resid_pre[l]`` ``[batch pos d_model]`` (after base edits).
        keys, values: per layer, the attention's cached keys/values ``[batch kv_head pos
            d_head]`` (rotary applied where the family has it).
        logits: the base run's final-position logits ``[batch d_vocab]``.
        acts: activations the caller asked to save.
        edits: the base run's own edits (re-applied where a patched run recomputes them).
    """

    enc: dict[str, Tensor]
    resid: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    logits: Tensor
    acts: dict[SiteKey, Tensor] = field(default_factory=dict)
    edits: dict[SiteKey, Edit] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return self.enc["input_ids"].shape[1]


def before(key: SiteKey, layer: int, *, inclusive: bool) -> bool:
    """Whether the site ``key`` lies upstream of ``resid_pre[layer]`` (``inclusive``: or is
    it), i.e. its base-run value is inside the cached residual a run started at ``layer``
    begins from. A run started at layer 0 recomputes the embeddings, so nothing is upstream."""
    comp, lay = key
    if layer == 0:
        return False
    if comp is Component.EMBED:
        return True
    return lay < layer or (inclusive and lay == layer and comp is Component.RESID_PRE)


def lift(edit: Edit, p0: int) -> Edit:
    """``edit`` (written for full-length activations ``[rows pos ...]``) applied to the
    positions ``p0..`` a patched run computes: positions before ``p0`` are filled with zeros
    for the call and dropped after it, so ``edit`` must act position by position (every edit in
    factfind does: masked writes, additions, projections)."""
    if p0 == 0:
        return edit

    def lifted(act: Tensor) -> Tensor:
        pad = act.new_zeros(act.shape[0], p0, *act.shape[2:])
        return edit(torch.cat([pad, act], dim=1))[:, p0:].contiguous()

    return lifted


def compose(first: Edit, then: Edit) -> Edit:
    """``then(first(x))``: a base run's edit followed by a patch at the same site."""
    return lambda act: then(first(act))


def first_position(mask: Tensor) -> int:
    """The first position column any row of a ``[rows pos ...]`` bool mask touches (the
    last position when the mask is empty: nothing before it changes)."""
    cols = mask.reshape(mask.shape[0], mask.shape[1], -1).any(-1).any(0).nonzero()
    return int(cols[0, 0]) if len(cols) else mask.shape[1] - 1


def cost(layer: int, position: int, *, n_layers: int, n_pos: int) -> float:
    """Work per stacked copy of a run started at ``(layer, position)``, as a fraction of a
    full forward (the layers it runs, times the positions it computes above a floor)."""
    share = (n_pos - position) / n_pos
    return (n_layers - layer) / n_layers * (POSITION_FLOOR + (1 - POSITION_FLOOR) * share)


def plan_groups(starts: Sequence[tuple[int, int]], *, n_layers: int, n_pos: int,
                max_size: int, overhead: float = 1.0, max_tile: int = 8) -> list[list[int]]:
    """Group site indices so that each stacked forward starts at its group's minimum
    ``(layer, position)`` and the estimated total work is small.

    Sites are binned into tiles of ``a`` layers × ``b`` positions (a tile's forward starts at
    its lowest layer and position, so wider tiles waste work on their later sites, while
    narrower ones pay more forwards); tiles larger than ``max_size`` are split. Every tile
    shape up to ``max_tile`` × ``max_tile`` is priced with :func:`cost` plus ``overhead`` per
    forward and the cheapest is kept.

    Args:
        starts: per site, the first layer and the first position it writes.
        n_layers, n_pos: the model's layers and the batch's positions.
        max_size: most sites per forward (memory).
        overhead: the fixed price of one more forward, in stacked copies of the base rows
            through every layer it runs (:data:`OVERHEAD_ROWS` / rows per copy).
        max_tile: the largest tile side tried.

    Returns:
        Lists of site indices; every index appears once.

    Example::

        plan_groups([(0, 3), (1, 3), (5, 0)], n_layers=6, n_pos=4, max_size=8)
    """
    best: tuple[float, list[list[int]]] | None = None
    for a in range(1, max_tile + 1):
        for b in range(1, max_tile + 1):
            groups = _tiles(starts, a, b, max_size)
            total = 0.0
            for g in groups:
                layer, pos = group_start(starts, g)
                total += (len(g) * cost(layer, pos, n_layers=n_layers, n_pos=n_pos)
                          + overhead * (n_layers - layer) / n_layers)
            if best is None or total < best[0] - 1e-12:
                best = (total, groups)
    return [] if best is None else best[1]


def _tiles(starts: Sequence[tuple[int, int]], a: int, b: int, max_size: int
           ) -> list[list[int]]:
    """Site indices binned by ``(layer // a, position // b)``, bins cut at ``max_size``
    (within a bin, sites in (position, layer) order, so a cut keeps starts close)."""
    bins: dict[tuple[int, int], list[int]] = {}
    for i in sorted(range(len(starts)), key=lambda i: (starts[i][1], starts[i][0], i)):
        layer, pos = starts[i]
        bins.setdefault((pos // b, layer // a), []).append(i)
    out: list[list[int]] = []
    for key in sorted(bins):
        members = bins[key]
        out.extend(members[k:k + max_size] for k in range(0, len(members), max_size))
    return out


def group_start(starts: Sequence[tuple[int, int]], group: Sequence[int]) -> tuple[int, int]:
    """The ``(layer, position)`` a group's forward starts at: the minimum over its sites."""
    return min(starts[i][0] for i in group), min(starts[i][1] for i in group)


def per_copy(edit: Edit, rows: int) -> Edit:
    """A base-run ``edit`` (written for ``rows`` rows) applied to each stacked copy."""
    def stacked(act: Tensor) -> Tensor:
        if act.shape[0] == rows:
            return edit(act)
        return torch.cat([edit(part) for part in act.split(rows)])

    return stacked


def patch_edits(prefix: Prefix, edits: Mapping[SiteKey, Edit], layer: int, p0: int
                ) -> dict[SiteKey, Edit]:
    """The edits a run resumed at ``(layer, p0)`` applies: the base run's edits that lie
    downstream of ``resid_pre[layer]`` (their effect is not in the cached residual), then the
    patch's own, each lifted to full-length activations (:func:`lift`). A patch upstream of
    the start is a planning error."""
    out: dict[SiteKey, Edit] = {}
    for key, edit in prefix.edits.items():
        if not before(key, layer, inclusive=True):
            out[key] = per_copy(edit, prefix.enc["input_ids"].shape[0])
    for key, edit in edits.items():
        if before(key, layer, inclusive=False):
            raise ArgumentError(f"a patch at {key} lies before the start layer {layer}")
        out[key] = compose(out[key], edit) if key in out else edit
    return {key: lift(edit, p0) for key, edit in out.items()}
