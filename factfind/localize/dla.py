"""Direct logit attribution (DLA): how much each component writes the answer *directly*.

The final residual stream at the last token is a sum of component outputs,
``resid = embed + sum_l (sum_h head_out[l, h] + b_O[l] + mlp_out[l])``, and the logits are
``norm(resid) @ W_U + b_U``. With the final norm's scale frozen at its clean-run value the norm
is linear, so the logit difference ``logit[correct] - logit[wrong]`` splits exactly into one
term per component: ``norm_frozen(x_c) @ (W_U[:, correct] - W_U[:, wrong])``. That is the
component's *direct* effect - through the residual stream straight to the unembedding,
ignoring how later layers read it. Indirect effects need patching.

Finer splits are also exact:

* an MLP layer into its **neurons**: ``mlp_out = sum_n neurons[n] * W_out[n] + b_out``;
* a head into its **source tokens** (Chughtai et al. 2024, "Summing up the facts"): the head's
  output at the final query is ``sum_k pattern[h, final, k] * v[k, h] @ W_O[h]``, so each key
  position ``k`` - grouped here by role (subject, relation, final, ...) - gets its share.

Every row's ``effect`` is in logit-difference units; summed over the component rows (plus the
``bias`` row holding the norm bias and ``b_U``) they equal the model's logit difference.

Post-norm families (Gemma 2/3, OLMo 2): a head's or neuron's write is taken *after* its block's
post norm, with that norm's scale frozen at the run's value (``head_out`` already is;
neurons and source shares are multiplied by :meth:`~factfind.model.Model.mlp_write_scale` /
:meth:`~factfind.model.Model.attn_write_scale` at the final position), so the splits stay
exact. Softcapped logits (Gemma 2/3: ``cap * tanh(raw / cap)``) are not additive, so DLA
attributes the **pre-softcap** logit difference: ``total`` is then ``raw[correct] -
raw[wrong]`` (``Run.logits_raw``), which the rows sum to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError
from factfind.results import tidy
from factfind.types import GROUP_ROLES, Component, Role, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.types import Remote


@validated
def direct_logit_attribution(
    model: Model,
    data: FactDataset | FactPairs,
    *,
    neurons: bool = True,
    sources: bool = True,
    batch_size: int = 32,
    remote: Remote = None,
) -> pd.DataFrame:
    """Per-prompt DLA of the embedding, every head, attention bias, MLP and (optionally) neuron,
    and of every head split by source role.

    Args:
        model: the model (eager attention for ``sources=True``).
        data: prompts; with :class:`~factfind.data.FactPairs` the direction is
            ``W_U[correct] - W_U[corrupt attribute]``, otherwise ``W_U[correct]`` alone.
        neurons: include one row per MLP neuron (``component = "neurons"``).
        sources: include head rows split by source role (``method = "dla/source"``).
        remote: run the forwards as one nnsight session, ``"local"`` or on NDIF (``True``);
            see :meth:`~factfind.model.Model.session`.

    Returns:
        Rows with ``method`` ``"dla"`` or ``"dla/source"``, ``component`` in ``embed,
        head_out, attn_bias, mlp_out, neurons, bias``, ``layer``, ``head``/``neuron``,
        ``role`` (for ``dla/source``: the source role; else ``final``), ``prompt``,
        ``effect``, and ``total`` (the prompt's logit difference).
    """
    from factfind.data import FactPairs

    facts = data.clean if isinstance(data, FactPairs) else data
    wrong_facts = data.corrupt if isinstance(data, FactPairs) else None
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    L = model.n_layers
    save = [(Component.RESID_PRE, 0)]
    for layer in range(L):
        save += [(Component.HEAD_OUT, layer), (Component.MLP_OUT, layer)]
        if neurons:
            save.append((Component.NEURONS, layer))
        if sources:
            save += [(Component.PATTERN, layer), (Component.V, layer)]
    save.append((Component.RESID_POST, L - 1))
    batches = []
    for start in range(0, len(facts), batch_size):
        batch = model.tokenize(list(facts[start:start + batch_size]))
        wrong = (model.tokenize(list(wrong_facts[start:start + batch_size])).attribute_ids
                 if wrong_facts is not None else None)
        batches.append((batch, wrong))
    blocks = model.session(_dla_sweep, model, batches, save, neurons=neurons, sources=sources,
                           remote=remote)
    frames: list[pd.DataFrame] = []
    start = 0
    for total, parts in blocks:
        add = _collector(frames, start, total)
        for method, component, layer, head, neuron, values, role in parts:
            add(method, component, layer, head, neuron, values, role=role)
        start += len(total)
    return tidy(pd.concat(frames, ignore_index=True))


Block = tuple[str, str, int | None, Any, Any, Tensor, str]
"""One block of DLA rows: method, component, layer, heads, neurons, values, role."""


@torch.no_grad()
def _dla_sweep(model: Model, batches: list[tuple[TokenBatch, Tensor | None]],
               save: list[SiteKey], *, neurons: bool, sources: bool
               ) -> list[tuple[Tensor, list[Block]]]:
    """The model-side half of :func:`direct_logit_attribution` (one nnsight session, torch
    only): per batch the logit difference ``[batch]`` and the blocks of effects, each reduced
    to the final position before it leaves the model's device."""
    L = model.n_layers
    W_U = model.W_U
    out: list[tuple[Tensor, list[Block]]] = []
    for batch, wrong in batches:
        if wrong is not None:
            direction = W_U[:, batch.attribute_ids].T - W_U[:, wrong].T  # [batch d_model]
            bias_u = model.b_U[batch.attribute_ids] - model.b_U[wrong]
        else:
            direction = W_U[:, batch.attribute_ids].T
            bias_u = model.b_U[batch.attribute_ids]
        run = model.run(batch, save=save)
        a = run.acts
        final = a[(Component.RESID_POST, L - 1)][:, -1]
        scale = model.final_norm_scale(final)  # [batch 1], frozen from the clean run

        # the frozen final norm is linear, so ``<norm(x), direction>`` is ``<x, read>`` with
        # ``read`` the norm's transpose applied to the direction: one vector-Jacobian product
        # of the model's own norm per batch ([batch d_model]), then every component is one dot
        # product (the per-neuron writes ``[batch d_mlp d_model]`` are never formed)
        with torch.enable_grad():
            x0 = torch.zeros_like(final, requires_grad=True)
            y = (model.final_norm_frozen(x0, scale, bias=False) * direction).sum()
            (read,) = torch.autograd.grad(y, x0)

        def dla(x: Tensor, read: Tensor = read) -> Tensor:
            """``x [batch ... d_model]`` at the final position -> ``[batch ...]``."""
            shape = x.shape
            flat = x.reshape(shape[0], -1, shape[-1])
            return torch.einsum("bnd,bd->bn", flat, read).reshape(shape[:-1])

        logits = run.logits if run.logits_raw is None else run.logits_raw  # pre-softcap
        total = (logits.gather(-1, batch.attribute_ids[:, None])[:, 0])
        if wrong is not None:
            total = total - logits.gather(-1, wrong[:, None])[:, 0]
        zero = torch.zeros_like(final)
        bias_term = dla_bias = (model.final_norm_frozen(zero, scale) * direction).sum(-1)
        bias_term = dla_bias + bias_u
        parts: list[Block] = []

        def add(method: str, component: str, layer: int | None, head: Any, neuron: Any,
                values: Tensor, *, role: str = "final", parts: list[Block] = parts) -> None:
            parts.append((method, component, layer, head, neuron, values.detach().float().cpu(),
                          role))

        add("dla", "embed", None, None, None, dla(a[(Component.RESID_PRE, 0)][:, -1]))
        add("dla", "bias", None, None, None, bias_term)
        for layer in range(L):
            heads = dla(a[(Component.HEAD_OUT, layer)][:, -1])  # [batch head]
            add("dla", "head_out", layer, range(model.n_heads), None, heads)
            add("dla", "attn_bias", layer, None, None,
                dla(model.b_O(layer).expand_as(final)))
            if neurons:
                n = a[(Component.NEURONS, layer)][:, -1]
                f = model.mlp_write_scale(layer, n)  # [batch d_model]; ones without post norm
                # neuron i writes n_i * W_out[i] * f: its DLA is n_i * <W_out[i], f * read>
                nd = n * torch.einsum("nd,bd->bn", model.W_out(layer), f * read)  # [batch neuron]
                add("dla", "mlp_out", layer, None, None,
                    nd.sum(-1) + dla(model.b_out(layer) * f))
                add("dla", "neurons", layer, None, range(model.d_mlp), nd)
            else:
                add("dla", "mlp_out", layer, None, None,
                    dla(a[(Component.MLP_OUT, layer)][:, -1]))
            if sources:
                pat = a[(Component.PATTERN, layer)][:, :, -1]  # [batch head k]
                v = a[(Component.V, layer)]  # [batch k head d_head]
                per_k = torch.einsum("bhk,bkhd,hdm->bhkm", pat, v, model.W_O(layer))
                f = model.attn_write_scale(layer, torch.einsum("bhk,bkhd->bhd", pat, v))
                per_k = per_k * f[:, None, None, :]
                src = dla(per_k)  # [batch head k]
                for role in GROUP_ROLES:
                    m = _role_mask(batch, role).to(src.dtype)  # [batch k]
                    share = (src * m[:, None, :]).sum(-1)  # [batch head]
                    add("dla/source", "head_out", layer, range(model.n_heads), None,
                        share, role=str(role))
        out.append((total.detach().float().cpu(), parts))
    return out


def _role_mask(batch: Any, role: Role) -> Tensor:
    if role is Role.FINAL:
        m = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        m[:, -1] = True
        return m
    return batch.masks[role].bool()


def _collector(rows: list[pd.DataFrame], start: int, total: Tensor):
    """``add(...)`` appends one block of rows: ``values`` is ``[batch]`` (one component) or
    ``[batch n]`` (``n`` heads or neurons, indexed by the ``head``/``neuron`` argument's range)."""
    tot = total.detach().cpu().numpy()

    def add(method: str, component: str, layer: int | None, head: Any, neuron: Any,
            values: Tensor, *, role: str = "final") -> None:
        v = values.detach().cpu().numpy()
        nb = v.shape[0]
        units = 1 if v.ndim == 1 else v.shape[1]
        rows.append(pd.DataFrame({
            "method": method, "component": component, "layer": layer,
            "head": np.tile(np.asarray(head), nb) if head is not None else None,
            "neuron": np.tile(np.asarray(neuron), nb) if neuron is not None else None,
            "role": role, "prompt": np.repeat(np.arange(start, start + nb), units),
            "effect": v.reshape(-1), "total": np.repeat(tot, units)}))
    return add
