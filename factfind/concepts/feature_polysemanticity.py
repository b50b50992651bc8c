"""Polysemanticity of dictionary features against neurons, measured the same way.

:mod:`factfind.concepts.polysemanticity` scores each MLP neuron at a token role for a *key* of
the prompts (their ``attribute``, ``subject`` or ``relation``): the neuron is *selective* when
its largest class-mean excess ``max_v (m_v - mu)`` reaches ``min_z`` standard deviations, and
its polysemanticity is the number of values it responds to (1 = monosemantic). A sparse
dictionary is meant to be the better basis (Bricken et al. 2023; Cunningham et al. 2023): its
features should be selective more often, and respond to fewer values, than the neurons of the
same layer. Here features are read exactly as neurons are - one activation per prompt at the
role, the same :func:`~factfind.concepts.polysemanticity.selectivity` on it - so the two columns
of :func:`polysemanticity_comparison` differ only in the basis.

A transcoder at layer ``l`` replaces MLP ``l``, so its features and that MLP's neurons are the
natural pair; an SAE's features are compared with the neurons of its layer's MLP.

Example::

    feature_selectivity(model, dicts, facts, keys=("attribute",))
    polysemanticity_comparison(model, dicts, facts)   # rows per (basis, key)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from factfind.concepts.polysemanticity import (
    KEYS,
    monosemantic_fraction,
    neuron_selectivity,
    selectivity,
)
from factfind.errors import ArgumentError
from factfind.features.dictionary import Dictionaries, Dictionary
from factfind.features.labels import role_feature_activations
from factfind.features.tokens import as_dictionaries
from factfind.results import tidy
from factfind.types import Component, Role, Site
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.model import Model


@validated
def feature_selectivity(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    facts: FactDataset,
    *,
    features: dict[str, Sequence[int]] | None = None,
    keys: Sequence[str] = KEYS,
    role: Role | str = Role.SUBJECT_LAST,
    threshold: float = 0.5,
    min_z: float = 0.5,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Polysemanticity of each feature for each key, as
    :func:`~factfind.concepts.polysemanticity.neuron_selectivity` scores neurons.

    Args:
        dicts: the dictionaries whose features to score.
        facts: the prompts the features are read on.
        features: per dictionary name, the features to score (default all of every one).
        keys, threshold, min_z: as for neurons (prompt fields to group by; response and
            selectivity thresholds).
        role: the token role read (a group role: the mean over its tokens).

    Returns:
        One row per (feature, key) with the neuron frame's columns (``method="polysemanticity"``,
        ``component="features"``, ``layer``, ``role``, ``key``, ``effect`` = the count,
        ``effective_values``, ``max_z``, ``top_value``, ``n_values``, ``monosemantic``, ``n``)
        plus ``dictionary``, ``feature``, ``feature_id``.
    """
    ds = as_dictionaries(dicts)
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    for k in keys:
        if not hasattr(facts[0], k):
            raise ArgumentError(f"unknown key {k!r}: a FactPrompt has no field {k!r}")
    for name in features or {}:
        if name not in ds:
            raise ArgumentError(f"features names dictionary {name!r}, not in {', '.join(ds)}")
    r = Role(role)
    acts = role_feature_activations(model, ds, facts, role=r, batch_size=batch_size)
    frames = []
    for d in ds.values():
        idx = list(range(d.d_sae)) if features is None or d.name not in features else \
            [int(i) for i in features[d.name]]
        if features is not None and d.name not in features:
            continue
        a = acts[d.name][:, idx]
        for k in keys:
            s = selectivity(a, [getattr(f, k) for f in facts], threshold=threshold,
                            min_z=min_z)
            frames.append(pd.DataFrame({
                "method": "polysemanticity", "component": "features", "layer": d.layer,
                "role": r.value, "effect": s["polysemanticity"], "n": len(facts), "key": k,
                "effective_values": s["effective_values"], "max_z": s["max_z"],
                "top_value": s["top_value"], "n_values": s["n_values"],
                "monosemantic": s["polysemanticity"] == 1, "dictionary": d.name,
                "feature": idx, "feature_id": [d.feature_id(i, r.value) for i in idx]}))
    if not frames:
        raise ArgumentError("no features to score")
    return tidy(pd.concat(frames, ignore_index=True))


@validated
def polysemanticity_comparison(
    model: Model,
    dicts: Dictionaries | Dictionary | Iterable[Dictionary],
    facts: FactDataset,
    *,
    keys: Sequence[str] = KEYS,
    role: Role | str = Role.SUBJECT_LAST,
    threshold: float = 0.5,
    min_z: float = 0.5,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Features against neurons: for each dictionary, its features and the neurons of the MLP
    at its layer, scored the same way and summarised by
    :func:`~factfind.concepts.polysemanticity.monosemantic_fraction`.

    Returns:
        Rows per (dictionary, basis, key), ``method="polysemanticity/features_vs_neurons"``:
        ``dictionary``, ``layer``, ``basis`` (``neurons`` or ``features``), ``units`` (neurons
        or features scored), ``selective``, ``effect`` (the monosemantic fraction of the
        selective units), ``mean_polysemanticity``, ``mean_effective_values``, ``n_values``,
        ``selective_fraction`` (``selective / units``).
    """
    ds = as_dictionaries(dicts)
    r = Role(role)
    feats = feature_selectivity(model, ds, facts, keys=keys, role=r, threshold=threshold,
                                min_z=min_z, batch_size=batch_size)
    rows: list[dict[str, Any]] = []
    neuron_cache: dict[int, pd.DataFrame] = {}
    for d in ds.values():
        if d.layer not in neuron_cache:
            sites = [Site(Component.NEURONS, d.layer, neuron=n, position=r)
                     for n in range(model.d_mlp)]
            neuron_cache[d.layer] = neuron_selectivity(model, facts, sites, keys=keys,
                                                       threshold=threshold, min_z=min_z,
                                                       batch_size=batch_size)
        mine = pd.DataFrame(feats[feats["dictionary"] == d.name])
        for basis, df in (("neurons", neuron_cache[d.layer]), ("features", mine)):
            for row in monosemantic_fraction(df).to_dict("records"):
                rows.append({**row, "method": "polysemanticity/features_vs_neurons",
                             "dictionary": d.name, "layer": d.layer, "basis": basis,
                             "role": r.value, "units": row["neurons"],
                             "selective_fraction": row["selective"] / max(row["neurons"], 1)})
    out = tidy(rows)
    return out.drop(columns=["neurons"])


__all__ = ["feature_selectivity", "polysemanticity_comparison"]
