"""How good is a dictionary? SAELens' evaluations, on held-out tokens, one dictionary at a time.

A sparse dictionary trades two things against each other: how sparse its code is and how much
of the model it keeps. :func:`evaluate_dictionaries` measures both, with the definitions of
SAELens' ``evals.py`` (Bloom et al.; the CE-loss score is Bricken et al. 2023's "loss
recovered"), on tokens the dictionary was not trained on. For each dictionary ``d`` reading
``x`` (``mlp_in`` for a transcoder, its own site for an SAE) and writing ``y_hat`` in place of
``y`` (``mlp_out`` for a transcoder, ``x`` for an SAE):

*Reconstruction*, from one clean run per batch:

* ``explained_variance = 1 - E|y - y_hat|^2 / (E|y|^2 - |E y|^2)``: the share of the target's
  variance (summed over dimensions, about its mean over all evaluated tokens) that the
  dictionary reconstructs. This is SAELens' ``explained_variance`` (its ``_legacy`` variant
  divides per token instead and is not reported);
* ``mse``: ``E |y - y_hat|^2 / d_out`` (per element); ``cosine``: mean ``cos(y, y_hat)``;

*Sparsity*, from the feature activations ``f = d.encode(x)``:

* ``l0``: mean number of features active (``f > 0``) per token;
* ``dead_fraction``: features that never fired on the evaluated tokens;
* ``dense_fraction``: features that fired on more than ``dense_threshold`` (default 10%) of
  them (SAELens' feature-density histogram marks ``log10 density > -1`` as dense);

*Downstream*, with next-token cross-entropy over the evaluated tokens:

* ``ce_clean``: the model's own loss; ``ce_spliced``: with ``d`` spliced in and its error
  excluded (:func:`factfind.features.splice.spliced_run` with ``error=False``), so the model runs
  on the dictionary's reconstruction; ``ce_zero``: with the written site set to zero;
* ``ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``: 1 when splicing costs
  nothing, 0 when it is as bad as deleting the site (SAELens' ``ce_loss_score``);
* ``kl_recovered = (KL_zero - KL_spliced) / KL_zero`` with ``KL = KL(clean || run)`` of the
  next-token distributions (SAELens' ``kl_div_score``).

Dictionaries are spliced one at a time: each row measures one dictionary with the rest of the
model intact. Evaluated tokens exclude padding and the tokenizer's special tokens (BOS, EOS,
PAD; SAELens' ``ignore_tokens``): the BOS position's activations are huge and never
reconstructed well, and no one asks a dictionary about them. A next-token loss counts where
both the token and the one it predicts are evaluated.

Cost per batch: ``1 + 2 * len(dicts)`` forward passes (clean, and spliced plus zero-ablated
per dictionary), each with the full unembedding at every position; ``downstream=False`` keeps
only the clean one.

Example::

    corpus = ["The Eiffel Tower is in Paris.", ...]             # held-out text
    evaluate_dictionaries(model, dicts, corpus, batch_size=8)
    #   dictionary layer  explained_variance   l0  dead_fraction  ce_recovered  kl_recovered ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.splice import spliced_run
from factfind.features.tokens import as_dictionaries, token_batches
from factfind.results import tidy
from factfind.types import Component
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.model import Model

log = logging.getLogger(__name__)

#: a feature firing on more than this fraction of tokens is *dense* (SAELens' density plots)
DENSE_THRESHOLD = 0.1


# ----------------------------------------------------------------------------- the evaluation


@dataclass
class _Acc:
    """Running sums for one dictionary (float64)."""

    d_sae: int
    d_out: int
    tokens: int = 0
    resid_sq: float = 0.0
    y_sq: float = 0.0
    cos: float = 0.0
    l0: float = 0.0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl_spliced: float = 0.0
    kl_zero: float = 0.0

    def __post_init__(self) -> None:
        self.y_sum = torch.zeros(self.d_out, dtype=torch.float64)
        self.fired = torch.zeros(self.d_sae, dtype=torch.float64)


def _rows(act: Tensor, mask: Tensor, d: Dictionary) -> Tensor:
    """``act [batch pos d]`` at the ``mask [batch pos]`` tokens, on the dictionary's device
    (a model on a GPU with dictionaries on the CPU, or the reverse)."""
    return act[mask.to(act.device)].to(d.W_enc.device)


def _next_token_ce(logits: Tensor, ids: Tensor, keep: Tensor) -> Tensor:
    """Summed next-token cross-entropy at positions ``keep [batch pos-1]``."""
    lp = F.log_softmax(logits[:, :-1].float(), -1)
    nll = -lp.gather(-1, ids[:, 1:, None].to(lp.device)).squeeze(-1)
    return nll[keep.to(nll.device)].double().sum().cpu()


def _kl(clean_lp: Tensor, logits: Tensor, keep: Tensor) -> Tensor:
    """Summed ``KL(clean || run)`` over positions ``keep [batch pos]``."""
    lp = F.log_softmax(logits.float(), -1)
    kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
    return kl[keep.to(kl.device)].double().sum().cpu()


@validated
def evaluate_dictionaries(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    data: Any,
    *,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    downstream: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """SAELens' evaluations of each dictionary on held-out tokens (module docstring).

    Args:
        model: the model the dictionaries belong to.
        dicts: a :class:`Dictionaries`, one :class:`Dictionary` or a list of them.
        data: held-out tokens: facts, text(s), a token batch or a corpus (see
            :func:`factfind.features.tokens.token_batches`); not the dictionaries' training tokens.
        batch_size, max_length: rows per forward pass; texts are cut to ``max_length`` tokens.
        max_tokens: evaluate about this many tokens (whole batches), default all.
        dense_threshold: a feature firing on more than this fraction of tokens is dense.
        downstream: also measure CE loss and KL with each dictionary spliced in (2 extra
            forwards per dictionary and batch).
        progress: show a progress bar.

    Returns:
        One row per dictionary, ``method="features/evaluation"``: ``dictionary`` (``L3.tc``),
        ``component`` (the site it reads), ``layer``, ``out_site``, ``kind``, ``activation``,
        ``width``, ``k``, ``n`` and ``tokens`` (evaluated tokens), ``effect`` and
        ``explained_variance``, ``mse``, ``cosine``, ``l0``, ``dead_fraction``,
        ``dense_fraction``, ``dense_threshold``, ``ce_clean``, ``ce_spliced``, ``ce_zero``,
        ``ce_recovered``, ``kl_spliced``, ``kl_zero``, ``kl_recovered``, ``ce_tokens``.

    Raises:
        ArgumentError: a dictionary that does not fit the model, or ``dense_threshold``
            outside (0, 1).
        EmptyInputError: no tokens to evaluate.

    Example::

        df = evaluate_dictionaries(model, dicts, heldout_texts, max_tokens=20_000)
        df[["dictionary", "explained_variance", "l0", "ce_recovered"]]
    """
    ds = as_dictionaries(dicts)
    ds.check(model)
    if not 0 < dense_threshold < 1:
        raise ArgumentError(f"dense_threshold must be in (0, 1), got {dense_threshold}")
    accs = {d.name: _Acc(d.d_sae, d.d_out) for d in ds.values()}
    sites = sorted({(d.site, d.layer) for d in ds.values()} |
                   {(d.out_site, d.layer) for d in ds.values()}, key=str)
    f32 = {d.name: d if d.W_enc.dtype == torch.float32 else d.to(torch.float32)
           for d in ds.values()}
    ce_clean = 0.0
    n_ce = 0
    bar = tqdm(desc="evaluating dictionaries", unit="tok", total=max_tokens,
               disable=not progress)
    with torch.no_grad():
        for tb in token_batches(model, data, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens):
            valid = tb.valid
            if not valid.any():
                continue
            ids = tb.input_ids.cpu()
            clean = model.run(tb.batch, save=sites, logits="all" if downstream else "final")
            keep_ce = valid[:, :-1] & valid[:, 1:]
            if downstream:
                clean_lp = F.log_softmax(clean.logits.float(), -1)
                ce_clean += float(_next_token_ce(clean.logits, ids, keep_ce))
                n_ce += int(keep_ce.sum())
            for d in ds.values():
                acc = accs[d.name]
                dd = f32[d.name]
                x = _rows(clean.acts[(d.site, d.layer)], valid, dd).float()
                y = _rows(clean.acts[(d.out_site, d.layer)], valid, dd).float()
                f = dd.encode(x)
                y_hat = dd.decode(f) + (dd.skip(x) if dd.W_skip is not None else 0.0)
                active = f > 0
                acc.tokens += len(x)
                acc.resid_sq += float((y - y_hat).double().pow(2).sum())
                acc.y_sq += float(y.double().pow(2).sum())
                acc.y_sum += y.double().sum(0).cpu()
                acc.cos += float(F.cosine_similarity(y.double(), y_hat.double(), dim=-1,
                                                     eps=1e-12).sum())
                acc.l0 += float(active.sum())
                acc.fired += active.sum(0).double().cpu()
                if downstream:
                    sp = spliced_run(model, tb.batch, [d], error=False, logits="all")
                    zero = model.run(tb.batch, logits="all",
                                     edits={(d.out_site, d.layer): torch.zeros_like})
                    acc.ce_spliced += float(_next_token_ce(sp.logits, ids, keep_ce))
                    acc.ce_zero += float(_next_token_ce(zero.logits, ids, keep_ce))
                    acc.kl_spliced += float(_kl(clean_lp, sp.logits, valid))
                    acc.kl_zero += float(_kl(clean_lp, zero.logits, valid))
            bar.update(int(valid.sum()))
    bar.close()
    rows = []
    for d in ds.values():
        acc = accs[d.name]
        if acc.tokens == 0:
            raise EmptyInputError("no tokens to evaluate on: every token is padding or special")
        n = acc.tokens
        total_var = acc.y_sq / n - float((acc.y_sum / n).pow(2).sum())
        ev = 1 - (acc.resid_sq / n) / total_var if total_var > 0 else math.nan
        density = acc.fired / n
        row: dict[str, Any] = {
            "method": "features/evaluation", "dictionary": d.name, "component": str(d.site),
            "layer": d.layer, "out_site": str(d.out_site), "kind": str(d.kind),
            "activation": str(d.activation), "width": d.d_sae, "k": d.k, "n": n, "tokens": n,
            "effect": ev, "explained_variance": ev, "mse": acc.resid_sq / (n * d.d_out),
            "cosine": acc.cos / n, "l0": acc.l0 / n,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold}
        if downstream and n_ce:
            c_clean, c_sp, c_zero = ce_clean / n_ce, acc.ce_spliced / n_ce, acc.ce_zero / n_ce
            kl_sp, kl_zero = acc.kl_spliced / n, acc.kl_zero / n
            row |= {"ce_clean": c_clean, "ce_spliced": c_sp, "ce_zero": c_zero,
                    "ce_recovered": (c_zero - c_sp) / (c_zero - c_clean)
                    if c_zero != c_clean else math.nan,
                    "kl_spliced": kl_sp, "kl_zero": kl_zero,
                    "kl_recovered": (kl_zero - kl_sp) / kl_zero if kl_zero > 0 else math.nan,
                    "ce_tokens": n_ce}
        rows.append(row)
        log.info("%s: explained variance %.3f, L0 %.1f, dead %.3f, CE recovered %s", d.name,
                 ev, row["l0"], row["dead_fraction"], row.get("ce_recovered"))
    return tidy(rows)


def site_activations(model: Model, data: Any, sites: Iterable[tuple[Any, int]], *,
                        batch_size: int = 16, max_length: int = 128,
                        max_tokens: int | None = None) -> dict[tuple[Any, int], Tensor]:
    """The activations ``[tokens d]`` of each ``(component, layer)`` site on the evaluated
    tokens of ``data`` (padding and special tokens left out), float32 on the CPU: what feature
    splitting and superposition are measured on."""
    keys = sorted({(Component(c), int(layer)) for c, layer in sites}, key=str)
    if not keys:
        raise ArgumentError("no sites to collect")
    parts: dict[tuple[Any, int], list[Tensor]] = {k: [] for k in keys}
    with torch.no_grad():
        for tb in token_batches(model, data, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens):
            run = model.run(tb.batch, save=keys)
            for k in keys:
                parts[k].append(run.acts[k][tb.valid.to(run.acts[k].device)].float().cpu())
    out = {k: torch.cat(v) for k, v in parts.items()}
    if not len(next(iter(out.values()))):
        raise EmptyInputError("no tokens to collect: every token is padding or special")
    return out


@validated
def feature_density(model: Model, dicts: Dictionaries | Dictionary | Iterable[Dictionary],
                    data: Any, *, batch_size: int = 8, max_length: int = 128,
                    max_tokens: int | None = None) -> pd.DataFrame:
    """Per feature: the fraction of evaluated tokens it fires on (SAELens' feature density).

    Returns:
        One row per (dictionary, feature): ``dictionary``, ``layer``, ``feature``,
        ``feature_id`` (``L3.tc.f12@all``), ``density``, ``fired`` (tokens), ``tokens``,
        ``log10_density`` (``-inf`` for a dead feature).
    """
    ds = as_dictionaries(dicts)
    ds.check(model)
    sites = sorted({(d.site, d.layer) for d in ds.values()}, key=str)
    fired = {d.name: torch.zeros(d.d_sae, dtype=torch.float64) for d in ds.values()}
    n = 0
    with torch.no_grad():
        for tb in token_batches(model, data, batch_size=batch_size, max_length=max_length,
                                max_tokens=max_tokens):
            run = model.run(tb.batch, save=sites)
            for d in ds.values():
                x = _rows(run.acts[(d.site, d.layer)], tb.valid, d)
                fired[d.name] += (d.encode(x) > 0).sum(0).double().cpu()
            n += int(tb.valid.sum())
    if n == 0:
        raise EmptyInputError("no tokens to evaluate on: every token is padding or special")
    frames = []
    for d in ds.values():
        dens = (fired[d.name] / n).numpy()
        frames.append(pd.DataFrame({
            "dictionary": d.name, "layer": d.layer, "feature": range(d.d_sae),
            "feature_id": [d.feature_id(i) for i in range(d.d_sae)], "density": dens,
            "fired": fired[d.name].numpy().astype(int), "tokens": n}))
    out = pd.concat(frames, ignore_index=True)
    out["log10_density"] = [math.log10(v) if v > 0 else -math.inf for v in out["density"]]
    return out


__all__ = ["DENSE_THRESHOLD", "evaluate_dictionaries", "feature_density", "site_activations"]
