"""Fact Finding's neuron analyses: what do single MLP neurons at the subject do?

DeepMind's "Fact Finding" (Nanda, Rajamanoharan, Kramár & Shah 2023; post 3, "Exploring
hypotheses for the MLP lookup") asked whether the MLPs at a multi-token subject's last token
look facts up with interpretable neurons - e.g. a neuron that fires for ``Michael AND Jordan``
(the "single-step detokenization" hypothesis). They found the lookup spread over many neurons
with little structure. These are their experiments, each returning a tidy frame:

* :func:`resample_neurons` - **resample ablation** of single neurons: replace a neuron's
  activation with its value on ``K`` other subjects of the same relation and token length (a
  different attribute), averaged over the ``K``; the effect is the drop in the logit of the
  attribute against the relation's other attributes
  (:func:`factfind.localize.ablation.ablate_sets`).
* :func:`neuron_nonlinearity` - **is the neuron an AND of tokens?** Read its activation at the
  last subject token on the subject, on the subject with its first name swapped for another
  subject's (``A'B``), its last name swapped (``AB'``) and both (``A'B'``). The *interaction*
  ``f(AB) - f(A'B) - f(AB') + f(A'B')`` is zero for a neuron additive in the two names; the
  **AND score** ``interaction / (f(AB) - f(A'B'))`` is 1 for a pure AND (it fires only when
  both names are right), 0 for an additive (linear) neuron and -1 for an OR.
* :func:`cross_relation_correlation` - **one lookup, many attributes?** Per subject, each
  neuron's AtP effect on one relation's fact (sport) and on another's (country). Correlated
  effects mean the same neurons serve every attribute of the subject (a subject-level
  representation is built first, then read by attribute-specific heads).
* :func:`mlp_output_norms` - ``||mlp_out||`` per layer at the last subject token, for
  **known vs unknown** subjects: does the MLP write more for subjects it knows facts about?
* :func:`neuron_dla` - each neuron's **direct logit attribution** to the attribute: its
  activation times its output weight, through the final norm (scale frozen at that position's
  final residual) onto ``W_U[attribute] - W_U[other]``. At the final token this is exact DLA
  (:mod:`factfind.localize.dla`); at the subject it asks whether the neuron's output *already*
  points at the answer.

Every per-neuron statistic is streamed over prompts (:class:`~factfind.attribute.atp.RunningStats`),
so memory scales with the number of neurons, not prompts.

Example::

    ver = verify(model, pairs, atp_star(model, pairs, positions=["subject_last"]))
    top = ver.frame.nsmallest(20, "effect")            # noising: the most necessary neurons
    resample_neurons(model, known, top, k=8)
    neuron_nonlinearity(model, known, top)
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.attribute.atp import estimate, position_masks
from factfind.attribute.node_index import NodeIndex, node_frame
from factfind.attribute.running_stats import RunningStats
from factfind.errors import ArgumentError
from factfind.localize.ablation import ablation
from factfind.results import aggregate, tidy
from factfind.types import Component, Role, Site
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs, FactPrompt
    from factfind.model import Model


def neuron_sites(neurons: Sequence[Site] | pd.DataFrame | Iterable[tuple[int, int]], *,
                 position: Role = Role.SUBJECT_LAST) -> list[Site]:
    """Neurons as :class:`~factfind.types.Site` values, from Sites, ``(layer, neuron)`` pairs
    or a node frame (its ``neurons`` rows; their role, else ``position``)."""
    if isinstance(neurons, pd.DataFrame):
        df = neurons[neurons["component"] == "neurons"]
        roles = df["role"] if "role" in df.columns else [None] * len(df)
        return [Site(Component.NEURONS, int(layer), neuron=int(n),
                     position=Role(r) if not pd.isna(r) else position)
                for layer, n, r in zip(df["layer"], df["neuron"], roles, strict=True)]
    out = []
    for s in neurons:
        if isinstance(s, Site):
            if s.component is not Component.NEURONS or s.neuron is None:
                raise ArgumentError(f"{s.name} is not a single neuron")
            out.append(s)
        else:
            layer, n = s
            out.append(Site(Component.NEURONS, int(layer), neuron=int(n), position=position))
    return out


def _site_columns(sites: Sequence[Site]) -> dict[str, list[Any]]:
    return {"component": ["neurons"] * len(sites), "layer": [s.layer for s in sites],
            "neuron": [s.neuron for s in sites],
            "role": [str(s.position) if isinstance(s.position, Role) else None for s in sites],
            "position": [s.position if isinstance(s.position, int) else None for s in sites]}


# ----------------------------------------------------------------------------- resample ablation


@validated
def resample_neurons(model: Model, facts: FactDataset, neurons: Sequence[Site] | pd.DataFrame,
                     *, k: int = 8, pool: FactDataset | None = None, seed: int = 0,
                     batch_size: int = 32, per_prompt: bool = False) -> pd.DataFrame:
    """Resample-ablate each neuron alone against ``k`` other subjects (Fact Finding, post 3).

    Args:
        facts: the prompts measured.
        neurons: Sites, or a node frame (e.g. :func:`~factfind.attribute.verification.verify`'s).
        k: resampled subjects per prompt (same relation and token length, other attribute).
        pool: extra prompts to draw partners from.

    Returns:
        One row per neuron: ``method="neurons/resample"``, ``effect`` the mean change of the
        logit difference against the relation's other attributes (negative: the neuron helps),
        95% CI and ``n`` prompts; per prompt with ``per_prompt=True``.
    """
    sites = neuron_sites(neurons)
    df = ablation(model, facts, sites, how="resample", resamples=k, pool=pool,
                  seed=seed, batch_size=batch_size)
    df["method"] = "neurons/resample"
    return df if per_prompt else aggregate(df)


# ----------------------------------------------------------------------------- nonlinearity


def _split_name(subject: str) -> tuple[str, str] | None:
    words = subject.split(" ")
    if len(words) < 2:
        return None
    return words[0], " ".join(words[1:])


@validated
def swap_variants(facts: FactDataset, *, samples: int = 4, seed: int = 0
                  ) -> list[tuple[int, tuple[FactPrompt, FactPrompt, FactPrompt, FactPrompt]]]:
    """For each multi-word subject, ``samples`` quadruples ``(AB, A'B, AB', A'B')``: the fact,
    its first name swapped, its last name swapped, both swapped (donors drawn from the other
    subjects' first and last names, never equal to the original)."""
    names = [n for f in facts if (n := _split_name(f.subject)) is not None]
    firsts = sorted({a for a, _ in names})
    lasts = sorted({b for _, b in names})
    rng = random.Random(seed)
    out = []
    for i, f in enumerate(facts):
        split = _split_name(f.subject)
        if split is None:
            continue
        a, b = split
        other_a = [x for x in firsts if x != a]
        other_b = [x for x in lasts if x != b]
        if not other_a or not other_b:
            continue
        for _ in range(samples):
            a2, b2 = rng.choice(other_a), rng.choice(other_b)
            out.append((i, tuple(dataclasses.replace(f, subject=s)
                                 for s in (f"{a} {b}", f"{a2} {b}", f"{a} {b2}",
                                           f"{a2} {b2}"))))
    return out  # type: ignore[return-value]


@validated
def neuron_nonlinearity(model: Model, facts: FactDataset, neurons: Sequence[Site] | pd.DataFrame,
                        *, samples: int = 4, seed: int = 0, batch_size: int = 64
                        ) -> pd.DataFrame:
    """Is each neuron an AND of the subject's first and last name? (module docstring)

    Activations are read at each variant's own last subject token (its ``subject_last`` role;
    or the neuron's ``position`` role).

    Returns:
        One row per neuron: ``method="neurons/nonlinearity"``, ``effect`` the mean interaction
        ``f(AB) - f(A'B) - f(AB') + f(A'B')`` with CI and ``n`` (prompt x sample), the mean
        activations ``act_AB, act_A'B, act_AB', act_A'B'`` and ``and_score`` (mean interaction
        over mean ``f(AB) - f(A'B')``).
    """
    sites = neuron_sites(neurons)
    quads = swap_variants(facts, samples=samples, seed=seed)
    if not quads:
        raise ArgumentError("no multi-word subjects to swap names between")
    layers = sorted({s.layer for s in sites})
    by_group: dict[tuple[int, Role], tuple[list[int], list[int]]] = {}
    for i, s in enumerate(sites):
        role = s.position if isinstance(s.position, Role) else Role.SUBJECT_LAST
        cols, units = by_group.setdefault((s.layer, role), ([], []))
        cols.append(i)
        units.append(int(s.neuron or 0))
    groups = {k: (torch.tensor(c), torch.tensor(u)) for k, (c, u) in by_group.items()}
    acts = [RunningStats(len(sites)) for _ in range(4)]
    inter = RunningStats(len(sites))
    per = max(1, batch_size // 4)
    for c0 in range(0, len(quads), per):
        chunk = quads[c0:c0 + per]
        prompts = [p for _, q in chunk for p in q]  # quad-major: 4 rows per quadruple
        batch = model.tokenize(prompts)
        run = model.run(batch, save=[(Component.NEURONS, layer) for layer in layers])
        val = torch.empty(len(prompts), len(sites), device=model.device)
        for (layer, role), (cols, units) in groups.items():  # every neuron of a group at once
            m = batch.mask(role).to(model.device).float()  # [rows pos]
            a = torch.einsum("rt,rtu->ru", m, run.acts[(Component.NEURONS, layer)][..., units]
                             .float())
            val[:, cols] = a / m.sum(-1, keepdim=True).clamp(min=1)
        val = val.cpu().reshape(len(chunk), 4, len(sites))
        for j in range(4):
            acts[j].update(val[:, j])
        inter.update(val[:, 0] - val[:, 1] - val[:, 2] + val[:, 3])
    v = inter.values()
    df = tidy(pd.DataFrame({"method": "neurons/nonlinearity", **_site_columns(sites),
                            "effect": v["effect"].numpy(), "ci_low": v["ci_low"].numpy(),
                            "ci_high": v["ci_high"].numpy(), "n": v["n"].numpy()}))
    for j, name in enumerate(("act_AB", "act_A'B", "act_AB'", "act_A'B'")):
        df[name] = acts[j].mean.numpy()
    total = df["act_AB"] - df["act_A'B'"]
    df["and_score"] = np.where(total.abs() > 1e-8, df["effect"] / total.where(total != 0, 1),
                               np.nan)
    return df


# ----------------------------------------------------------------------------- across relations


def _pairs_subset(pairs: FactPairs, idx: Sequence[int]) -> FactPairs:
    from factfind.data import FactDataset, FactPairs

    return FactPairs(FactDataset([pairs.clean[i] for i in idx], name=pairs.clean.name),
                     FactDataset([pairs.corrupt[i] for i in idx], name=pairs.corrupt.name),
                     seed=pairs.seed)


@validated
def cross_relation_correlation(
    model: Model,
    facts: FactDataset,
    *,
    relations: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    position: Role | int = Role.SUBJECT_LAST,
    seed: int = 0,
    subjects_per_chunk: int = 32,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Correlate each neuron's AtP effect on one relation's fact with its effect on another's,
    for the same subjects (module docstring), streamed over chunks of subjects.

    Each relation's prompts are paired with corrupt partners (``facts.corrupt``); a subject's
    effect is the mean AtP (noising) over its templates.

    Returns:
        Rows for every relation pair ``(relation_a, relation_b)``:

        * ``method="neurons/cross_relation/subject"``: ``effect`` the mean over subjects of
          the Pearson correlation, across all neurons of ``layers``, of the two relations'
          effects, with a 95% CI and ``n`` subjects;
        * ``method="neurons/cross_relation/neuron"``: one row per neuron, ``effect`` the
          Pearson correlation across subjects, ``n`` subjects.
    """
    rels = list(relations or facts.relations)
    if len(rels) < 2:
        raise ArgumentError("need facts of at least two relations")
    pairs = {r: facts.by_relation(r).corrupt(model, seed=seed, on_missing="skip") for r in rels}
    by_subject: dict[str, dict[str, list[int]]] = {r: {} for r in rels}
    for r, p in pairs.items():
        for i, f in enumerate(p.clean):
            by_subject[r].setdefault(f.subject, []).append(i)
    common = sorted(set.intersection(*(set(d) for d in by_subject.values())))
    if len(common) < 3:
        raise ArgumentError(f"only {len(common)} subjects have facts of every relation")
    index = NodeIndex.build(model, components=["neurons"], positions=[position], layers=layers)
    combos = list(itertools.combinations(rels, 2))
    subj_r = {c: RunningStats(1) for c in combos}
    sums = {c: torch.zeros(5, len(index), dtype=torch.float64) for c in combos}
    n_subj = 0
    for c0 in range(0, len(common), subjects_per_chunk):
        chunk = common[c0:c0 + subjects_per_chunk]
        eff = {}
        for r in rels:
            idx = [i for s in chunk for i in by_subject[r][s]]
            est = estimate(model, _pairs_subset(pairs[r], idx), components=["neurons"],
                           positions=[position], layers=layers, batch_size=batch_size,
                           per_prompt=True, progress=False).per_prompt
            assert est is not None
            owner = torch.tensor([chunk.index(pairs[r].clean[i].subject) for i in idx])
            per = torch.zeros(len(chunk), len(index), dtype=torch.float64)
            per.index_add_(0, owner, est.double().nan_to_num(0.0))
            eff[r] = per / torch.bincount(owner, minlength=len(chunk))[:, None]
        n_subj += len(chunk)
        for a, b in combos:
            x, y = eff[a], eff[b]  # [subject neuron]
            subj_r[(a, b)].update(_pearson(x, y, dim=1)[:, None])
            sums[(a, b)] += torch.stack([x.sum(0), y.sum(0), (x * y).sum(0), (x * x).sum(0),
                                         (y * y).sum(0)])
    frames = []
    for a, b in combos:
        v = subj_r[(a, b)].values()
        frames.append(tidy([{"method": "neurons/cross_relation/subject",
                             "component": "neurons",
                             "role": str(position) if isinstance(position, Role) else None,
                             "position": position if isinstance(position, int) else None,
                             "effect": float(v["effect"][0]), "ci_low": float(v["ci_low"][0]),
                             "ci_high": float(v["ci_high"][0]), "n": n_subj,
                             "relation_a": a, "relation_b": b}]))
        sx, sy, sxy, sxx, syy = sums[(a, b)]
        cov = sxy - sx * sy / n_subj
        den = ((sxx - sx ** 2 / n_subj) * (syy - sy ** 2 / n_subj)).sqrt()
        r = torch.where(den > 0, cov / den.clamp(min=1e-300), torch.nan)
        df = node_frame(index, "neurons/cross_relation/neuron",
                        {"effect": r, "n": torch.full_like(r, n_subj)})
        df["relation_a"], df["relation_b"] = a, b
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _pearson(x: Tensor, y: Tensor, *, dim: int) -> Tensor:
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    den = (x.pow(2).sum(dim) * y.pow(2).sum(dim)).sqrt()
    return torch.where(den > 0, (x * y).sum(dim) / den.clamp(min=1e-300), torch.nan)


# ----------------------------------------------------------------------------- norms and DLA


@validated
def mlp_output_norms(model: Model, groups: dict[str, FactDataset], *,
                     positions: Sequence[Role | int | str] = (Role.SUBJECT_LAST,),
                     batch_size: int = 64) -> pd.DataFrame:
    """``||mlp_out||`` per layer and position for groups of prompts (e.g. ``{"known": ...,
    "unknown": ...}``), streamed.

    Returns:
        One row per (group, layer, position): ``method="neurons/mlp_out_norm"``,
        ``component="mlp_out"``, ``effect`` the mean L2 norm with a 95% CI, ``n`` prompts, and
        ``group``.
    """
    L = model.n_layers
    positions = [p if isinstance(p, int) else Role(p) for p in positions]
    frames = []
    keys = [(Component.MLP_OUT, layer) for layer in range(L)]
    for name, facts in groups.items():
        if len(facts) == 0:
            raise ArgumentError(f"group {name!r} is empty")
        st = RunningStats(L * len(positions))
        for start in range(0, len(facts), batch_size):
            batch = model.tokenize(list(facts[start:start + batch_size]))
            run = model.run(batch, save=keys)
            masks = position_masks(batch, positions, model.device)  # [P B T]
            norms = torch.stack([run.acts[k].float().norm(dim=-1) for k in keys])  # [L B T]
            per = torch.einsum("lbt,pbt->blp", norms, masks) / masks.sum(-1).T.clamp(min=1)[
                :, None, :]
            valid = masks.sum(-1).gt(0).T[:, None, :].expand(-1, L, -1)  # [B L P]
            st.update(per.flatten(1), valid.flatten(1))
        v = st.values()
        layer, pos = np.divmod(np.arange(L * len(positions)), len(positions))
        frames.append(tidy(pd.DataFrame({
            "method": "neurons/mlp_out_norm", "component": "mlp_out", "layer": layer,
            "position": [positions[p] if isinstance(positions[p], int) else None for p in pos],
            "role": [str(positions[p]) if isinstance(positions[p], Role) else None
                     for p in pos],
            "effect": v["effect"].numpy(), "ci_low": v["ci_low"].numpy(),
            "ci_high": v["ci_high"].numpy(), "n": v["n"].numpy(), "group": name})))
    return pd.concat(frames, ignore_index=True)


@validated
def neuron_dla(model: Model, data: FactDataset | FactPairs, *,
               positions: Sequence[Role | int | str] = (Role.SUBJECT_LAST, Role.FINAL),
               layers: Iterable[int] | None = None, batch_size: int = 32) -> pd.DataFrame:
    """Direct logit attribution of every neuron to the attribute, at each position (module doc).

    The direction is ``W_U[attribute] - W_U[corrupt attribute]`` for
    :class:`~factfind.data.FactPairs`, else ``W_U[attribute]`` minus the mean ``W_U`` column
    of the relation's other attributes. A position that names several tokens sums them.

    Returns:
        One row per (layer, position, neuron): ``method="neurons/dla"``, ``effect`` the mean
        DLA over prompts with a 95% CI and ``n``.
    """
    from factfind.data.pairs import FactPairs

    paired = isinstance(data, FactPairs)
    facts = data.clean if isinstance(data, FactPairs) else data
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    index = NodeIndex.build(model, components=["neurons"], positions=positions, layers=layers)
    L = model.n_layers
    W_U = model.W_U.float()
    cand = {}
    if not paired:
        for r in facts.relations:
            cand[r] = model.tokenize(list(facts.by_relation(r))).attribute_ids.unique()
    keys = [(Component.NEURONS, layer) for layer in index.layers]
    st = RunningStats(len(index))
    for start in range(0, len(facts), batch_size):
        chunk = list(facts[start:start + batch_size])
        batch = model.tokenize(chunk)
        ids = batch.attribute_ids.to(model.device)
        if isinstance(data, FactPairs):
            wrong = model.tokenize(list(data.corrupt[start:start + batch_size])).attribute_ids
            direction = W_U[:, ids].T - W_U[:, wrong.to(model.device)].T  # [B d_model]
        else:
            rows = []
            for f, a in zip(chunk, ids.tolist(), strict=True):
                others = cand[f.relation][cand[f.relation] != a].to(model.device)
                rows.append(W_U[:, a] - W_U[:, others].mean(-1))
            direction = torch.stack(rows)
        run = model.run(batch, save=[*keys, (Component.RESID_POST, L - 1)])
        scale = model.final_norm_scale(run.acts[(Component.RESID_POST, L - 1)]).float()  # [B T 1]
        masks = position_masks(batch, index.positions, model.device)  # [P B T]
        per_layer = []
        for layer in index.layers:
            w = model.W_out(layer).float()  # [neuron d_model]
            wn = model.final_norm_frozen(w, torch.ones(1, 1, device=w.device), bias=False)
            acts = run.acts[(Component.NEURONS, layer)].float()  # [B T neuron]
            if model.spec.mlp_post_norm is None:
                proj = torch.einsum("nd,bd->bn", wn.float(), direction)[:, None]  # [B 1 neuron]
            else:  # the post norm frozen at each position (an RMSNorm: diagonal, commutes)
                f = model.mlp_write_scale(layer, acts).float()  # [B T d_model]
                proj = torch.einsum("nd,btd->btn", wn.float(), f * direction[:, None])
            dla = acts * proj / scale  # [B T neuron]
            per_layer.append(torch.einsum("pbt,btn->bpn", masks, dla))
        valid = masks.sum(-1).gt(0).T[:, index.node_positions()]
        st.update(torch.stack(per_layer, 1).flatten(1), valid)
    return node_frame(index, "neurons/dla", dict(st.values()))
