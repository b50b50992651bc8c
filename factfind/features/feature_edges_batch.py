"""The pieces of a counterfactual feature graph that every path shares: nodes, writes, reads.

:func:`~factfind.features.feature_edges.feature_edges` (the fast path and its literal
reference, :mod:`.feature_edges_reference`) and
:func:`~factfind.features.feature_edge_heads.split_edge_heads` work on the same things:

* the graph's **nodes** (:class:`Unit`, checked against the dictionaries by :func:`node_units`;
  :func:`edge_graph` adds an embedding node per role as senders and the logits as a receiver);
* one batch's **writes** (:func:`endpoint_writes`): what each sender writes into the stream in
  the corrupt run minus the clean run, at the roles' positions - a feature ``da W_dec[f]``, an
  error node its error vector (the MLP's output minus the features' write: a skip path is
  part of it), an embedding node the input embeddings;
* the **reads** of each receiver at one integration point (:func:`receiver_cotangents`): the
  metric's gradient through the receiver, as a cotangent on its layer's MLP input - a feature
  ``dM/da_f 1[a_f > 0] W_enc[:, f]``, an error node ``(J_mlp - J_features)^T dM/dmlp_out``
  (:func:`error_cotangent`);
* EAP-IG's **points** on the input embeddings (:func:`ig_points`), the live model's run at
  each (:func:`point_run`) and, for the fast path and the head split, that run rebuilt with the
  transcoded MLPs frozen (:func:`frozen_at_point`), and the dot products of leaf gradients with
  the writes (:func:`add_dots`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from factfind.data.batch import PairBatch
from factfind.errors import ArgumentError, NotFoundError
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.features.feature_edges_model import MlpFrozenStream, mlp_frozen_stream, stream_sites
from factfind.graph.node import Node
from factfind.model.architectures import _get
from factfind.types import Component, Metric, Role

if TYPE_CHECKING:
    from factfind.model import Model


# ----------------------------------------------------------------------------- the nodes


@dataclass(frozen=True)
class Unit:
    """A node of the graph: ``kind`` embed / feature / error / logits; ``layer`` -1 for the
    embeddings (they write ``x_0``), the model's depth for the logits."""

    id: str
    kind: str
    layer: int
    role: Role
    dictionary: str | None = None
    feature: int | None = None


def node_units(model: Model, ds: Dictionaries, nodes: Any) -> list[Unit]:
    """The feature and error nodes named by ``nodes`` (a frame with a ``node`` column, or ids),
    checked against the dictionaries: a typed one-line error names the first bad id."""
    if isinstance(nodes, pd.DataFrame):
        if "node" not in nodes.columns:
            raise ArgumentError("nodes must be node ids or a feature-attribution frame with a "
                                "'node' column (ff.feature_atp); got columns "
                                f"{', '.join(map(str, nodes.columns))}")
        ids = [str(x) for x in nodes["node"]]
    elif isinstance(nodes, str):
        ids = [nodes]
    else:
        ids = [str(x) for x in nodes]
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ArgumentError("nodes is empty: pass the feature and error nodes to connect (e.g. "
                            "feature_atp(...).nlargest(100, 'score'))")
    out = []
    for i in ids:
        try:
            n = Node.parse(i, n_layers=model.n_layers)
        except ArgumentError as err:
            raise NotFoundError(f"node {i!r} names no feature or error node: {err}") from None
        if n.kind not in ("feature", "error"):
            raise NotFoundError(f"node {i!r} is a {n.kind} node; feature_edges connects feature "
                                "and error nodes (ids like 'L5.tc.f1234@final', "
                                "'L5.tc.err@final'; embeddings and logits are added)")
        name = f"L{n.layer}.{n.dictionary}"
        if name not in ds:
            raise NotFoundError(f"node {i!r} names dictionary {name}, which is not among the "
                                f"dictionaries given ({', '.join(ds)})")
        d = ds[name]
        if d.kind is DictKind.SAE:
            raise ArgumentError(f"node {i!r}: {name} is an SAE; feature_edges needs transcoders "
                                "(the MLPs they replace become the graph's nodes)")
        if n.kind == "feature" and not 0 <= int(n.index or 0) < d.d_sae:
            raise NotFoundError(f"node {i!r} names feature {n.index} of {name}, which has "
                                f"{d.d_sae}")
        if n.role == "all":
            raise ArgumentError(f"node {i!r} sits at every position; feature_edges needs nodes "
                                "at position roles")
        out.append(Unit(i, n.kind, n.layer, Role(n.role), name,
                         None if n.kind == "error" else int(n.index or 0)))
    return out


@dataclass
class EdgeGraph:
    """The senders (embeddings, then the nodes) and receivers (the nodes, then the logits),
    their roles and the leaf each sender writes (``-1``: ``x_0``; ``l``: ``mlp_out[l]``)."""

    senders: list[Unit]
    receivers: list[Unit]
    roles: list[Role]
    frozen: set[int]  # every layer with a transcoder: its MLP is made of nodes


def edge_graph(model: Model, ds: Dictionaries, units: list[Unit], roles: Sequence[Role | str]
           ) -> EdgeGraph:
    embed_roles = [Role(r) for r in roles]
    all_roles = list(dict.fromkeys(embed_roles + [u.role for u in units] + [Role.FINAL]))
    units = sorted(units, key=lambda u: (u.layer, u.dictionary or "", u.feature is None,
                                         u.feature or 0, all_roles.index(u.role)))
    senders = [Unit(f"embed@{r}", "embed", -1, r) for r in embed_roles] + units
    receivers = [*units, Unit("logits@final", "logits", model.n_layers, Role.FINAL)]
    frozen = {d.layer for d in ds.values() if d.kind is not DictKind.SAE}
    return EdgeGraph(senders, receivers, all_roles, frozen)


# ----------------------------------------------------------------------------- the batch


@dataclass
class Writes:
    """One batch's sender writes at the roles' positions: per leaf (``-1`` or a layer) the
    senders writing there and their writes ``[S N d]`` at the ``N`` selected positions."""

    sel: Tensor          # [batch pos] bool: the positions of any role
    pos_b: Tensor        # [N] the prompt of each selected position
    masks: Tensor        # [role batch pos] float
    by_leaf: dict[int, tuple[list[int], Tensor]]
    emb: tuple[Tensor, Tensor]  # the clean and corrupt input embeddings (EAP-IG's ends)


def endpoint_writes(model: Model, ds: Dictionaries, g: EdgeGraph, pb: PairBatch, masks: Tensor
                    ) -> Writes:
    """``w_u(corrupt) - w_u(clean)`` for every sender, from one run of each side."""
    emb = (Component.EMBED, 0)
    sites = [emb, *stream_sites(model)]
    clean = model.run(pb.clean, save=sites).acts
    bad = model.run(pb.corrupt, save=sites).acts
    sel = masks.sum(0).gt(0)
    pos_b = sel.nonzero(as_tuple=True)[0]
    w = masks[:, sel]  # [role N]
    diffs: dict[str, Tensor] = {}  # per dictionary: [N d_sae] activation and [N d] error diffs
    errs: dict[str, Tensor] = {}
    for name in {u.dictionary for u in g.senders if u.dictionary}:
        d = ds[name]
        a, e = [], []
        for run in (clean, bad):
            x = run[(Component.MLP_IN, d.layer)][sel]
            y = run[(Component.MLP_OUT, d.layer)][sel]
            acts = d.encode(x)
            a.append(acts)
            e.append(y.to(d.W_dec.dtype) - d.decode(acts))
        diffs[name], errs[name] = a[1] - a[0], e[1] - e[0]
    x0 = (Component.RESID_PRE, 0)
    d_emb = (bad[x0] - clean[x0])[sel].float()
    by_leaf: dict[int, tuple[list[int], list[Tensor]]] = {}
    for s, u in enumerate(g.senders):
        wr = w[g.roles.index(u.role)][:, None].float()  # [N 1]
        if u.kind == "embed":
            vec = d_emb * wr
        else:
            assert u.dictionary is not None
            d = ds[u.dictionary]
            if u.kind == "error":
                vec = errs[u.dictionary].float() * wr
            else:
                assert u.feature is not None
                vec = (diffs[u.dictionary][:, u.feature, None].float() * wr
                       * d.W_dec[u.feature].float())
        leaf = u.layer if u.kind != "embed" else -1
        idx, vecs = by_leaf.setdefault(leaf, ([], []))
        idx.append(s)
        vecs.append(vec)
    return Writes(sel, pos_b, masks, {k: (i, torch.stack(v)) for k, (i, v) in
                                       by_leaf.items()}, (clean[emb], bad[emb]))


def receiver_cotangents(model: Model, ds: Dictionaries, g: EdgeGraph, rec: Sequence[int],
                        reads: Tensor, g_out: Tensor, masks: Tensor) -> Tensor:
    """``[T batch pos d]``: what receivers ``rec`` (all at one layer) read from the stream at
    its MLP input, weighted by the metric's gradient through them (module docstring)."""
    x = reads.detach()
    encoded: dict[str, Tensor] = {}  # per dictionary its activations [B P F] at this point
    errors: dict[str, Tensor] = {}
    out = []
    for u in (g.receivers[t] for t in rec):
        assert u.dictionary is not None
        d = ds[u.dictionary]
        if u.dictionary not in encoded:
            encoded[u.dictionary] = d.encode(x)
        acts = encoded[u.dictionary]
        m = masks[g.roles.index(u.role)][..., None].to(x.dtype)  # [B P 1]
        if u.kind == "feature":
            assert u.feature is not None
            coef = (g_out.to(d.W_dec.dtype) @ d.W_dec[u.feature]) * (acts[..., u.feature] != 0)
            out.append(m * coef[..., None].to(x.dtype) * d.W_enc[:, u.feature].to(x.dtype))
        else:
            if u.dictionary not in errors:
                errors[u.dictionary] = error_cotangent(model, d, x, g_out, acts)
            out.append(m * errors[u.dictionary])
    return torch.stack(out)


def error_cotangent(model: Model, d: Dictionary, x: Tensor, g_out: Tensor, acts: Tensor
                    ) -> Tensor:
    """``(J_mlp - J_features)^T g_out`` at MLP input ``x``: the gradient an error node's read
    passes back (the error is the MLP minus the features' write; a skip path is its own)."""
    blk = model._block_hf(d.layer)
    with torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True)
        y = _get(blk, model.spec.mlp)(xi)
        if model.spec.mlp_post_norm:
            y = _get(blk, model.spec.mlp_post_norm)(y)
        (j_mlp,) = torch.autograd.grad(y, xi, g_out.to(y.dtype))
    active = (acts != 0).to(d.W_dec.dtype)
    j_feat = ((g_out.to(d.W_dec.dtype) @ d.W_dec.T) * active) @ d.W_enc.T
    return (j_mlp - j_feat.to(j_mlp.dtype)).to(x.dtype)


def ig_points(emb_clean: Tensor, emb_bad: Tensor, steps: int) -> list[Tensor]:
    """EAP-IG's points on the input embeddings (EAP: the clean input)."""
    if steps == 0:
        return [emb_clean]
    return [emb_bad + k / steps * (emb_clean - emb_bad) for k in range(1, steps + 1)]


def point_run(model: Model, pb: PairBatch, point: Tensor, metric: Metric | None
              ) -> tuple[dict[Any, Tensor], dict[Any, Tensor], Tensor]:
    """The live model at one point: the stream's sites, the metric's gradients at every MLP
    output and the metric ``[batch]``."""
    store: dict[str, Tensor] = {}

    def fn(lg: Tensor) -> Tensor:
        m = pb.measure(lg, 1, metric, answers=metric is None)
        store["m"] = m.detach()
        return m.sum()

    run = model.run(pb.clean, save=stream_sites(model),
                    edits={(Component.EMBED, 0): lambda e: point.to(e.dtype)},
                    metric=fn, logits=pb.answer_ids() if metric is None else "final")
    return run.acts, run.grads, store["m"]


def frozen_at_point(model: Model, g: EdgeGraph, pb: PairBatch, point: Tensor,
                    metric: Metric | None) -> tuple[MlpFrozenStream, dict[Any, Tensor]]:
    """One point's live run (:func:`point_run`: the metric's gradients at the MLP outputs) and
    the same run rebuilt with ``g``'s transcoded MLPs frozen, checked against it."""
    acts, grads, m = point_run(model, pb, point, metric)
    return mlp_frozen_stream(model, acts, pb, g.frozen, metric, expect=m), grads


def add_dots(out: Tensor, rec: Sequence[int], G: Sequence[Tensor], layers: Sequence[int],
             wr: Writes) -> None:
    """Add ``w_u . G_v`` (per prompt) into ``out [T S batch]`` for receivers ``rec`` with leaf
    gradients ``G`` (``[T batch pos d]`` per leaf of ``layers``)."""
    B = out.shape[2]
    for Gl, leaf in zip(G, layers, strict=True):
        if leaf not in wr.by_leaf:
            continue
        idx, W = wr.by_leaf[leaf]
        e = torch.einsum("tnd,snd->tsn", Gl[:, wr.sel].double(), W.double())  # [T S N]
        per_b = torch.zeros(*e.shape[:2], B, dtype=torch.float64).index_add_(
            2, wr.pos_b.cpu(), e.cpu())
        out[torch.tensor(list(rec))[:, None], torch.tensor(idx)[None, :]] += per_b


def roles_present(masks: Tensor) -> Tensor:
    """``[role batch]`` bool: each role has a token in each prompt."""
    return masks.sum(-1).gt(0).cpu()
