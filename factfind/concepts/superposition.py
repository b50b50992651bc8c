"""Superposition diagnostics: does the model store more than it has dimensions for?

A layer with ``d`` dimensions can hold ``d`` features without interference, one per orthogonal
direction. **Superposition** (Elhage et al. 2022, "Toy models of superposition") is storing
more features than that, in directions that overlap a little: sparse features rarely co-occur,
so the overlaps rarely matter. *Bottleneck* superposition packs features into the residual
stream (``d_model`` dimensions); *neuron* superposition packs them into an MLP's neurons. Fact
lookup is a natural candidate: a model knows far more facts than it has neurons (Nanda et al.
2023). Three numbers:

* **capacity** (:func:`storage_counts`): facts stored against neurons and residual dimensions
  at the lookup layers, as ratios (``facts_per_neuron``, ``facts_per_dim``) and in bits (each
  fact of a relation with ``A`` attributes carries ``log2 A`` bits; ``bits_per_neuron``). More
  than one fact per neuron means no one-neuron-per-fact lookup is possible.
* **interference** (:func:`interference`): for a set of feature directions (e.g. every
  attribute direction of every relation at a layer, :mod:`factfind.concepts.representation`), the
  distribution of off-diagonal ``|cos|``. ``n <= d`` features can be orthogonal (0); ``n > d``
  cannot, and the smallest possible worst-case overlap is the **Welch bound**
  ``sqrt((n - d) / (d (n - 1)))``; random directions give ``E|cos| ~ sqrt(2 / (pi d))``.
* **effective rank** (:func:`effective_rank`, :func:`lookup_effective_rank`) of activations
  ``X [n d]`` over the dataset, from the covariance eigenvalues ``lambda``:
  the *participation ratio* ``(sum lambda)^2 / sum lambda^2`` and the *entropy rank*
  ``exp(H(lambda / sum lambda))`` - both ``k`` for variance spread evenly over ``k``
  dimensions - and ``dims_90``, the dimensions holding 90% of the variance. A lookup MLP whose
  output over thousands of subjects has effective rank near ``d_model`` uses every dimension;
  compared with the number of distinct facts it says how much must share.

Example::

    storage_counts(model, facts, layers=[0, 1])
    interference(torch.stack([dirs.get(r, 1, "subject_last", "mean") for r in rels]).flatten(0, 1))
    lookup_effective_rank(model, facts, layers=[0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.concepts.representation import role_activations
from factfind.errors import ArgumentError
from factfind.results import tidy
from factfind.types import Component, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.model import Model


def storage_counts(model: Model, facts: FactDataset, *, layers: Iterable[int]) -> pd.DataFrame:
    """Facts stored against the lookup layers' neurons and residual dimensions.

    A fact is a distinct (subject, relation) with its attribute (templates do not count).

    Returns:
        One row ``method="superposition/capacity"``: ``facts``, ``subjects``, ``relations``,
        ``bits`` (``sum log2(attributes of the relation)`` over facts), ``lookup_layers``,
        ``neurons`` (``d_mlp`` times the lookup layers), ``d_model``, ``effect`` =
        ``facts_per_neuron``, ``facts_per_dim``, ``bits_per_neuron``, ``bits_per_dim``.
    """
    layer_l = sorted(set(layers))
    if not layer_l:
        raise ArgumentError("storage_counts needs at least one lookup layer")
    stored = {(f.subject, f.relation): f.attribute for f in facts}
    n_attr = {r: len({f.attribute for f in facts.by_relation(r)}) for r in facts.relations}
    bits = sum(math.log2(n_attr[r]) for _, r in stored if n_attr[r] > 1)
    neurons = model.d_mlp * len(layer_l)
    return tidy([{
        "method": "superposition/capacity", "facts": len(stored),
        "subjects": len({s for s, _ in stored}), "relations": len(n_attr), "bits": bits,
        "lookup_layers": ",".join(map(str, layer_l)), "neurons": neurons,
        "d_model": model.d_model, "effect": len(stored) / neurons,
        "facts_per_dim": len(stored) / model.d_model, "bits_per_neuron": bits / neurons,
        "bits_per_dim": bits / model.d_model}])


def welch_bound(n: int, d: int) -> float:
    """The smallest possible maximum ``|cos|`` among ``n`` unit vectors in ``d`` dimensions
    (0 when ``n <= d``)."""
    return 0.0 if n <= d else math.sqrt((n - d) / (d * (n - 1)))


def interference(vectors: Tensor, *, labels: Iterable[str] | None = None,
                 groups: Iterable[str] | None = None) -> pd.DataFrame:
    """Distribution of off-diagonal ``|cos|`` between feature directions ``[n d]``.

    Args:
        labels: a name per direction (to name the worst pair).
        groups: a group per direction (e.g. its relation): adds rows for the pairs within a
            group and across groups. Directions of one relation's mutually exclusive attributes
            overlap by construction (centred, they sum to zero: ``cos = -1/(C-1)`` for a
            regular simplex); pairs across relations show interference proper.

    Returns:
        One row per set of pairs (``pairs`` = ``"all"``, ``"within"``, ``"across"``):
        ``method="superposition/interference"``, ``effect`` the mean ``|cos|``, ``median``,
        ``p90``, ``max``, ``n_pairs``, ``n_features``, ``d``, ``welch_bound`` (for all
        ``n_features``), ``random_mean`` (``sqrt(2 / (pi d))``, the expected ``|cos|`` of random
        directions for large ``d``), ``worst_pair`` (if ``labels``).
    """
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ArgumentError(f"interference needs [n d] with n >= 2 directions, got "
                         f"{tuple(vectors.shape)}")
    v = vectors.double()
    norms = v.norm(dim=-1)
    if (norms == 0).any():
        raise ArgumentError(f"direction {int((norms == 0).nonzero()[0])} is zero")
    u = v / norms[:, None]
    n, d = v.shape
    iu = torch.triu_indices(n, n, 1)
    off = (u @ u.T).abs()[iu[0], iu[1]].numpy()
    names = list(labels) if labels is not None else None
    sets = {"all": np.ones(len(off), dtype=bool)}
    if groups is not None:
        g = np.asarray(list(groups))
        same = g[iu[0].numpy()] == g[iu[1].numpy()]
        sets |= {"within": same, "across": ~same}
    rows = []
    for name, keep in sets.items():
        if not keep.any():
            continue
        x = off[keep]
        worst = int(np.flatnonzero(keep)[x.argmax()])
        rows.append({
            "method": "superposition/interference", "pairs": name, "effect": float(x.mean()),
            "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)),
            "max": float(x.max()), "n_pairs": int(keep.sum()), "n_features": n, "d": d,
            "welch_bound": welch_bound(n, d), "random_mean": math.sqrt(2 / (math.pi * d)),
            "worst_pair": None if names is None else
            f"{names[int(iu[0, worst])]} / {names[int(iu[1, worst])]}"})
    return tidy(rows)


def effective_rank(x: Tensor) -> dict[str, float]:
    """Participation ratio, entropy rank and 90%-variance dimensions of ``x [n d]``
    (centred over rows), from the covariance eigenvalues."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ArgumentError(f"effective_rank needs [n d] with n >= 2 rows, got {tuple(x.shape)}")
    xc = x.double() - x.double().mean(0)
    s = torch.linalg.svdvals(xc) ** 2  # eigenvalues of the scatter matrix
    total = float(s.sum())
    if total <= 0:
        return {"participation_ratio": 0.0, "entropy_rank": 0.0, "dims_90": 0.0}
    p = s / total
    ent = float(-(p[p > 0] * p[p > 0].log()).sum())
    dims_90 = int((torch.cumsum(p, 0) < 0.9 - 1e-12).sum()) + 1
    return {"participation_ratio": total ** 2 / float((s ** 2).sum()),
            "entropy_rank": math.exp(ent), "dims_90": float(dims_90)}


@validated
def lookup_effective_rank(
    model: Model,
    facts: FactDataset,
    *,
    layers: Iterable[int] | None = None,
    role: Role | str = Role.SUBJECT_LAST,
    components: Iterable[str] = ("mlp_out", "neurons"),
    batch_size: int = 64,
) -> pd.DataFrame:
    """Effective rank of the lookup MLPs' output (and neurons) at ``role`` over the dataset,
    one activation per distinct prompt.

    Returns:
        Rows ``method="superposition/effective_rank"`` per (component, layer): ``effect``
        the participation ratio, ``entropy_rank``, ``dims_90``, ``dims`` (``d_model`` or
        ``d_mlp``), ``n`` (prompts), ``subjects``.
    """
    layer_l = list(range(model.n_layers)) if layers is None else list(layers)
    rows: list[dict[str, Any]] = []
    for comp in components:
        acts = role_activations(model, facts, component=comp, layers=layer_l, roles=[role],
                                batch_size=batch_size)
        for layer in layer_l:
            x = acts[(layer, Role(role))]
            r = effective_rank(x)
            rows.append({"method": "superposition/effective_rank",
                         "component": str(Component(comp)), "layer": layer,
                         "role": str(Role(role)), "effect": r["participation_ratio"],
                         "entropy_rank": r["entropy_rank"], "dims_90": r["dims_90"],
                         "dims": x.shape[1], "n": len(x),
                         "subjects": len({f.subject for f in facts})})
    return tidy(rows)
