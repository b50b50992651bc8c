"""Metrics: pure functions from next-token logits to one number per prompt.

Localization methods compare a *clean* run (the fact's own subject), a *corrupt* run (another
subject with a different attribute) and a *patched* run (one of the two with some activations
taken from the other). What they compare is one of these metrics at the final position:

* **logit difference** ``logit[correct] - logit[wrong]``: linear in the final residual stream,
  so direct logit attribution decomposes it exactly, and it is the usual choice for patching
  (Wang et al. 2022; Zhang & Nanda 2024 recommend it over probabilities);
* **logit difference against the mean** of the relation's other attributes (no single foil);
* **probability** and **rank** of the correct attribute token (ROME's causal tracing reports
  probability);
* **normalised recovery** ``(patched - corrupt) / (clean - corrupt)``: 0 means the patch did
  nothing, 1 means it restored the clean behaviour (denoising) - or, for noising, the share of
  the effect that survives.

All functions take ``logits [batch d_vocab]`` and index tensors ``[batch]`` and return
``[batch]``; they never reduce over the batch, so per-prompt effects and confidence intervals
stay available.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from factfind.errors import ArgumentError, DegenerateResultError


def _gather(logits: Tensor, ids: Tensor) -> Tensor:
    ids = ids.to(logits.device).long()
    if ids.shape != logits.shape[:1]:
        raise ArgumentError(f"ids of shape {tuple(ids.shape)} do not match logits "
                         f"{tuple(logits.shape)}: need one id per row")
    return logits.gather(-1, ids[:, None])[:, 0]


def logit_diff(logits: Tensor, correct: Tensor, wrong: Tensor) -> Tensor:
    """``logit[correct] - logit[wrong]`` per row.

    Example::

        >>> logit_diff(torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([1]), torch.tensor([0]))
        tensor([2.])
    """
    return _gather(logits, correct) - _gather(logits, wrong)


def logit_diff_vs_mean(logits: Tensor, correct: Tensor, candidates: Tensor) -> Tensor:
    """``logit[correct]`` minus the mean logit of the other candidates per row.

    Args:
        logits: ``[batch d_vocab]``.
        correct: ``[batch]`` correct attribute token ids.
        candidates: ``[n]`` the relation's attribute token ids (``correct`` may be among them;
            it is excluded from the mean of its own row).
    """
    correct = correct.to(logits.device).long()
    candidates = candidates.to(logits.device).long().unique()
    cand = logits[:, candidates]  # [batch n]
    others = candidates[None, :] != correct[:, None]  # [batch n]
    if bool((others.sum(-1) == 0).any()):
        raise ArgumentError("a row has no candidate other than its correct attribute")
    mean_other = (cand * others).sum(-1) / others.sum(-1)
    return _gather(logits, correct) - mean_other


def prob(logits: Tensor, ids: Tensor) -> Tensor:
    """Softmax probability of ``ids`` per row."""
    return _gather(torch.log_softmax(logits.float(), -1), ids).exp()


def prob_correct(logits: Tensor, correct: Tensor, wrong: Tensor) -> Tensor:
    """A :data:`~factfind.types.Metric`: the probability of the correct attribute's first token
    (ROME's causal-tracing quantity; ``wrong`` is unused). Pass it as ``metric=`` to any
    analysis that measures a metric.

    Example::

        >>> prob_correct(torch.tensor([[0.0, 0.0]]), torch.tensor([1]), torch.tensor([0]))
        tensor([0.5000])
    """
    del wrong
    return prob(logits, correct)


def rank(logits: Tensor, ids: Tensor) -> Tensor:
    """0-based rank of ``ids`` per row (0 = top-1); ties counted in the token's favour."""
    target = _gather(logits, ids)
    return (logits > target[:, None]).sum(-1)


def normalized_recovery(patched: Tensor, clean: Tensor, corrupt: Tensor,
                        *, eps: float = 1e-9) -> Tensor:
    """``(patched - corrupt) / (clean - corrupt)``, elementwise (rows where clean = corrupt are
    NaN, not silently 0)."""
    denom = clean - corrupt
    out = (patched - corrupt) / denom
    return torch.where(denom.abs() < eps, torch.full_like(out, float("nan")), out)


def share(value: float, low: float, high: float, *, what: str) -> float:
    """``(value - low) / (high - low)``: where ``value`` lies between a baseline ``low`` (e.g.
    everything ablated) and ``high`` (the full model), for scalar measures such as
    faithfulness.

    Raises:
        DegenerateResultError: ``high == low`` (or either is not finite), so the share is
            undefined - the model shows no behaviour to explain on these prompts.
    """
    span = high - low
    if not (abs(span) > 0 and all(map(math.isfinite, (value, low, high)))):
        raise DegenerateResultError(
            f"{what} is undefined: the full model's metric ({high:.4g}) equals the baseline's "
            f"({low:.4g}), so there is no behaviour to explain; use facts the model knows "
            "(facts.known_by(model)) and corrupt partners whose answers differ")
    return (value - low) / span
