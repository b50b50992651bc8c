"""Placement: circuit nodes and sites made concrete on a batch, and what they write.

Path patching, edge patching and circuit evaluation all need the same bookkeeping: which token
positions of a batch a node covers, in which order components run, and what a component adds
to the residual stream.

* **Roles.** Graph nodes (:class:`~factfind.graph.Node`) name positions by the *partition* of
  :func:`factfind.localize.tracing.token_roles`: ``prefix`` (everything before the template, e.g. a
  BOS token), ``subject_first``, ``subject`` (the subject's *inner* tokens), ``subject_last``,
  ``relation``, ``final``; every real token belongs to exactly one role
  (:func:`role_labels`, :func:`node_mask`). A :class:`~factfind.types.Site` keeps its usual
  meaning (``Role.SUBJECT`` = every subject token;
  :func:`factfind.localize.patching.position_mask`).
* **Placed units.** :func:`place_site` and :func:`place_node` turn either into a
  :class:`Placed`: a kind (embed, head, attn = every head of a layer, mlp, neuron, logits), a
  layer, a unit index and a ``[batch pos]`` mask.
* **Order.** ``u`` can feed ``v`` only if ``stage(u) < stage(v)``
  (:func:`~factfind.graph.stage`): embeddings first, then per layer attention before the MLP
  (the same stage in parallel blocks, :func:`is_parallel`), the logits last.
* **Writes.** By linearity of the residual stream a head writes ``z[head] @ W_O[head]``, an MLP
  ``neurons @ W_out`` and a neuron ``a_n * W_out[n]`` (:func:`writes`; biases cancel in every
  difference taken). In post-norm families (Gemma 2/3, OLMo 2) each write is also multiplied
  by its block's post-norm scale frozen at the run it comes from
  (:meth:`~factfind.model.Model.attn_write_scale`), so a whole layer's writes are exactly what
  it adds to the residual stream in that run. :func:`set_changes` is what a *set* of senders
  changes between two runs, overlapping senders counted once; with a post norm it is exact
  rather than a sum of per-unit writes (the layer's write with the senders' units at their
  source values and the others at base, minus the base write: the norm sees the mix).

Example::

    labels = role_labels(batch)                               # [batch pos] role indices
    p = place_node(model, batch, "L1.mlp@subject_last", labels)
    writes(model, model.run(batch, save=[p.key]).acts, p)     # [batch pos d_model]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, OutOfRangeError
from factfind.graph import Node, sort_nodes
from factfind.types import ROLE_NAMES, Component, Site, SiteKey

if TYPE_CHECKING:
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

NodeLike = Node | str




def node_mask(batch: TokenBatch, role: str, labels: Tensor | None = None) -> Tensor:
    """``[batch pos]`` bool: the positions a graph node's role names (``"all"``: every real
    token; ``"subject"``: the subject's inner tokens)."""
    labels = batch.role_labels() if labels is None else labels
    if role == "all":
        return labels >= 0
    if role not in ROLE_NAMES:
        raise ArgumentError(f"unknown node role {role!r}; choose from {ROLE_NAMES} or 'all'")
    return labels == ROLE_NAMES.index(role)




def all_nodes(model: Model, batch: TokenBatch, *, neurons: bool = False) -> list[Node]:
    """Every inner node at one granularity: each head and each MLP (or, with ``neurons``, each
    MLP neuron) of every layer at every role present in ``batch``. Embeddings and logits are
    the graph's endpoints and are not counted."""
    out = []
    for role in batch.roles_present():
        for layer in range(model.n_layers):
            out += [Node("head", layer, h, role) for h in range(model.n_heads)]
            if neurons:
                out += [Node("neuron", layer, n, role) for n in range(model.d_mlp)]
            else:
                out.append(Node("mlp", layer, None, role))
    return sort_nodes(out)


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
    :func:`factfind.localize.patching.position_mask`; ``None`` = every real token)."""
    c = site.component
    if site.position is None:
        mask = batch.attention_mask.bool().cpu()
    else:
        mask = batch.position_mask(site.position)
    if c is Component.EMBED:
        return Placed("embed", -1, None, mask)
    if c in (Component.Z, Component.HEAD_OUT, Component.ATTN_OUT):
        if site.head is not None and not 0 <= site.head < model.n_heads:
            raise OutOfRangeError(f"head {site.head} does not exist ({model.n_heads} heads)")
        kind = "attn" if site.head is None else "head"
        return Placed(kind, _layer(model, site.layer), site.head, mask)
    if c is Component.MLP_OUT or (c is Component.NEURONS and site.neuron is None):
        return Placed("mlp", _layer(model, site.layer), None, mask)
    if c is Component.NEURONS:
        if not 0 <= (site.neuron or 0) < model.d_mlp:
            raise OutOfRangeError(f"neuron {site.neuron} does not exist ({model.d_mlp} neurons)")
        return Placed("neuron", _layer(model, site.layer), site.neuron, mask)
    raise ArgumentError(f"path patching sends from and into embed, z/head_out/attn_out, mlp_out "
                     f"and neurons sites, not {c}")


def place_node(model: Model, batch: TokenBatch, node: NodeLike,
               labels: Tensor | None = None) -> Placed:
    """A graph node as a :class:`Placed` (positions by the role partition)."""
    n = as_node(node, model)
    if n.kind in ("resid",):
        raise ArgumentError(f"{n.id}: residual-stream nodes are not senders or receivers")
    mask = node_mask(batch, n.role, labels)
    layer = n.layer if n.kind in ("embed", "logits") else _layer(model, n.layer)
    return Placed(n.kind, layer, n.index, mask)


def _layer(model: Model, layer: int) -> int:
    if not 0 <= layer < model.n_layers:
        raise OutOfRangeError(f"layer {layer} does not exist ({model.n_layers} layers)")
    return layer


def is_parallel(model: Model) -> bool:
    return bool(getattr(model, "parallel", False)
                or getattr(model.hf.config, "use_parallel_residual", False))


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
        if model.spec.attn_post_norm is not None:
            out = out * model.attn_write_scale(p.layer, z)
    elif p.kind == "mlp":  # mlp_out = neurons @ W_out + b_out
        n = acts[(Component.NEURONS, p.layer)]
        out = n @ model.W_out(p.layer).to(n.dtype)
        if model.spec.mlp_post_norm is not None:
            out = out * model.mlp_write_scale(p.layer, n)
    elif p.kind == "neuron":
        full = acts[(Component.NEURONS, p.layer)]
        n = full[:, :, p.index]
        out = n[..., None] * model.W_out(p.layer)[p.index].to(n.dtype)
        if model.spec.mlp_post_norm is not None:
            out = out * model.mlp_write_scale(p.layer, full)
    else:
        raise ArgumentError(f"{p.kind} writes nothing into the residual stream")
    return out * p.mask.to(out.device)[..., None]


def unit_mask(model: Model, p: Placed) -> Tensor:
    """``p``'s mask over its site's activation: ``[batch pos head]`` for heads, ``[batch pos
    neuron]`` for MLPs and neurons (an MLP is all of its neurons), ``[batch pos]`` for
    embeddings."""
    if p.kind not in ("head", "attn", "mlp", "neuron"):
        return p.mask.clone()
    units = model.n_heads if p.kind in ("head", "attn") else model.d_mlp
    m = torch.zeros(*p.mask.shape, units, dtype=torch.bool)
    if p.kind in ("head", "neuron"):  # one unit
        m[..., p.index] = p.mask
    else:  # every unit of the layer
        m[:] = p.mask[..., None]
    return m


def set_changes(model: Model, src: dict[SiteKey, Tensor], base: dict[SiteKey, Tensor],
                placed: Sequence[Placed], cache: dict[Any, Tensor] | None = None
                ) -> list[tuple[str, int, Tensor]]:
    """What a *set* of senders changes in the residual stream, ``src`` minus ``base``, one
    ``(kind, layer, [batch pos d_model])`` per embed / attention layer / MLP layer; senders that
    overlap (a head and its whole layer, an MLP and one of its neurons) count once. ``cache``
    keeps per-head and per-layer changes between calls on the same two runs.

    In post-norm families a layer's write is not a sum over its heads or neurons: the post norm
    divides by the rms of the whole sublayer output. The change is then taken exactly, as the
    literal recipe makes it: the layer's write with the senders' units at their ``src`` values
    and every other unit at its ``base`` value, minus the base write (:func:`_mixed_change`)."""
    cache = {} if cache is None else cache
    masks: dict[SiteKey, Tensor] = {}
    for p in placed:
        m = unit_mask(model, p)
        masks[p.key] = masks[p.key] | m if p.key in masks else m
    out = []
    for (comp, layer), m in sorted(masks.items()):
        key = (comp, layer)
        if comp is Component.Z and model.spec.attn_post_norm is not None:
            out.append(("head", layer, _mixed_change(model, key, src[key], base[key], m, cache)))
            continue
        if comp is Component.NEURONS and model.spec.mlp_post_norm is not None:
            out.append(("mlp", layer, _mixed_change(model, key, src[key], base[key], m, cache)))
            continue
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


def _layer_write(model: Model, key: SiteKey, act: Tensor) -> Tensor:
    """A whole sublayer's write into the residual stream from its ``z [N head d_head]`` or
    ``neurons [N neuron]``, through the post norm at this activation's own scale: ``[N
    d_model]`` (no bias: post-norm families have none on these projections)."""
    comp, layer = key
    if comp is Component.Z:
        pre = torch.einsum("nhd,hdm->nm", act, model.W_O(layer).to(act.dtype))
        return pre * model.attn_write_scale(layer, act)
    return (act @ model.W_out(layer).to(act.dtype)) * model.mlp_write_scale(layer, act)


def _mixed_change(model: Model, key: SiteKey, src: Tensor, base: Tensor, m: Tensor,
                  cache: dict[Any, Tensor]) -> Tensor:
    """``[B P d_model]``: a post-norm sublayer's write with the units in ``m`` (``[B P head]``
    or ``[B P neuron]``) at their ``src`` values and the rest at ``base``, minus its base
    write; computed at the positions ``m`` touches only (zero elsewhere). Where ``m`` holds
    every unit of a position the mixed write is the source run's own, cached per layer."""
    m = m.to(src.device)
    rows = m.any(-1)  # [B P]
    out = torch.zeros(*rows.shape, model.d_model, dtype=src.dtype, device=src.device)
    if not bool(rows.any()):
        return out
    if ("base_write", key) not in cache:
        cache[("base_write", key)] = _layer_write(model, key, base.flatten(0, 1)).reshape(
            *rows.shape, model.d_model)
    base_w = cache[("base_write", key)]
    full = rows & m.all(-1)
    part = rows & ~full
    if bool(full.any()):
        if ("src_write", key) not in cache:
            cache[("src_write", key)] = _layer_write(model, key, src.flatten(0, 1)).reshape(
                *rows.shape, model.d_model)
        out[full] = cache[("src_write", key)][full] - base_w[full]
    if bool(part.any()):
        sel = m[part]  # [N unit]
        shape = (*sel.shape, *([1] * (src.dim() - 3)))
        mixed = torch.where(sel.reshape(shape), src[part], base[part])
        out[part] = _layer_write(model, key, mixed) - base_w[part]
    return out


__all__ = [
    "NodeLike", "Placed", "all_nodes", "as_node", "is_parallel", "node_mask", "place_node",
    "place_site", "set_changes", "unit_mask", "writes",
]
