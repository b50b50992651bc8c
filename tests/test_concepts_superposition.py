"""Superposition diagnostics on constructed feature sets whose answers are known: equiangular
frames at the Welch bound, orthogonal features, activations of known effective rank."""

import math

import numpy as np
import pytest
import torch

from factfind.concepts.superposition import (
    effective_rank,
    interference,
    lookup_effective_rank,
    storage_counts,
    welch_bound,
)
from factfind.testing.planted import planted_model


def _mercedes() -> torch.Tensor:
    """k = 3 features in d = 2 dimensions at 120 degrees: |cos| = 1/2 = the Welch bound."""
    return torch.tensor([[math.cos(2 * math.pi * i / 3), math.sin(2 * math.pi * i / 3)]
                         for i in range(3)])


def _icosahedron() -> torch.Tensor:
    """k = 6 features in d = 3 (the icosahedron's diagonals): |cos| = 1/sqrt(5) for every pair."""
    p = (1 + math.sqrt(5)) / 2
    return torch.tensor([[0, 1, p], [0, 1, -p], [1, p, 0], [1, -p, 0], [p, 0, 1], [-p, 0, 1]])


@pytest.mark.parametrize(("frame", "k", "d"), [(_mercedes, 3, 2), (_icosahedron, 6, 3)])
def test_equiangular_frames_meet_the_welch_bound(frame, k, d):
    f = frame()
    row = interference(f).iloc[0]
    assert (row["n_features"], row["d"]) == (k, d)
    assert row["welch_bound"] == pytest.approx(welch_bound(k, d)) and row["welch_bound"] > 0
    assert row["effect"] == pytest.approx(row["welch_bound"], abs=1e-6)
    assert row["max"] == pytest.approx(row["welch_bound"], abs=1e-6)
    # activations that use each feature equally (+ and -): variance spread evenly over d dims
    x = torch.cat([f, -f]) * 3.0
    r = effective_rank(x)
    assert r["participation_ratio"] == pytest.approx(d, abs=1e-6)
    assert r["entropy_rank"] == pytest.approx(d, abs=1e-6)
    assert r["dims_90"] == d


def test_orthogonal_features_do_not_interfere():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    row = interference(q[:, :5].T).iloc[0]
    assert row["effect"] < 1e-6 and row["welch_bound"] == 0.0
    codes = torch.randn(4000, 5)
    r = effective_rank(codes @ q[:, :5].T)
    assert r["participation_ratio"] == pytest.approx(5, rel=0.05)
    assert r["dims_90"] == 5


def test_effective_rank_matches_eigenvalues():
    torch.manual_seed(1)
    x = torch.randn(300, 8) * torch.tensor([5.0, 3, 2, 1, 1, 0.5, 0.1, 0.1])
    lam = np.linalg.eigvalsh(np.cov(x.numpy().T))
    p = lam / lam.sum()
    r = effective_rank(x)
    assert r["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam ** 2).sum())
    assert r["entropy_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert 1 < r["participation_ratio"] < 8


def test_interference_groups_and_errors():
    f = _mercedes()
    df = interference(f, labels=["a", "b", "c"], groups=["x", "x", "y"]).set_index("pairs")
    assert df.loc["within", "n_pairs"] == 1 and df.loc["across", "n_pairs"] == 2
    assert df.loc["all", "worst_pair"] in {"a / b", "a / c", "b / c"}
    with pytest.raises(ValueError, match="direction 1 is zero"):
        interference(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="n >= 2"):
        interference(torch.ones(1, 3))


def test_planted_capacity_and_rank():
    """16 facts (4 sports: 2 bits each) over one lookup layer of 32 neurons in 64 dims; the
    lookup MLP writes one of 4 ATTR features (plus inert distractors), so its output at the last
    subject token has rank 4 plus the distractor directions."""
    model, facts, _ = planted_model("gpt_neox")
    cap = storage_counts(model, facts, layers=[1]).iloc[0]
    assert (cap["facts"], cap["neurons"], cap["d_model"]) == (16, 32, 64)
    assert cap["bits"] == pytest.approx(32.0)
    assert cap["effect"] == pytest.approx(0.5)
    er = lookup_effective_rank(model, facts, layers=[1], components=["mlp_out"]).iloc[0]
    assert 3.0 <= er["effect"] <= 8.0 and er["dims"] == 64 and er["n"] == 16
    with pytest.raises(ValueError, match="at least one lookup layer"):
        storage_counts(model, facts, layers=[])


def test_organism_superposition_runs():
    import factfind as ff

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").sample(200, seed=0)
    cap = storage_counts(model, facts, layers=[0]).iloc[0]
    assert cap["neurons"] == model.d_mlp and cap["facts"] > 10
    er = lookup_effective_rank(model, facts, layers=[0])
    assert set(er["component"]) == {"mlp_out", "neurons"}
    assert bool((er["effect"] > 1).all() and (er["effect"] <= er["dims"]).all())
