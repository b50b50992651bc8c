"""Exact node patching: the reference that AtP estimates are verified against.

:mod:`factfind.attribute.atp` *estimates* every node's patching effect ``c(n)`` in a few passes;
this module measures it exactly for any sets of nodes, batched, and keeps the brute-force loop that
the batched version is tested against. :mod:`factfind.attribute.verification` uses it to verify AtP*
candidates and to bound what the search missed.

**Exact node patching.** A node is a :class:`~factfind.localize.patching.PatchSite` (a neuron, an
MLP layer, a head's output, or a head's query, key or value at a position spec). As in
:mod:`factfind.localize.patching`, sites are batched by *stacking*: ``S`` node sets times ``B``
prompts run as ``S*B`` rows of one forward, and at each ``(component, layer)`` one ``torch.where``
with a per-row mask over ``[pos, unit]`` writes the source activation into exactly the rows,
positions and units of that row's set. The effect is ``c = mean over prompts of M(patched) -
M(base)``, raw logit-difference units, prompts where the node's position is absent left out.

Queries, keys and values are read-only in the adapter, yet patching them is exact: a head's
``q, k, v`` at layer ``l`` reach the rest of the network *only* through its ``z = softmax(scale
* q k^T) v``, and nothing upstream of layer ``l`` changes when only they are patched. So the
patched ``z`` is recomputed from the base and source runs' ``q, k, v`` and written as an
additive edit ``z + (z' - z)``. (A set may therefore not patch a head input together with any
node of an earlier layer; this is checked.)

Example::

    sites = [PatchSite(Component.NEURONS, 0, Role.SUBJECT_LAST, neuron=i) for i in range(8)]
    exact_patching(model, pairs, [[s] for s in sites])   # one row per node set
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.attribute.atp import attention_allow, attention_logits
from factfind.attribute.node_index import ATTENTION_INPUTS, NodeIndex, node_frame
from factfind.attribute.running_stats import RunningStats
from factfind.data.batch import PairBatch, encode_pairs, pair_batches
from factfind.errors import ArgumentError, check_mode
from factfind.localize.patching import DEFAULT_ROLES, PatchSite, auto_chunk
from factfind.model.incremental import OVERHEAD_ROWS, first_position, group_start, plan_groups
from factfind.types import DIRECTIONS, Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.model.incremental import Prefix


NodeSet = Sequence[PatchSite]


# ----------------------------------------------------------------------------- prepared batches


@dataclass
class _Prepared:
    """One prompt batch: the base tokens and metric, source activations, head inputs."""

    start: int
    pb: PairBatch
    base: TokenBatch
    m_base: Tensor  # [B]
    src: dict[SiteKey, Tensor]
    qkv: dict[int, tuple[Tensor, ...]]  # layer -> base q, k, v, source q, k, v
    allow: Tensor  # [B q k]
    masks: dict[Role | int, Tensor] = field(default_factory=dict)
    prefix: Prefix | None = None  # the cached base run, for incremental patched runs
    metric: Metric | None = None  # what is measured (None: the logit difference)

    def mask(self, position: Role | int) -> Tensor:
        """``[B pos]`` bool on the model's device."""
        if position not in self.masks:
            self.masks[position] = self.base.position_mask(position).to(self.allow.device)
        return self.masks[position]


def _check_set(group: NodeSet) -> None:
    heads = [s for s in group if s.component in ATTENTION_INPUTS]
    if not heads:
        return
    top = min(s.layer for s in heads)
    if any(s.layer < top for s in group) or any(s.layer != top for s in heads):
        raise ArgumentError("a set that patches a head's q, k or v may not patch anything at an "
                         "earlier layer (q, k, v are patched through z; see the module doc)")
    out = {(s.layer, s.head) for s in group if s.component is Component.Z}
    if out & {(s.layer, s.head) for s in heads}:
        raise ArgumentError("a set may not patch a head's output together with its inputs")


def _prepare(model: Model, pairs: FactPairs | PairBatch, sites: Iterable[PatchSite], *,
             direction: str, batch_size: int, incremental: bool = True,
             metric: Metric | None = None) -> list[_Prepared]:
    check_mode(direction, "direction", DIRECTIONS)
    sites = list(sites)
    keys = sorted({(s.component, s.layer) for s in sites if s.component not in ATTENTION_INPUTS})
    qkv_layers = sorted({s.layer for s in sites if s.component in ATTENTION_INPUTS})
    qkv_keys = [(c, layer) for layer in qkv_layers for c in ATTENTION_INPUTS]
    out = []
    for start, pb in pair_batches(model, pairs, batch_size):
        base, source = pb.base_and_source(direction)
        prefix = model.base_run(base, save=qkv_keys) if incremental else None
        b_run = model.run(base, save=qkv_keys) if prefix is None else prefix
        s_run = model.run(source, save=keys + qkv_keys)
        qkv = {layer: tuple(r.acts[(c, layer)] for r in (b_run, s_run) for c in ATTENTION_INPUTS)
               for layer in qkv_layers}
        out.append(_Prepared(start, pb, base, pb.measure(b_run.logits, 1, metric),
                             {k: s_run.acts[k] for k in keys}, qkv,
                             attention_allow(base, model.device), prefix=prefix,
                             metric=metric))
    return out


# ----------------------------------------------------------------------------- stacked patching


def _delta_z(model: Model, p: _Prepared, layer: int, m: Tensor) -> Tensor:
    """``[s B pos head d_head]``: the change of ``z`` at ``layer`` when each set's queries, keys
    and values (``m [3 s B pos head]``: q, k, v masks) take their source values."""
    q0, k0, v0, q1, k1, v1 = (t.float() for t in p.qkv[layer])
    q = torch.where(m[0, ..., None], q1, q0)  # [s B T H D]
    k = torch.where(m[1, ..., None], k1, k0)
    v = torch.where(m[2, ..., None], v1, v0)
    scale, cap = model.attn_scale(layer), model.attn_softcap(layer)
    a = attention_logits(q, k, scale, p.allow, cap).softmax(-1)  # [s B H T T]
    a0 = attention_logits(q0, k0, scale, p.allow, cap).softmax(-1)
    z = torch.einsum("sbhqk,sbkhd->sbqhd", a, v)
    z0 = torch.einsum("bhqk,bkhd->bqhd", a0, v0)
    touched = m.any(0).any(-2)  # [s B H]
    rows = p.base.attention_mask.to(z.device).float()[None, :, :, None, None]
    return (z - z0) * touched[:, :, None, :, None] * rows


def _where_edit(mask: Tensor, src: Tensor | None, delta: Tensor | None):
    """``act [S*B ...] -> where(mask, src, act) + delta`` with mask ``[S B ...]`` and src
    ``[B ...]`` broadcast over the stacked copies (no copy of the source)."""
    def edit(act: Tensor) -> Tensor:
        a = act.reshape(*mask.shape[:2], *act.shape[1:])
        if src is not None:
            m = mask.reshape(*mask.shape, *([1] * (a.dim() - mask.dim())))
            a = torch.where(m, src[None].to(a.dtype), a)
        if delta is not None:
            a = a + delta.to(a.dtype)
        return a.reshape(act.shape)
    return edit


def _patch_chunk(model: Model, p: _Prepared, sets: Sequence[NodeSet]) -> tuple[Tensor, Tensor]:
    """Effects ``[set B]`` of patching each set alone (all sets in one forward) and which
    prompts each set touches ``[set B]``."""
    S = len(sets)
    B, T = p.base.input_ids.shape
    dev = p.allow.device
    units = {Component.NEURONS: (model.d_mlp,), Component.MLP_OUT: (),
             Component.Z: (model.n_heads,)}
    masks: dict[SiteKey, Tensor] = {}
    heads: dict[int, Tensor] = {}
    valid = torch.zeros(S, B, dtype=torch.bool, device=dev)
    for i, group in enumerate(sets):
        _check_set(group)
        for s in group:
            pm = p.mask(s.position)  # [B T]
            valid[i] |= pm.any(-1)
            if s.component in ATTENTION_INPUTS:
                if s.layer not in heads:
                    heads[s.layer] = torch.zeros(3, S, B, T, model.n_heads, dtype=torch.bool,
                                                 device=dev)
                heads[s.layer][ATTENTION_INPUTS.index(s.component), i, :, :, s.head] |= pm
                continue
            if s.key not in masks:  # [S B T (unit)]
                masks[s.key] = torch.zeros(S, B, T, *units[s.component], dtype=torch.bool,
                                           device=dev)
            unit = s.neuron if s.component is Component.NEURONS else s.head
            if unit is None:
                masks[s.key][i] |= pm
            else:
                masks[s.key][i, :, :, unit] |= pm
    edits = {}
    for key, m in masks.items():
        edits[key] = _where_edit(m, p.src[key], None)
    for layer, m in heads.items():
        idx = m.flatten(2).any(-1).any(0).nonzero()[:, 0]  # sets with head inputs here
        delta = torch.zeros(S, B, T, model.n_heads, model.d_head, device=dev)
        delta[idx] = _delta_z(model, p, layer, m[:, idx])
        key = (Component.Z, layer)
        src = p.src.get(key)
        edits[key] = _where_edit(masks.get(key, torch.zeros(S, B, T, model.n_heads,
                                                            dtype=torch.bool, device=dev)),
                                 src, delta)
    prefix = p.prefix
    if prefix is None:
        forward = lambda lg: model.run(p.base.repeat(S), edits=edits, logits=lg).logits
    else:
        start = group_start([_set_start(p, group) for group in sets], range(S))
        forward = lambda lg: model.run_from(prefix, start=start, reps=S, edits=edits,
                                            logits=lg).logits
    effect = p.pb.measure_run(forward, S, p.metric).reshape(S, B) - p.m_base[None]
    return effect, valid


def _set_start(p: _Prepared, group: NodeSet) -> tuple[int, int]:
    """The first ``(layer, position)`` a set patches (a head's q/k/v patch acts through its
    ``z`` at the same layer, at and after the patched position)."""
    if not group:
        n_layers = len(p.prefix.resid) if p.prefix is not None else 1
        return n_layers - 1, p.base.input_ids.shape[1] - 1
    return (min(s.layer for s in group),
            min(first_position(p.mask(s.position)) for s in group))


def _chunk(model: Model, p: _Prepared) -> int:
    """Stacked copies per forward: what fits in memory, and on CPU at most ~4096 rows (larger
    forwards run slower per row there: measured 0.67 ms/row at 4096 vs 1.0 at 8192 rows on
    the organism)."""
    rows = len(p.m_base)
    size = auto_chunk(model, rows, p.base.input_ids.shape[1])
    return size if model.device.type != "cpu" else max(1, min(size, 4096 // rows))


def patch_node_sets(model: Model, pairs: FactPairs | PairBatch, sets: Sequence[NodeSet], *,
                    direction: str = "noise", batch_size: int = 32, chunk: int | None = None,
                    per_prompt: bool = False, progress: bool = True,
                    prepared: list[_Prepared] | None = None,
                    metric: Metric | None = None) -> RunningStats | Tensor:
    """Exactly patch each set of nodes together (one set per stacked copy).

    Args:
        sets: each a sequence of :class:`~factfind.localize.patching.PatchSite` patched at once.
        direction: ``"noise"`` (clean base, corrupt source) or ``"denoise"``.
        chunk: sets stacked per forward (default from free memory).
        per_prompt: return ``[set prompt]`` effects (NaN where the set touches nothing)
            instead of streamed :class:`~factfind.attribute.atp.RunningStats`.
        prepared: batches already prepared (with their metric) by the caller.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference).

    Returns:
        Per set, ``M(patched) - M(base)`` statistics over prompts (or per prompt).
    """
    if prepared is None:
        prepared = _prepare(model, pairs, [s for g in sets for s in g], direction=direction,
                            batch_size=batch_size, metric=metric)
    stats = RunningStats(len(sets))
    rows = []
    bar = tqdm(total=len(sets) * len(prepared), desc="exact patching", disable=not progress)
    for p in prepared:
        size = chunk or _chunk(model, p)
        if p.prefix is None:
            plan = [list(range(c0, min(len(sets), c0 + size)))
                    for c0 in range(0, len(sets), size)]
        else:  # sets grouped so each forward resumes at its sets' first layer and position
            plan = plan_groups([_set_start(p, g) for g in sets], n_layers=model.n_layers,
                               n_pos=p.base.input_ids.shape[1], max_size=size,
                               overhead=OVERHEAD_ROWS / len(p.m_base))
        e = torch.empty(len(sets), len(p.m_base), device=p.allow.device)
        v = torch.empty(len(sets), len(p.m_base), dtype=torch.bool, device=p.allow.device)
        for idx in plan:
            got, ok = _patch_chunk(model, p, [sets[i] for i in idx])
            index = torch.tensor(idx, device=e.device)
            e[index] = got.to(e.dtype)
            v[index] = ok
            bar.update(len(idx))  # e, v: [set B]
        stats.update(e.T, v.T)
        if per_prompt:
            rows.append(torch.where(v, e, torch.nan).cpu())
    bar.close()
    return torch.cat(rows, 1) if per_prompt else stats


@validated
def exact_patching(
    model: Model,
    pairs: FactPairs | PairBatch,
    *,
    components: Iterable[str | Component] = ("neurons",),
    positions: Iterable[Role | int | str] = DEFAULT_ROLES,
    layers: Iterable[int] | None = None,
    direction: str = "noise",
    batch_size: int = 32,
    chunk: int | None = None,
    per_prompt: bool = False,
    progress: bool = True,
    metric: Metric | None = None,
) -> pd.DataFrame:
    """Brute force: patch every node of :func:`~factfind.attribute.atp.estimate`'s node set exactly.

    ``metric(logits, correct, wrong) -> [rows]`` is what a patch changes (default the logit
    difference); the other arguments are :func:`~factfind.attribute.atp.estimate`'s.

    Returns:
        The same layout as :func:`~factfind.attribute.atp.atp` with ``method="exact"``: one row per
        node (mean effect over prompts, 95% CI, ``n``) or per prompt and node.
    """
    index = NodeIndex.build(model, components=components, positions=positions, layers=layers)
    sets = [[index.site(i)] for i in range(len(index))]
    out = patch_node_sets(model, pairs, sets, direction=direction, batch_size=batch_size,
                          chunk=chunk, per_prompt=per_prompt, progress=progress,
                          metric=metric)
    if isinstance(out, Tensor):  # [node prompt]
        prompts = np.repeat(np.arange(out.shape[1]), len(index))
        df = node_frame(index, "exact", {"effect": out.T.flatten()}, prompts=prompts)
    else:
        df = node_frame(index, "exact", dict(out.values()))
    df["direction"] = direction
    return df


@validated
def exact_patching_reference(model: Model, pairs: FactPairs, sets: Sequence[NodeSet], *,
                             direction: str = "noise", metric: Metric | None = None
                             ) -> Tensor:
    """The slow reference of :func:`patch_node_sets`: one set per forward over the whole padded
    batch, values written by direct index assignment in plain loops, and patched heads'
    ``z`` recomputed query row by query row from ``q, k, v`` (a softmax per row).

    Returns:
        ``[set prompt]`` effects (NaN where the set touches nothing in a prompt).
    """
    check_mode(direction, "direction", DIRECTIONS)
    pb = encode_pairs(model, pairs)
    base, source = pb.base_and_source(direction)
    flat = [s for g in sets for s in g]
    keys = sorted({(s.component, s.layer) for s in flat if s.component not in ATTENTION_INPUTS})
    qkv_keys = sorted({(c, s.layer) for s in flat if s.component in ATTENTION_INPUTS
                       for c in ATTENTION_INPUTS})
    b_run, s_run = model.run(base, save=qkv_keys), model.run(source, save=keys + qkv_keys)
    m_base = pb.measure(b_run.logits, 1, metric)
    am = base.attention_mask.bool()
    out = torch.full((len(sets), len(m_base)), float("nan"))
    for i, group in enumerate(sets):
        _check_set(group)
        where = {s: [m.nonzero()[:, 0].tolist() for m in base.position_mask(s.position)]
                 for s in group}
        edits: dict[SiteKey, Any] = {}
        for key in {s.key for s in group if s.component not in ATTENTION_INPUTS}:
            mine = [s for s in group if s.key == key]

            def put(a: Tensor, mine: list[PatchSite] = mine, key: SiteKey = key,
                    where: dict[PatchSite, list[list[int]]] = where) -> Tensor:
                a = a.clone()
                src = s_run.acts[key]
                for s in mine:
                    for b, cols in enumerate(where[s]):
                        for t in cols:
                            unit = s.neuron if s.neuron is not None else s.head
                            if unit is None:
                                a[b, t] = src[b, t]
                            else:
                                a[b, t, unit] = src[b, t, unit]
                return a
            edits[key] = put
        for layer in {s.layer for s in group if s.component in ATTENTION_INPUTS}:
            mine = [s for s in group if s.layer == layer and s.component in ATTENTION_INPUTS]
            new = {}
            for head in {s.head for s in mine}:
                assert head is not None
                qkv = {}
                for c in ATTENTION_INPUTS:
                    val = b_run.acts[(c, layer)][:, :, head].clone()
                    for s in mine:
                        if s.component is c and s.head == head:
                            for b, cols in enumerate(where[s]):
                                for t in cols:
                                    val[b, t] = s_run.acts[(c, layer)][b, t, head]
                    qkv[c] = val.float()
                q, k, v = (qkv[c] for c in ATTENTION_INPUTS)
                z = torch.zeros_like(q)
                for b in range(len(m_base)):
                    for t in am[b].nonzero()[:, 0].tolist():
                        ks = [s for s in range(t + 1) if am[b, s]]
                        w = torch.softmax(model.attn_logits(layer, k[b, ks] @ q[b, t]), 0)
                        z[b, t] = w @ v[b, ks]
                new[head] = z

            def put_z(a: Tensor, new: dict[int, Tensor] = new) -> Tensor:
                a = a.clone()
                for head, z in new.items():
                    for b in range(a.shape[0]):
                        for t in am[b].nonzero()[:, 0].tolist():
                            a[b, t, head] = z[b, t].to(a.dtype)
                return a
            edits[(Component.Z, layer)] = put_z
        m = pb.measure(model.run(base, edits=edits).logits, 1, metric)
        for b in range(len(m_base)):
            if any(where[s][b] for s in group):
                out[i, b] = float(m[b] - m_base[b])
    return out
