"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

A circuit graph (:mod:`factfind.graph`) has an edge ``u → v`` wherever ``v`` reads what ``u``
writes into the residual stream. Edge patching measures an edge exactly: let only ``v``'s
reading of ``u`` see ``u``'s corrupt value (:func:`factfind.pathpatch.edge_patching`); one pair of
forwards per edge. EAP approximates all edges at once to first order:

    score(u → v) = (a_u(corrupt) - a_u(clean)) · ∂m/∂x_v

where ``a_u`` is what ``u`` writes at its positions and ``x_v`` is *v's own copy* of the residual
stream, so the gradient flows through ``v`` only (and then through everything downstream of
``v``). The residual stream is a sum, so every reader of layer ``l``'s stream sees the same
``x``; this module separates the readers with detaching edits instead of new adapter hooks.
For a layer ``l``, in a copy of the batch where every head's ``z`` but one head at one query
role is detached (values unchanged, gradients blocked), the gradient at the block's input minus
the gradient at its output is exactly the gradient through that head plus the gradient through
the layer's MLP; a copy with every head detached gives the MLP's share alone (in GPT-2-style
sequential blocks the MLP reads the stream *after* the heads, and the difference still works:
``g_pre - g_post = g_post J_mlp + g_mid J_head``). One backward pass over all copies stacked
gives every receiver's gradient; dot products with the activation differences give every edge.

Nodes are heads and MLPs (or, with ``neurons=True``, single MLP neurons) at position roles, plus
``embed@<role>`` and ``logits@final``. Roles partition the tokens (see
:mod:`factfind.pathpatch`): MLPs and neurons read their own role only, heads read every role
(as key/value) and their own (as query), the logits read the final token.

**EAP-IG** replaces the gradient at the clean input by its average along the straight line
between the corrupt and clean *input embeddings*, ``m`` points ``x_corrupt + k/m (x_clean -
x_corrupt)`` for ``k = 0..m-1`` (Hanna et al. 2024's left Riemann sum), which is more faithful
when the model saturates. On a model that is linear in its inputs EAP is exact: the tests check
EAP against :func:`~factfind.pathpatch.edge_patching` to 1e-5 there.

Example::

    df = eap_ig(model, pairs, steps=5)
    graph = to_graph(df, model, pairs)
    circuit = prune(graph, top_n=30)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.ablation import TOKEN_ROLES
from factfind.graph import CircuitGraph
from factfind.metrics import logit_diff
from factfind.patching import PairBatch, encode_pairs, repeat, take
from factfind.pathpatch import Metric, is_parallel, provenance, role_labels, roles_present
from factfind.types import Component

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receiver:
    """One copy of the batch: the reader whose input gradient it isolates."""

    kind: str  # "mlp" (the whole MLP, every role), "neuron" (every role), "head" (one role)
    layer: int
    index: int | None = None
    role: int | None = None  # index into TOKEN_ROLES, for heads


def _receivers(model: Model, roles: Sequence[int], neurons: bool) -> list[Receiver]:
    out = []
    for layer in range(model.n_layers):
        out.append(Receiver("mlp", layer))
        out += [Receiver("head", layer, h, r) for h in range(model.n_heads) for r in roles]
        if neurons:
            out += [Receiver("neuron", layer, n) for n in range(model.d_mlp)]
    return out


def _grad_edits(model: Model, recv: Sequence[Receiver], labels: Tensor, B: int,
                embed: Tensor | None) -> dict[Any, Any]:
    """Edits that detach, per copy, every reader of its layer but the live one."""
    P, H = labels.shape[1], model.n_heads
    edits: dict[Any, Any] = {}
    for layer in range(model.n_layers):
        live_z = torch.ones(len(recv), B, P, H, dtype=torch.bool)
        live_n = torch.ones(len(recv), B, P, model.d_mlp, dtype=torch.bool)
        touched_n = False
        for c, r in enumerate(recv):
            if r.layer != layer:
                continue
            live_z[c] = False
            if r.kind == "head":
                live_z[c, :, :, r.index] = labels == r.role
            elif r.kind == "neuron":
                live_n[c] = False
                live_n[c, :, :, r.index] = True
                touched_n = True
        edits[(Component.Z, layer)] = _detach_where(live_z.flatten(0, 1))
        if touched_n:
            edits[(Component.NEURONS, layer)] = _detach_where(live_n.flatten(0, 1))
    if embed is not None:
        edits[(Component.EMBED, 0)] = (lambda e: embed.repeat(len(recv), 1, 1).to(e.dtype))
    return edits


def _detach_where(live: Tensor):
    def edit(act: Tensor) -> Tensor:
        m = live.to(act.device).reshape(*live.shape, *([1] * (act.dim() - live.dim())))
        return torch.where(m, act, act.detach())
    return edit


def _input_grads(model: Model, pb: PairBatch, recv: Sequence[Receiver], labels: Tensor,
                 metric: Metric, embed: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradient of the summed metric w.r.t. each receiver's own input ``[copy batch pos d]``
    and w.r.t. the logits' input ``[batch pos d]``."""
    B, L = len(pb.correct), model.n_layers
    save = [(c, layer) for layer in range(L) for c in (Component.RESID_PRE, Component.RESID_POST)]
    C = len(recv)

    def total(logits: Tensor) -> Tensor:
        return metric(logits, pb.correct.repeat(C), pb.wrong.repeat(C)).sum()

    run = model.run(repeat(pb.clean, C), save=save, metric=total,
                    edits=_grad_edits(model, recv, labels, B, embed))
    g = {k: v.reshape(C, B, *v.shape[1:]) for k, v in run.grads.items()}
    through = torch.stack([g[(Component.RESID_PRE, r.layer)][c] - g[(Component.RESID_POST,
                                                                     r.layer)][c]
                           for c, r in enumerate(recv)])
    mlp_of = {r.layer: c for c, r in enumerate(recv) if r.kind == "mlp"}
    for c, r in enumerate(recv):
        if r.kind == "head":  # the head's copy also carries its layer's MLP; take it away
            through[c] = through[c] - through[mlp_of[r.layer]]
    return through, g[(Component.RESID_POST, L - 1)][0]


def _node(kind: str, layer: int, index: int | None, role: int) -> str:
    r = TOKEN_ROLES[role]
    if kind == "embed":
        return f"embed@{r}"
    if kind == "logits":
        return f"logits@{r}"
    unit = {"head": f"h{index}", "neuron": f"n{index}"}.get(kind, kind)
    return f"L{layer}.{unit}@{r}"


def edge_attribution(
    model: Model, pairs: FactPairs, *, steps: int = 0, neurons: bool = False,
    metric: Metric | None = None, batch_size: int = 8, copies: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """EAP (``steps=0``) or EAP-IG (``steps=m``) scores of every edge of the graph.

    Args:
        model: the model.
        pairs: clean/corrupt pairs.
        steps: 0 for EAP (gradients at the clean input), ``m >= 1`` for EAP-IG.
        neurons: nodes are single MLP neurons instead of whole MLPs.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default logit difference).
        batch_size: prompts per forward; copies: receiver copies stacked per forward.

    Returns:
        One row per edge: ``method``, ``src``, ``dst`` (node ids), ``score`` (mean over prompts
        of ``(a_u(corrupt) - a_u(clean)) · ∂m/∂x_v``, in metric units), ``n`` (prompts).
        Feed it to :func:`to_graph`.

    Example::

        df = edge_attribution(model, pairs, steps=5)      # EAP-IG
        df.sort_values("score", key=abs).tail()
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    pb_all = encode_pairs(model, pairs)
    roles = [TOKEN_ROLES.index(r) for r in roles_present(pb_all.clean)]
    labels_all = role_labels(pb_all.clean)
    ctx = _Context(model, metric or logit_diff, roles, _feasible(labels_all, roles),
                   _receivers(model, roles, neurons), neurons, steps, copies)
    n = len(pairs)
    bar = tqdm(total=n, disable=not progress, desc="eap-ig" if steps else "eap", unit="prompt")
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        pb = PairBatch(take(pb_all.clean, idx), take(pb_all.corrupt, idx), pb_all.correct[idx],
                       pb_all.wrong[idx])
        ctx.add_chunk(pb, labels_all[idx])
        bar.update(idx.stop - idx.start)
    bar.close()
    method = f"eap-ig/{steps}" if steps else "eap"
    present = {TOKEN_ROLES[r] for r in roles}
    rows = [{"method": method, "src": s, "dst": d, "score": v / n, "n": n}
            for (s, d), v in ctx.sums.items() if s.split("@")[1] in present]
    return pd.DataFrame(rows, columns=["method", "src", "dst", "score", "n"])


@dataclass
class _Context:
    """What one EAP run shares across prompt chunks, and its running sums of edge scores."""

    model: Model
    metric: Metric
    roles: list[int]
    feasible: Tensor
    recv: list[Receiver]
    neurons: bool
    steps: int
    copies: int

    def __post_init__(self) -> None:
        self.sums: dict[tuple[str, str], float] = {}
        self.parallel = is_parallel(self.model)

    def add(self, src: Sequence[str], dst: str, values: Tensor) -> None:
        for s, v in zip(src, values.tolist(), strict=True):
            self.sums[(s, dst)] = self.sums.get((s, dst), 0.0) + v

    def add_chunk(self, pb: PairBatch, labels: Tensor) -> None:
        model, L = self.model, self.model.n_layers
        self.onehot = torch.stack([labels == r for r in range(len(TOKEN_ROLES))], -1).double()
        mlp = Component.NEURONS if self.neurons else Component.MLP_OUT
        keys = [(Component.EMBED, 0)] + [(c, layer) for layer in range(L)
                                         for c in (Component.Z, mlp)]
        clean = model.run(pb.clean, save=keys).acts
        bad = model.run(pb.corrupt, save=keys).acts
        emb = (Component.EMBED, 0)
        self.d_embed = (bad[emb] - clean[emb]).double()  # [B P d_model]
        self.d_head = [torch.einsum("bphd,hdm->bphm", (bad[(Component.Z, layer)]  # [B P H d]
                                                        - clean[(Component.Z, layer)]).double(),
                                    model.W_O(layer).double()) for layer in range(L)]
        self.d_mlp = [(bad[(mlp, layer)] - clean[(mlp, layer)]).double() for layer in range(L)]
        points: list[Tensor | None] = [None] if self.steps == 0 else [
            bad[emb] + k / self.steps * (clean[emb] - bad[emb]) for k in range(self.steps)]
        g_all = torch.zeros(len(self.recv), *self.d_embed.shape, dtype=torch.float64)
        g_logits = torch.zeros_like(self.d_embed)
        for point in points:
            for c0 in range(0, len(self.recv), self.copies):
                part = self.recv[c0:c0 + self.copies]
                through, g_out = _input_grads(model, pb, _with_mlps(part), labels, self.metric,
                                              point)
                g_all[c0:c0 + len(part)] += through[:len(part)].double() / len(points)
            g_logits += g_out.double() / len(points)
        for c, r in enumerate(self.recv):
            if r.kind == "head":
                assert r.role is not None
                dst = _node("head", r.layer, r.index, r.role)
                for ids, v in self.senders((r.layer, 1), g_all[c], None):
                    keep = [i for i, s in enumerate(ids) if self.feasible[_role_of(s), r.role]]
                    self.add([ids[i] for i in keep], dst, v[keep])
            elif r.kind == "neuron" or not self.neurons:  # neuron mode: MLP copies only subtract
                for role in self.roles:
                    dst = _node(r.kind, r.layer, r.index, role)
                    for ids, v in self.senders((r.layer, 2 - self.parallel), g_all[c], role):
                        self.add(ids, dst, v)
        final = TOKEN_ROLES.index("final")
        for ids, v in self.senders((L, 3), g_logits, final):
            self.add(ids, _node("logits", L, None, final), v)

    def per_role(self, x: Tensor) -> Tensor:
        """``[B P ...] -> [R ...]``: summed over the batch and each role's positions."""
        return torch.einsum("bpr,bp...->r...", self.onehot, x)

    def senders(self, before: tuple[int, int], G: Tensor, role: int | None
                ) -> list[tuple[list[str], Tensor]]:
        """(ids, summed scores ``a_u · G``) of every sender upstream of stage ``before``; with a
        ``role``, only senders at that role (readers of one position)."""
        R, H, model = len(TOKEN_ROLES), self.model.n_heads, self.model
        out = [([_node("embed", -1, None, r) for r in range(R)],
                self.per_role((self.d_embed * G).sum(-1)))]
        for layer in range(model.n_layers):
            if (layer, 1) < before:
                s = self.per_role(torch.einsum("bphm,bpm->bph", self.d_head[layer], G))
                out.append(([_node("head", layer, h, r) for r in range(R) for h in range(H)],
                            s.flatten()))
            if (layer, 2 - self.parallel) < before:
                if self.neurons:
                    gw = G @ model.W_out(layer).double().T  # [B P neuron]
                    s = self.per_role(self.d_mlp[layer] * gw)
                    out.append(([_node("neuron", layer, k, r) for r in range(R)
                                 for k in range(model.d_mlp)], s.flatten()))
                else:
                    s = self.per_role((self.d_mlp[layer] * G).sum(-1))
                    out.append(([_node("mlp", layer, None, r) for r in range(R)], s))
        if role is None:
            return out
        return [([i for i in ids if i.endswith("@" + TOKEN_ROLES[role])],
                 v.reshape(R, -1)[role]) for ids, v in out]


def _with_mlps(chunk: Sequence[Receiver]) -> list[Receiver]:
    """The chunk plus the MLP copy of every layer whose heads it holds (needed to subtract)."""
    out = list(chunk)
    for layer in sorted({r.layer for r in chunk if r.kind == "head"}):
        if Receiver("mlp", layer) not in out:
            out.append(Receiver("mlp", layer))
    return out


def _role_of(node_id: str) -> int:
    return TOKEN_ROLES.index(node_id.split("@")[1])


def _feasible(labels: Tensor, roles: Sequence[int]) -> Tensor:
    """``[R R]`` bool: a token of role ``a`` precedes or is a token of role ``b`` in some
    prompt (a head at ``b`` can read ``a`` causally)."""
    R = len(TOKEN_ROLES)
    out = torch.zeros(R, R, dtype=torch.bool)
    pos = torch.arange(labels.shape[1])
    for a in roles:
        first = torch.where(labels == a, pos, labels.shape[1]).min(-1).values
        for b in roles:
            last = torch.where(labels == b, pos, -1).max(-1).values
            out[a, b] = bool(((first <= last) & (last >= 0)).any())
    return out


def eap(model: Model, pairs: FactPairs, **kwargs: Any) -> pd.DataFrame:
    """Edge attribution patching (Syed et al. 2023): :func:`edge_attribution` with
    ``steps=0``."""
    return edge_attribution(model, pairs, steps=0, **kwargs)


def eap_ig(model: Model, pairs: FactPairs, *, steps: int = 5, **kwargs: Any) -> pd.DataFrame:
    """EAP with integrated gradients over ``steps`` points (Hanna et al. 2024)."""
    if steps < 1:
        raise ValueError(f"EAP-IG needs steps >= 1, got {steps}")
    return edge_attribution(model, pairs, steps=steps, **kwargs)


def to_graph(scores: pd.DataFrame, model: Model, pairs: FactPairs, *,
             config: dict[str, Any] | None = None) -> CircuitGraph:
    """The complete scored :class:`~factfind.graph.CircuitGraph` of an EAP frame, with the
    model's and the pairs' provenance; prune it with :func:`factfind.graph.prune`."""
    method = str(scores["method"].iloc[0]) if len(scores) else "eap"
    prov = provenance(model, pairs, method, {"n": len(pairs), **(config or {})})
    frame = pd.DataFrame({c: scores[c] for c in ("src", "dst", "score")})
    return CircuitGraph.from_edge_scores(frame, prov,
                                         n_layers=model.n_layers)


__all__ = ["eap", "eap_ig", "edge_attribution", "to_graph"]
