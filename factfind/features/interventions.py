"""Interventions that test what a feature means: swap or steer it and see the answer change.

An attribution (:func:`~factfind.features.attribution.feature_atp`) says which features a
counterfactual metric is sensitive to; it does not say that those features *are* the
attribute. The test of that claim is an intervention (Marks et al. 2024, §4; Templeton et al.
2024's steering): in the clean run, move the features that the attribution says carry the
subject's attribute to where the corrupt subject's run has them, and see whether the model now
answers with the corrupt subject's attribute. If the features hold the attribute, the answer
flips; if they only correlate with it, it does not.

For a set ``S`` of features at one position role (``L5.tc.f1234@subject_last``), each pair's
clean run (the base; the corrupt run is the source) is rerun with the dictionaries of ``S``
spliced in and their error terms kept (:mod:`factfind.features.splice`), and every feature of
``S`` *clamped* at the role's tokens to a target computed from the two unpatched runs:

    a_f  <-  a_f(base) + k (a_f(source) - a_f(base))       for f in S, at the role's tokens

so the run changes by exactly the decoded difference ``(target - a_f) W_dec[f]`` at each
edited site (the error term is the unedited features'). A set that spans layers is clamped at
every layer: a feature downstream of an edited one still takes its target, not what the
upstream edit would make of it (the swap sets the features to the corrupt run's values, as
the question "do these features carry the attribute?" asks).

* ``k = 1`` is the **swap**: the features take the corrupt subject's values (the clean
  subject's attribute features switch off, the corrupt subject's switch on);
* ``k != 1`` **steers**: the same move scaled (``k = 2``: twice as far; the other subject's
  features at twice their activation, the subject's own at ``1 - k`` times theirs).

The sets of one batch run stacked as copies of it in one forward per chunk; the tests hold
the stacked run equal to one :func:`~factfind.features.splice.spliced_run` with
``edit_features`` per set (for a set in one dictionary, this is
:func:`~factfind.features.verification.patch_features`'s additive edit, scaled).

**What is measured**, per pair: whether the top-1 token at the final position becomes the
source prompt's attribute (its first token) - the **success rate**, with a Wilson 95%
interval - and the change of the metric (default the logit difference clean - corrupt
attribute), with a Student-t interval. Beside them: how often the unpatched clean run already
answers with the other attribute (``base_rate``, ~0 for facts the model knows), how often the
corrupt run itself does (``source_rate``, the ceiling of a perfect swap), and the metric's
change when the corrupt prompt is run whole (``full_change``; ``fraction`` = the mean change
over it).

**The control** (``control=True``): as many features drawn at random at the same role among
the attributed features outside ``S`` (features that do change between the two runs), or,
given node ids only, among every feature of the same dictionaries. A set that flips the answer
while random sets of its size do not is evidence that the attribution found the attribute, not
merely any large change.

Cost: per batch, a clean and a corrupt run reading the dictionaries' sites, two plain
forwards for the top-1s, and per chunk of sets one spliced forward of ``sets x batch`` rows.

Example::

    est = ff.feature_atp(model, pairs, dicts, roles=["subject_last", "final"])
    df = feature_interventions(model, pairs, dicts, est, top=10, scales=(1.0, 2.0))
    df[["role", "intervention", "selection", "success_rate", "success_low", "effect"]]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from factfind.data.batch import PairBatch, pair_batches
from factfind.errors import ArgumentError, EmptyInputError, check_mode
from factfind.features.attribution import _checked, _dense, _read
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.splice import splice_edits
from factfind.features.verification import parse_feature_node
from factfind.results import t_quantile, tidy
from factfind.types import DIRECTIONS, Metric, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactPairs
    from factfind.data.batch import TokenBatch
    from factfind.model import Model

log = logging.getLogger(__name__)

#: the roles interventions are made at by default: the subject's last token and the final one
INTERVENTION_ROLES = ("subject_last", "final")

Parsed = tuple[Dictionary, int | None, Role]


# ----------------------------------------------------------------------------- the sets


def _selected(nodes: pd.DataFrame | Sequence[str], ds: Dictionaries, roles: Sequence[str],
              top: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(chosen, pool)`` per role: the feature node ids to move, and the ids a random control
    draws from (the attributed features outside the chosen ones; empty: draw from every
    feature of the chosen dictionaries)."""
    if isinstance(nodes, pd.DataFrame):
        if "node" not in nodes.columns or "feature" not in nodes.columns:
            raise ArgumentError("nodes must be feature node ids or a feature_atp frame "
                                "(columns node, feature, role, score)")
        if "prompt" in nodes.columns and bool(nodes["prompt"].notna().any()):
            raise ArgumentError("nodes ranks features: pass feature_atp's aggregate frame (one "
                                "row per node), not per_prompt=True")
        feats = nodes.loc[nodes["feature"].notna().to_numpy()]
        score = feats["score"] if "score" in feats.columns else feats["effect"].abs()
        feats = feats.assign(_s=np.nan_to_num(score.to_numpy(dtype=float)))
        chosen, pool = {}, {}
        for role in roles:
            at = feats.loc[(feats["role"].astype(str) == role).to_numpy()]
            at = at.sort_values(["_s", "node"], ascending=[False, True], kind="stable")
            ids = at["node"].astype(str).tolist()
            if ids:
                chosen[role], pool[role] = ids[:top], ids[top:]
        if not chosen:
            raise EmptyInputError(f"nodes holds no feature at roles {list(roles)}: attribute "
                                  "at those roles (feature_atp(..., roles=...))")
        return chosen, pool
    ids = [nodes] if isinstance(nodes, str) else list(nodes)
    if not ids:
        raise ArgumentError("nodes is empty: name at least one feature node id (e.g. "
                            "'L5.tc.f1234@subject_last') or pass a feature_atp frame")
    chosen: dict[str, list[str]] = {}
    for i in ids:
        _, f, role = parse_feature_node(str(i), ds)
        if f is None:
            raise ArgumentError(f"{i!r} is an error node: interventions move features (name a "
                                "feature, e.g. 'L5.tc.f1234@final')")
        chosen.setdefault(str(role), []).append(str(i))
    return chosen, {}


def _control(chosen: list[str], pool: list[str], ds: Dictionaries,
             rng: np.random.Generator) -> list[str]:
    """As many features as ``chosen`` drawn at random at the same role: from ``pool`` when it
    is large enough, else from every feature of the chosen dictionaries outside ``chosen``."""
    k = len(chosen)
    if len(pool) >= k:
        return [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]
    parsed = [parse_feature_node(n, ds) for n in chosen]
    role = str(parsed[0][2])
    taken = set(chosen)
    every = [d.feature_id(f, role) for d in dict.fromkeys(p[0] for p in parsed)
             for f in range(d.d_sae)]
    free = [n for n in every if n not in taken]
    if len(free) < k:
        return []
    return [free[i] for i in sorted(rng.choice(len(free), k, replace=False))]


# ----------------------------------------------------------------------------- the runs


@dataclass
class _Values:
    """One batch's unpatched feature activations at every real position, per dictionary:
    ``base [B P F]`` and the change ``delta = source - base [B P F]``; role masks ``[B P]``."""

    base: dict[str, Tensor]
    delta: dict[str, Tensor]
    masks: dict[Role, Tensor]


def _values(model: Model, ds: Dictionaries, base_tb: TokenBatch, src_tb: TokenBatch,
            roles: Iterable[Role]) -> _Values:
    every = base_tb.attention_mask.to(model.device).bool()
    base, _, _ = _read(model, ds, base_tb, every)
    src, _, _ = _read(model, ds, src_tb, every)
    masks = {r: (base_tb.position_mask(r) & every.cpu()).to(model.device) for r in set(roles)}
    return _Values({n: _dense(base.acts[n], every) for n in ds},
                   {n: _dense(src.acts[n] - base.acts[n], every) for n in ds}, masks)


def _stacked(model: Model, ds: Dictionaries, v: _Values, pb: PairBatch, base_tb: TokenBatch,
             sets: Sequence[Sequence[tuple[Parsed, float]]], metric: Metric | None
             ) -> tuple[Tensor, Tensor]:
    """``([set batch] metric, [set batch] top-1 token)`` of the base run with each set's
    features clamped to ``base + k (source - base)`` (the unpatched runs' values) at their
    role's tokens, every touched dictionary spliced in with its error kept; the sets stacked
    as copies of the batch in one forward."""
    S, B = len(sets), len(pb)
    entries: dict[str, list[tuple[int, int, Role, float]]] = {}
    for s, group in enumerate(sets):
        for (d, f, role), k in group:
            assert f is not None
            entries.setdefault(d.name, []).append((s, f, role, k))

    def clamp(name: str) -> Callable[[Tensor], Tensor]:
        def edit(a: Tensor) -> Tensor:  # [S*B P F], copy-major
            out = a.clone()
            base, delta = v.base[name], v.delta[name]
            for s, f, role, k in entries[name]:
                rows = slice(s * B, (s + 1) * B)
                target = (base[..., f] + k * delta[..., f]).to(a.dtype)
                out[rows, :, f] = torch.where(v.masks[role], target, out[rows, :, f])
            return out
        return edit

    edits = splice_edits([ds[n] for n in entries], error=True,
                         edit_features={n: clamp(n) for n in entries})
    with torch.no_grad():
        logits = model.run(base_tb.repeat(S), edits=edits).logits.float()
    m = pb.measure(logits, S, metric).reshape(S, B)
    return m.double().cpu(), logits.argmax(-1).reshape(S, B).cpu()


def _wilson(hits: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Wilson score interval of ``hits`` successes in ``n`` trials (elementwise)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = hits / n
        den = 1 + z * z / n
        mid = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


@validated
def feature_interventions(
    model: Model,
    pairs: FactPairs | PairBatch,
    dicts: Dictionaries | Dictionary | Sequence[Dictionary],
    nodes: pd.DataFrame | Sequence[str],
    *,
    roles: Sequence[str] = INTERVENTION_ROLES,
    top: int = 10,
    scales: Sequence[float] = (1.0, 2.0),
    control: bool = True,
    direction: str = "noise",
    metric: Metric | None = None,
    batch_size: int = 32,
    chunk: int = 16,
    seed: int = 0,
    per_prompt: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Swap (``scale`` 1) or steer (other scales) the attributed features at each role and
    measure how often the answer becomes the other attribute's top-1 (see the module doc).

    Args:
        model: the model the dictionaries were trained on.
        pairs: clean/corrupt pairs (the answer should flip from the clean to the corrupt
            attribute; with ``direction="denoise"`` the other way round).
        dicts: the dictionaries.
        nodes: a :func:`feature_atp` frame (aggregate: the ``top`` features by ``score`` at
            each role of ``roles`` are moved together) or feature node ids (grouped by their
            role; error nodes are refused: they are not features).
        roles: the roles to intervene at (with a frame); one set per role.
        top: features per role taken from a frame.
        scales: ``k`` per intervention: 1 swaps, others steer (``k`` times the swap's move).
        control: also move as many random features at each role (module doc).
        direction: ``"noise"`` (default: the clean run is patched toward the corrupt one) or
            ``"denoise"``.
        metric: ``metric(logits, correct, wrong) -> [rows]`` (default the logit difference).
        batch_size: pairs per forward; chunk: sets stacked per forward.
        seed: draws the controls.
        per_prompt: one row per set and pair (``success`` 0/1, ``effect``) instead of the
            aggregate.
        progress: a progress bar over batches.

    Returns:
        One row per (role, scale, selection): ``method`` (``feature_swap`` /
        ``feature_steer``), ``role``, ``effect`` (the metric's mean change) with a 95% CI and
        ``n`` (pairs where the role exists), then ``intervention`` (``swap`` / ``steer x2``),
        ``scale``, ``selection`` (``attributed`` / ``random``), ``n_features``,
        ``success_rate`` with its Wilson interval ``success_low``/``success_high``,
        ``n_known`` (pairs whose source run answers with the other attribute) and
        ``success_known`` (the success rate among them: the swap's ceiling is 1 there),
        ``base_rate``, ``source_rate``, ``full_change``, ``fraction`` and ``nodes``
        (``;``-joined ids).

    Example::

        feature_interventions(model, pairs, dicts, est, top=5)
        feature_interventions(model, pairs, dicts, ["L3.tc.f17@subject_last"], scales=[1, 4])
    """
    check_mode(direction, "direction", DIRECTIONS)
    ds = _checked(dicts, model)
    scale_list = [float(k) for k in scales]
    if not scale_list or any(not math.isfinite(k) or k == 0 for k in scale_list):
        raise ArgumentError(f"scales must be non-zero finite numbers (1 swaps, others steer), "
                            f"got {list(scales)}")
    for r in roles:
        if r not in [x.value for x in Role]:
            raise ArgumentError(f"roles must be position roles {[x.value for x in Role]}, got "
                                f"{r!r}")
    chosen, pools = _selected(nodes, ds, list(roles), top)
    rng = np.random.default_rng(seed)
    specs: list[dict] = []  # one per set: role, scale, selection, ids
    for role, ids in chosen.items():
        random_ids = _control(ids, pools.get(role, []), ds, rng) if control else []
        if control and not random_ids:
            log.warning("feature_interventions: no random control at %s (too few features)",
                        role)
        for k in scale_list:
            specs.append({"role": role, "scale": k, "selection": "attributed", "ids": ids})
            if random_ids:
                specs.append({"role": role, "scale": k, "selection": "random",
                              "ids": random_ids})
    parsed = {n: parse_feature_node(n, ds) for s in specs for n in s["ids"]}
    used = Dictionaries(list(dict.fromkeys(d for d, _, _ in parsed.values())))
    sets = [[(parsed[n], s["scale"]) for n in s["ids"]] for s in specs]
    role_set = {Role(s["role"]) for s in specs}

    batches = list(pair_batches(model, pairs, batch_size))
    bar = tqdm(total=len(batches), desc="feature interventions", unit="batch",
               disable=not progress)
    effect, hit, valid, base_hit, src_hit, full = [], [], [], [], [], []
    for _, pb in batches:
        base_tb, src_tb = pb.base_and_source(direction)
        v = _values(model, used, base_tb, src_tb, role_set)
        target = (pb.wrong if direction == "noise" else pb.correct).cpu()  # the other answer
        with torch.no_grad():
            lg_base = model.run(base_tb).logits.float()
            lg_src = model.run(src_tb).logits.float()
        base_hit.append(lg_base.argmax(-1).cpu() == target)
        src_hit.append(lg_src.argmax(-1).cpu() == target)
        m0 = pb.measure(lg_base, 1, metric).double().cpu()
        full.append(pb.measure(lg_src, 1, metric).double().cpu() - m0)
        eff = torch.empty(len(sets), len(pb), dtype=torch.float64)
        top1 = torch.empty(len(sets), len(pb), dtype=torch.long)
        for c in range(0, len(sets), chunk):
            m, t = _stacked(model, used, v, pb, base_tb, sets[c:c + chunk], metric)
            eff[c:c + chunk], top1[c:c + chunk] = m - m0[None], t
        present = torch.stack([v.masks[Role(s["role"])].sum(-1).gt(0).cpu() for s in specs])
        effect.append(eff)
        hit.append(top1 == target[None])
        valid.append(present)
        bar.update(1)
    bar.close()
    E, H, V = torch.cat(effect, 1).numpy(), torch.cat(hit, 1).numpy(), torch.cat(valid, 1).numpy()
    B, S, F = (torch.cat(base_hit).numpy(), torch.cat(src_hit).numpy(),
               torch.cat(full).numpy())
    return _frame(specs, E, H, V, B, S, F, direction, per_prompt)


def _frame(specs: list[dict], E: np.ndarray, H: np.ndarray, V: np.ndarray, B: np.ndarray,
           S: np.ndarray, F: np.ndarray, direction: str, per_prompt: bool) -> pd.DataFrame:
    """The result frame from ``[set prompt]`` effects, hits and validity (module doc)."""
    rows = []
    for i, s in enumerate(specs):
        ok = V[i]
        label = "swap" if s["scale"] == 1 else f"steer x{s['scale']:g}"
        common = {"method": "feature_swap" if s["scale"] == 1 else "feature_steer",
                  "component": "features", "role": s["role"], "intervention": label,
                  "scale": s["scale"], "selection": s["selection"],
                  "n_features": len(s["ids"]), "nodes": ";".join(s["ids"])}
        if per_prompt:
            for j in np.flatnonzero(ok):
                rows.append({**common, "prompt": int(j), "effect": float(E[i, j]), "n": 1,
                             "success": bool(H[i, j]), "base_hit": bool(B[j]),
                             "source_hit": bool(S[j]), "full_change": float(F[j])})
            continue
        n = int(ok.sum())
        e = E[i, ok]
        mean = float(e.mean()) if n else math.nan
        half = float(e.std(ddof=1) / math.sqrt(n) * t_quantile(n)) if n > 1 else math.nan
        hits = int(H[i, ok].sum())
        lo, hi = _wilson(np.array(hits, dtype=float), np.array(n, dtype=float))
        known = ok & S  # pairs whose source run itself answers with the other attribute
        n_known = int(known.sum())
        full = float(F[ok].mean()) if n else math.nan
        rows.append({**common, "effect": mean, "ci_low": mean - half, "ci_high": mean + half,
                     "n": n, "success_rate": hits / n if n else math.nan,
                     "success_low": float(lo), "success_high": float(hi),
                     "n_known": n_known,
                     "success_known": float(H[i, known].mean()) if n_known else math.nan,
                     "base_rate": float(B[ok].mean()) if n else math.nan,
                     "source_rate": float(S[ok].mean()) if n else math.nan,
                     "full_change": full, "fraction": mean / full if full else math.nan})
    df = tidy(rows)
    df["direction"] = direction
    return df


def intervention_sets(frame: pd.DataFrame) -> Iterable[tuple[str, list[str]]]:
    """``(role, node ids)`` of each attributed set of a :func:`feature_interventions` frame
    (for dashboards of the features it moved)."""
    seen = set()
    for row in frame.loc[frame["selection"] == "attributed"].itertuples():
        key = (str(row.role), str(row.nodes))
        if key not in seen:
            seen.add(key)
            yield key[0], key[1].split(";")


__all__ = ["INTERVENTION_ROLES", "feature_interventions", "intervention_sets"]
