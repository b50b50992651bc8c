"""Polysemanticity and the neuron-vs-PCA basis comparison: known answers on the planted model
(one AND neuron per subject, distractor neurons per first or last name) and a loop reference."""

import numpy as np
import pytest
import torch

from factfind.concepts.polysemanticity import (
    basis_comparison,
    monosemantic_fraction,
    neuron_selectivity,
    selectivity,
)


def test_planted_lookup_neurons_are_monosemantic(planted):
    model, facts = planted.model, planted.facts
    lookup = [(1, n) for n in range(16)]  # one AND neuron per subject
    first_name = [(1, 16 + i) for i in range(4)]  # fire for every subject with first name i
    last_name = [(0, j) for j in range(4)]  # fire for every subject with last name j
    df = neuron_selectivity(model, facts, lookup + first_name + last_name,
                            keys=("attribute", "subject"))
    got = df.set_index(["layer", "neuron", "key"])["effect"].to_dict()
    for layer, n in lookup:
        assert got[(layer, n, "subject")] == 1
        assert got[(layer, n, "attribute")] == 1
    for layer, n in first_name + last_name:
        assert got[(layer, n, "subject")] == 4
        assert got[(layer, n, "attribute")] == 0  # a Latin square: equal class means
    eff = df.set_index(["layer", "neuron", "key"])["effective_values"].to_dict()
    assert eff[(1, 0, "subject")] == pytest.approx(1.0)
    assert eff[(1, 16, "subject")] == pytest.approx(4.0)
    frac = monosemantic_fraction(df).set_index("key")
    assert frac.loc["attribute", "effect"] == 1.0  # the 16 selective neurons
    assert frac.loc["attribute", "selective"] == 16
    assert frac.loc["subject", "effect"] == pytest.approx(16 / 24)


def _selectivity_loop(acts, labels, threshold, min_z):
    """Plain-Python reference of the polysemanticity count."""
    values = sorted(set(labels))
    out = []
    for j in range(acts.shape[1]):
        col = [float(a) for a in acts[:, j]]
        mu = sum(col) / len(col)
        sd = (sum((c - mu) ** 2 for c in col) / (len(col) - 1)) ** 0.5
        r = {}
        for v in values:
            xs = [c for c, lab in zip(col, labels, strict=True) if lab == v]
            r[v] = sum(xs) / len(xs) - mu
        top = max(r.values())
        out.append(0 if top < min_z * sd else sum(x >= threshold * top for x in r.values()))
    return out


def test_selectivity_matches_loop():
    torch.manual_seed(0)
    labels = [f"v{i % 5}" for i in range(60)]
    acts = torch.randn(60, 12)
    acts[:, :4] += torch.tensor([[3.0 * (lab == "v1") + 2.0 * (lab == "v3") for lab in labels]
                                 ]).T
    got = selectivity(acts, labels, threshold=0.5, min_z=0.3)["polysemanticity"]
    want = _selectivity_loop(acts, labels, 0.5, 0.3)
    assert list(got) == want
    assert sum(w > 0 for w in want) >= 6 and max(want) >= 2  # non-trivial counts


def test_basis_comparison_planted(planted):
    """16 lookup neurons carry the whole lookup; their outputs live in the 4 ATTR features, so
    4 principal directions of the MLP output do too, and one neuron carries 1/8 of it (each
    pair uses two of the sixteen: its clean and its corrupt subject's)."""
    model, pairs = planted.model, planted.pairs
    df = basis_comparison(model, pairs, layer=1, ks=(1, 4, 16))
    r = df.set_index(["basis", "k"])["ratio"].to_dict()
    assert r[("neurons", 16)] == pytest.approx(1.0, abs=1e-4)
    assert r[("neurons", 1)] == pytest.approx(1 / 8, abs=1e-3)
    assert r[("pca/variance", 4)] == pytest.approx(1.0, abs=1e-3)
    assert r[("pca/attribution", 4)] == pytest.approx(1.0, abs=1e-3)
    assert r[("neurons", 4)] < 0.6


def test_bad_input(planted):
    model, facts, pairs = planted.model, planted.facts, planted.pairs
    with pytest.raises(ValueError, match="unknown key"):
        neuron_selectivity(model, facts, [(1, 0)], keys=("colour",))
    with pytest.raises(ValueError, match="no neurons"):
        neuron_selectivity(model, facts, [])
    import pandas as pd

    with pytest.raises(ValueError, match="no neurons rows at layer 2"):
        basis_comparison(model, pairs, layer=2, neuron_scores=pd.DataFrame(
            {"component": ["neurons"], "layer": [1], "neuron": [0], "effect": [1.0]}))


def test_organism_polysemanticity_runs():
    import factfind as ff
    from factfind.attribute.atp import atp

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").sample(120, seed=0).known_by(model)
    pairs = facts[:8].corrupt(model, seed=0, on_missing="skip")
    top = atp(model, pairs, components=["neurons"], positions=["subject_last"],
              layers=[0]).nlargest(10, "score")
    df = neuron_selectivity(model, facts, top, keys=("attribute", "subject"))
    assert len(df) == 20 and df["effect"].between(0, 80).all()
    frac = monosemantic_fraction(df)
    assert frac["effect"].dropna().between(0, 1).all()
    bc = basis_comparison(model, pairs, layer=0, ks=(4, 64), neuron_scores=top)
    full = bc[bc["basis"] == "full"]
    assert float(np.asarray(full["effect"], dtype=float)[0]) > 0.05  # MLP0 restores some
    assert bool(bc["ratio"].notna().all())
