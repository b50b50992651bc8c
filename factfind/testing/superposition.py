"""A planted superposition model: sparse features in fewer dimensions, with known directions.

Elhage et al. 2022 ("Toy models of superposition") showed that when features are sparse a model
stores more of them than it has dimensions: ``n`` features in ``m < n`` dimensions, each along
its own direction, the directions overlapping a little. At high sparsity their toy models learn
directions that are close to orthogonal, and at each token only a few features are active, so
the few directions present rarely interfere. A sparse dictionary is meant to undo exactly this:
trained on the activations alone it should find the ``n`` directions again (Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders", who introduced this test).

:class:`PlantedSuperposition` is that setting with the answer written down: ``n`` unit
directions drawn at random in ``m`` dimensions (near-orthogonal for ``m >= 16``, as the toy
models' high-sparsity solutions are), each feature active independently with probability
``density`` and, when active, with a magnitude uniform in ``[0, 1]`` (Elhage et al.'s
distribution), and activations ``x = sum_i a_i d_i``. :func:`feature_recovery` scores a decoder
against the directions: for each true feature, the best cosine between its direction and any
decoder row. Sharkey et al. count a feature as *found* at a mean max cosine (MMCS) near 1.

Example::

    planted = planted_superposition(n_features=128, d=32, density=3 / 128, seed=0)
    x, acts = planted.sample(32_768, seed=1)             # [32768 32], [32768 128]
    d = fit_dictionary(x, kind="sae", width=256, k=4, batch_size=256, epochs=3)
    feature_recovery(planted.directions, d)["best_cos"].mean()     # ~0.99
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError
from factfind.features.dictionary import Dictionary


@dataclass(frozen=True)
class PlantedSuperposition:
    """``n_features`` sparse features along known directions in ``d`` dimensions.

    Attributes:
        directions: ``[n_features d]`` unit rows, the ground truth a dictionary should find.
        density: the probability that a feature is active on a sample (``n_features *
            density`` features are active per sample on average).
        seed: the seed the directions were drawn with.
    """

    directions: Tensor
    density: float
    seed: int

    @property
    def n_features(self) -> int:
        return int(self.directions.shape[0])

    @property
    def d(self) -> int:
        return int(self.directions.shape[1])

    def sample(self, n: int, *, seed: int = 1) -> tuple[Tensor, Tensor]:
        """``n`` samples: activations ``x [n d]`` and the true feature activations
        ``acts [n n_features]`` (``x = acts @ directions``); deterministic under ``seed``."""
        if n <= 0:
            raise ArgumentError(f"n must be > 0 samples, got {n}")
        g = torch.Generator().manual_seed(seed)
        on = torch.rand(n, self.n_features, generator=g) < self.density
        acts = on * torch.rand(n, self.n_features, generator=g)
        return acts @ self.directions, acts


def planted_superposition(n_features: int = 128, d: int = 32, *, density: float | None = None,
                          seed: int = 0) -> PlantedSuperposition:
    """A :class:`PlantedSuperposition` with random unit directions.

    Args:
        n_features: the number of true features ``n``; d: the dimensions ``m`` (``m < n`` is
            superposition).
        density: probability that a feature is active (default ``3 / n_features``: three
            active features per sample on average).
        seed: draws the directions.
    """
    if n_features <= 0 or d <= 0:
        raise ArgumentError(f"n_features and d must be > 0, got {n_features} and {d}")
    density = 3 / n_features if density is None else density
    if not 0 < density <= 1:
        raise ArgumentError(f"density is a probability in (0, 1], got {density}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    return PlantedSuperposition(dirs / dirs.norm(dim=1, keepdim=True), float(density), seed)


def feature_recovery(directions: Tensor, decoder: Dictionary | Tensor, *,
                     threshold: float = 0.9) -> pd.DataFrame:
    """How well a decoder recovers known feature directions.

    Args:
        directions: ``[n d]`` the true directions; decoder: a :class:`Dictionary` (its
            ``W_dec`` rows) or a ``[width d]`` matrix.
        threshold: a true feature is *found* when its best cosine reaches it.

    Returns:
        One row per true feature: ``true_feature``, ``best_feature`` (the decoder row nearest
        to it), ``best_cos`` (the max cosine over decoder rows; its mean is Sharkey et al.'s
        MMCS), ``found`` (``best_cos >= threshold``).
    """
    w = decoder.W_dec if isinstance(decoder, Dictionary) else decoder
    if w.dim() != 2 or directions.dim() != 2 or w.shape[1] != directions.shape[1]:
        raise ArgumentError(f"directions [n d] and decoder rows [width d] must share d, got "
                            f"{tuple(directions.shape)} and {tuple(w.shape)}")
    a = directions.double() / directions.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    b = w.double() / w.double().norm(dim=1, keepdim=True).clamp(min=1e-12)
    best = (a @ b.T).max(1)
    return pd.DataFrame({"true_feature": range(len(a)), "best_feature": best.indices.numpy(),
                         "best_cos": best.values.numpy(),
                         "found": (best.values >= threshold).numpy()})


__all__ = ["PlantedSuperposition", "feature_recovery", "planted_superposition"]
