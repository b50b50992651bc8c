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
a circuit graph (:mod:`factfind.graph`): :func:`~factfind.edges.edge_patching.edge_patching`
measures the effect of that one path, the exact quantity that edge attribution patching
(:mod:`factfind.edges.eap`) approximates, and
:func:`~factfind.edges.edge_patching.path_patching_circuit` grows a circuit backwards from the
logits with it, as Wang et al. did by hand.

The pieces: :mod:`factfind.edges.placement` (nodes and sites on a batch, by the role partition, and
what they write), :mod:`factfind.edges.engine` (the stacked two-run recipe and its literal
reference), :mod:`factfind.edges.edge_patching` (edges and the circuit search); this module is the
sweep over senders, and re-exports the names of the others.

Example::

    pairs = facts.corrupt(model, seed=0)
    mlps = [Site("mlp_out", l, position="subject_last") for l in range(model.n_layers)]
    heads = [Site("z", 3, head=h, position="final") for h in range(model.n_heads)]
    path_patching(model, pairs, mlps, heads, receiver_input="v")      # MLPs -> heads' values
    path_patching_sweep(model, pairs, heads)                          # direct effects
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor

from factfind.edges.engine import Job, run_jobs
from factfind.edges.placement import (
    place_site,
)
from factfind.errors import ArgumentError
from factfind.results import tidy
from factfind.types import Component, Metric, Site
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model


_INPUTS = ("q", "k", "v", "qk", "qv", "kv", "qkv")


def _check_options(receiver_input: str, direction: str) -> str:
    order = "".join(c for c in "qkv" if c in receiver_input)
    if order not in _INPUTS or len(order) != len(receiver_input):
        raise ArgumentError(f"receiver_input must be some of 'q', 'k', 'v' (e.g. 'qk'), "
                         f"got {receiver_input!r}")
    if direction not in ("noise", "denoise"):
        raise ArgumentError(f"direction must be 'noise' or 'denoise', not {direction!r}")
    return order



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


@validated
def path_patching_sweep(
    model: Model, pairs: FactPairs, senders: Sequence[Site],
    receivers: Sequence[Site] | None = None, *, receiver_input: str = "qkv",
    direct: bool = False, direction: str = "noise", metric: Metric | None = None,
    batch_size: int = 32, chunk: int | None = None, progress: bool = True,
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
        raise ArgumentError("no senders to patch")
    groups = [list(senders)] if sets else [[s] for s in senders]

    def make(batch: TokenBatch, labels: Tensor) -> list[Job]:
        rcv = None if receivers is None else [place_site(model, batch, r) for r in receivers]
        return [Job([place_site(model, batch, s) for s in g], rcv) for g in groups]

    m, clean, corrupt = run_jobs(model, pairs, make, reference=reference,
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


@validated
def path_patching(model: Model, pairs: FactPairs, senders: Sequence[Site],
                  receivers: Sequence[Site] | None = None, **kwargs: Any) -> pd.DataFrame:
    """Path-patch the sender *set* into the receivers (see :func:`path_patching_sweep` for the
    options); one row per prompt."""
    return path_patching_sweep(model, pairs, senders, receivers, sets=True, **kwargs)


@validated
def path_patching_reference(model: Model, pairs: FactPairs, senders: Sequence[Site],
                            receivers: Sequence[Site] | None = None, **kwargs: Any
                            ) -> pd.DataFrame:
    """:func:`path_patching` by the literal freeze-everything recipe (slow, exact reference)."""
    return path_patching_sweep(model, pairs, senders, receivers, sets=True, reference=True,
                               **kwargs)


__all__ = ["path_patching", "path_patching_reference", "path_patching_sweep"]
