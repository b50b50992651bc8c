"""Neuron basis vs feature basis: are the neurons that look facts up monosemantic?

An activation space has a **privileged basis** when something in the architecture - here the
MLP's elementwise non-linearity - makes its coordinates special (Elhage et al. 2022, "Toy
models of superposition"; Olah et al. 2020, "Zoom in"). If each MLP neuron then stood for one
feature, neurons would be **monosemantic** and the neuron basis would be the right one to read
a lookup in; a **polysemantic** neuron responds to several unrelated things (Bricken et al.
2023), and the features live in directions that mix neurons. Fact Finding (Nanda et al. 2023,
post 3) found Pythia's lookup neurons hard to interpret. Two measurements:

**Polysemanticity score** (:func:`neuron_selectivity`). For a neuron read at a token role and
a *key* of the prompts - the ``attribute``, the ``subject`` or the ``relation`` - let ``m_v``
be its mean activation over prompts whose key is ``v``, ``mu`` and ``sigma`` its mean and
standard deviation over all prompts, and the *selectivity* ``r_v = m_v - mu``. The neuron is
**selective** for the key when ``max_v r_v >= min_z * sigma`` (default ``min_z = 0.5``); a
selective neuron **responds to** ``v`` when ``r_v >= threshold * max_u r_u`` (default 0.5).

    polysemanticity = number of values it responds to      (0 = not selective; 1 = monosemantic)
    effective_values = exp(H(p)),  p_v = relu(r_v) / sum_u relu(r_u)   (1 for one value)

A neuron that fires for one subject scores 1 on ``subject``; one that fires for every subject
with a given first name scores the number of those subjects; one that fires for four subjects
whose attributes are all different is *not selective* for ``attribute`` (its class means are
equal). :func:`monosemantic_fraction` reports the share of selective neurons scoring 1.

**Who carries the lookup** (:func:`basis_comparison`). The lookup's effect is the denoising
effect of patching a layer's whole MLP output at the subject's last token (corrupt run, clean
activation). Patching only the top-``k`` neurons by attribution (:func:`factfind.attribute.atp.atp`)
is a rank-``k`` patch of that output (the neurons' columns of ``W_out``); so is patching the
top-``k`` principal directions of the MLP output over the dataset (ranked by variance, or by
their own attribution ``(delta . u)(grad . u)``). The share ``ratio = effect_k / effect_full``
(:func:`factfind.localize.subspace.patch_ratio`) as ``k`` grows tells which basis concentrates the
lookup: a monosemantic neuron basis reaches 1 with few neurons; a lookup in superposition
needs many neurons but may need few directions.

Example::

    top = atp(model, pairs, components=["neurons"], positions=["subject_last"]).nlargest(
        50, "score")
    sel = neuron_selectivity(model, facts, top)
    monosemantic_fraction(sel)
    basis_comparison(model, pairs, layer=1, ks=[1, 4, 16, 64])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from factfind.attribute.atp import atp
from factfind.attribute.neurons import neuron_sites
from factfind.data.batch import encode_pairs, pair_batches
from factfind.errors import ArgumentError
from factfind.localize.probing import _gather_role
from factfind.localize.subspace import FULL, SubspacePatch, patch_ratio, subspace_patching
from factfind.results import tidy
from factfind.types import Component, Role, Site
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model

KEYS = ("attribute", "subject", "relation")


@validated
def neuron_activations(model: Model, facts: FactDataset, sites: Sequence[Site], *,
                       batch_size: int = 64) -> torch.Tensor:
    """``[prompt neuron]`` activation of each neuron site at its role (group roles: the mean)."""
    layers = sorted({s.layer for s in sites})
    cols: list[torch.Tensor] = []
    for start in range(0, len(facts), batch_size):
        batch = model.tokenize(list(facts[start:start + batch_size]))
        run = model.run(batch, save=[(Component.NEURONS, layer) for layer in layers])
        cols.append(torch.stack([
            _gather_role(run.acts[(Component.NEURONS, s.layer)][..., s.neuron], batch,
                         Role(s.position) if isinstance(s.position, Role) else
                         Role.SUBJECT_LAST).float().cpu() for s in sites], -1))
    return torch.cat(cols)


def selectivity(acts: torch.Tensor, labels: Sequence[Any], *, threshold: float = 0.5,
                min_z: float = 0.5) -> dict[str, Any]:
    """The polysemanticity of each column of ``acts [prompt neuron]`` for one key (``labels``
    per prompt), as defined in the module docstring.

    Returns:
        A dict of ``[neuron]`` arrays: ``polysemanticity`` (count), ``effective_values``,
        ``max_z`` (``max_v r_v / sigma``), ``top_value``, plus ``n_values``.
    """
    values = sorted(set(labels), key=str)
    idx = torch.tensor([values.index(v) for v in labels])
    onehot = torch.nn.functional.one_hot(idx, len(values)).double()  # [prompt value]
    a = acts.double()
    means = (onehot.T @ a) / onehot.sum(0)[:, None]  # [value neuron]
    r = means - a.mean(0)
    sigma = a.std(0)
    top = r.max(0)
    selective = top.values >= min_z * sigma.clamp(min=1e-12)
    responds = (r >= threshold * top.values) & selective
    p = r.clamp(min=0)
    p = p / p.sum(0).clamp(min=1e-300)
    ent = -(p * p.clamp(min=1e-300).log()).sum(0)
    return {"polysemanticity": responds.sum(0).numpy(),
            "effective_values": torch.where(selective, ent.exp(), torch.nan).numpy(),
            "max_z": (top.values / sigma.clamp(min=1e-12)).numpy(),
            "top_value": [str(values[i]) for i in top.indices.tolist()],
            "n_values": len(values)}


@validated
def neuron_selectivity(
    model: Model,
    facts: FactDataset,
    neurons: Sequence[Site] | pd.DataFrame | Iterable[tuple[int, int]],
    *,
    keys: Sequence[str] = KEYS,
    threshold: float = 0.5,
    min_z: float = 0.5,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Polysemanticity of each neuron for each key (module docstring).

    Args:
        facts: the prompts the neurons are read on (for ``relation``, facts of several
            relations about the same subjects).
        neurons: Sites, ``(layer, neuron)`` pairs (read at ``subject_last``) or a node frame
            (e.g. :func:`factfind.attribute.atp.atp`'s top rows).
        keys: prompt fields to group by: ``attribute``, ``subject``, ``relation``,
            ``template``.

    Returns:
        One row per (neuron, key): ``method="polysemanticity"``, ``component="neurons"``,
        ``layer``, ``neuron``, ``role``, ``key``, ``effect`` (the polysemanticity count),
        ``effective_values``, ``max_z``, ``top_value``, ``n_values``, ``monosemantic``
        (count == 1), ``n`` (prompts).
    """
    sites = neuron_sites(neurons)
    if not sites:
        raise ArgumentError("no neurons given")
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    for k in keys:
        if not hasattr(facts[0], k):
            raise ArgumentError(f"unknown key {k!r}: a FactPrompt has no field {k!r}")
    acts = neuron_activations(model, facts, sites, batch_size=batch_size)
    frames = []
    for k in keys:
        labels = [getattr(f, k) for f in facts]
        s = selectivity(acts, labels, threshold=threshold, min_z=min_z)
        frames.append(pd.DataFrame({
            "method": "polysemanticity", "component": "neurons",
            "layer": [x.layer for x in sites], "neuron": [x.neuron for x in sites],
            "role": [str(x.position) if isinstance(x.position, Role) else "subject_last"
                     for x in sites],
            "effect": s["polysemanticity"], "n": len(facts), "key": k,
            "effective_values": s["effective_values"], "max_z": s["max_z"],
            "top_value": s["top_value"], "n_values": s["n_values"],
            "monosemantic": s["polysemanticity"] == 1}))
    return tidy(pd.concat(frames, ignore_index=True))


def monosemantic_fraction(df: pd.DataFrame) -> pd.DataFrame:
    """Per key: how many neurons were scored, how many are selective, the fraction of the
    selective ones that are monosemantic (``effect``), and the mean polysemanticity and
    effective number of values of the selective ones."""
    rows = []
    keys = np.asarray(df["key"], dtype=object)
    count = np.asarray(df["effect"], dtype=float)
    eff = np.asarray(df["effective_values"], dtype=float)
    n_values = np.asarray(df["n_values"], dtype=int)
    for key in dict.fromkeys(keys.tolist()):
        mine = keys == key
        sel = mine & (count > 0)
        any_sel = bool(sel.any())
        rows.append({"method": "polysemanticity/monosemantic_fraction", "key": key,
                     "neurons": int(mine.sum()), "selective": int(sel.sum()),
                     "effect": float((count[sel] == 1).mean()) if any_sel else math.nan,
                     "mean_polysemanticity": float(count[sel].mean()) if any_sel else math.nan,
                     "mean_effective_values": float(eff[sel].mean()) if any_sel else math.nan,
                     "n_values": int(n_values[mine][0])})
    return tidy(rows)


# ----------------------------------------------------------------------------- basis comparison


def _pca(model: Model, pairs: FactPairs, layer: int, role: Role, batch_size: int
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions ``[d_model d_model]`` (columns, by decreasing variance) of the MLP
    output at ``role`` over the clean and corrupt prompts, and their variances."""
    key = (Component.MLP_OUT, layer)
    xs = []
    for _, pb in pair_batches(model, pairs, batch_size):
        for tb in (pb.clean, pb.corrupt):
            xs.append(_gather_role(model.run(tb, save=[key]).acts[key], tb, role).float().cpu())
    x = torch.cat(xs)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=True)
    var = torch.zeros(vh.shape[0], dtype=torch.float64)
    var[:len(s)] = s ** 2 / max(1, len(x) - 1)
    return vh.T.float(), var


def _direction_attribution(model: Model, pairs: FactPairs, layer: int, role: Role,
                           basis: torch.Tensor, batch_size: int) -> torch.Tensor:
    """AtP of each basis direction of the MLP output (denoising): the mean over pairs of
    ``sum_pos (delta . u)(grad . u)`` at the role's positions."""
    key = (Component.MLP_OUT, layer)
    total = torch.zeros(basis.shape[1], dtype=torch.float64)
    n = 0
    for _, pb in pair_batches(model, pairs, batch_size):
        base, src = pb.base_and_source("denoise")
        run = model.run(base, save=[key], metric=lambda lg, pb=pb: pb.logit_diff(lg).sum())
        delta = model.run(src, save=[key]).acts[key] - run.acts[key]  # [b pos d]
        m = base.position_mask(role).to(delta.device)[..., None].float()
        u = basis.to(delta.device)
        est = ((delta * m) @ u) * (run.grads[key] @ u)  # [b pos k]
        total += est.sum((0, 1)).double().cpu()
        n += len(pb.correct)
    return total / max(1, n)


@validated
def basis_comparison(
    model: Model,
    pairs: FactPairs,
    *,
    layer: int,
    role: Role | str = Role.SUBJECT_LAST,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    neuron_scores: pd.DataFrame | None = None,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Share of the lookup's patching effect carried by the top-k neurons vs the top-k PCA
    directions of the same MLP output (module docstring).

    Args:
        layer, role: the lookup site (an MLP layer at a token role).
        ks: subspace sizes (capped at ``d_model`` for PCA, ``d_mlp`` for neurons).
        neuron_scores: an attribution frame with ``neurons`` rows at ``layer`` (column
            ``effect``) to rank neurons by ``|effect|``; default AtP (denoising) on ``pairs``.

    Returns:
        :func:`~factfind.localize.subspace.patch_ratio` rows with ``basis`` (``neurons``,
        ``pca/variance``, ``pca/attribution`` or ``full``), ``k``, ``effect``, ``full_effect``
        and ``ratio`` (the share of the full MLP patch's change).
    """
    role = Role(role)
    pb = encode_pairs(model, pairs)
    if neuron_scores is None:
        neuron_scores = atp(model, pb, components=["neurons"], positions=[role],
                            layers=[layer], direction="denoise", batch_size=batch_size,
                            progress=False)
    ns = neuron_scores[(neuron_scores["component"] == "neurons")
                       & (neuron_scores["layer"] == layer)]
    if ns.empty:
        raise ArgumentError(f"neuron_scores has no neurons rows at layer {layer}")
    size = -np.abs(np.asarray(ns["effect"], dtype=float))
    order = [int(n) for n in np.asarray(ns["neuron"], dtype=int)[np.argsort(size, kind="stable")]]
    pcs, _ = _pca(model, pairs, layer, role, batch_size)
    attr = _direction_attribution(model, pairs, layer, role, pcs, batch_size)
    by_attr = pcs[:, attr.abs().argsort(descending=True)]
    group = {"group": f"L{layer}.mlp"}
    patches = [SubspacePatch(FULL, Component.MLP_OUT, layer, role,
                             info={**group, "basis": "full", "k": None})]
    eye = torch.eye(model.d_mlp)
    for k in ks:
        kn, kp = min(k, len(order)), min(k, model.d_model)
        patches.append(SubspacePatch(f"neurons/top{kn}", Component.NEURONS, layer, role,
                                     basis=eye[:, order[:kn]],
                                     info={**group, "basis": "neurons", "k": kn}))
        for name, b in (("pca/variance", pcs), ("pca/attribution", by_attr)):
            patches.append(SubspacePatch(f"{name}/top{kp}", Component.MLP_OUT, layer, role,
                                         basis=b[:, :kp], info={**group, "basis": name, "k": kp}))
    df = subspace_patching(model, pb, patches, batch_size=batch_size)
    out = patch_ratio(df, by=("group", "layer", "role"))
    out["method"] = "polysemanticity/basis_comparison"
    return out
