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
between the corrupt and clean *input embeddings*, at ``m`` points ``x_corrupt + k/m (x_clean -
x_corrupt)``, ``k = 1..m`` (the Riemann sum of Hanna et al. 2024's code; ``m = 1`` is EAP),
which is more faithful when the model saturates. On a model that is linear in its inputs EAP is
exact: the tests check EAP against :func:`~factfind.pathpatch.edge_patching` to 1e-5 there.

Cost: one forward and backward pass per receiver copy - ``layers x (1 + heads x roles)``, plus
``layers x d_mlp`` with neurons - stacked as batch rows (``copies`` per pass), times ``m`` for
EAP-IG; exact edge patching needs a pair of stacked passes per edge. On the organism (3,489
edges) EAP is ~30x faster than patching every edge, EAP-IG(5) ~6x.

Example::

    df = eap_ig(model, pairs, steps=5)
    graph = to_graph(df, model, pairs)
    circuit = prune(graph, top_n=30)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
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
    from factfind.model import Model, Remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Receiver:
    """One copy of the batch: the reader whose input gradient it isolates."""

    kind: str  # "mlp"/"neuron" (every role), "head" (one query role), "logits"
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


def edge_attribution(
    model: Model, pairs: FactPairs, *, steps: int = 0, neurons: bool = False,
    metric: Metric | None = None, batch_size: int = 8, copies: int = 64,
    progress: bool = False, remote: Remote = None,
) -> pd.DataFrame:
    """EAP (``steps=0``) or EAP-IG (``steps=m``) scores of every edge of the graph.

    Args:
        model: the model.
        pairs: clean/corrupt pairs.
        steps: 0 for EAP (gradients at the clean input), ``m >= 1`` for EAP-IG.
        neurons: nodes are single MLP neurons instead of whole MLPs.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default logit difference).
        batch_size: prompts per forward; copies: receiver copies stacked per forward.
        remote: every forward and backward as one nnsight session, ``"local"`` or on NDIF
            (``True``); see :meth:`~factfind.model.Model.session`.

    Returns:
        One row per edge: ``method``, ``src``, ``dst`` (node ids), ``score`` (mean over prompts
        of ``(a_u(corrupt) - a_u(clean)) · ∂m/∂x_v``, in metric units), ``n`` (prompts).
        Feed it to :func:`to_graph`.

    Post-norm families (Gemma 2/3, OLMo 2): a head's ``a_u`` is its write after the post norm,
    each run at its own frozen scale (:meth:`~factfind.model.Model.head_out`), so a layer's
    heads sum to its ``attn_out`` change; single-neuron senders are refused there (a neuron's
    post-norm write depends on its whole layer's scale, which this streaming form does not
    carry).

    Example::

        df = edge_attribution(model, pairs, steps=5)      # EAP-IG
        df.sort_values("score", key=abs).tail()
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if neurons and model.spec.mlp_post_norm is not None:
        raise ValueError(f"neurons=True: {model.spec.name} normalises MLP outputs after the "
                         "down projection, so single-neuron edges are not exact; use "
                         "neurons=False (whole MLPs)")
    pb_all = encode_pairs(model, pairs)
    roles = [TOKEN_ROLES.index(r) for r in roles_present(pb_all.clean)]
    labels_all = role_labels(pb_all.clean)
    n = len(pairs)
    bar = tqdm(total=n, disable=not progress, desc="eap-ig" if steps else "eap", unit="prompt")
    sums = model.session(_eap_sweep, model, pb_all, labels_all, roles, steps=steps,
                         neurons=neurons, metric=metric or logit_diff, batch_size=batch_size,
                         copies=copies, progress=bar.update, remote=remote)
    bar.close()
    acc = _Scores(model, roles, neurons)
    acc.head, acc.mlp, acc.logits = sums
    method = f"eap-ig/{steps}" if steps else "eap"
    return _edge_frame(acc, method, n, _feasible(labels_all, roles))


def _eap_sweep(model: Model, pb_all: PairBatch, labels_all: Tensor, roles: list[int], *,
               steps: int, neurons: bool, metric: Metric, batch_size: int, copies: int,
               progress: Callable[[int], Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The model-side half of :func:`edge_attribution` (one nnsight session, torch only): the
    summed edge scores of heads, MLPs (or neurons) and logits."""
    acc = _Scores(model, roles, neurons)
    recv = _receivers(model, roles, neurons)
    n = pb_all.correct.shape[0]
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        pb = PairBatch(take(pb_all.clean, idx), take(pb_all.corrupt, idx), pb_all.correct[idx],
                       pb_all.wrong[idx])
        labels = labels_all[idx]
        deltas, emb = acc.deltas(pb)
        points: list[Tensor | None] = [None] if steps == 0 else [
            emb[1] + k / steps * (emb[0] - emb[1]) for k in range(1, steps + 1)]
        onehot = torch.stack([labels == r for r in range(len(TOKEN_ROLES))], -1).double()
        for point in points:
            for c0 in range(0, len(recv), copies):
                part = recv[c0:c0 + copies]
                through, g_out = _input_grads(model, pb, _with_mlps(part), labels, metric, point)
                acc.add(part, through[:len(part)], deltas, onehot, 1 / len(points))
            acc.add([Receiver("logits", model.n_layers)], g_out[None], deltas, onehot,
                    1 / len(points))
        if progress is not None:
            progress(idx.stop - idx.start)
    return acc.head, acc.mlp, acc.logits


class _Scores:
    """Edge scores summed over prompts, as tensors.

    Senders are (role, unit): units are the embedding, then per layer its heads and its MLP
    (or its neurons), in forward order, so the senders upstream of a receiver are a prefix of
    the units. Receivers: heads ``[layer head role_dst role_src unit]``, MLPs or neurons
    ``[layer (neuron) role unit]`` (their senders share their role), the logits ``[unit]``.
    """

    def __init__(self, model: Model, roles: Sequence[int], neurons: bool) -> None:
        self.model, self.roles, self.neurons = model, list(roles), neurons
        self.parallel = is_parallel(model)
        L, H, R, N = model.n_layers, model.n_heads, len(TOKEN_ROLES), model.d_mlp
        self.units = ["embed"]
        self.prefix_head, self.prefix_mlp = [], []  # units upstream of layer l's heads / MLP
        for layer in range(L):
            self.prefix_head.append(len(self.units))
            if self.parallel:
                self.prefix_mlp.append(len(self.units))
            self.units += [f"L{layer}.h{h}" for h in range(H)]
            if not self.parallel:
                self.prefix_mlp.append(len(self.units))
            self.units += [f"L{layer}.n{k}" for k in range(N)] if neurons else [f"L{layer}.mlp"]
        U = len(self.units)
        self.head = torch.zeros(L, H, R, R, U, dtype=torch.float64)
        self.mlp = torch.zeros(L, N if neurons else 1, R, U, dtype=torch.float64)
        self.logits = torch.zeros(U, dtype=torch.float64)

    def deltas(self, pb: PairBatch) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
        """Per unit block, what it writes in the corrupt run minus the clean run: embedding
        ``[B P 1 d]``, heads ``[B P H d]``, MLPs ``[B P 1 d]`` or neuron activations
        ``[B P N]``; and the (clean, corrupt) embeddings."""
        model, L = self.model, self.model.n_layers
        mlp = Component.NEURONS if self.neurons else Component.MLP_OUT
        emb = (Component.EMBED, 0)
        keys = [emb] + [(c, layer) for layer in range(L) for c in (Component.Z, mlp)]
        clean = model.run(pb.clean, save=keys).acts
        bad = model.run(pb.corrupt, save=keys).acts
        out = [(bad[emb] - clean[emb]).double()[:, :, None]]
        for layer in range(L):
            if model.spec.attn_post_norm is not None:  # each run's writes at its own scale
                out.append((model.head_out(layer, bad[(Component.Z, layer)])
                            - model.head_out(layer, clean[(Component.Z, layer)])).double())
            else:
                dz = (bad[(Component.Z, layer)] - clean[(Component.Z, layer)]).double()
                out.append(torch.einsum("bphd,hdm->bphm", dz, model.W_O(layer).double()))
            dm = (bad[(mlp, layer)] - clean[(mlp, layer)]).double()
            out.append(dm if self.neurons else dm[:, :, None])
        return out, (clean[emb], bad[emb])

    def add(self, recv: Sequence[Receiver], G: Tensor, deltas: list[Tensor], onehot: Tensor,
            weight: float) -> None:
        """Add ``weight * (delta_u · G_v)``, summed over each role's positions and the batch,
        for receivers ``recv`` with input gradients ``G [C B P d]``."""
        G = G.double()
        parts = [torch.einsum("bpud,cbpd->cbpu", deltas[0], G)]
        for layer in range(self.model.n_layers):
            parts.append(torch.einsum("bpud,cbpd->cbpu", deltas[1 + 2 * layer], G))
            d = deltas[2 + 2 * layer]
            if self.neurons:  # a_n * (W_out[n] · G): no [B P N d] tensor
                w = self.model.W_out(layer).double()
                parts.append(d[None] * torch.einsum("cbpd,nd->cbpn", G, w))
            else:
                parts.append(torch.einsum("bpud,cbpd->cbpu", d, G))
        T = torch.einsum("bpr,cbpu->cru", onehot, torch.cat(parts, -1)) * weight  # [C R U]
        for c, r in enumerate(recv):
            if r.kind == "head":
                assert r.role is not None and r.index is not None
                k = self.prefix_head[r.layer]
                self.head[r.layer, r.index, r.role, :, :k] += T[c, :, :k]
            elif r.kind == "logits":
                self.logits += T[c, TOKEN_ROLES.index("final")]
            elif r.kind == "neuron" or not self.neurons:
                k = self.prefix_mlp[r.layer]
                self.mlp[r.layer, r.index or 0, :, :k] += T[c, :, :k]


def _edge_frame(acc: _Scores, method: str, n: int, feasible: Tensor) -> pd.DataFrame:
    """The non-structural-zero edges of ``acc`` as rows (mean over the ``n`` prompts); a free
    function, so that the class a remote sweep ships carries no pandas."""
    model, names = acc.model, TOKEN_ROLES
    units = np.array(acc.units, dtype=object)
    src, dst, score = [], [], []

    def emit(dst_id: str, role_src: int, k: int, values: Tensor) -> None:
        src.append(units[:k] + "@" + names[role_src])
        dst.append(np.full(k, dst_id, dtype=object))
        score.append(values[:k].numpy() / n)

    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            for q in acc.roles:
                for r in acc.roles:
                    if feasible[r, q]:
                        emit(f"L{layer}.h{h}@{names[q]}", r, acc.prefix_head[layer],
                             acc.head[layer, h, q, r])
        for i in range(acc.mlp.shape[1]):
            unit = f"L{layer}.n{i}" if acc.neurons else f"L{layer}.mlp"
            for q in acc.roles:
                emit(f"{unit}@{names[q]}", q, acc.prefix_mlp[layer], acc.mlp[layer, i, q])
    final = names.index("final")
    emit("logits@final", final, len(acc.units), acc.logits)
    return pd.DataFrame({"method": method, "src": np.concatenate(src),
                         "dst": np.concatenate(dst), "score": np.concatenate(score), "n": n})


def _with_mlps(chunk: Sequence[Receiver]) -> list[Receiver]:
    """The chunk plus the MLP copy of every layer whose heads it holds (needed to subtract)."""
    out = list(chunk)
    for layer in sorted({r.layer for r in chunk if r.kind == "head"}):
        if Receiver("mlp", layer) not in out:
            out.append(Receiver("mlp", layer))
    return out


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
