"""Attribution patching (AtP) and AtP*: estimate every node's patching effect at once.

Activation patching (:mod:`factfind.localize.patching`) measures one site per forward pass. For a
model with ``L`` layers of ``d_mlp`` neurons at ``P`` positions that is ``L * d_mlp * P``
forward passes - too many to patch *every neuron*. **Attribution patching** (Nanda 2023;
Syed et al. 2023) replaces each of them with a first-order Taylor estimate. Write ``M(x)`` for
the metric (here the logit difference ``logit[clean attribute] - logit[corrupt attribute]`` at
the final token), ``n(x)`` for a node's activation on prompt ``x``, and run the *base* prompt
with the node set to its value on the *source* prompt. The effect of that patch is

    c(n) = M(base | do(n = n(source))) - M(base)
         ≈ (n(source) - n(base)) . dM/dn (base)                                       (AtP)

and every node's estimate comes from the same **two forward passes and one backward pass**:
the base run with gradients, and the source run. The default direction is *noising*, as in
AtP* (base = clean, source = corrupt: ``c(n) < 0`` for a node the fact needs); ``direction=
"denoise"`` swaps them. Effects are raw metric differences (logit-difference units), per prompt
or averaged over prompts.

Nodes (:class:`~factfind.attribute.node_index.NodeIndex`) are a component at a layer at a *position
spec* (a role such as ``subject_last`` or an absolute index (negative indices count from the final
token)) and a unit: every MLP **neuron** (``neurons``, the input of ``W_out``), the MLP layer
(``mlp_out``), and per attention head its output (``head_out``, patched through ``z``) and its
inputs at a position: the query (``q``), key (``k``) and value (``v``) vectors. A role that
names several tokens (``relation``) patches all of them together; AtP is linear, so its estimate
is the sum.

**AtP*** (Kramár, Lieberum, Shah & Nanda 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components") fixes AtP's two failure modes:

* **QK fix** (their §3.1.1). A head's attention softmax saturates: patching a key from
  irrelevant to dominant can move a probability from 0 to 1 while the gradient at 0 says
  nothing. The attention *logits* are linear in a query (for fixed keys) and in a key (for
  fixed queries), so the only non-linearity between a q or k node and the rest of the network
  is the softmax. AtP* computes that part exactly and stays linear downstream:

      c_AtP*(q_t) = sum_s (A'_ts - A_ts) dM/dA_ts,
          A'_t = softmax(scale * q_t(source) . k_s(base) | mask)       (query row t replaced)
      c_AtP*(k_s) = sum_t (A'_t - A_t) . dM/dA_t,
          A'_t = softmax of row t with logit s replaced by scale * q_t(base) . k_s(source)

  with ``A`` the base attention pattern and ``dM/dA`` the gradient at it. *What this
  implements:* the fix applies to the **q and k nodes themselves** (a head's query or key at
  a position, rotary applied); a node *upstream* of a head (an earlier neuron) still reaches
  that head's pattern through the gradient, i.e. linearised, as in the paper. Values, head
  outputs, MLP layers and neurons are estimated as by AtP. Query rows are independent, so all
  rows are patched in one softmax; a key spec naming several tokens patches all of its keys
  in one softmax per spec (``O(specs * batch * heads * pos^2)``). Plain AtP's q/k estimates use
  the same pattern gradient through the softmax Jacobian, ``dM/dS = A * (g - sum_s A g)``
  with ``dS = scale * dq . k`` (or ``q . dk``), so the two differ exactly by the softmax's
  curvature.

* **GradDrop** (their §3.1.2). A node can act through several paths whose effects cancel in
  the total gradient but not under patching. For each layer ``l`` the backward pass is rerun
  with the gradient through layer ``l``'s residual-stream contributions (its ``attn_out`` and
  ``mlp_out``) blocked - their forward values unchanged, via ``detach`` edits - giving
  ``c_l(n)``; the sign-agnostic score

      GD(n) = 1/(L-1) * sum_{l != layer(n)} |c_l(n)|

  is large when any path-restricted estimate is, even if the total cancels. Layers ``l`` below
  the node leave its gradient unchanged (``c_l = c_AtP*``); the node's own layer is left out
  (it would block the node itself); ``c_l`` is averaged over prompts before the ``|.|``, as
  ``c`` is. The literal recipe is ``L - 1`` extra forward+backward passes
  (``estimate(..., reference=True)``). Blocking layer ``l``'s two writes leaves the residual
  stream's skip connection as the only path from ``resid_pre[l]`` to ``resid_post[l]``, so
  with ``l`` blocked ``dM/d resid_pre[l] = dM/d resid_post[l]`` of the intact model, and
  ``resid_pre[l]`` is a cut every path from a lower node to the metric crosses: ``c_l`` of
  the nodes below ``l`` is one vector-Jacobian product from ``resid_pre[l]`` down, with the
  intact gradient at ``resid_post[l]``. The default does exactly that on one retained graph:
  one forward, one full backward, then per layer a backward over the layers below it only
  (about ``L / 2`` backward passes in all, no extra forwards). Nodes are ranked for
  verification by ``score = max(|c_AtP*(n)|, GD(n))``: GradDrop *flags* nodes, exact patching
  then measures them.

Estimates are not effects: :mod:`factfind.attribute.verification` patches candidates exactly in
order of ``score`` until a stopping rule, and bounds what it may have missed (the AtP* recipe).

**Streaming.** Over many prompts, per-node statistics (count, mean, variance, mean |effect|) are
accumulated batch by batch with Chan et al.'s parallel update
(:mod:`factfind.attribute.running_stats`), so memory grows with the number of nodes, never with the
number of prompts.

Example::

    pairs = facts.corrupt(model, seed=0)
    est = atp_star(model, pairs, components=["neurons", "head_out", "q", "k"])
    est.nlargest(20, "score")          # candidates for exact verification
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.attribute.node_index import NodeIndex, node_frame
from factfind.attribute.running_stats import RunningStats, running_update
from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, check_mode
from factfind.localize.patching import DEFAULT_ROLES
from factfind.types import DIRECTIONS, Component, Metric, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.types import Remote




# ----------------------------------------------------------------------------- batches










def position_masks(batch: TokenBatch, positions: Sequence[Role | int], device: torch.device
                   ) -> Tensor:
    """``[position batch pos]`` float: the tokens each position spec names in each row."""
    return torch.stack([batch.position_mask(p) for p in positions]).to(device, torch.float32)


def attention_allow(batch: TokenBatch, device: torch.device) -> Tensor:
    """``[batch q k]`` bool: causal and not padding (plus the diagonal, so that no row of a
    softmax is empty - padded query rows never reach the metric)."""
    am = batch.attention_mask.to(device).bool()
    n = am.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return (causal[None] & am[:, None, :]) | eye[None]


def attention_logits(q: Tensor, k: Tensor, scale: float, allow: Tensor,
                     cap: float | None = None) -> Tensor:
    """``[... head q k]`` masked attention logits from ``q, k [... pos head d_head]``, softcapped
    as ``cap * tanh(s / cap)`` when ``cap`` is given (:meth:`Model.attn_softcap`)."""
    s = torch.einsum("...qhd,...khd->...hqk", q.float(), k.float()) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    return s.masked_fill(~allow.unsqueeze(-3), float("-inf"))


# ----------------------------------------------------------------------------- AtP


@dataclass
class _Batch:
    """One batch's base and source activations, the deltas and the cached softmax fixes.

    ``cache`` holds what does not depend on the gradients, so that GradDrop's blocked passes
    (one :func:`_scores` call per blocked layer) reuse it: per layer the source-minus-base
    deltas, the base pattern, values and ``z``, and the QK fix's patched softmaxes."""

    base: dict[SiteKey, Tensor]
    src: dict[SiteKey, Tensor]
    masks: Tensor  # [position batch pos]
    qvalid: Tensor  # [batch pos] float: real tokens
    allow: Tensor  # [batch q k]
    cache: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    def get(self, name: str, layer: int, make: Callable[[], Tensor]) -> Tensor:
        """``cache[(name, layer)]``, made by ``make()`` on first use."""
        key = (name, layer)
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def delta(self, comp: Component, layer: int) -> Tensor:
        """``source - base`` at a site, float."""
        return self.get(f"d_{comp.value}", layer, lambda: (
            self.src[(comp, layer)].float() - self.base[(comp, layer)].float()))

    def heads(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """The base run's pattern ``A [B H T T]``, values ``v`` and ``z = A v`` ``[B T H d]``
        (float), read back from the saved pattern and values."""
        A = self.get("A", layer, lambda: self.base[(Component.PATTERN, layer)].float())
        v = self.get("v", layer, lambda: self.base[(Component.V, layer)].float())
        z = self.get("z", layer, lambda: torch.einsum("bhqk,bkhd->bqhd", A, v))
        return A, v, z


def _saves(index: NodeIndex, *, grads: bool) -> list[SiteKey]:
    """Sites to read for ``index``: base runs (with a metric) read z through ``attn_out``'s
    gradient and the pattern (``z = pattern @ v``); source runs read ``z`` directly."""
    keys: set[SiteKey] = set()
    for comp, layer in itertools.product(index.components, index.layers):
        if comp is Component.NEURONS:
            keys.add((Component.NEURONS, layer))
        elif comp is Component.MLP_OUT:
            keys.add((Component.MLP_OUT, layer))
        else:
            if grads:
                keys |= {(Component.ATTN_OUT, layer), (Component.PATTERN, layer),
                         (Component.V, layer)}
            else:
                keys |= {(Component.Z, layer), (Component.V, layer)}
            if comp in (Component.Q, Component.K):
                keys |= {(Component.Q, layer), (Component.K, layer)}
    return sorted(keys)


def _z_grad(model: Model, grads: dict[SiteKey, Tensor], layer: int, z: Tensor) -> Tensor:
    """``dM/dz [batch pos head d_head]`` at ``z`` from ``dM/d attn_out`` (``attn_out = z @ W_O
    + b``, through the post norm in families that have one: :meth:`Model.z_grad`)."""
    g = grads.get((Component.ATTN_OUT, layer))
    if g is None:
        return torch.zeros_like(z)
    return model.z_grad(layer, z, g)


def _scores(model: Model, index: NodeIndex, b: _Batch, grads: dict[SiteKey, Tensor], *,
            qk_fix: bool, below: int | None = None) -> Tensor:
    """``[batch node]`` estimates ``(source - base) . grad`` for every node (QK-fixed for q, k
    when asked), from one set of gradients; with ``below``, zeros for the nodes at layers
    ``>= below`` (GradDrop does not use them). What does not depend on the gradients is
    cached on ``b``; ``dM/dz`` is pulled back once per layer, for head outputs and values."""
    out = []
    masks = b.masks  # [P B T]
    n_batch, n_pos = masks.shape[1], masks.shape[0]
    g_z: dict[int, Tensor] = {}

    def z_grad(layer: int) -> Tensor:
        if layer not in g_z:
            g_z[layer] = _z_grad(model, grads, layer, b.heads(layer)[2])
        return g_z[layer]

    for comp in index.components:
        per_layer = []
        for layer in index.layers:
            key = (comp, layer)
            if below is not None and layer >= below:
                units = (model.d_mlp if comp is Component.NEURONS else
                         1 if comp is Component.MLP_OUT else model.n_heads)
                per_layer.append(torch.zeros(n_batch, n_pos, units, device=masks.device))
                continue
            if comp in (Component.NEURONS, Component.MLP_OUT):
                d = b.delta(comp, layer)
                g = grads.get(key)
                g = torch.zeros_like(d) if g is None else g.float()
                if comp is Component.NEURONS:
                    per_layer.append(torch.einsum("pbt,btu->bpu", masks, d * g))
                else:
                    per_layer.append(torch.einsum("pbt,bt->bp", masks, (d * g).sum(-1))[..., None])
                continue
            if comp is Component.Z:
                dz = b.get("dz", layer, lambda layer=layer: (
                    b.src[(Component.Z, layer)].float() - b.heads(layer)[2]))
                per_layer.append(torch.einsum("pbt,bth->bph", masks,
                                              (dz * z_grad(layer)).sum(-1)))
            elif comp is Component.V:
                A = b.heads(layer)[0]
                g_v = torch.einsum("bhts,bthd->bshd", A, z_grad(layer))
                dv = b.delta(Component.V, layer)
                per_layer.append(torch.einsum("pbt,bth->bph", masks, (dv * g_v).sum(-1)))
            else:
                A = b.heads(layer)[0]
                g_a = grads.get((Component.PATTERN, layer))
                g_a = torch.zeros_like(A) if g_a is None else g_a.float()
                per_layer.append(_qk_scores(model, b, comp, layer, A, g_a, qk_fix=qk_fix))
        out.append(torch.stack(per_layer, 1).flatten(1))  # [B L*P*U]
    return torch.cat(out, 1)


def _qk_scores(model: Model, b: _Batch, comp: Component, layer: int, A: Tensor, g: Tensor,
               *, qk_fix: bool) -> Tensor:
    """``[batch position head]`` estimates for query or key nodes at one layer.

    Linear (AtP): ``sum dM/dS * dS`` with the softmax Jacobian ``dM/dS = A * (g - sum_s A g)``.
    QK fix (AtP*): ``sum (A' - A) * g`` with ``A'`` the exact softmax of the patched logits
    (made once per batch and layer, cached on ``b``).
    """
    scale, cap = model.attn_scale(layer), model.attn_softcap(layer)
    q0, k0 = b.base[(Component.Q, layer)].float(), b.base[(Component.K, layer)].float()
    q1, k1 = b.src[(Component.Q, layer)].float(), b.src[(Component.K, layer)].float()
    qv = b.qvalid[:, None, :, None]  # [B 1 T 1]
    if not qk_fix:
        dmds = A * (g - (A * g).sum(-1, keepdim=True)) * qv  # [B H T T]
        if comp is Component.Q:
            ds = b.get("ds_q", layer, lambda: attention_logits(
                q1 - q0, k0, scale, b.allow, cap).nan_to_num(0.0, 0.0, 0.0))
            row = (dmds * ds).sum(-1)  # [B H T]: per query row
            return torch.einsum("pbt,bht->bph", b.masks, row)
        ds = b.get("ds_k", layer, lambda: attention_logits(
            q0, k1 - k0, scale, b.allow, cap).nan_to_num(0.0, 0.0, 0.0))
        col = (dmds * ds).sum(-2)  # [B H S]: per key column
        return torch.einsum("pbs,bhs->bph", b.masks, col)

    def s0() -> Tensor:
        return b.get("s0", layer, lambda: attention_logits(q0, k0, scale, b.allow, cap))

    def a0() -> Tensor:
        return b.get("a0", layer, lambda: s0().softmax(-1))

    if comp is Component.Q:  # rows are independent: patch every query row at once
        dA = b.get("dA_q", layer, lambda: (attention_logits(
            q1, k0, scale, b.allow, cap).softmax(-1) - a0()) * qv)
        row = (dA * g).sum(-1)  # [B H T]
        return torch.einsum("pbt,bht->bph", b.masks, row)

    def key_fix() -> Tensor:  # one softmax per position spec: all of its keys patched together
        ds = attention_logits(q0, k1, scale, b.allow, cap) - s0()  # [B H T S] (NaN: masked)
        ds = ds.nan_to_num(0.0, 0.0, 0.0)
        return torch.stack([((s0() + ds * m[:, None, None, :]).softmax(-1) - a0()) * qv
                            for m in b.masks])

    return torch.einsum("pbhts,bhts->bph", b.get("dA_k", layer, key_fix), g)


@dataclass
class Estimates:
    """AtP / AtP* over a set of prompts: streamed statistics per node.

    Attributes:
        index: the nodes.
        method: ``"atp"`` or ``"atp*"``.
        direction: ``"noise"`` or ``"denoise"``.
        stats: :class:`RunningStats` of the per-prompt estimates.
        grad_drop: ``[node]`` the GradDrop score, or ``None``.
        per_prompt: ``[prompt node]`` estimates (NaN where the position is absent) when asked.
    """

    index: NodeIndex
    method: str
    direction: str
    stats: RunningStats
    grad_drop: Tensor | None = None
    per_prompt: Tensor | None = None

    @property
    def effect(self) -> Tensor:
        """``[node]`` mean estimate over the prompts where the node's position exists."""
        return torch.where(self.stats.count > 0, self.stats.mean, torch.nan)

    @property
    def score(self) -> Tensor:
        """``[node]`` ranking score: ``|effect|``, or ``max(|effect|, GradDrop)`` for AtP*."""
        s = self.stats.mean.abs()
        return s if self.grad_drop is None else torch.maximum(s, self.grad_drop)

    @property
    def frame(self) -> pd.DataFrame:
        """Tidy frame, one row per node: the mean over prompts with a 95% CI (an attribute, as
        :attr:`~factfind.attribute.verification.Verification.frame` is)."""
        return self._frame(per_prompt=False)

    @property
    def prompt_frame(self) -> pd.DataFrame:
        """Tidy frame, one row per node and prompt (needs ``estimate(..., per_prompt=True)``)."""
        return self._frame(per_prompt=True)

    def _frame(self, *, per_prompt: bool) -> pd.DataFrame:
        if per_prompt:
            if self.per_prompt is None:
                raise ArgumentError("per-prompt estimates were not kept: pass per_prompt=True")
            n_prompts = self.per_prompt.shape[0]
            prompts = np.repeat(np.arange(n_prompts), len(self.index))
            df = node_frame(self.index, self.method,
                            {"effect": self.per_prompt.flatten()}, prompts=prompts)
        else:
            values: dict[str, np.ndarray | Tensor] = dict(self.stats.values())
            values["score"] = self.score
            if self.grad_drop is not None:
                values["grad_drop"] = self.grad_drop
            df = node_frame(self.index, self.method, values)
        df["direction"] = self.direction
        return df


@validated
def estimate(
    model: Model,
    pairs: FactPairs | PairBatch,
    *,
    components: Iterable[str | Component] = ("neurons",),
    positions: Iterable[Role | int | str] = DEFAULT_ROLES,
    layers: Iterable[int] | None = None,
    direction: str = "noise",
    qk_fix: bool = False,
    grad_drop: bool = False,
    batch_size: int = 32,
    per_prompt: bool = False,
    progress: bool = True,
    remote: Remote = None,
    metric: Metric | None = None,
    reference: bool = False,
) -> Estimates:
    """AtP (optionally with AtP*'s QK fix and GradDrop) for every node, streamed over prompts.

    Per batch: one source forward, one base forward + backward (all nodes at once; from the
    first position a node sits at, the positions before it run once without gradients), and
    with ``grad_drop`` per layer above the lowest node layer one vector-Jacobian product from that
    layer down on the retained graph (about ``L / 2`` backward passes in all; ``reference``:
    one detached forward + backward per layer instead). Measured at one thread with every
    node kind at the four default roles: 0.56-0.83 FE per layer on SmolLM2-135M,
    Gemma-3-270M and a Qwen3-shaped model (``benchmarks/bench_families.py``).

    Args:
        model: the model (eager attention for head, q, k, v nodes).
        pairs: clean/corrupt prompt pairs (or their encoded
        :class:`~factfind.localize.patching.PairBatch`). components: any of ``neurons, mlp_out,
        head_out, q, k, v``. positions: roles or absolute indices (negative: from the final token).
        layers: default all.
        direction: ``"noise"`` (default, as AtP*) or ``"denoise"``.
        qk_fix: exact softmax for q and k nodes.
        grad_drop: compute the GradDrop score.
        batch_size: prompts per forward.
        per_prompt: also keep ``[prompt node]`` estimates (memory grows with prompts).
        remote: run every forward and backward as one nnsight session, ``"local"`` or on
            NDIF (``True``); see :meth:`~factfind.model.Model.session`.
        metric: ``metric(logits, correct, wrong) -> [rows]``, differentiable (default the
            logit difference); AtP linearises it around the base run.
        reference: GradDrop by its literal recipe, one forward and backward per blocked
            layer with ``detach`` edits (the slow reference; remote runs always use it).

    Returns:
        :class:`Estimates` (``.frame`` is the tidy frame, ``.prompt_frame`` per prompt).
    """
    check_mode(direction, "direction", DIRECTIONS)
    index = NodeIndex.build(model, components=components, positions=positions, layers=layers)
    L = model.n_layers
    node_layer = index.node_layers()
    drops = list(range(min(index.layers) + 1, L)) if grad_drop else []
    batches = [pb for _, pb in pair_batches(model, pairs, batch_size)]
    # one tick per forward + backward pass: the AtP pass and each GradDrop pass of each batch
    bar = tqdm(total=len(batches) * (1 + len(drops)), desc="atp", unit="pass",
               disable=not progress)
    state, gd_sums, kept = model.session(
        _atp_sweep, model, batches, index, direction=direction, qk_fix=qk_fix, drops=drops,
        per_prompt=per_prompt, progress=bar.update, remote=remote, metric=metric,
        reference=reference or remote is not None)
    bar.close()
    stats_ = RunningStats.from_state(state)
    gd = None
    if grad_drop:
        n = stats_.count.clamp(min=1)
        own = stats_.mean.abs() * node_layer.double()  # layers below the node: unchanged
        terms = (gd_sums / n).abs()  # [drop node]
        above = torch.stack([node_layer < d for d in drops]) if drops else None
        gd = own + ((terms * above).sum(0) if above is not None else 0.0)
        gd = gd / max(1, L - 1)
    return Estimates(index, "atp*" if (qk_fix or grad_drop) else "atp", direction, stats_,
                     grad_drop=gd, per_prompt=torch.cat(kept) if per_prompt else None)


def _atp_sweep(model: Model, batches: list[PairBatch], index: NodeIndex, *, direction: str,
               qk_fix: bool, drops: list[int], per_prompt: bool,
               progress: Callable[[int], Any] | None = None, metric: Metric | None = None,
               reference: bool = False,
               ) -> tuple[dict[str, Tensor], Tensor, list[Tensor]]:
    """The model-side half of :func:`estimate` (one nnsight session, torch only): the running
    statistics' accumulators, GradDrop's per-layer sums ``[drop node]`` and, if asked, the
    per-prompt estimates - ``O(node)`` memory however many prompts stream through."""
    n_nodes = len(index)
    zero = torch.zeros(n_nodes, dtype=torch.float64)
    state = {k: zero.clone() for k in ("count", "mean", "m2", "abs_sum", "abs_max")}
    node_pos = index.node_positions()
    gd_sums = torch.zeros(len(drops), n_nodes, dtype=torch.float64)
    kept: list[Tensor] = []
    base_keys, src_keys = _saves(index, grads=True), _saves(index, grads=False)
    for pb in batches:
        base_tb, src_tb = pb.base_and_source(direction)
        fn = lambda lg, pb=pb: pb.measure(lg, 1, metric).sum()
        cuts = [] if reference or not drops else [
            (c, d) for d in drops for c in (Component.RESID_PRE, Component.RESID_POST)]
        dev = model.device
        masks = position_masks(base_tb, index.positions, dev)
        run = _base_run(model, base_tb, base_keys, cuts, fn, masks=masks,
                        truncate=not reference)
        src = model.run(src_tb, save=src_keys).acts
        b = _Batch(run.acts, src, masks, base_tb.attention_mask.to(dev).float(),
                   attention_allow(base_tb, dev))
        est = _scores(model, index, b, run.grads, qk_fix=qk_fix)  # [B N]
        valid = b.masks.sum(-1).gt(0).T[:, node_pos]  # [B N]
        state = running_update(state, est, valid)
        if per_prompt:
            kept.append(torch.where(valid, est, torch.nan).cpu())
        if progress is not None:
            progress(1)
        for i, drop in enumerate(drops):
            if reference:
                blocked = {(Component.ATTN_OUT, drop): _detach,
                           (Component.MLP_OUT, drop): _detach}
                g = model.run(base_tb, save=base_keys, metric=fn, edits=blocked).grads
            else:
                g = _dropped_grads(run, drop)
            est_l = _scores(model, index, b, g, qk_fix=qk_fix, below=drop)
            gd_sums[i] += (est_l.double().cpu() * valid.cpu()).sum(0)
            if progress is not None:  # one GradDrop backward pass
                progress(1)
    return state, gd_sums, kept


#: the sites whose gradients :func:`_scores` reads
_GRAD_SITES = (Component.NEURONS, Component.MLP_OUT, Component.ATTN_OUT, Component.PATTERN)


@dataclass
class _BaseRun:
    """The base run with gradients, full length (``acts``, ``grads``), and what GradDrop's
    vector-Jacobian products need: the retained graph's activations ``live`` and their
    gradients ``live_grads``, over the positions ``>= p0`` the run computed."""

    acts: dict[SiteKey, Tensor]
    grads: dict[SiteKey, Tensor]
    live: dict[SiteKey, Tensor] | None
    live_grads: dict[SiteKey, Tensor]
    p0: int = 0


def _base_run(model: Model, tb: TokenBatch, keys: list[SiteKey], cuts: list[SiteKey],
              fn: Callable[[Tensor], Tensor], *, masks: Tensor, truncate: bool) -> _BaseRun:
    """The base forward and backward. No node sits before ``p0``, the first position any
    node's mask ``[position batch pos]`` touches, and attention is causal, so nothing there
    depends on a node: with ``truncate`` the positions before ``p0`` run once without
    gradients (their keys and values cached, :meth:`~factfind.model.Model.base_run` on the
    truncated batch) and the forward and backward with gradients, GradDrop's included, run
    on positions ``p0..`` only (:meth:`~factfind.model.Model.run_from`). On a one-shot prompt
    (Fact Finding's athletes: 11 of 19 tokens before the subject) that halves the work; the
    result is the same up to float rounding (the reference runs full length)."""
    cols = masks.sum((0, 1)).nonzero()
    p0 = int(cols[0, 0]) if truncate and len(cols) else 0
    if p0 == 0:
        run = model.run(tb, save=keys + cuts, metric=fn, keep_graph=bool(cuts))
        return _BaseRun(run.acts, run.grads, run.live, run.grads)
    enc = {"input_ids": tb.input_ids, "attention_mask": tb.attention_mask,
           "position_ids": tb.position_ids}
    head = model.base_run({k: v[:, :p0] for k, v in enc.items()}, save=keys)
    prefix = dataclasses.replace(head, enc={k: v.to(model.device) for k, v in enc.items()})
    run = model.run_from(prefix, start=(0, p0), save=keys + cuts, metric=fn,
                         keep_graph=bool(cuts))
    n_pos = tb.input_ids.shape[1]
    acts = {k: _full_length(k, run.acts[k], p0, n_pos, head.acts[k]) for k in keys}
    grads = {k: _full_length(k, g, p0, n_pos) for k, g in run.grads.items() if k in keys}
    return _BaseRun(acts, grads, run.live, run.grads, p0)


def _full_length(key: SiteKey, tail: Tensor, p0: int, n_pos: int,
                 head: Tensor | None = None) -> Tensor:
    """A site's values over positions ``p0..`` back to full length: ``head`` (the values over
    positions ``..p0``, from the truncated run) in front, or zeros (gradients). The pattern
    ``[batch head q k]`` grows along its query rows (the head's keys padded with zeros)."""
    dim = 2 if key[0] is Component.PATTERN else 1
    if head is None:
        head = tail.new_zeros(*tail.shape[:dim], p0, *tail.shape[dim + 1:])
    elif key[0] is Component.PATTERN:
        head = torch.nn.functional.pad(head, (0, n_pos - p0))
    return torch.cat([head.to(tail.dtype), tail], dim=dim)


def _dropped_grads(run: _BaseRun, drop: int) -> dict[SiteKey, Tensor]:
    """GradDrop's gradients with layer ``drop``'s attention and MLP writes blocked, for the
    sites below ``drop`` (module docstring): ``J^T g`` from ``resid_pre[drop]`` down, with
    ``g`` the intact gradient at ``resid_post[drop]``, on ``run``'s retained graph (full
    length: zeros before ``run.p0``). Sites at ``drop`` and above are left out (their ``c_l``
    is not used)."""
    live = run.live
    assert live is not None, "GradDrop needs the base run's retained graph"
    keys = [k for k in live if k[0] in _GRAD_SITES and k[1] < drop and live[k].requires_grad]
    if not keys:
        return {}
    got = torch.autograd.grad(live[(Component.RESID_PRE, drop)], [live[k] for k in keys],
                              grad_outputs=run.live_grads[(Component.RESID_POST, drop)],
                              retain_graph=True, allow_unused=True)
    n_pos = run.grads[keys[0]].shape[2 if keys[0][0] is Component.PATTERN else 1]
    out = {k: torch.zeros_like(live[k]) if g is None else g
           for k, g in zip(keys, got, strict=True)}
    if run.p0:
        out = {k: _full_length(k, g, run.p0, n_pos) for k, g in out.items()}
    return out


def _detach(x: Tensor) -> Tensor:
    """Same forward value, no gradient: GradDrop's edit."""
    return x.detach()


@validated
def atp(model: Model, pairs: FactPairs | PairBatch, **kwargs) -> pd.DataFrame:
    """Attribution patching of every node (see :func:`estimate` for the options).

    Returns:
        One row per node: ``method="atp"``, ``effect`` the mean estimate over prompts with a
        95% CI, ``n``, ``abs_mean``, ``score = |effect|`` and ``direction`` (or one row per
        prompt and node with ``per_prompt=True``).

    Example::

        df = atp(model, pairs, components=["neurons"], positions=["subject_last"])
        df.nsmallest(10, "effect")      # noising: the most necessary neurons
    """
    per_prompt = kwargs.pop("per_prompt", False)
    est = estimate(model, pairs, per_prompt=per_prompt, **kwargs)
    return est.prompt_frame if per_prompt else est.frame


@validated
def atp_star(model: Model, pairs: FactPairs | PairBatch, **kwargs) -> pd.DataFrame:
    """AtP*: AtP with the QK fix and GradDrop (see :func:`estimate`).

    Returns:
        One row per node with ``method="atp*"``, ``effect`` (QK-fixed AtP estimate),
        ``grad_drop`` and ``score = max(|effect|, grad_drop)``, the order in which
        :func:`factfind.attribute.verification.verify` patches candidates.
    """
    kwargs.setdefault("qk_fix", True)
    kwargs.setdefault("grad_drop", True)
    per_prompt = kwargs.pop("per_prompt", False)
    est = estimate(model, pairs, per_prompt=per_prompt, **kwargs)
    return est.prompt_frame if per_prompt else est.frame
