"""Each cross-position edge of the counterfactual feature graph split over attention heads.

In :func:`~factfind.features.feature_edges.feature_edges` heads are not nodes, so an edge between
two positions crosses through attention. Each path from the sender's write to the receiver's read
that changes position takes exactly one *last* step onto the receiver's position, through one
head ``(layer, head)``; :func:`split_edge_heads` credits the path to that head (the rule of
:meth:`~factfind.features.linear_graph.LinearGraph.split_heads`, here with attention live).
Per receiver, :func:`~factfind.features.feature_edges_model.by_head` walks the layers down and
keeps, per layer and head, the cotangent the head sends to other positions; per sender,
:func:`~factfind.features.feature_edges_model.stream_tangents` pushes its write up the
MLP-frozen model (forward mode); a head's share is their dot product, and the shares plus the
same-position (``local``) part sum to the edge exactly. circuit-tracer cannot split its edges by
head (its issue #53).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, NotFoundError
from factfind.features.attribution import _checked, _role_masks
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.feature_edges_batch import (
    EdgeGraph,
    Writes,
    edge_graph,
    endpoint_writes,
    frozen_at_point,
    ig_points,
    node_units,
    receiver_cotangents,
    roles_present,
)
from factfind.features.feature_edges_model import by_head, stream_tangents
from factfind.types import Component, Metric, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

#: EAP-IG points when none are asked for (the fact-finding run's EAP-IG uses 5)
DEFAULT_STEPS = 5


@validated
def split_edge_heads(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    edges: pd.DataFrame | Iterable[tuple[str, str]],
    *,
    steps: int = DEFAULT_STEPS,
    metric: Metric | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Split edges of :func:`~factfind.features.feature_edges.feature_edges` over the attention
    heads that carry them.

    Each path from the sender's write to the receiver's read that changes position takes one
    *last* step onto the receiver's position, through one head ``(layer, head)``
    (:func:`~factfind.features.feature_edges_model.by_head`); the rest of the edge is ``local``
    (paths that never leave the receiver's position: only possible when the two share a role).
    Per edge, ``local + sum(share) = edge`` exactly.

    Args:
        edges: ``(sender, receiver)`` id pairs, or an edge frame (its ``sender`` and ``receiver``
            columns), e.g. ``feature_edges(...).nlargest(10, "score")``.
        steps, metric, batch_size: as for :func:`feature_edges` (use the same values).

    Returns:
        One row per edge and head with a non-zero share: ``sender``, ``receiver``, ``layer``,
        ``head``, ``share`` (mean over prompts), ``local``, ``edge`` (the edge's effect, equal to
        :func:`feature_edges`' over the same prompts) and ``n``.

    Cost, per point and batch: one run of the model and one rebuild of it with its MLPs frozen
    (shared by every edge), per receiver and position one per-head pull-back through each
    attention layer below it (a layer's backward, the heads batched), and per sender one
    forward-mode pass up the MLP-frozen model (about twice its forward; shared by the edges the
    sender sends). Gemma-3-270M, 10 edges over 16 pairs and 5 points: 72 s at 2 threads.
    """
    if isinstance(edges, pd.DataFrame):
        missing = [c for c in ("sender", "receiver") if c not in edges.columns]
        if missing:
            raise ArgumentError(f"edges needs columns sender, receiver; missing "
                                f"{', '.join(missing)}")
        pairs_ids = list(zip(edges["sender"].astype(str), edges["receiver"].astype(str),
                             strict=True))
    else:
        pairs_ids = [(str(a), str(b)) for a, b in edges]
    if not pairs_ids:
        raise ArgumentError("edges is empty: pass (sender, receiver) pairs to split")
    ds = _checked(dicts, model)
    ids = [i for e in pairs_ids for i in e if not i.startswith(("embed@", "logits@"))]
    embed_roles = [i.split("@", 1)[1] for e in pairs_ids for i in e if i.startswith("embed@")]
    g = edge_graph(model, ds, node_units(model, ds, ids) if ids else [],
               list(dict.fromkeys(embed_roles)) or [Role.FINAL])
    s_of = {u.id: i for i, u in enumerate(g.senders)}
    t_of = {u.id: i for i, u in enumerate(g.receivers)}
    for s, t in pairs_ids:
        if s not in s_of:
            raise NotFoundError(f"edge {s}->{t}: {s} is not a sender (a feature, error or "
                                "embedding node)")
        if t not in t_of:
            raise NotFoundError(f"edge {s}->{t}: {t} is not a receiver (a feature, error or "
                                "logits node)")
        if not g.senders[s_of[s]].layer < g.receivers[t_of[t]].layer:
            raise ArgumentError(f"edge {s}->{t}: the sender does not write before the "
                                "receiver reads")
    acc: dict[tuple[str, str, int, int], float] = {}
    local: dict[tuple[str, str], float] = {}
    cnt: dict[tuple[str, str], int] = {}
    batches = list(pair_batches(model, pairs, batch_size))
    bar = tqdm(total=sum(len(pb.correct) for _, pb in batches), desc="head split",
               unit="prompt", disable=not progress)
    for _, pb in batches:
        masks = _role_masks(pb.clean, g.roles, model.device)
        wr = endpoint_writes(model, ds, g, pb, masks)
        present = roles_present(masks)
        points = ig_points(*wr.emb, steps)
        for point in points:
            _split_point(model, ds, g, pb, wr, point, metric, pairs_ids, s_of, t_of,
                         acc, local, 1 / len(points))
        for s, t in pairs_ids:
            both = present[g.roles.index(g.senders[s_of[s]].role)] & \
                present[g.roles.index(g.receivers[t_of[t]].role)]
            cnt[(s, t)] = cnt.get((s, t), 0) + int(both.sum())
        bar.update(len(pb.correct))
    bar.close()
    rows = []
    for (s, t, layer, head), v in acc.items():
        n = cnt[(s, t)]
        if v != 0 and n:
            rows.append({"sender": s, "receiver": t, "layer": layer, "head": head,
                         "share": v / n, "local": local.get((s, t), 0.0) / n, "n": n})
    have = {(r["sender"], r["receiver"]) for r in rows}
    for s, t in dict.fromkeys(pairs_ids):  # an edge no head carries: its local part alone
        if (s, t) not in have and cnt[(s, t)]:
            rows.append({"sender": s, "receiver": t, "layer": pd.NA, "head": pd.NA,
                         "share": 0.0, "local": local.get((s, t), 0.0) / cnt[(s, t)],
                         "n": cnt[(s, t)]})
    df = pd.DataFrame(rows, columns=["sender", "receiver", "layer", "head", "share", "local",
                                     "n"])
    df["layer"], df["head"] = df["layer"].astype("Int64"), df["head"].astype("Int64")
    total = df.groupby(["sender", "receiver"])["share"].transform("sum")
    df["edge"] = total + df["local"]
    return df.sort_values(["sender", "receiver", "layer", "head"]).reset_index(drop=True)


def _split_point(model: Model, ds: Dictionaries, g: EdgeGraph, pb: PairBatch, wr: Writes,
                 point: Tensor, metric: Metric | None, pairs_ids: list[tuple[str, str]],
                 s_of: dict[str, int], t_of: dict[str, int],
                 acc: dict[tuple[str, str, int, int], float],
                 local: dict[tuple[str, str], float], weight: float) -> None:
    stream, grads = frozen_at_point(model, g, pb, point, metric)
    L = model.n_layers
    tangents: dict[str, tuple[Tensor, list[Tensor]]] = {}  # per sender: its write, what it does

    def moved(s_id: str) -> tuple[Tensor, list[Tensor]]:
        if s_id not in tangents:
            s = s_of[s_id]
            leaf = g.senders[s].layer if g.senders[s].kind != "embed" else -1
            idx, W = wr.by_leaf[leaf]
            w = torch.zeros_like(stream.x[0])  # the sender's write, [batch pos d]
            w[wr.sel] = W[idx.index(s)].to(w.dtype)
            tangents[s_id] = w, stream_tangents(stream, leaf, w)
        return tangents[s_id]

    for t_id in dict.fromkeys(t for _, t in pairs_ids):
        t = t_of[t_id]
        u = g.receivers[t]
        senders = [s for s, tt in pairs_ids if tt == t_id]
        if u.kind == "logits":
            (cot,) = torch.autograd.grad(stream.metric.sum(), stream.x[L], retain_graph=True)
            mask = torch.zeros(cot.shape[:2], dtype=torch.bool, device=cot.device)
            mask[:, -1] = True
        else:
            c = receiver_cotangents(model, ds, g, [t], stream.reads[u.layer],
                                     grads[(Component.MLP_OUT, u.layer)], wr.masks)[0]
            (cot,) = torch.autograd.grad(stream.reads[u.layer], stream.read_at[u.layer],
                                         c.to(stream.reads[u.layer].dtype), retain_graph=True)
            mask = wr.masks[g.roles.index(u.role)].bool()
        for query, on in _query_slots(mask):
            cq = cot * on[:, None, None]
            loc, cross = by_head(stream, u.layer, cq, query)
            leaf_layers = stream.leaf_layers(u.layer if u.layer < L else None)
            for s_id in senders:
                s = s_of[s_id]
                leaf = g.senders[s].layer if g.senders[s].kind != "embed" else -1
                w, dx = moved(s_id)  # the write, and what it does to each x_k
                j = leaf_layers.index(leaf)
                local[(s_id, t_id)] = local.get((s_id, t_id), 0.0) + weight * float(
                    (loc[j].double() * w.double()).sum())
                for layer, v in cross:
                    per_head = torch.einsum("hbpd,bpd->h", v.double(), dx[layer].double())
                    for h, val in enumerate(per_head.tolist()):
                        key = (s_id, t_id, layer, h)
                        acc[key] = acc.get(key, 0.0) + weight * val


def _query_slots(mask: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The receiver's positions one at a time: per slot ``j``, each row's ``j``-th position of
    the role (``query [batch]``) and whether the row has one (``on [batch]``)."""
    B, P = mask.shape
    pos = torch.arange(P, device=mask.device).expand(B, P)
    order = torch.where(mask, pos, P).sort(-1).values  # positions of the role first
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    return [(order[:, j].clamp(max=P - 1), (order[:, j] < P).to(torch.float32))
            for j in range(k)]




__all__ = ["split_edge_heads"]
