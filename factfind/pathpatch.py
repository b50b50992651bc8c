"""Path patching: the effect of a component *along chosen paths only*.

Activation patching changes a component's output and lets the change flow everywhere. Path
patching (Wang et al. 2022, "Interpretability in the Wild", appendix B; Goldowsky-Dill et al.
2023, "Localizing Model Behavior with Path Patching") lets it reach only a chosen set of
*receivers*: "do the MLPs at the subject's last token matter *through the heads at the final
token*?" The two-run recipe of Wang et al., here in the noising direction (a clean run, the
senders' corrupt values patched in):

1. **run 1**: the senders take their corrupt values and every other head and MLP is frozen at its
   clean value; record what the receivers compute. Freezing makes the residual stream a sum of
   clean outputs plus the senders' changes, so a receiver's input is exactly
   ``clean input + sum of the senders' output changes upstream of it`` (at the senders'
   positions), and that is how run 1 is computed: one edit of the receivers' layer input.
2. **run 2**: the clean run with only the receivers' outputs (at their positions) replaced by run
   1's; everything downstream recomputes freely. With ``direct=True`` the receivers' changes
   instead reach the logits only directly (sender → receiver → logits), and with no receivers
   the senders' direct effect on the logits is measured (``receivers=None``).

A head receiver can be patched through its query, key or value input alone
(``receiver_input="q"``, ``"k"``, ``"v"`` or any combination): run 1 records ``q``, ``k``, ``v``
and the head's output is recomputed as ``softmax(q k^T * scale + mask) v`` from the patched
ones and the clean others. Sender sets of a sweep are stacked as copies of the batch, so one
pair of forwards serves a chunk of sets; :func:`path_patching_reference` does the literal
freeze-everything recipe, one receiver layer per forward, and is what the tests compare with.

**Edges.** A single sender node ``u`` and a single receiver node ``v`` is the edge ``u → v`` of
a circuit graph (:mod:`factfind.graph`): :func:`edge_patching` measures ``m(u's change reaches v
only) - m(clean)``, the exact quantity that edge attribution patching (:mod:`factfind.eap`)
approximates, and :func:`path_patching_circuit` grows a circuit backwards from the logits with
it, as Wang et al. did by hand. Graph nodes name positions by the *partition* of
:func:`factfind.tracing.token_roles` (``subject`` = the subject's inner tokens, ``prefix``
= everything before the template, e.g. a BOS token), so every real token belongs to exactly one
role; :class:`~factfind.types.Site` positions keep their usual meaning
(``Role.SUBJECT`` = every subject token).

Example::

    pairs = facts.corrupt(model, seed=0)
    mlps = [Site("mlp_out", l, position="subject_last") for l in range(model.n_layers)]
    heads = [Site("z", 3, head=h, position="final") for h in range(model.n_heads)]
    path_patching(model, pairs, mlps, heads, receiver_input="v")      # MLPs -> heads' values
    path_patching_sweep(model, pairs, heads)                          # direct effects
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.ablation import TOKEN_ROLES
from factfind.graph import CircuitGraph, Node, Provenance
from factfind.metrics import logit_diff
from factfind.patching import PairBatch, auto_chunk, encode_pairs, position_mask, repeat, take
from factfind.results import tidy
from factfind.tracing import token_roles
from factfind.types import Component, Site, SiteKey

if TYPE_CHECKING:
    from factfind.data import FactPairs, TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)

Metric = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``metric(logits [rows d_vocab], correct [rows], wrong [rows]) -> [rows]``; default
:func:`~factfind.metrics.logit_diff`."""

NodeLike = Node | str


# ----------------------------------------------------------------------------- nodes on a batch


def role_labels(batch: TokenBatch) -> Tensor:
    """``[batch pos]`` index into :data:`~factfind.ablation.TOKEN_ROLES` (the partition of
    :func:`~factfind.tracing.token_roles`), -1 for padding."""
    rows = token_roles(batch)
    return torch.tensor([[TOKEN_ROLES.index(r) if r else -1 for r in row] for row in rows],
                        dtype=torch.long).reshape(batch.input_ids.shape)


def node_mask(batch: TokenBatch, role: str, labels: Tensor | None = None) -> Tensor:
    """``[batch pos]`` bool: the positions a graph node's role names (``"all"``: every real
    token; ``"subject"``: the subject's inner tokens)."""
    labels = role_labels(batch) if labels is None else labels
    if role == "all":
        return labels >= 0
    if role not in TOKEN_ROLES:
        raise ValueError(f"unknown node role {role!r}; choose from {TOKEN_ROLES} or 'all'")
    return labels == TOKEN_ROLES.index(role)


def roles_present(batch: TokenBatch) -> list[str]:
    """The partition roles that hold at least one token of some prompt, in role order."""
    labels = role_labels(batch)
    return [r for i, r in enumerate(TOKEN_ROLES) if bool((labels == i).any())]


def all_nodes(model: Model, batch: TokenBatch, *, neurons: bool = False) -> list[Node]:
    """Every inner node at one granularity: each head and each MLP (or, with ``neurons``, each
    MLP neuron) of every layer at every role present in ``batch``. Embeddings and logits are
    the graph's endpoints and are not counted."""
    out = []
    for role in roles_present(batch):
        for layer in range(model.n_layers):
            out += [Node("head", layer, h, role) for h in range(model.n_heads)]
            if neurons:
                out += [Node("neuron", layer, n, role) for n in range(model.d_mlp)]
            else:
                out.append(Node("mlp", layer, None, role))
    return sorted(out)


def as_node(node: NodeLike, model: Model) -> Node:
    return node if isinstance(node, Node) else Node.parse(node, n_layers=model.n_layers)


@dataclass(frozen=True)
class Placed:
    """A sender or receiver made concrete on one batch: ``kind`` is embed, head, attn (every
    head), mlp, neuron or logits; ``mask`` the positions ``[batch pos]``."""

    kind: str
    layer: int
    index: int | None
    mask: Tensor

    @property
    def key(self) -> SiteKey:
        comp = {"embed": Component.EMBED, "head": Component.Z, "attn": Component.Z,
                "mlp": Component.NEURONS, "neuron": Component.NEURONS}[self.kind]
        return (comp, max(self.layer, 0))


def place_site(model: Model, batch: TokenBatch, site: Site) -> Placed:
    """A :class:`~factfind.types.Site` as a :class:`Placed` (positions as in
    :func:`factfind.patching.position_mask`; ``None`` = every real token)."""
    c = site.component
    if site.position is None:
        mask = batch.attention_mask.bool().cpu()
    else:
        mask = position_mask(batch, site.position)
    if c is Component.EMBED:
        return Placed("embed", -1, None, mask)
    if c in (Component.Z, Component.HEAD_OUT, Component.ATTN_OUT):
        if site.head is not None and not 0 <= site.head < model.n_heads:
            raise IndexError(f"head {site.head} does not exist ({model.n_heads} heads)")
        kind = "attn" if site.head is None else "head"
        return Placed(kind, _layer(model, site.layer), site.head, mask)
    if c is Component.MLP_OUT or (c is Component.NEURONS and site.neuron is None):
        return Placed("mlp", _layer(model, site.layer), None, mask)
    if c is Component.NEURONS:
        if not 0 <= (site.neuron or 0) < model.d_mlp:
            raise IndexError(f"neuron {site.neuron} does not exist ({model.d_mlp} neurons)")
        return Placed("neuron", _layer(model, site.layer), site.neuron, mask)
    raise ValueError(f"path patching sends from and into embed, z/head_out/attn_out, mlp_out "
                     f"and neurons sites, not {c}")


def place_node(model: Model, batch: TokenBatch, node: NodeLike,
               labels: Tensor | None = None) -> Placed:
    """A graph node as a :class:`Placed` (positions by the role partition)."""
    n = as_node(node, model)
    if n.kind in ("resid",):
        raise ValueError(f"{n.id}: residual-stream nodes are not senders or receivers")
    mask = node_mask(batch, n.role, labels)
    layer = n.layer if n.kind in ("embed", "logits") else _layer(model, n.layer)
    return Placed(n.kind, layer, n.index, mask)


def _layer(model: Model, layer: int) -> int:
    if not 0 <= layer < model.n_layers:
        raise IndexError(f"layer {layer} does not exist ({model.n_layers} layers)")
    return layer


def stage(kind: str, layer: int, parallel: bool) -> tuple[int, int]:
    """Order in the forward pass: embed, then per layer attention before the MLP (the same
    stage in parallel blocks), logits last. ``u`` can feed ``v`` iff stage(u) < stage(v)."""
    sub = {"embed": 0, "head": 1, "attn": 1, "mlp": 2 - parallel, "neuron": 2 - parallel,
           "logits": 3}[kind]
    return (layer, sub)


def is_parallel(model: Model) -> bool:
    return bool(getattr(model.hf.config, "use_parallel_residual", False))


def writes(model: Model, acts: dict[SiteKey, Tensor], p: Placed) -> Tensor:
    """What ``p`` writes into the residual stream in a run, ``[batch pos d_model]`` (zero
    outside its positions; biases excluded - they cancel in every difference taken here)."""
    if p.kind == "embed":
        out = acts[(Component.EMBED, 0)]
    elif p.kind in ("head", "attn"):
        z = acts[(Component.Z, p.layer)]
        w = model.W_O(p.layer).to(z.dtype)
        if p.kind == "head":
            out = z[:, :, p.index] @ w[p.index]
        else:
            out = torch.einsum("bphd,hdm->bpm", z, w)
    elif p.kind == "mlp":  # mlp_out = neurons @ W_out + b_out
        n = acts[(Component.NEURONS, p.layer)]
        out = n @ model.W_out(p.layer).to(n.dtype)
    elif p.kind == "neuron":
        n = acts[(Component.NEURONS, p.layer)][:, :, p.index]
        out = n[..., None] * model.W_out(p.layer)[p.index].to(n.dtype)
    else:
        raise ValueError(f"{p.kind} writes nothing into the residual stream")
    return out * p.mask.to(out.device)[..., None]


def unit_mask(model: Model, p: Placed) -> Tensor:
    """``p``'s mask over its site's activation: ``[batch pos head]`` for heads, ``[batch pos
    neuron]`` for MLPs and neurons (an MLP is all of its neurons), ``[batch pos]`` for
    embeddings."""
    if p.kind in ("head", "attn"):
        m = torch.zeros(*p.mask.shape, model.n_heads, dtype=torch.bool)
        if p.kind == "head":
            m[..., p.index] = p.mask
        else:
            m[:] = p.mask[..., None]
        return m
    if p.kind in ("mlp", "neuron"):
        m = torch.zeros(*p.mask.shape, model.d_mlp, dtype=torch.bool)
        if p.kind == "neuron":
            m[..., p.index] = p.mask
        else:
            m[:] = p.mask[..., None]
        return m
    return p.mask.clone()


def set_changes(model: Model, src: dict[SiteKey, Tensor], base: dict[SiteKey, Tensor],
                placed: Sequence[Placed], cache: dict[Any, Tensor] | None = None
                ) -> list[tuple[str, int, Tensor]]:
    """What a *set* of senders changes in the residual stream, ``src`` minus ``base``, one
    ``(kind, layer, [batch pos d_model])`` per embed / attention layer / MLP layer; senders that
    overlap (a head and its whole layer, an MLP and one of its neurons) count once. ``cache``
    keeps per-head and per-layer changes between calls on the same two runs."""
    cache = {} if cache is None else cache
    masks: dict[SiteKey, Tensor] = {}
    for p in placed:
        m = unit_mask(model, p)
        masks[p.key] = masks[p.key] | m if p.key in masks else m
    out = []
    for (comp, layer), m in sorted(masks.items()):
        key = (comp, layer)
        if key not in cache:
            d = src[key] - base[key]
            if comp is Component.Z:  # per head, in the residual stream: [B P H d_model]
                d = torch.einsum("bphd,hdm->bphm", d, model.W_O(layer).to(d.dtype))
            cache[key] = d
        d = cache[key]
        if comp is Component.EMBED:
            out.append(("embed", -1, d * m[..., None].to(d.dtype)))
        elif comp is Component.Z:
            out.append(("head", layer, torch.einsum("bph,bphm->bpm", m.to(d.dtype), d)))
        else:
            rows = m.any(-1)
            if bool((m == rows[..., None]).all()):  # whole MLPs at some positions
                if ("mlp", layer) not in cache:
                    cache[("mlp", layer)] = d @ model.W_out(layer).to(d.dtype)
                out.append(("mlp", layer, cache[("mlp", layer)] * rows[..., None].to(d.dtype)))
            else:
                out.append(("mlp", layer, (d * m.to(d.dtype)) @ model.W_out(layer).to(d.dtype)))
    return out


def attend(model: Model, layer: int, q: Tensor, k: Tensor, v: Tensor,
           attention_mask: Tensor) -> Tensor:
    """A layer's heads recomputed from queries, keys and values ``[batch pos head d_head]``:
    ``softmax(q k^T * scale + causal/padding mask) v``, shape ``[batch pos head d_head]``."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * model.attn_scale(layer)
    n = q.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    allowed = allowed & attention_mask.bool().to(q.device)[:, None, None, :]
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


# ----------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One patched run: senders (their source values) and receivers (None: the logits)."""

    senders: list[Placed]
    receivers: list[Placed] | None = None


def _check_job(model: Model, job: Job, parallel: bool) -> None:
    for s in job.senders:
        if s.kind == "logits":
            raise ValueError("the logits cannot be a sender")
    if job.receivers is None:
        return
    for r in job.receivers:
        if r.kind in ("embed", "logits"):
            raise ValueError(f"{r.kind} cannot be a receiver: use receivers=None for the logits")
        if not any(stage(s.kind, s.layer, parallel) < stage(r.kind, r.layer, parallel)
                   for s in job.senders):
            log.info("receiver %s at layer %d has no upstream sender: its path is empty",
                     r.kind, r.layer)


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


def _where(mask: Tensor, value: Tensor) -> Callable[[Tensor], Tensor]:
    def edit(act: Tensor) -> Tensor:
        m = mask.to(act.device).reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        return torch.where(m, value.to(act.device, act.dtype), act)
    return edit


def _stack(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _path_metrics(model: Model, pb: PairBatch, jobs: Sequence[Job], *, qkv: str = "qkv",
                  direct: bool = False, direction: str = "noise",
                  metric: Metric | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Metric ``[job batch]`` of each job's patched run (all jobs stacked in two forwards),
    and the clean and corrupt metrics ``[batch]``."""
    metric = metric or logit_diff
    parallel = is_parallel(model)
    L = model.n_layers
    for job in jobs:
        _check_job(model, job, parallel)
    base_b, src_b = (pb.clean, pb.corrupt) if direction == "noise" else (pb.corrupt, pb.clean)
    base_keys, src_keys = _keys(jobs, qkv=qkv, parallel=parallel, n_layers=L)
    base_run, src_run = model.run(base_b, save=base_keys), model.run(src_b, save=src_keys)
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
        for layer in layers:
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
            edits[(Component.RESID_PRE, layer)] = _where(_stack(rows), _stack(vals))
            if arows:
                edits[(Component.ATTN_OUT, layer)] = _where(_stack(arows), _stack(avals))
        keys = {r.key for j in r1 for r in jobs[j].receivers or ()}
        if qkv != "qkv":
            keys |= {(c, k[1]) for k in keys if k[0] is Component.Z
                     for c in (Component.Q, Component.K, Component.V)}
        run1 = model.run(repeat(base_b, len(r1)), save=keys, edits=edits).acts
        for key, act in run1.items():
            got[key] = act.reshape(len(r1), B, *act.shape[1:])
        if qkv != "qkv":
            for layer in {k[1] for k in keys if k[0] is Component.Z}:
                qkv_ = [got[(c, layer)] if c.value in qkv else
                        base[(c, layer)][None].expand_as(got[(c, layer)])
                        for c in (Component.Q, Component.K, Component.V)]
                q, k, v = (t.flatten(0, 1) for t in qkv_)
                z = attend(model, layer, q, k, v, repeat(base_b, len(r1)).attention_mask)
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
        else:
            for r in job.receivers:
                put(r.key, j, unit_mask(model, r), got[r.key][slot[j]])
    edits2 = {}
    for key, ms in masks.items():
        shape = next(m for m in ms if m is not None).shape
        full = [torch.zeros(shape, dtype=torch.bool) if m is None else m for m in ms]
        vals = [base[key] if v is None else v for v in values[key]]
        edits2[key] = _where(_stack(full), _stack(vals))
    logits = model.run(repeat(base_b, J), edits=edits2).logits
    out = metric(logits, pb.correct.repeat(J), pb.wrong.repeat(J)).reshape(J, B).double().cpu()
    return out, *ends


def _ends(metric: Metric, pb: PairBatch, base: Tensor, src: Tensor, direction: str
          ) -> tuple[Tensor, Tensor]:
    """(clean, corrupt) metrics from the base and source runs' logits."""
    mb, ms = (metric(lg, pb.correct, pb.wrong).double().cpu() for lg in (base, src))
    return (mb, ms) if direction == "noise" else (ms, mb)


def _path_metrics_reference(model: Model, pb: PairBatch, jobs: Sequence[Job], *,
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


# ----------------------------------------------------------------------------- public API


_INPUTS = ("q", "k", "v", "qk", "qv", "kv", "qkv")


def _check_options(receiver_input: str, direction: str) -> str:
    order = "".join(c for c in "qkv" if c in receiver_input)
    if order not in _INPUTS or len(order) != len(receiver_input):
        raise ValueError(f"receiver_input must be some of 'q', 'k', 'v' (e.g. 'qk'), "
                         f"got {receiver_input!r}")
    if direction not in ("noise", "denoise"):
        raise ValueError(f"direction must be 'noise' or 'denoise', not {direction!r}")
    return order


def _chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sub(pb: PairBatch, idx: slice) -> PairBatch:
    return PairBatch(take(pb.clean, idx), take(pb.corrupt, idx), pb.correct[idx], pb.wrong[idx])


def _run_sets(model: Model, pairs: FactPairs, make: Callable[[TokenBatch, Tensor], list[Job]],
              *, reference: bool, batch_size: int, chunk: int | None, progress: bool,
              desc: str, **opts: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Metrics ``[job prompt]`` plus clean and corrupt metrics ``[prompt]``."""
    pb_all = encode_pairs(model, pairs)
    n = len(pairs)
    cols, m_clean, m_corrupt = [], [], []
    bar = tqdm(total=n, disable=not progress, desc=desc, unit="prompt")
    for idx in _chunks(n, batch_size):
        pb = _sub(pb_all, idx)
        labels = role_labels(pb.clean)
        jobs = make(pb.clean, labels)
        if reference:
            got = [_path_metrics_reference(model, pb, jobs, **opts)]
        else:
            size = chunk or auto_chunk(model, len(pb.correct), pb.clean.input_ids.shape[1])
            got = [_path_metrics(model, pb, jobs[s], **opts)
                   for s in _chunks(len(jobs), max(1, size // 2))]
        cols.append(torch.cat([g[0] for g in got]))
        m_clean.append(got[0][1])
        m_corrupt.append(got[0][2])
        bar.update(idx.stop - idx.start)
    bar.close()
    return torch.cat(cols, dim=1), torch.cat(m_clean), torch.cat(m_corrupt)


def _site_cols(site: Site) -> dict[str, Any]:
    comp = "head_out" if site.component is Component.Z else str(site.component)
    pos = site.position
    return {"component": comp, "layer": site.layer, "head": site.head, "neuron": site.neuron,
            "position": pos if isinstance(pos, int) else None,
            "role": None if pos is None or isinstance(pos, int) else str(pos)}


def _effect(metric: Tensor, clean: Tensor, corrupt: Tensor, direction: str) -> Tensor:
    denom = clean - corrupt
    num = clean - metric if direction == "noise" else metric - corrupt
    return torch.where(denom.abs() < 1e-9, torch.nan, num / denom)


def path_patching_sweep(
    model: Model, pairs: FactPairs, senders: Sequence[Site],
    receivers: Sequence[Site] | None = None, *, receiver_input: str = "qkv",
    direct: bool = False, direction: str = "noise", metric: Metric | None = None,
    batch_size: int = 32, chunk: int | None = None, progress: bool = False,
    reference: bool = False, sets: bool = False,
) -> pd.DataFrame:
    """Path-patch each sender alone (or, with ``sets=True``, all of them together) into the
    receivers; one row per (sender, prompt).

    Args:
        model: the model.
        pairs: clean/corrupt prompt pairs.
        senders: ``embed``, ``z``/``head_out`` (one head, or every head with ``head=None``),
            ``attn_out``, ``mlp_out`` and ``neurons`` sites, at roles or absolute positions.
        receivers: heads, attention layers, MLPs or neurons (same kinds of sites), or ``None``
            for the logits (the senders' direct effect).
        receiver_input: which inputs of head receivers the paths enter: any of ``"q"``,
            ``"k"``, ``"v"`` (``"qkv"``: all three).
        direct: the receivers' changes reach the logits only directly.
        direction: ``"noise"`` (clean run, corrupt senders) or ``"denoise"``.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default logit difference).
        batch_size: prompts per forward; chunk: senders stacked per forward.
        reference: use the slow literal recipe (:func:`path_patching_reference`).
        sets: patch all senders together (one row per prompt, site columns empty).

    Returns:
        Tidy rows with the sender's site columns, ``effect`` (noising: ``(clean - patched) /
        (clean - corrupt)``; denoising: ``(patched - corrupt) / (clean - corrupt)``),
        ``metric``, ``clean`` and ``corrupt``.

    Example::

        heads = [Site("z", l, head=h, position="final") for l in range(4) for h in range(8)]
        aggregate(path_patching_sweep(model, pairs, heads))   # direct effect of every head
    """
    qkv = _check_options(receiver_input, direction)
    if not senders:
        raise ValueError("no senders to patch")
    groups = [list(senders)] if sets else [[s] for s in senders]

    def make(batch: TokenBatch, labels: Tensor) -> list[Job]:
        rcv = None if receivers is None else [place_site(model, batch, r) for r in receivers]
        return [Job([place_site(model, batch, s) for s in g], rcv) for g in groups]

    m, clean, corrupt = _run_sets(model, pairs, make, reference=reference,
                                  batch_size=batch_size, chunk=chunk, progress=progress,
                                  desc="path patching", qkv=qkv, direct=direct,
                                  direction=direction, metric=metric)
    eff = _effect(m, clean[None], corrupt[None], direction)
    method = f"path_patching/{direction}" + ("/direct" if direct or receivers is None else "")
    rows = []
    for g, group in enumerate(groups):
        cols = _site_cols(group[0]) if not sets else {}
        for b in range(m.shape[1]):
            rows.append({"method": method, **cols, "prompt": b, "effect": float(eff[g, b]),
                         "metric": float(m[g, b]), "clean": float(clean[b]),
                         "corrupt": float(corrupt[b])})
    return tidy(rows)


def path_patching(model: Model, pairs: FactPairs, senders: Sequence[Site],
                  receivers: Sequence[Site] | None = None, **kwargs: Any) -> pd.DataFrame:
    """Path-patch the sender *set* into the receivers (see :func:`path_patching_sweep` for the
    options); one row per prompt."""
    return path_patching_sweep(model, pairs, senders, receivers, sets=True, **kwargs)


def path_patching_reference(model: Model, pairs: FactPairs, senders: Sequence[Site],
                            receivers: Sequence[Site] | None = None, **kwargs: Any
                            ) -> pd.DataFrame:
    """:func:`path_patching` by the literal freeze-everything recipe (slow, exact reference)."""
    return path_patching_sweep(model, pairs, senders, receivers, sets=True, reference=True,
                               **kwargs)


# ----------------------------------------------------------------------------- edges


def edge_patching(model: Model, pairs: FactPairs, edges: Sequence[tuple[NodeLike, NodeLike]],
                  *, metric: Metric | None = None, batch_size: int = 32,
                  chunk: int | None = None, progress: bool = False,
                  reference: bool = False) -> pd.DataFrame:
    """The effect of each circuit-graph edge ``u → v`` alone: ``u``'s corrupt change reaches
    ``v``'s input only (into every input of a head), ``v``'s change then flows freely; score =
    mean over prompts of ``m(patched) - m(clean)``. A ``logits@final`` receiver measures ``u``'s
    direct effect.

    Returns:
        One row per edge: ``method``, ``src``, ``dst``, ``score``, ``n``.
    """
    pairs_ = [(as_node(u, model), as_node(v, model)) for u, v in edges]

    def make(batch: TokenBatch, labels: Tensor) -> list[Job]:
        jobs = []
        for u, v in pairs_:
            rcv = None if v.kind == "logits" else [place_node(model, batch, v, labels)]
            if v.kind == "logits" and v.role != "final":
                raise ValueError(f"{v.id}: the logits are read at the final token only")
            jobs.append(Job([place_node(model, batch, u, labels)], rcv))
        return jobs

    m, clean, _ = _run_sets(model, pairs, make, reference=reference, batch_size=batch_size,
                            chunk=chunk, progress=progress, desc="edge patching",
                            metric=metric)
    score = (m - clean[None]).mean(1)
    return pd.DataFrame({"method": "edge_patching", "src": [u.id for u, _ in pairs_],
                         "dst": [v.id for _, v in pairs_], "score": score.double().numpy(),
                         "n": m.shape[1]})


def feeds(u: Node, v: Node, parallel: bool) -> bool:
    """Whether graph node ``v`` reads what ``u`` writes (the rule of :mod:`factfind.graph`)."""
    if stage(u.kind, u.layer, parallel) >= stage(v.kind, v.layer, parallel):
        return False
    if v.kind in ("attn", "head"):
        return True
    return u.role == v.role or "all" in (u.role, v.role)


def provenance(model: Model, pairs: Any, method: str, config: dict[str, Any]) -> Provenance:
    """The :class:`~factfind.graph.Provenance` of a graph measured on ``model`` and ``pairs``."""
    return Provenance(model=model.name, revision=model.revision, dataset=pairs.fingerprint(),
                      method=method, config=config)


def path_patching_circuit(model: Model, pairs: FactPairs, *, threshold: float = 0.05,
                          nodes: Sequence[NodeLike] | None = None, neurons: bool = False,
                          metric: Metric | None = None, batch_size: int = 32,
                          max_receivers: int = 64, progress: bool = False) -> CircuitGraph:
    """Grow a circuit backwards from the logits by edge patching (Wang et al. 2022's manual
    procedure, automated): score every edge into the logits, keep those whose ``|score|`` is at
    least ``threshold`` times the clean-corrupt metric gap, then score every edge into each kept
    node, and so on until only embeddings are left.

    Args:
        threshold: keep edges with ``|score| >= threshold * |mean(clean - corrupt)|``.
        nodes: candidate inner nodes (default :func:`all_nodes` at the given granularity).
        max_receivers: stop after this many receivers were expanded (a guard on cost).

    Returns:
        A :class:`~factfind.graph.CircuitGraph` of the kept edges (``method="path_patching"``)
        whose scores are the edge effects.
    """
    pb = encode_pairs(model, pairs)
    parallel = is_parallel(model)
    universe = [as_node(n, model) for n in nodes] if nodes is not None else all_nodes(
        model, pb.clean, neurons=neurons)
    embeds = [Node("embed", -1, None, r) for r in roles_present(pb.clean)]
    metric_ = metric or logit_diff
    gap = float((metric_(model.run(pb.clean).logits, pb.correct, pb.wrong)
                 - metric_(model.run(pb.corrupt).logits, pb.correct, pb.wrong)).mean())
    cut = threshold * abs(gap)
    frontier = [Node("logits", model.n_layers, None, "final")]
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    while frontier and len(seen) < max_receivers:  # one wave of receivers per call
        wave, frontier = frontier[:max_receivers - len(seen)], frontier[max_receivers:]
        seen |= {v.id for v in wave}
        edges = [(u, v) for v in wave for u in embeds + universe if feeds(u, v, parallel)]
        if not edges:
            continue
        df = edge_patching(model, pairs, edges, metric=metric, batch_size=batch_size,
                           progress=progress)
        for src, dst, score in zip(df["src"], df["dst"], df["score"], strict=True):
            if abs(score) >= cut:
                kept.append({"src": src, "dst": dst, "score": score})
                u = Node.parse(str(src), n_layers=model.n_layers)
                if u.kind != "embed" and u.id not in seen and u not in frontier:
                    frontier.append(u)
    if frontier:
        log.warning("path_patching_circuit stopped after %d receivers with %d left",
                    len(seen), len(frontier))
    prov = provenance(model, pairs, "path_patching",
                      {"threshold": threshold, "neurons": neurons, "n": len(pairs)})
    frame = pd.DataFrame(kept, columns=["src", "dst", "score"])
    graph = CircuitGraph.from_edge_scores(frame, prov, n_layers=model.n_layers)
    return graph


__all__ = [
    "Job", "Metric", "Placed", "all_nodes", "attend", "edge_patching", "feeds", "node_mask",
    "path_patching", "path_patching_circuit", "path_patching_reference", "path_patching_sweep",
    "place_node", "place_site", "provenance", "role_labels", "roles_present",
]
