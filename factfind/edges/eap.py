"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

A circuit graph (:mod:`factfind.graph`) has an edge ``u → v`` wherever ``v`` reads what ``u``
writes into the residual stream. Edge patching measures an edge exactly: let only ``v``'s
reading of ``u`` see ``u``'s corrupt value (:func:`factfind.edges.path_patching.edge_patching`); one
pair of forwards per edge. EAP approximates all edges at once to first order:

    score(u → v) = (a_u(corrupt) - a_u(clean)) · ∂m/∂x_v

where ``a_u`` is what ``u`` writes at its positions and ``x_v`` is *v's own copy* of the residual
stream, so the gradient flows through ``v`` only (and then through everything downstream of
``v``). The residual stream is a sum, so every reader of layer ``l``'s stream sees the same
``x`` and one backward pass gives only the sum of their gradients. :mod:`factfind.edges.eap_grads`
separates them from that one pass: the gradient at each head's output ``z`` is pulled back
through that head alone (its attention recomputed from the saved block input, with whatever the
family adds - q/k norms, softcap, sliding window, rotary variants; its query/key/value
projections - per *query* head under grouped-query attention - and the block's input norm),
once per query role, for every supported family; the MLP's share is what remains of
``dm/dresid_pre - dm/dresid_post``. The literal way, one detached
copy of the batch per receiver, is kept as the reference (:mod:`factfind.edges.eap_reference`,
``reference=True``) and still serves ``neurons=True``. Dot products with the activation
differences, one batched matrix product per layer, give every edge.

Nodes are heads and MLPs (or, with ``neurons=True``, single MLP neurons) at position roles, plus
``embed@<role>`` and ``logits@final``. Roles partition the tokens (see
:mod:`factfind.edges.path_patching`): MLPs and neurons read their own role only, heads read every
role (as key/value) and their own (as query), the logits read the final token.

**EAP-IG** replaces the gradient at the clean input by its average along the straight line
between the corrupt and clean *input embeddings*, at ``m`` points ``x_corrupt + k/m (x_clean -
x_corrupt)``, ``k = 1..m`` (a right Riemann sum, so ``m = 1`` is EAP; ``get_scores_eap_ig`` of
Hanna et al.'s hannamw/EAP-IG takes the left one, ``k = 0..m-1``), which is more faithful when
the model saturates. On a model that is linear in its inputs EAP is exact: the tests check EAP
against :func:`~factfind.edges.path_patching.edge_patching` to 1e-5 there.

Cost, in forward-pass equivalents (FE, one plain forward of the batch): one corrupt forward for
the activation differences, then per integration point (1 for EAP, ``m`` for EAP-IG) one
forward and backward pass (about 2-3 FE; the points run stacked on the batch dimension, up to
:data:`factfind.edges.eap_grads.STACK_ROWS` rows per pass, which costs less per row) plus the
head's attention pulled back in head space and one projection of the normalised input (a third
of a layer's forward), whatever the number of heads, roles or positions. The cotangents are
summed over the points in head space and taken to ``d_model`` once (``roles x 2 heads d_head
x d_model`` per token and layer, about 1 FE on a 30-layer model), then dotted with the
differences once (``heads x roles x units x d_model`` per token and layer, one matrix product
per layer and sender role, 1-2 FE on a 30-layer model). As measured with
``benchmarks/bench_eap.py --models`` (2 athlete pairs x 19-21 tokens, 1 thread, CPU time):
EAP-IG(5) 8 FE on Gemma-3-270M, 15 FE on SmolLM2-135M, 22 FE on a Qwen3-0.6B-shaped model
(28 layers, 2.5 million edges); EAP 4-12 FE. The reference path costs one pass per receiver
copy instead, ``layers x (1 + heads x roles)`` (plus ``layers x d_mlp`` with neurons) copies
per point - about 1,650 on SmolLM2, ~7,000 FE for EAP-IG(5); 1,006 FE on Gemma-3-270M. Exact
edge patching needs a pair of stacked passes per edge.

Example::

    df = eap_ig(model, pairs, steps=5)
    graph = to_graph(df, model, pairs)
    circuit = prune(graph, top_n=30)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, encode_pairs
from factfind.edges.eap_grads import receiver_grads
from factfind.edges.eap_reference import Receiver, input_grads, receivers, with_mlps
from factfind.edges.placement import is_parallel
from factfind.errors import ArgumentError
from factfind.graph.build import to_graph  # re-exported: v0.1 had it here
from factfind.metrics import logit_diff
from factfind.model.attention import AttentionMismatchError
from factfind.types import ROLE_NAMES, Component, Metric, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.model import Model
    from factfind.types import Remote

log = logging.getLogger(__name__)


@validated
def edge_attribution(
    model: Model, pairs: FactPairs, *, steps: int = 0, neurons: bool = False,
    metric: Metric | None = None, batch_size: int = 8, copies: int = 64,
    progress: bool = True, remote: Remote = None, reference: bool = False,
) -> pd.DataFrame:
    """EAP (``steps=0``) or EAP-IG (``steps=m``) scores of every edge of the graph.

    Args:
        model: the model.
        pairs: clean/corrupt pairs.
        steps: 0 for EAP (gradients at the clean input), ``m >= 1`` for EAP-IG.
        neurons: nodes are single MLP neurons instead of whole MLPs (receiver gradients from
            the per-receiver copies of :mod:`factfind.edges.eap_reference`).
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default logit difference).
        batch_size: prompts per forward (the receiver gradients held between integration
            points take ``layers x roles x heads x batch_size x pos x d_model`` numbers);
            copies: receiver copies stacked per forward on the reference path.
        remote: every forward and backward as one nnsight session, ``"local"`` or on NDIF
            (``True``); see :meth:`~factfind.model.Model.session`.
        reference: get every receiver's gradient from its own detached copy of the batch
            (:mod:`factfind.edges.eap_reference`, the slow reference) instead of one pass per point.

    Returns:
        One row per edge, the edge-result columns of :data:`factfind.types.EDGE_RESULT_COLUMNS`:
        ``method``, ``sender``, ``receiver`` (node ids), ``effect`` (mean over prompts of
        ``(a_u(corrupt) - a_u(clean)) · ∂m/∂x_v``, in metric units), ``n`` (prompts). Feed it
        to :func:`factfind.graph.to_graph`.

    Post-norm families (Gemma 2/3, OLMo 2): a head's ``a_u`` is its write after the post norm,
    each run at its own frozen scale (:meth:`~factfind.model.Model.head_out`), so a layer's
    heads sum to its ``attn_out`` change; single-neuron senders are refused there (a neuron's
    post-norm write depends on its whole layer's scale, which this streaming form does not
    carry).

    Example::

        df = edge_attribution(model, pairs, steps=5)      # EAP-IG
        df.sort_values("effect", key=abs).tail()
    """
    if steps < 0:
        raise ArgumentError(f"steps must be >= 0, got {steps}")
    if neurons and model.spec.mlp_post_norm is not None:
        raise ArgumentError(f"neurons=True: {model.spec.name} normalises MLP outputs after the "
                         "down projection, so single-neuron edges are not exact; use "
                         "neurons=False (whole MLPs)")
    why = _fast_path_unsupported(model)
    if why is not None and not (reference or neurons):
        log.info("edge attribution on %s uses the per-receiver reference path: %s",
                 model.spec.name, why)
        reference = True
    pb_all = encode_pairs(model, pairs)
    roles = [ROLE_NAMES.index(r) for r in pb_all.clean.roles_present()]
    labels_all = pb_all.clean.role_labels()
    n = len(pairs)
    bar = tqdm(total=n, disable=not progress, desc="eap-ig" if steps else "eap", unit="prompt")

    def sweep(reference: bool) -> tuple[Tensor, Tensor, Tensor]:
        return model.session(_eap_sweep, model, pb_all, labels_all, roles, steps=steps,
                             neurons=neurons, metric=metric or logit_diff,
                             batch_size=batch_size, copies=copies, progress=bar.update,
                             remote=remote, reference=reference)

    if reference or neurons:
        sums = sweep(True)
    else:
        log.debug("edge attribution on %s uses the one-pass receiver gradients",
                  model.spec.name)
        try:
            sums = sweep(False)
        except AttentionMismatchError as err:  # an attention variant the recompute misses
            log.warning("edge attribution on %s falls back to the per-receiver reference "
                        "path: %s", model.spec.name, err)
            bar.reset()
            sums = sweep(True)
    bar.close()
    acc = _Scores(model, roles, neurons)
    acc.head, acc.mlp, acc.logits = sums
    method = f"eap-ig/{steps}" if steps else "eap"
    return _edge_frame(acc, method, n, _feasible(labels_all, roles))


def _fast_path_unsupported(model: Model) -> str | None:
    """Why the one-pass gradients would not be exact for ``model`` (``None``: they are).

    They cover every registered and derived family (:mod:`factfind.edges.eap_grads`; the tests
    check each against the reference). Left out: attention that is not causal (Gemma 3 with
    ``use_bidirectional_attention``). Any other variant the recomputation misses is caught at
    run time (:class:`~factfind.model.attention.AttentionMismatchError`) and also sent to the
    reference."""
    if getattr(model.hf.config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    return None


def _eap_sweep(model: Model, pb_all: PairBatch, labels_all: Tensor, roles: list[int], *,
               steps: int, neurons: bool, metric: Metric, batch_size: int, copies: int,
               progress: Callable[[int], Any] | None = None, reference: bool = False
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The model-side half of :func:`edge_attribution` (one nnsight session, torch only): the
    summed edge scores of heads, MLPs (or neurons) and logits."""
    acc = _Scores(model, roles, neurons)
    recv = receivers(model, roles, neurons)
    n = pb_all.correct.shape[0]
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        pb = PairBatch(pb_all.clean.take(idx), pb_all.corrupt.take(idx), pb_all.correct[idx],
                       pb_all.wrong[idx])
        labels = labels_all[idx]
        onehot = torch.stack([labels == r for r in range(len(ROLE_NAMES))], -1).double()
        if not reference:
            _fast_batch(model, acc, pb, onehot, roles, steps, metric)
            if progress is not None:
                progress(idx.stop - idx.start)
            continue
        deltas, emb = acc.deltas(pb)
        points: list[Tensor | None] = [None] if steps == 0 else [
            emb[1] + k / steps * (emb[0] - emb[1]) for k in range(1, steps + 1)]
        for point in points:
            for c0 in range(0, len(recv), copies):
                part = recv[c0:c0 + copies]
                through, g_out = input_grads(model, pb, with_mlps(part), labels, metric, point)
                acc.add(part, through[:len(part)], deltas, onehot, 1 / len(points))
            acc.add([Receiver("logits", model.n_layers)], g_out[None], deltas, onehot,
                    1 / len(points))
        if progress is not None:
            progress(idx.stop - idx.start)
    return acc.head, acc.mlp, acc.logits


def _fast_batch(model: Model, acc: _Scores, pb: PairBatch, onehot: Tensor, roles: list[int],
                steps: int, metric: Metric) -> None:
    """Add one batch's scores from one forward and backward pass per point
    (:func:`factfind.edges.eap_grads.receiver_grads`). The clean point (``k = m``, or EAP's only
    one) runs first and also provides the clean activations; the corrupt run adds one forward.
    Scores are linear in the gradients and the activation differences do not depend on the
    point, so the gradients are averaged over the points first and dotted with the differences
    once."""
    masks = onehot[..., roles].permute(2, 0, 1)  # [R batch pos]
    m = max(steps, 1)
    emb = (Component.EMBED, 0)
    bad = model.run(pb.corrupt, save=acc.delta_keys(), logits=pb.answer_ids()).acts
    heads, mlps, logits, clean = receiver_grads(
        model, pb, masks, metric, base=bad[emb], alphas=[1.0] + [k / m for k in range(1, m)],
        extra=acc.delta_keys())
    deltas, _ = acc.deltas(pb, clean, bad)
    acc.add_dense(heads, mlps, logits, deltas, onehot, roles)


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
        L, H, R, N = model.n_layers, model.n_heads, len(ROLE_NAMES), model.d_mlp
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

    def delta_keys(self) -> list[SiteKey]:
        """The sites :meth:`deltas` reads: the embeddings, every layer's ``z`` and MLP."""
        mlp = Component.NEURONS if self.neurons else Component.MLP_OUT
        return [(Component.EMBED, 0)] + [(c, layer) for layer in range(self.model.n_layers)
                                         for c in (Component.Z, mlp)]

    def deltas(self, pb: PairBatch, clean: dict[SiteKey, Tensor] | None = None,
               bad: dict[SiteKey, Tensor] | None = None
               ) -> tuple[list[Tensor], tuple[Tensor, Tensor]]:
        """Per unit block, what it writes in the corrupt run minus the clean run: embedding
        ``[B P 1 d]``, heads ``[B P H d]``, MLPs ``[B P 1 d]`` or neuron activations
        ``[B P N]``; and the (clean, corrupt) embeddings. ``clean``: the clean run's
        activations at :meth:`delta_keys`, if already at hand (``bad``: the corrupt run's)."""
        model, L = self.model, self.model.n_layers
        mlp = Component.NEURONS if self.neurons else Component.MLP_OUT
        emb = (Component.EMBED, 0)
        keys = self.delta_keys()
        if clean is None:
            clean = model.run(pb.clean, save=keys).acts
        if bad is None:
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
                self.logits += T[c, ROLE_NAMES.index("final")]
            elif r.kind == "neuron" or not self.neurons:
                k = self.prefix_mlp[r.layer]
                self.mlp[r.layer, r.index or 0, :, :k] += T[c, :, :k]


    def add_dense(self, heads: list[Tensor], mlps: Tensor, logits: Tensor,
                  deltas: list[Tensor], onehot: Tensor, roles: Sequence[int]) -> None:
        """Add ``delta_u · G_v`` summed over each sender role's positions and the batch, for
        the gradients of :func:`~factfind.edges.eap_grads.receiver_grads`: heads per layer
        ``[R head B P d]`` (``R`` query roles ``roles``), MLPs ``[layer B P d]``, logits
        ``[B P d]``. Per layer and sender role one matrix product ``[receivers, positions *
        d] x [positions * d, upstream units]`` (the positions of that role only, and only the
        query roles whose queries reach them: a head's gradient is zero after its role's
        last position)."""
        assert not self.neurons
        dtype = mlps.dtype
        D = torch.cat([x.to(dtype) for x in deltas], 2)  # [B P U d]
        B, P, U, d = D.shape
        D = D.reshape(B * P, U, d)
        hot = onehot.reshape(B * P, -1).to(D.device).bool()
        pos = torch.arange(P, device=D.device).repeat(B)
        ends = {r: int(pos[hot[:, r]].max()) + 1 for r in roles if bool(hot[:, r].any())}
        R, H = len(roles), self.model.n_heads
        senders = []  # (role, flat positions, sender deltas [positions * d, U])
        for rs in roles:
            idx = hot[:, rs].nonzero()[:, 0]
            if len(idx) == 0:
                continue
            Ds = D[idx].transpose(1, 2).reshape(len(idx) * d, U)
            first = int(pos[idx].min())
            dst = [i for i, r in enumerate(roles) if ends.get(r, 0) > first]
            senders.append((rs, idx, Ds, dst))
        final = ROLE_NAMES.index("final")
        for layer in range(self.model.n_layers):
            k = self.prefix_head[layer]
            G = heads[layer].reshape(R, H, B * P, d)
            km = self.prefix_mlp[layer]
            Gm = mlps[layer].reshape(B * P, d)
            for rs, idx, Ds, dst in senders:
                if dst:
                    Gs = G.index_select(2, idx)
                    Gs = (Gs if len(dst) == R else Gs[dst]).reshape(len(dst) * H, -1)
                    T = (Gs @ Ds[:, :k]).reshape(len(dst), H, k).double().cpu()
                    for i, t in zip(dst, T, strict=True):
                        self.head[layer, :, roles[i], rs, :k] += t
                self.mlp[layer, 0, rs, :km] += (Gm[idx].reshape(-1) @ Ds[:, :km]).double().cpu()
        for rs, idx, Ds, _ in senders:
            if rs == final:
                self.logits += (logits.reshape(B * P, d)[idx].reshape(-1) @ Ds).double().cpu()


def _edge_frame(acc: _Scores, method: str, n: int, feasible: Tensor) -> pd.DataFrame:
    """The non-structural-zero edges of ``acc`` as rows (mean over the ``n`` prompts); a free
    function, so that the class a remote sweep ships carries no pandas. Node ids are built
    once each and taken by code (a million edges in well under a second)."""
    model, names = acc.model, ROLE_NAMES
    U = len(acc.units)
    src_ids = [f"{u}@{r}" for r in names for u in acc.units]  # code: role * U + unit
    dst_ids: list[str] = []
    src, dst, score = [], [], []
    head, mlp = acc.head.numpy(), acc.mlp.numpy()
    pairs = [(q, r) for q in acc.roles for r in acc.roles if feasible[r, q]]
    qa, ra = np.array([q for q, _ in pairs], dtype=np.int64), np.array([r for _, r in pairs],
                                                                       dtype=np.int64)
    roles = np.array(acc.roles, dtype=np.int64)

    def emit(ids: list[str], role_src: np.ndarray, k: int, values: np.ndarray) -> None:
        """One block of receivers ``ids`` (in order), each reading the first ``k`` units of
        its sender role ``role_src[i]``; ``values [len(ids) k]``."""
        src.append((role_src[:, None] * U + np.arange(k)[None]).reshape(-1))
        dst.append(np.repeat(np.arange(len(dst_ids), len(dst_ids) + len(ids)), k))
        dst_ids.extend(ids)
        score.append(values.reshape(-1) / n)

    for layer in range(model.n_layers):
        k = acc.prefix_head[layer]
        if pairs:  # receivers in (head, query role, sender role) order
            emit([f"L{layer}.h{h}@{names[q]}" for h in range(model.n_heads) for q, _ in pairs],
                 np.tile(ra, model.n_heads), k, head[layer][:, qa, ra, :k])
        k = acc.prefix_mlp[layer]
        units = ([f"L{layer}.n{i}" for i in range(mlp.shape[1])] if acc.neurons
                 else [f"L{layer}.mlp"])
        emit([f"{unit}@{names[q]}" for unit in units for q in acc.roles],
             np.tile(roles, len(units)), k, mlp[layer][:, roles, :k])
    final = names.index("final")
    emit(["logits@final"], np.array([final]), U, acc.logits.numpy()[None])

    def column(ids: list[str], codes: list[np.ndarray]) -> Any:
        return pd.Series(np.array(ids, dtype=object)).array.take(np.concatenate(codes))

    return pd.DataFrame({"method": method, "sender": column(src_ids, src),
                         "receiver": column(dst_ids, dst), "effect": np.concatenate(score),
                         "n": n})


def _feasible(labels: Tensor, roles: Sequence[int]) -> Tensor:
    """``[R R]`` bool: a token of role ``a`` precedes or is a token of role ``b`` in some
    prompt (a head at ``b`` can read ``a`` causally)."""
    R = len(ROLE_NAMES)
    out = torch.zeros(R, R, dtype=torch.bool)
    pos = torch.arange(labels.shape[1])
    for a in roles:
        first = torch.where(labels == a, pos, labels.shape[1]).min(-1).values
        for b in roles:
            last = torch.where(labels == b, pos, -1).max(-1).values
            out[a, b] = bool(((first <= last) & (last >= 0)).any())
    return out


@validated
def eap(model: Model, pairs: FactPairs, **kwargs: Any) -> pd.DataFrame:
    """Edge attribution patching (Syed et al. 2023): :func:`edge_attribution` with
    ``steps=0``."""
    return edge_attribution(model, pairs, steps=0, **kwargs)


@validated
def eap_ig(model: Model, pairs: FactPairs, *, steps: int = 5, **kwargs: Any) -> pd.DataFrame:
    """EAP with integrated gradients over ``steps`` points (Hanna et al. 2024)."""
    if steps < 1:
        raise ArgumentError(f"EAP-IG needs steps >= 1, got {steps}")
    return edge_attribution(model, pairs, steps=steps, **kwargs)


__all__ = ["eap", "eap_ig", "edge_attribution", "to_graph"]
