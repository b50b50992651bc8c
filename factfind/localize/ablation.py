"""Ablation: what breaks when a component is removed - and how to remove it fairly.

Setting an activation to zero takes the model off its distribution; interpretability work
instead *replaces* it with a typical value:

* **mean ablation** - the activation's mean over a pool of facts, taken separately for each
  token role (the mean at "final" tokens differs from the mean at subject tokens), so only
  the prompt-specific information is removed;
* **resample ablation** - the activation from a *different* prompt of the same relation and
  token length (Chan et al. 2022, causal scrubbing; Fact Finding resamples a neuron from K other
  athletes), averaged over ``K`` resamples;
* **zero ablation**, for comparison.

Sites are :class:`~factfind.types.Site` values - a layer's ``attn_out``/``mlp_out``/
``resid_*``, one head (``z`` with ``head``), one neuron (``neurons`` with ``neuron``), at a role
or at every position (``position=None``). :func:`ablation` removes each site alone (one row per
site and prompt); :func:`ablate_sets` removes whole sets at once - the primitive behind circuit
faithfulness and behind the **effective model** of Fact Finding (:func:`effective_model`): mean-
ablate the attention at the subject tokens from layer ``k`` on and see whether the model still
recalls the fact; the smallest ``k`` that keeps accuracy says how many attention layers the
subject's tokens need to be joined before the MLP lookup.

The metric is the logit of the correct attribute minus the mean logit of the relation's other
attributes, and "correct" means the attribute is the top-1 among the relation's attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.pairs import FALLBACKS
from factfind.errors import ArgumentError, OutOfRangeError
from factfind.metrics import logit_diff_vs_mean
from factfind.model.incremental import OVERHEAD_ROWS, first_position, plan_groups
from factfind.results import tidy
from factfind.types import ABLATIONS, ROLE_NAMES, Component, Role, Site, SiteKey
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.data.batch import TokenBatch
    from factfind.model import Model
    from factfind.types import Remote

log = logging.getLogger(__name__)

ABLATABLE = (Component.RESID_PRE, Component.RESID_POST, Component.ATTN_OUT, Component.MLP_OUT,
             Component.Z, Component.NEURONS)




@validated
def mean_activations(model: Model, facts: FactDataset, keys: Iterable[SiteKey], *,
                     batch_size: int = 64, remote: Remote = None) -> dict[SiteKey, Tensor]:
    """Per-role mean activation ``[n_roles ...]`` (roles in :data:`TOKEN_ROLES` order) for each
    ``(component, layer)``, streamed over the dataset (memory independent of its size)."""
    keys = sorted({(Component(c), layer) for c, layer in keys})
    return model.session(_mean_sweep, model, _role_batches(model, facts, batch_size), keys,
                         remote=remote)


def _role_batches(model: Model, facts: FactDataset, batch_size: int
                  ) -> list[tuple[TokenBatch, Tensor]]:
    """Token batches with each token's role index (tokenized here, before any session)."""
    out = []
    for start in range(0, len(facts), batch_size):
        batch = model.tokenize(list(facts[start:start + batch_size]))
        out.append((batch, batch.role_labels()))
    return out


def _mean_sweep(model: Model, batches: list[tuple[TokenBatch, Tensor]], keys: list[SiteKey]
                ) -> dict[SiteKey, Tensor]:
    """The model-side half of :func:`mean_activations` (torch only, one session)."""
    sums: dict[SiteKey, Tensor] = {}
    counts = torch.zeros(len(ROLE_NAMES))
    for batch, roles in batches:
        run = model.run(batch, save=keys)
        onehot = torch.nn.functional.one_hot(roles.clamp(min=0), len(ROLE_NAMES)).float()
        onehot = onehot * (roles >= 0)[..., None]  # [batch pos role]
        counts += onehot.sum((0, 1))
        for key in keys:
            act = run.acts[key].float().cpu()
            flat = act.flatten(2)  # [batch pos features]
            s = torch.einsum("bpr,bpf->rf", onehot, flat).reshape(len(ROLE_NAMES),
                                                                   *act.shape[2:])
            sums[key] = sums[key] + s if key in sums else s
    denom = counts.clamp(min=1)
    return {k: v / denom.reshape(-1, *([1] * (v.dim() - 1))) for k, v in sums.items()}


def _site_mask(model: Model, batch: TokenBatch, site: Site) -> Tensor:
    """Boolean mask over the site's activation ``[batch pos (head|neuron)]``."""
    rows, n_pos = batch.input_ids.shape
    if site.position is None:
        pm = batch.attention_mask.bool().cpu()
    elif isinstance(site.position, Role):
        pm = batch.mask(site.position).cpu().bool()
    else:
        pm = torch.zeros(rows, n_pos, dtype=torch.bool)
        pm[:, site.position] = True
    if site.component is Component.Z:
        m = torch.zeros(rows, n_pos, model.n_heads, dtype=torch.bool)
        if site.head is None:
            m[:] = pm[..., None]
        else:
            m[..., site.head] = pm
        return m
    if site.component is Component.NEURONS:
        m = torch.zeros(rows, n_pos, model.d_mlp, dtype=torch.bool)
        if site.neuron is None:
            m[:] = pm[..., None]
        else:
            m[..., site.neuron] = pm
        return m
    return pm


def _set_start(model: Model, batch: TokenBatch, group: Sequence[Site]) -> tuple[int, int]:
    """The first ``(layer, position)`` a set of ablated sites writes."""
    if not group:
        return model.n_layers - 1, batch.input_ids.shape[1] - 1
    layer = min(0 if s.component is Component.EMBED else s.layer for s in group)
    pos = min(first_position(_site_mask(model, batch, s)) for s in group)
    return layer, pos


def _check(model: Model, site: Site) -> None:
    if site.component not in ABLATABLE:
        raise ArgumentError(f"cannot ablate {site.component}; choose from "
                         f"{', '.join(str(c) for c in ABLATABLE)}")
    if site.layer >= model.n_layers:
        raise OutOfRangeError(f"layer {site.layer} does not exist ({model.n_layers} layers)")
    if site.head is not None and site.head >= model.n_heads:
        raise OutOfRangeError(f"head {site.head} does not exist ({model.n_heads} heads)")
    if site.neuron is not None and site.neuron >= model.d_mlp:
        raise OutOfRangeError(f"neuron {site.neuron} does not exist ({model.d_mlp} neurons)")


@validated
def ablate_sets(
    model: Model,
    facts: FactDataset,
    sets: Sequence[Sequence[Site]],
    *,
    how: str = "mean",
    means: dict[SiteKey, Tensor] | None = None,
    pool: FactDataset | None = None,
    resamples: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    remote: Remote = None,
    incremental: bool = True,
) -> pd.DataFrame:
    """Ablate each *set* of sites together; one row per (set, prompt).

    Cost: one forward per prompt batch (plus one per resample partner), then per set and
    partner about ``(n_layers - l) / n_layers * (P - p) / P`` of a forward, ``(l, p)`` the
    set's first ablated layer and position (:mod:`factfind.model.incremental`); with
    ``incremental=False`` one full stacked forward per set and partner.

    Args:
        model: the model.
        facts: the prompts measured (targets are their own attributes).
        sets: each a list of :class:`~factfind.types.Site` removed at once.
        how: ``"mean"``, ``"resample"`` or ``"zero"``.
        means: precomputed :func:`mean_activations` (default: over ``pool``/``facts``).
        pool: the facts the means come from, and extra resample partners (default
            ``facts``) - the same name as :meth:`FactDataset.corrupt`'s partner pool.
        resamples: K partners per prompt for ``"resample"``.
        remote: run the forwards (means included) as one nnsight session, ``"local"`` or on
            NDIF (``True``); see :meth:`~factfind.model.Model.session`.
        incremental: resume each stacked ablation from the cached clean run (local only).

    Returns:
        Rows with ``set`` (index into ``sets``), ``prompt``, ``effect`` (ablated minus clean
        metric), ``metric``, ``clean``, ``correct`` and ``clean_correct``.
    """
    if how not in ABLATIONS:
        raise ArgumentError(f"how must be 'mean', 'resample' or 'zero', not {how!r}")
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    for group in sets:
        for site in group:
            _check(model, site)
    keys = sorted({(s.component, s.layer) for g in sets for s in g})
    mean_batches = (_role_batches(model, pool or facts, 64)
                    if how == "mean" and means is None else None)
    candidates = answer_candidates(model, facts if pool is None else facts + pool)
    partners = _partners(model, facts, pool, resamples, seed) if how == "resample" else []
    batches = []
    for start in range(0, len(facts), batch_size):
        batch = model.tokenize(list(facts[start:start + batch_size]))
        cand = [candidates[f.relation] for f in batch.prompts]
        srcs = [model.tokenize(list(pairs.corrupt[start:start + batch_size]))
                for pairs in partners]
        batches.append((batch, cand, batch.role_labels(), srcs))
    bar = tqdm(total=len(facts), disable=not progress, desc="ablation")
    rows = model.session(_ablation_sweep, model, batches, sets, keys, how=how, means=means,
                         mean_batches=mean_batches, progress=bar.update, remote=remote,
                         incremental=incremental and not remote)
    bar.close()
    return tidy(rows)


def _ablation_sweep(model: Model, batches: list[tuple[TokenBatch, list[Tensor], Tensor,
                                                     list[TokenBatch]]],
                    sets: Sequence[Sequence[Site]], keys: list[SiteKey], *, how: str,
                    means: dict[SiteKey, Tensor] | None,
                    mean_batches: list[tuple[TokenBatch, Tensor]] | None,
                    progress: Callable[[int], Any] | None = None,
                    incremental: bool = False) -> list[dict[str, Any]]:
    """The model-side half of :func:`ablate_sets` (one nnsight session, torch only): rows."""
    if mean_batches is not None:
        means = _mean_sweep(model, mean_batches, keys)
    rows: list[dict[str, Any]] = []
    start = 0
    for batch, cand, roles, src_batches in batches:
        done = len(rows)
        nb = len(batch)
        reps = max(1, len(src_batches))
        prefix = model.base_run(batch) if incremental else None
        clean = model.run(batch) if prefix is None else prefix
        m_clean = _metric(clean.logits, batch.attribute_ids, cand)
        ok_clean = _correct(clean.logits, batch.attribute_ids, cand)
        sources = [model.run(src, save=keys).acts for src in src_batches]
        chunk = max(1, 512 // (nb * reps))
        if prefix is None:
            plan = [list(range(g0, min(len(sets), g0 + chunk)))
                    for g0 in range(0, len(sets), chunk)]
        else:  # each set's forward resumes at its first ablated layer and position
            starts = [_set_start(model, batch, group) for group in sets]
            plan = plan_groups(starts, n_layers=model.n_layers, n_pos=batch.input_ids.shape[1],
                               max_size=chunk, overhead=OVERHEAD_ROWS / (nb * reps))
        for idx in plan:
            groups = [sets[i] for i in idx]
            n_rows = len(groups) * reps * nb
            edits = {}
            for key in keys:
                masks, repl = [], []
                for group in groups:
                    m = torch.zeros_like(_site_mask(model, batch, Site(key[0], key[1])))
                    for site in group:
                        if (site.component, site.layer) == key:
                            m |= _site_mask(model, batch, site)
                    for r in range(reps):
                        masks.append(m)
                        if how == "resample":
                            repl.append(sources[r][key].cpu())
                if not any(bool(m.any()) for m in masks):
                    continue
                mask = torch.cat(masks).to(model.device)
                if how == "mean":
                    assert means is not None
                    table = means[key].to(model.dtype)  # [roles ...]
                    value = table[roles.clamp(min=0)]  # [batch pos ...]
                    value = value.repeat(n_rows // nb, *([1] * (value.dim() - 1)))
                elif how == "resample":
                    value = torch.cat(repl)
                else:
                    value = None
                edits[key] = _replace(mask, value)
            if prefix is None:
                run = model.run(batch.repeat(n_rows // nb), edits=edits)
            else:
                resume = (min(starts[i][0] for i in idx), min(starts[i][1] for i in idx))
                run = model.run_from(prefix, start=resume, reps=n_rows // nb, edits=edits)
            ids = batch.attribute_ids.repeat(n_rows // nb)
            metric = _metric(run.logits, ids, cand * (n_rows // nb)).reshape(len(groups), reps,
                                                                             nb)
            ok = _correct(run.logits, ids, cand * (n_rows // nb)).reshape(len(groups), reps, nb)
            for g in range(len(groups)):
                for b in range(nb):
                    m = float(metric[g, :, b].mean())
                    rows.append({"method": f"ablation/{how}", "set": idx[g],
                                 "prompt": start + b, "effect": m - float(m_clean[b]),
                                 "metric": m, "clean": float(m_clean[b]),
                                 "correct": float(ok[g, :, b].float().mean()),
                                 "clean_correct": float(ok_clean[b])})
        # rows in set order whatever the plan's order of forwards
        rows[done:] = sorted(rows[done:], key=lambda r: (r["set"], r["prompt"]))
        start += nb
        if progress is not None:
            progress(nb)
    return rows


def answer_candidates(model: Model, facts: FactDataset) -> dict[str, Tensor]:
    """Per relation, the attribute tokens the metric compares the answer with: the relation's
    own attributes among ``facts``; a relation with a single attribute there (a handful of
    ROME facts of one relation share their answer) is compared with every relation's
    attributes instead, so the contrast is never empty (logged)."""
    every = model.tokenize(list(facts)).attribute_ids.unique()
    out, widened = {}, []
    for r in facts.relations:
        own = model.tokenize(list(facts.by_relation(r))).attribute_ids.unique()
        if len(own) < 2:
            own, _ = torch.sort(every)
            widened.append(r)
        out[r] = own
    if widened:
        log.info("%d relations have a single attribute among the facts; their answers are "
                 "contrasted with every relation's attributes: %s", len(widened),
                 ", ".join(widened[:5]) + (" ..." if len(widened) > 5 else ""))
    if len(every) < 2:
        raise ArgumentError("ablation needs at least two different attributes among the facts "
                         "(the metric contrasts the answer with the others)")
    return out


@validated
def ablation(model: Model, facts: FactDataset, sites: Sequence[Site], **kwargs: Any
             ) -> pd.DataFrame:
    """Ablate each site alone (see :func:`ablate_sets` for options); rows carry the site."""
    df = ablate_sets(model, facts, [[s] for s in sites], **kwargs)
    site = [sites[i] for i in df["set"]]
    df["component"] = pd.array([str(s.component) for s in site], dtype="string")
    df["layer"] = pd.array([s.layer for s in site], dtype="Int64")
    df["head"] = pd.array([s.head for s in site], dtype="Int64")
    df["neuron"] = pd.array([s.neuron for s in site], dtype="Int64")
    df["role"] = pd.array([None if s.position is None else str(s.position) for s in site],
                          dtype="string")
    return df


@validated
def effective_model(model: Model, facts: FactDataset, *, how: str = "mean",
                    positions: Sequence[Role] = (Role.SUBJECT,), **kwargs: Any) -> pd.DataFrame:
    """Fact Finding's effective model: accuracy with attention at ``positions`` (default the
    subject tokens) ablated in every layer from ``k`` on, for each ``k`` (``k = n_layers``
    ablates nothing). Returns one row per ``k`` with mean ``accuracy`` and ``effect``."""
    L = model.n_layers
    sets = [[Site(Component.ATTN_OUT, layer, position=p) for layer in range(k, L)
             for p in positions] for k in range(L + 1)]
    df = ablate_sets(model, facts, sets, how=how, **kwargs)
    out = df.groupby("set").agg(effect=("effect", "mean"), accuracy=("correct", "mean"),
                                clean_accuracy=("clean_correct", "mean"), n=("prompt", "count"))
    out = out.reset_index().rename(columns={"set": "layer"})
    out["method"] = f"effective_model/{how}"
    out["component"] = "attn_out"
    out["role"] = ",".join(str(p) for p in positions)
    return tidy(out)


def _replace(mask: Tensor, value: Tensor | None):
    def edit(act: Tensor) -> Tensor:
        m = mask.reshape(*mask.shape, *([1] * (act.dim() - mask.dim())))
        v = torch.zeros_like(act) if value is None else value.to(act.device, act.dtype)
        return torch.where(m, v, act)
    return edit


def _metric(logits: Tensor, ids: Tensor, cand: list[Tensor]) -> Tensor:
    out = torch.empty(len(ids))
    for b in range(len(ids)):
        out[b] = logit_diff_vs_mean(logits[b:b + 1], ids[b:b + 1], cand[b])[0]
    return out


def _correct(logits: Tensor, ids: Tensor, cand: list[Tensor]) -> Tensor:
    out = torch.empty(len(ids), dtype=torch.bool)
    for b in range(len(ids)):
        c = cand[b].to(logits.device)
        out[b] = c[logits[b, c].argmax()] == ids[b]
    return out


def _partners(model: Model, facts: FactDataset, extra: FactDataset | None, k: int,
              seed: int) -> list[Any]:
    """K resample partners per prompt, drawn from ``facts + extra`` (same relation and token
    length, different attribute); every prompt must get one."""
    pool = facts if extra is None else facts + extra
    out = []
    for r in range(k):
        # only ``facts`` are paired (partners from the whole pool): the same pairs as pairing
        # the pool and keeping its first len(facts) (each fact's draw is seeded by the fact,
        # and the pool lists facts first), without pairing every reference fact k times
        pairs = facts.corrupt(model, seed=seed + r, on_missing="skip", pool=pool,
                              fallback=FALLBACKS)
        if [p.subject for p in pairs.clean] != [p.subject for p in facts]:
            raise ArgumentError("resample ablation needs a partner for every prompt; pass a larger "
                             "pool= of facts")
        out.append(pairs)
    return out


def ablate_sets_reference(model: Model, facts: FactDataset, sets: Sequence[Sequence[Site]], *,
                          how: str = "mean", means: dict[SiteKey, Tensor] | None = None,
                          pool: FactDataset | None = None, resamples: int = 3,
                          seed: int = 0) -> pd.DataFrame:
    """The exact reference of :func:`ablate_sets`: one prompt, one set and one resample per
    forward, each replaced value written by direct index assignment (same padded batch)."""
    keys = sorted({(s.component, s.layer) for g in sets for s in g})
    if how == "mean" and means is None:
        means = mean_activations(model, pool or facts, keys)
    batch = model.tokenize(list(facts))
    roles = batch.role_labels()
    cand = {r: model.tokenize(list(facts.by_relation(r))).attribute_ids.unique()
            for r in facts.relations}
    cands = [cand[f.relation] for f in facts]
    clean = model.run(batch)
    m_clean = _metric(clean.logits, batch.attribute_ids, cands)
    sources = []
    if how == "resample":
        for pairs in _partners(model, facts, pool, resamples, seed):
            sources.append(model.run(model.tokenize(list(pairs.corrupt)), save=keys).acts)
    rows: list[dict[str, Any]] = []
    for g, group in enumerate(sets):
        for b in range(len(facts)):
            one = batch.take(slice(b, b + 1))
            ms, oks = [], []
            for r in range(max(1, len(sources))):
                edits = {}
                for key in {(s.component, s.layer) for s in group}:
                    mask = torch.zeros_like(_site_mask(model, batch, Site(*key)))
                    for site in group:
                        if (site.component, site.layer) == key:
                            mask |= _site_mask(model, batch, site)

                    def put(a: Tensor, key: SiteKey = key, mask: Tensor = mask, r: int = r,
                            b: int = b) -> Tensor:
                        a = a.clone()
                        for idx in mask[b].nonzero().tolist():
                            p = idx[0]
                            if how == "zero":
                                value = torch.zeros_like(a[(0, *idx)])
                            elif how == "mean":
                                assert means is not None
                                value = means[key][(int(roles[b, p]), *idx[1:])]
                            else:
                                value = sources[r][key][(b, *idx)]
                            a[(0, *idx)] = value
                        return a
                    edits[key] = put
                lg = model.run(one, edits=edits).logits
                ms.append(float(_metric(lg, one.attribute_ids, [cands[b]])[0]))
                oks.append(float(_correct(lg, one.attribute_ids, [cands[b]])[0]))
            m = sum(ms) / len(ms)
            rows.append({"method": f"ablation/{how}", "set": g, "prompt": b,
                         "effect": m - float(m_clean[b]), "metric": m,
                         "clean": float(m_clean[b]), "correct": sum(oks) / len(oks)})
    return tidy(rows)
