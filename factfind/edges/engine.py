"""The path-patching engine: the two-run recipe for many sender sets at once, and its reference.

A *job* is one patched run: a set of senders (they take their source values) and a set of
receivers (``None``: the logits). :func:`path_metrics` computes the metric of every job of a
chunk in two stacked forwards (each job is a copy of the prompt batch):

1. **run 1**: freezing every head and MLP at its base value makes the residual stream a sum of
   base outputs plus the senders' changes, so a receiver's input is exactly
   ``base input + sum of the senders' output changes upstream of it`` (at the senders'
   positions, :func:`~factfind.edges.placement.set_changes`). Run 1 is therefore one edit of each
   receiver layer's input (``resid_pre``; in sequential blocks also the ``attn_out`` an MLP
   receiver reads, carrying only its own layer's heads' changes), recording what the receivers
   compute. A head receiver patched through some of its inputs only (``qkv`` = ``"q"``,
   ``"k"``, ``"v"`` or a combination) is recomputed with :func:`attend` from the patched inputs
   and the base others.
2. **run 2**: the base run with only the receivers' outputs (at their positions) replaced by
   run 1's; everything downstream recomputes freely. With ``direct`` the receivers' changes
   reach the logits' input (the last ``resid_post``) only, and with no receivers the senders'
   own changes do (their direct effect).

:func:`path_metrics_reference` does the literal freeze-everything recipe instead, one forward
per receiver layer: every head (``z``) and MLP (``neurons``) upstream of the receivers is
written entry by entry at its base value, the senders at their source values. It is slow and
exact, and the tests compare the stacked engine with it. :func:`run_jobs` runs either over a
dataset of pairs in batches of prompts and chunks of jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, encode_pairs
from factfind.edges.placement import Placed, is_parallel, set_changes, unit_mask
from factfind.errors import ArgumentError
from factfind.graph import stage
from factfind.localize.patching import auto_chunk
from factfind.metrics import logit_diff
from factfind.model.incremental import OVERHEAD_ROWS, first_position, plan_groups
from factfind.types import Component, Metric, SiteKey

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)



def attend(model: Model, layer: int, q: Tensor, k: Tensor, v: Tensor,
           attention_mask: Tensor) -> Tensor:
    """A layer's heads recomputed from queries, keys and values ``[batch pos head d_head]``:
    ``softmax(q k^T * scale + causal/padding mask) v`` (softcapped scores where the family
    caps them), shape ``[batch pos head d_head]``."""
    scores = model.attn_logits(layer, torch.einsum("bqhd,bkhd->bhqk", q, k))
    n = q.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    allowed = allowed & attention_mask.bool().to(q.device)[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@dataclass
class Job:
    """One patched run: senders (their source values) and receivers (None: the logits)."""

    senders: list[Placed]
    receivers: list[Placed] | None = None


def _check_job(model: Model, job: Job, parallel: bool) -> None:
    for s in job.senders:
        if s.kind == "logits":
            raise ArgumentError("the logits cannot be a sender")
    if job.receivers is None:
        return
    empty = []
    for r in job.receivers:
        if r.kind in ("embed", "logits"):
            raise ArgumentError(f"{r.kind} cannot be a receiver: use receivers=None for the logits")
        if not any(stage(s.kind, s.layer, parallel) < stage(r.kind, r.layer, parallel)
                   for s in job.senders):
            empty.append(f"{r.kind}@{r.layer}")
    if empty:  # one line per job, not one per receiver
        log.debug("%d receivers have no upstream sender, so their paths are empty: %s",
                  len(empty), ", ".join(dict.fromkeys(empty)))


def _keys(job_list: Sequence[Job], *, qkv: str, parallel: bool, n_layers: int
          ) -> tuple[set[SiteKey], set[SiteKey]]:
    """(keys of the base run, keys of the source run)."""
    src = {s.key for j in job_list for s in j.senders}
    base = set(src) | {(Component.RESID_POST, n_layers - 1)}
    for j in job_list:
        for r in j.receivers or ():
            base |= {r.key, (Component.RESID_PRE, r.layer)}
            if r.kind in ("head", "attn") and qkv != "qkv":
                base |= {(Component.Q, r.layer), (Component.K, r.layer), (Component.V, r.layer)}
            if r.kind in ("mlp", "neuron") and not parallel:
                base.add((Component.ATTN_OUT, r.layer))
    return base, src


def base_and_source_runs(model: Model, pb: PairBatch, jobs: Sequence[Job], *, qkv: str = "qkv",
                         direction: str = "noise", incremental: bool = True) -> tuple[Any, Any]:
    """The base run (a :class:`~factfind.model.incremental.Prefix` when incremental) and the
    source run of a batch, saving what :func:`path_metrics` reads for ``jobs``."""
    parallel = is_parallel(model)
    for job in jobs:
        _check_job(model, job, parallel)
    base_b, src_b = (pb.clean, pb.corrupt) if direction == "noise" else (pb.corrupt, pb.clean)
    base_keys, src_keys = _keys(jobs, qkv=qkv, parallel=parallel, n_layers=model.n_layers)
    base = (model.base_run(base_b, save=base_keys) if incremental
            else model.run(base_b, save=base_keys))
    return base, model.run(src_b, save=src_keys)


def _reaches(changes: list[tuple[str, int, Tensor]], layer: int, parallel: bool) -> bool:
    """Whether a job's sender changes (``set_changes``) reach the inputs of layer ``layer``'s
    receivers: a change upstream of the layer's attention, or (sequential blocks, an MLP
    receiver) of one of the layer's own heads."""
    here = stage("head", layer, parallel)
    return any(stage(kind, at, parallel) < here or (kind == "head" and at == layer)
               for kind, at, _ in changes)


def where_edit(mask: Tensor, value: Tensor) -> Callable[[Tensor], Tensor]:
    """An edit ``act -> where(mask, value, act)``, ``mask`` broadcast over ``act``'s trailing
    dimensions (on ``act``'s device and dtype)."""
    def edit(act: Tensor) -> Tensor:
        m = mask.to(act.device).reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        return torch.where(m, value.to(act.device, act.dtype), act)
    return edit


def _stack(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def path_metrics(model: Model, pb: PairBatch, jobs: Sequence[Job], *, qkv: str = "qkv",
                 direct: bool = False, direction: str = "noise",
                 metric: Metric | None = None, incremental: bool = True,
                 runs: tuple[Any, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Metric ``[job batch]`` of each job's patched run (all jobs stacked in two forwards),
    and the clean and corrupt metrics ``[batch]``. ``runs``: the base run (the
    :class:`~factfind.model.incremental.Prefix` when incremental) and the source run from
    :func:`base_and_source_runs` for these jobs or more, shared by the chunks of a batch.

    With ``incremental`` both stacked forwards resume from the cached base run
    (:mod:`factfind.model.incremental`): run 1 at the first receiver layer and the senders'
    first position, run 2 at the first layer and position it writes. Cost: two forwards for
    the base and source runs, then per job about ``(n_layers - l1) / n_layers * (P - p1) / P``
    (run 1, from the senders' first position ``p1``) plus ``(n_layers - l2) / n_layers *
    (P - p2) / P`` (run 2) of a forward. With the default metric the patched runs unembed the two
    answers only (``Model.run(logits=<ids>)``)."""
    answers = metric is None
    metric = metric or logit_diff
    parallel = is_parallel(model)
    L = model.n_layers
    for job in jobs:
        _check_job(model, job, parallel)
    base_b = pb.clean if direction == "noise" else pb.corrupt
    base_run, src_run = runs or base_and_source_runs(model, pb, jobs, qkv=qkv,
                                                     direction=direction,
                                                     incremental=incremental)
    prefix = base_run if incremental else None
    base, src = base_run.acts, src_run.acts
    ends = _ends(metric, pb, base_run.logits, src_run.logits, direction)
    B = base_b.input_ids.shape[0]
    cache: dict[Any, Tensor] = {}
    delta = [set_changes(model, src, base, j.senders, cache) for j in jobs]

    def upstream(j: int, st: tuple[int, int], only_layer: int | None = None) -> Tensor:
        out = torch.zeros_like(base[(Component.RESID_POST, L - 1)])
        for kind, layer, d in delta[j]:
            if stage(kind, layer, parallel) < st and (only_layer is None or (
                    layer == only_layer and kind == "head")):
                out = out + d.to(out.dtype)
        return out

    # run 1: the receivers' inputs are the clean inputs plus the senders' changes upstream
    r1 = [j for j, job in enumerate(jobs) if job.receivers]
    got: dict[SiteKey, Tensor] = {}
    if r1:
        edits: dict[SiteKey, Callable[[Tensor], Tensor]] = {}
        layers = sorted({r.layer for j in r1 for r in jobs[j].receivers or ()})
        # receiver layers that no job's senders reach (every sender sits at or above them)
        # compute their base values: an incremental run 1 starts at the first reached one
        reached = [layer for layer in layers if any(_reaches(delta[j], layer, parallel)
                                                    for j in r1)]
        first = layers[0] if prefix is None else reached[0] if reached else layers[-1] + 1
        for layer in layers:
            if layer < first:
                continue
            rows, vals, arows, avals = [], [], [], []
            for j in r1:
                here = [r for r in jobs[j].receivers or () if r.layer == layer]
                rows.append(torch.full((B,), bool(here)))
                vals.append(base[(Component.RESID_PRE, layer)]
                            + upstream(j, stage("head", layer, parallel)))
                mlp_here = any(r.kind in ("mlp", "neuron") for r in here)
                if (Component.ATTN_OUT, layer) in base:  # sequential blocks, MLP receivers
                    arows.append(torch.full((B,), mlp_here))
                    avals.append(base[(Component.ATTN_OUT, layer)]
                                 + upstream(j, (layer, 2), only_layer=layer))
            edits[(Component.RESID_PRE, layer)] = where_edit(_stack(rows), _stack(vals))
            if arows:
                edits[(Component.ATTN_OUT, layer)] = where_edit(_stack(arows), _stack(avals))
        keys = {r.key for j in r1 for r in jobs[j].receivers or ()}
        if qkv != "qkv":
            keys |= {(c, k[1]) for k in keys if k[0] is Component.Z
                     for c in (Component.Q, Component.K, Component.V)}
        for key in [k for k in keys if k[1] < first]:  # unreached: the base run's values
            got[key] = base[key][None].expand(len(r1), *base[key].shape)
        keys = {k for k in keys if k[1] >= first}
        # the senders change nothing before their first position, so (attention being
        # causal) no receiver input there changes: an incremental run 1 starts at it too
        p1 = 0 if prefix is None else min(
            (first_position(s.mask) for j in r1 for s in jobs[j].senders), default=0)
        if prefix is None:
            run1 = model.run(base_b.repeat(len(r1)), save=keys, edits=edits).acts
        elif edits:
            run1 = model.run_from(prefix, start=(first, p1), reps=len(r1), save=keys,
                                  edits=edits).acts
        else:
            run1 = {}
        for key, act in run1.items():
            act = act.reshape(len(r1), B, *act.shape[1:])
            if p1:  # positions before p1: the base run's values
                head = base[key][None, :, :p1].expand(len(r1), *base[key][:, :p1].shape)
                act = torch.cat([head.to(act.dtype), act], dim=2)
            got[key] = act
        if qkv != "qkv":
            for layer in {k[1] for k in keys if k[0] is Component.Z}:
                qkv_ = [got[(c, layer)] if c.value in qkv else
                        base[(c, layer)][None].expand_as(got[(c, layer)])
                        for c in (Component.Q, Component.K, Component.V)]
                q, k, v = (t.flatten(0, 1) for t in qkv_)
                z = attend(model, layer, q, k, v, base_b.repeat(len(r1)).attention_mask)
                got[(Component.Z, layer)] = z.reshape(len(r1), B, *z.shape[1:])
    slot = {j: i for i, j in enumerate(r1)}

    # run 2: the base run with the receivers' outputs (or, direct, the logits' input) replaced
    J = len(jobs)
    final_key = (Component.RESID_POST, L - 1)
    masks: dict[SiteKey, list[Tensor | None]] = {}
    values: dict[SiteKey, list[Tensor | None]] = {}

    def put(key: SiteKey, j: int, mask: Tensor, value: Tensor) -> None:
        ms = masks.setdefault(key, [None] * J)
        vs = values.setdefault(key, [None] * J)
        prev = ms[j]
        ms[j] = mask if prev is None else prev | mask
        vs[j] = value

    for j, job in enumerate(jobs):
        if job.receivers is None:
            final = base[final_key] + upstream(j, stage("logits", L, parallel))
            put(final_key, j, torch.ones(B, dtype=torch.bool), final)
        elif direct:
            final = base[final_key].clone()
            mine = {k: v[slot[j]] for k, v in got.items()}
            for _, _, d in set_changes(model, mine, base, job.receivers):
                final = final + d.to(final.dtype)
            put(final_key, j, torch.ones(B, dtype=torch.bool), final)
        else:  # a receiver the job's senders do not reach keeps its base output: no edit
            for r in job.receivers:
                if _reaches(delta[j], r.layer, parallel):
                    put(r.key, j, unit_mask(model, r), got[r.key][slot[j]])
    edits2 = {}
    for key, ms in masks.items():
        shape = next(m for m in ms if m is not None).shape
        full = [torch.zeros(shape, dtype=torch.bool) if m is None else m for m in ms]
        vals = [base[key] if v is None else v for v in values[key]]
        edits2[key] = where_edit(_stack(full), _stack(vals))
    if not edits2:  # no job changes anything: every patched run is the base run
        m = pb.measure(base_run.logits.float(), 1, None if answers else metric)
        return m[None].expand(J, B).double().cpu(), *ends
    if prefix is None:
        forward = lambda lg: model.run(base_b.repeat(J), edits=edits2, logits=lg).logits
    else:
        firsts = [0 if m.dim() < 2 else first_position(m)  # m: [batch] or [batch pos ...]
                  for ms in masks.values() for m in ms if m is not None]
        start = (min(k[1] for k in edits2), min(firsts, default=0))
        forward = lambda lg: model.run_from(prefix, start=start, reps=J, edits=edits2,
                                            logits=lg).logits
    out = pb.measure_run(forward, J, None if answers else metric)
    out = out.reshape(J, B).double().cpu()
    return out, *ends


def _ends(metric: Metric, pb: PairBatch, base: Tensor, src: Tensor, direction: str
          ) -> tuple[Tensor, Tensor]:
    """(clean, corrupt) metrics from the base and source runs' logits."""
    mb, ms = (metric(lg, pb.correct, pb.wrong).double().cpu() for lg in (base, src))
    return (mb, ms) if direction == "noise" else (ms, mb)


def path_metrics_reference(model: Model, pb: PairBatch, jobs: Sequence[Job], *,
                           qkv: str = "qkv", direct: bool = False, direction: str = "noise",
                           metric: Metric | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The literal recipe, one forward per receiver group: freeze every head (``z``) and MLP
    (``neurons``) upstream of the receivers at its base value, senders at their source values,
    written entry by entry; then write the receivers' values (or, ``direct``, freeze everything
    but the receivers) in a second forward."""
    metric = metric or logit_diff
    parallel = is_parallel(model)
    L = model.n_layers
    base_b, src_b = (pb.clean, pb.corrupt) if direction == "noise" else (pb.corrupt, pb.clean)
    every = [(Component.EMBED, 0)] + [(c, layer) for layer in range(L)
                                      for c in (Component.Z, Component.NEURONS)]
    base_run, src_run = model.run(base_b, save=every), model.run(src_b, save=every)
    base, src = base_run.acts, src_run.acts
    ends = _ends(metric, pb, base_run.logits, src_run.logits, direction)

    def frozen(senders: Sequence[Placed], below: tuple[int, int],
               own: dict[SiteKey, list[tuple[tuple[int, ...], Tensor]]] | None = None
               ) -> dict[SiteKey, Callable[[Tensor], Tensor]]:
        """Edits freezing every site upstream of ``below`` at base (senders from source)."""
        writes_at: dict[SiteKey, list[tuple[tuple[int, ...], Tensor]]] = {}
        for s in senders:
            key = (Component.NEURONS, s.layer) if s.kind in ("mlp", "neuron") else s.key
            for b, p in s.mask.nonzero().tolist():
                idx: tuple[int, ...] = (b, p) if s.index is None else (b, p, s.index)
                writes_at.setdefault(key, []).append((idx, src[key][idx]))
        for key, items in (own or {}).items():
            writes_at.setdefault(key, []).extend(items)
        edits = {}
        for key in every:
            kind = {"embed": "embed", "z": "head", "neurons": "mlp"}[key[0].value]
            layer = -1 if kind == "embed" else key[1]
            if stage(kind, layer, parallel) >= below:
                continue
            value = base[key].clone()
            for idx, v in writes_at.get(key, []):
                value[idx] = v
            edits[key] = (lambda a, v=value: v.to(a.dtype))
        return edits

    out = torch.zeros(len(jobs), base_b.input_ids.shape[0], dtype=torch.float64)
    qkv_cache: dict[int, dict[SiteKey, Tensor]] = {}
    for j, job in enumerate(jobs):
        if job.receivers is None:
            lg = model.run(base_b, edits=frozen(job.senders, (L, 3))).logits
            out[j] = metric(lg, pb.correct, pb.wrong).double().cpu()
            continue
        own: dict[SiteKey, list[tuple[tuple[int, ...], Tensor]]] = {}
        groups = sorted({(r.layer, r.kind in ("mlp", "neuron")) for r in job.receivers})
        for layer, is_mlp in groups:
            here = [r for r in job.receivers
                    if r.layer == layer and (r.kind in ("mlp", "neuron")) == is_mlp]
            below = stage("mlp" if is_mlp else "head", layer, parallel)
            key = (Component.NEURONS if is_mlp else Component.Z, layer)
            qk = [(c, layer) for c in (Component.Q, Component.K, Component.V)]
            run = model.run(base_b, save=[key, *qk] if qkv != "qkv" and not is_mlp else [key],
                            edits=frozen(job.senders, below)).acts
            value = run[key]
            if qkv != "qkv" and not is_mlp:
                base_qkv = model.run(base_b, save=qk).acts if layer not in qkv_cache else \
                    qkv_cache[layer]
                qkv_cache[layer] = base_qkv
                q, k, v = (run[key] if key[0].value in qkv else base_qkv[key] for key in qk)
                value = attend(model, layer, q, k, v, base_b.attention_mask)
            for r in here:
                for b, p in r.mask.nonzero().tolist():
                    if r.index is None:
                        own.setdefault(key, []).append(((b, p), value[b, p]))
                    else:
                        own.setdefault(key, []).append(((b, p, r.index), value[b, p, r.index]))
        if direct:
            edits = frozen([], (L, 3), own)
        else:
            edits = {}
            for key, items in own.items():
                def put(a: Tensor, items: list[tuple[tuple[int, ...], Tensor]] = items
                        ) -> Tensor:
                    a = a.clone()
                    for idx, v in items:
                        a[idx] = v
                    return a
                edits[key] = put
        out[j] = metric(model.run(base_b, edits=edits).logits, pb.correct,
                        pb.wrong).double().cpu()
    return out, *ends


def _chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sub(pb: PairBatch, idx: slice) -> PairBatch:
    return PairBatch(pb.clean.take(idx), pb.corrupt.take(idx), pb.correct[idx], pb.wrong[idx])


def run_jobs(model: Model, pairs: FactPairs, make: Callable[[TokenBatch, Tensor], list[Job]],
             *, reference: bool, batch_size: int, chunk: int | None, progress: bool,
             desc: str, **opts: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Metrics ``[job prompt]`` plus clean and corrupt metrics ``[prompt]``.

    ``make(batch, role_labels)`` builds the jobs of each batch of ``batch_size`` prompts (the
    jobs are placed on that batch); they run through :func:`path_metrics` in chunks of about
    ``chunk / 2`` copies (default: what fits in memory), or with ``reference`` through
    :func:`path_metrics_reference`. ``opts`` go to either (``qkv``, ``direct``, ``direction``,
    ``metric``)."""
    pb_all = encode_pairs(model, pairs)
    n = len(pairs)
    cols, m_clean, m_corrupt = [], [], []
    bar = tqdm(total=n, disable=not progress, desc=desc, unit="prompt")
    for idx in _chunks(n, batch_size):
        pb = _sub(pb_all, idx)
        labels = pb.clean.role_labels()
        jobs = make(pb.clean, labels)
        if reference:
            got = [path_metrics_reference(model, pb, jobs, **opts)]
        else:
            size = chunk or auto_chunk(model, len(pb.correct), pb.clean.input_ids.shape[1])
            # jobs whose senders sit in similar layers share a forward: an incremental run 1
            # starts at the first receiver layer its chunk's senders reach
            starts = [(max(0, min((s.layer for s in job.senders), default=0)), 0)
                      for job in jobs]
            groups = plan_groups(starts, n_layers=model.n_layers, n_pos=1,
                                 max_size=max(1, size // 2),
                                 overhead=OVERHEAD_ROWS / len(pb.correct))
            runs = base_and_source_runs(model, pb, jobs, **{
                k: opts[k] for k in ("qkv", "direction", "incremental") if k in opts})
            got = [path_metrics(model, pb, [jobs[i] for i in g], runs=runs, **opts)
                   for g in groups]
        if reference:
            cols.append(got[0][0])
        else:
            col = torch.empty(len(jobs), len(pb.correct), dtype=got[0][0].dtype)
            for g, part in zip(groups, got, strict=True):
                col[g] = part[0]
            cols.append(col)
        m_clean.append(got[0][1])
        m_corrupt.append(got[0][2])
        bar.update(idx.stop - idx.start)
    bar.close()
    return torch.cat(cols, dim=1), torch.cat(m_clean), torch.cat(m_corrupt)


__all__ = ["Job", "attend", "path_metrics", "path_metrics_reference", "run_jobs",
           "where_edit"]
