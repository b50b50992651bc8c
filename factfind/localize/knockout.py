"""Attention knockout (Geva, Bastings, Filippova, Globerson 2023): where does information flow?

To ask whether the final token reads the subject at layer ``l``, *block* the attention edges
from the final position to the subject positions - set those attention scores to -inf before
the softmax, so the final token cannot attend there - in a window of ``k`` layers starting at
``l``, and measure the relative change in the probability of the predicted attribute:
``effect = (p_knockout - p_clean) / p_clean``. A large drop in middle-upper layers when
blocking final -> subject (and not final -> relation) is Geva et al.'s evidence for
"attribute extraction" by attention from the subject's enriched representation; Fact Finding
calls these heads attribute extractors.

Knockout acts on the attention *mask* (edges), not on activations, so it is not a special case
of activation patching. All (source role x window start) variants for a batch of prompts run in
one stacked forward whose per-layer masks differ by row; :func:`attention_knockout_reference`
loops one variant per forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.errors import ArgumentError
from factfind.metrics import prob
from factfind.model.incremental import OVERHEAD_ROWS, plan_groups
from factfind.results import tidy
from factfind.types import GROUP_ROLES, POINT_ROLES, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.types import Remote

DEFAULT_SOURCES: tuple[Role, ...] = (Role.SUBJECT, Role.RELATION, Role.FINAL)


def _role_positions(batch: TokenBatch, role: Role) -> Tensor:
    """``[batch pos]`` bool of the positions a role names."""
    if role in GROUP_ROLES:
        return batch.masks[role].cpu().bool()
    if role in POINT_ROLES:
        n_rows, n_pos = batch.input_ids.shape
        m = torch.zeros(n_rows, n_pos, dtype=torch.bool)
        m[torch.arange(n_rows), batch.positions[role].cpu()] = True
        return m
    raise ArgumentError(f"unknown role {role!r}")


def _edge_block(batch: TokenBatch, source: Role) -> Tensor:
    """``[batch q k]``: True on the edges from the final position to the source role."""
    n_rows, n_pos = batch.input_ids.shape
    block = torch.zeros(n_rows, n_pos, n_pos, dtype=torch.bool)
    block[:, -1, :] = _role_positions(batch, source)  # left padding: final = -1
    return block


@validated
def attention_knockout(
    model: Model,
    facts: FactDataset,
    *,
    sources: Iterable[Role | str] = DEFAULT_SOURCES,
    window: int = 1,
    batch_size: int = 16,
    progress: bool = True,
    remote: Remote = None,
    incremental: bool = True,
) -> pd.DataFrame:
    """Relative change in the attribute's probability when final -> source edges are blocked.

    Cost: one forward per prompt batch, then each (source, window) knockout recomputes only
    the final position from its first blocked layer on (:mod:`factfind.model.incremental`): about
    ``(n_layers - layer) / n_layers / P`` of a forward (plus a fixed share for attention over
    every key); with ``incremental=False`` one full stacked forward per knockout.

    Args:
        model: the model.
        facts: prompts (their own attribute is the target).
        sources: roles whose positions the final token may no longer attend to.
        window: number of consecutive layers blocked, starting at each ``layer``.
        remote: run the forwards as one nnsight session, ``"local"`` or on NDIF (``True``);
            see :meth:`~factfind.model.Model.session`.
        incremental: resume each knockout from the cached clean run (local runs only).

    Returns:
        Rows with ``method = "attention_knockout"``, ``role`` (the blocked source), ``layer``
        (window start), ``prompt``, ``effect`` (relative change), ``p_clean``, ``p_knockout``.
    """
    roles = [Role(s) for s in sources]
    if window < 1 or window > model.n_layers:
        raise ArgumentError(f"window must be in 1..{model.n_layers}, got {window}")
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    starts = list(range(model.n_layers - window + 1))
    variants = [(r, s) for r in roles for s in starts]
    batches = [model.tokenize(list(facts[start:start + batch_size]))
               for start in range(0, len(facts), batch_size)]
    bar = tqdm(total=len(facts), desc="attention knockout", unit="prompt", disable=not progress)
    rows = model.session(_knockout_sweep, model, batches, variants, window=window,
                         progress=bar.update, remote=remote,
                         incremental=incremental and not remote)
    bar.close()
    return tidy(rows)


def _knockout_sweep(model: Model, batches: list[TokenBatch], variants: list[tuple[Role, int]],
                    *, window: int, progress: Callable[[int], Any] | None = None,
                    incremental: bool = False) -> list[dict[str, Any]]:
    """The model-side half of :func:`attention_knockout` (one nnsight session): plain rows."""
    rows: list[dict[str, Any]] = []
    start = 0
    for batch in batches:
        nb = batch.input_ids.shape[0]
        target = batch.attribute_ids
        prefix = model.base_run(batch) if incremental else None
        p_clean = prob(model.run(batch).logits if prefix is None else prefix.logits, target)
        blocks = {r: _edge_block(batch, r) for r, _ in variants}
        n_pos = batch.input_ids.shape[1]
        if prefix is None:
            groups = [list(range(len(variants)))]
        else:  # only the final query is blocked: resume at the window's first layer, there
            groups = plan_groups([(first, n_pos - 1) for _, first in variants],
                                 n_layers=model.n_layers, n_pos=n_pos, max_size=len(variants),
                                 overhead=OVERHEAD_ROWS / nb)
        p_knock = torch.empty(len(variants), nb)
        for idx in groups:
            per_layer: dict[int, Tensor] = {}
            for v, i in enumerate(idx):
                role, first = variants[i]
                for layer in range(first, first + window):
                    m = per_layer.setdefault(layer, torch.zeros(len(idx), *blocks[role].shape,
                                                                dtype=torch.bool))
                    m[v] = blocks[role]
            block = {k: m.flatten(0, 1) for k, m in per_layer.items()}
            if prefix is None:
                run = model.run(batch.repeat(len(idx)), block_attention=block)
            else:
                resume = (min(variants[i][1] for i in idx), n_pos - 1)
                run = model.run_from(prefix, start=resume, reps=len(idx), block_attention=block)
            p_knock[idx] = prob(run.logits, target.repeat(len(idx))).reshape(
                len(idx), nb).detach().cpu().to(p_knock.dtype)
        for v, (role, first) in enumerate(variants):
            for b in range(nb):
                pk, pc = float(p_knock[v, b]), float(p_clean[b])
                rows.append({"method": "attention_knockout", "component": "attn",
                             "layer": first, "role": str(role), "prompt": start + b,
                             "effect": (pk - pc) / pc, "p_clean": pc, "p_knockout": pk,
                             "window": window})
        start += nb
        if progress is not None:
            progress(nb)
    return rows


@validated
def attention_knockout_reference(model: Model, facts: FactDataset, *,
                                 sources: Iterable[Role | str] = DEFAULT_SOURCES,
                                 window: int = 1) -> pd.DataFrame:
    """The exact reference: one prompt and one (source, window) knockout per forward."""
    rows: list[dict[str, Any]] = []
    for i, fact in enumerate(facts):
        batch = model.tokenize([fact])
        pc = float(prob(model.run(batch).logits, batch.attribute_ids)[0])
        for role in [Role(s) for s in sources]:
            for first in range(model.n_layers - window + 1):
                block = _edge_block(batch, role)
                run = model.run(batch, block_attention={k: block
                                                        for k in range(first, first + window)})
                pk = float(prob(run.logits, batch.attribute_ids)[0])
                rows.append({"method": "attention_knockout", "component": "attn",
                             "layer": first, "role": str(role), "prompt": i,
                             "effect": (pk - pc) / pc, "p_clean": pc, "p_knockout": pk,
                             "window": window})
    return tidy(rows)
