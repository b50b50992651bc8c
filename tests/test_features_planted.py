"""Planted truth: a dictionary trained on a planted superposition model recovers its features.

128 sparse features (3 active per sample on average, magnitudes uniform in [0, 1]) live along
known random directions in 32 dimensions (Elhage et al. 2022's setting, Sharkey et al. 2022's
test). A TopK SAE trained on the activations alone must find them: mean over true features of
the best decoder cosine >= 0.95 and >= 90% of them at cosine >= 0.9 (issue 23's bar; measured
0.994 and 100% at one thread).
"""

import pytest
import torch

from factfind.errors import ArgumentError
from factfind.features.dictionary import Dictionary
from factfind.features.training import fit_dictionary
from factfind.testing.superposition import feature_recovery, planted_superposition


@pytest.fixture(scope="module")
def planted():
    return planted_superposition(n_features=128, d=32, seed=0)


def test_planted_model_is_superposition_with_sparse_features(planted):
    x, acts = planted.sample(4096, seed=1)
    assert x.shape == (4096, 32) and acts.shape == (4096, 128)
    assert planted.n_features > planted.d
    assert torch.allclose(planted.directions.norm(dim=1), torch.ones(128))
    torch.testing.assert_close(x, acts @ planted.directions)
    active = (acts > 0).sum(1).float().mean()
    assert 2.5 < active < 3.5  # 3 per sample on average
    x2, _ = planted.sample(4096, seed=1)
    assert torch.equal(x, x2)


def test_sae_recovers_planted_features(planted):
    torch.manual_seed(0)
    x, _ = planted.sample(32_768, seed=1)
    d = fit_dictionary(x, kind="sae", width=256, k=4, batch_size=256, epochs=3, seed=0,
                       progress=False)
    rec = feature_recovery(planted.directions, d)
    assert len(rec) == 128
    assert rec["best_cos"].mean() >= 0.95, rec["best_cos"].describe()
    assert rec["found"].mean() >= 0.9, rec["best_cos"].describe()
    # the control: an untrained decoder of the same width finds almost nothing
    rand = feature_recovery(planted.directions, Dictionary.random(d_in=32, d_sae=256, k=4))
    assert rand["best_cos"].mean() < 0.75
    assert rand["found"].mean() < 0.05


def test_recovery_checks_shapes(planted):
    with pytest.raises(ArgumentError, match="share d"):
        feature_recovery(planted.directions, torch.randn(10, 31))
    with pytest.raises(ArgumentError, match="density"):
        planted_superposition(16, 4, density=0.0)
