"""Linear representations: is an attribute a *direction* in the residual stream, and does the
model use that direction?

The **linear representation hypothesis** (Mikolov et al. 2013; Elhage et al. 2022, "Toy
models of superposition"; Park, Choe & Veitch 2023) says that a model represents a feature -
here, *which attribute the subject has* ("plays basketball") - as a direction in activation
space: the activation's projection on the direction says how much of the feature is present.
Three independent ways to find such a direction for each attribute ``c`` of a relation, at a
layer and token role:

* ``probe``: the weight vector of class ``c`` in a multinomial logistic probe trained on
  activations of training *subjects* (:func:`factfind.localize.probing.fit_logistic`; weights mapped
  back from standardised to raw coordinates);
* ``mean``: the class mean ``mu_c`` minus the mean of the class means (difference of means, the
  simplest probe and often the most causal one; Marks & Tegmark 2023);
* ``unembed``: the attribute token's unembedding seen through the final norm,
  ``centre(gain * W_U[:, c])`` - the direction that *raises that logit* when added to the final
  residual (what the model writes, rather than what a probe can read).

Every set of ``C`` directions is centred over classes (only differences between attributes
matter for choosing one). The numbers this module puts on the hypothesis:

* **decodability** - held-out accuracy (subjects never seen in training) of reading the
  attribute as the class with the largest projection ``(x - m) . u_c`` (``m`` the training
  mean; the probe uses its own bias), per direction method, layer and role, against chance;
* **agreement** - the mean over attributes of the cosine between two methods' directions at one
  site, or one method's directions at two layers (random directions in ``d`` dimensions give
  ``|cos| ~ sqrt(2 / (pi d))``, 0.07 for ``d = 128``);
* **sufficiency of the direction** - a rank-1 patch (only the component along ``u_clean -
  u_corrupt``, the contrast between the two attributes of the pair) and a rank-k patch (the span
  of all ``C`` directions, rank ``C - 1``) against the full activation patch
  (:mod:`factfind.localize.subspace`): the ratio of their effects is 1 when the direction carries
  all the activation does about the fact, 0 when it carries none of it.

Example::

    dirs = attribute_directions(model, known, layers=[1, 2, 3])
    dirs.decodability                       # held-out accuracy per method, layer, role
    direction_agreement(dirs)               # cosines across methods and layers
    direction_patching(model, pairs, dirs)  # rank-1 / rank-k / full patch ratios
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError, NotFoundError
from factfind.localize.probing import _gather_role, fit_logistic
from factfind.localize.subspace import FULL, SubspacePatch, patch_ratio, subspace_patching
from factfind.results import tidy
from factfind.types import Component, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model

METHODS = ("probe", "mean", "unembed")
DirKey = tuple[str, int, str, str]
"""(relation, layer, role, method)"""


@validated
def role_activations(model: Model, facts: FactDataset, *, component: Component | str,
                     layers: Iterable[int], roles: Iterable[Role | str], batch_size: int = 64
                     ) -> dict[tuple[int, Role], Tensor]:
    """Activations ``[prompt d]`` at each (layer, role) (the mean over a group role's tokens).

    Example::

        acts = role_activations(model, facts, component="mlp_out", layers=[1],
                                roles=["subject_last"])
        acts[(1, Role.SUBJECT_LAST)].shape          # [len(facts), d_model]
    """
    comp, layer_l, role_l = Component(component), list(layers), [Role(r) for r in roles]
    if len(facts) == 0:
        raise ArgumentError("no prompts: the dataset is empty")
    parts: dict[tuple[int, Role], list[Tensor]] = {}
    for start in range(0, len(facts), batch_size):
        batch = model.tokenize(list(facts[start:start + batch_size]))
        run = model.run(batch, save=[(comp, layer) for layer in layer_l])
        for layer, role in itertools.product(layer_l, role_l):
            parts.setdefault((layer, role), []).append(
                _gather_role(run.acts[(comp, layer)], batch, role).float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def unembed_directions(model: Model, token_ids: Tensor) -> Tensor:
    """``[len(ids) d_model]``: for each token the residual direction ``v`` with
    ``logit = v . resid / scale`` through the final norm (its gain, centring for LayerNorm)."""
    eye = torch.eye(model.d_model, device=model.device, dtype=model.dtype)
    m = model.final_norm_frozen(eye, torch.ones(1, device=model.device, dtype=model.dtype),
                                bias=False)  # [d d]: row i is norm(e_i)
    return (m.float() @ model.W_U.float()[:, token_ids.to(model.device)]).T.cpu()


@dataclass(frozen=True)
class Directions:
    """Attribute directions by (relation, layer, role, method), with their decodability.

    Attributes:
        vectors: ``[class d]`` per ``(relation, layer, role, method)``, centred over classes.
        classes: the attributes of each relation, in row order of ``vectors``.
        decodability: the tidy held-out accuracy frame (see :func:`attribute_directions`).
        component: the component they were read from.
    """

    vectors: dict[DirKey, Tensor]
    classes: dict[str, list[str]]
    decodability: pd.DataFrame
    component: str

    def get(self, relation: str, layer: int, role: Role | str, method: str) -> Tensor:
        key = (relation, layer, str(Role(role)), method)
        if key not in self.vectors:
            raise NotFoundError(f"no {method} directions for relation {relation!r} at layer "
                                f"{layer}, role {role}: computed for {sorted(self.vectors)[:4]}...")
        return self.vectors[key]


def _split(data: FactDataset, test_fraction: float, seed: int, relation: str) -> Tensor:
    subjects = sorted({f.subject for f in data})
    rng = np.random.default_rng(seed)
    n_test = max(1, int(len(subjects) * test_fraction))
    if n_test >= len(subjects):
        raise ArgumentError(f"relation {relation!r} has too few subjects ({len(subjects)}) to "
                         "hold some out")
    test = set(rng.choice(subjects, size=n_test, replace=False).tolist())
    return torch.tensor([f.subject in test for f in data])


@validated
def attribute_directions(
    model: Model,
    facts: FactDataset,
    *,
    component: Component | str = "resid_post",
    layers: Iterable[int] | None = None,
    roles: Iterable[Role | str] = (Role.SUBJECT_LAST, Role.FINAL),
    methods: Sequence[str] = METHODS,
    test_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-3,
    batch_size: int = 64,
) -> Directions:
    """Each attribute's direction by probe, class mean and unembedding (module docstring).

    Directions are fitted on training subjects only; held-out subjects measure decodability.

    Returns:
        :class:`Directions`; its ``decodability`` frame has one row per (relation, layer,
        role, direction method): ``method="representation/decodability"``, ``direction``,
        ``effect`` (held-out accuracy), ``train_accuracy``, ``chance`` (the test split's
        majority-class rate), ``n`` (test prompts), ``relation``.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ArgumentError(f"unknown direction methods {bad}; choose from {METHODS}")
    layer_l = list(range(model.n_layers)) if layers is None else list(layers)
    role_l = [Role(r) for r in roles]
    vectors: dict[DirKey, Tensor] = {}
    classes: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    for relation in facts.relations:
        data = facts.by_relation(relation)
        cls = sorted({f.attribute for f in data})
        if len(cls) < 2:
            raise ArgumentError(f"relation {relation!r} has a single attribute {cls}: nothing to "
                             "tell apart")
        classes[relation] = cls
        y = torch.tensor([cls.index(f.attribute) for f in data])
        test = _split(data, test_fraction, seed, relation)
        ids = model.tokenize([next(f for f in data if f.attribute == c) for c in cls]
                             ).attribute_ids
        acts = role_activations(model, data, component=component, layers=layer_l, roles=role_l,
                                batch_size=batch_size)
        for (layer, role), x in acts.items():
            for method in methods:
                u, score = _fit(method, x[~test], y[~test], len(cls), model, ids, l2)
                vectors[(relation, layer, str(role), method)] = u
                pred = score(x).argmax(-1)
                rows.append({
                    "method": "representation/decodability", "component": str(component),
                    "layer": layer, "role": str(role), "direction": method,
                    "effect": float((pred[test] == y[test]).float().mean()),
                    "train_accuracy": float((pred[~test] == y[~test]).float().mean()),
                    "chance": float(torch.bincount(y[test], minlength=len(cls)).max()
                                    / test.sum()),
                    "n": int(test.sum()), "relation": relation})
    return Directions(vectors, classes, tidy(rows), str(Component(component)))


def _fit(method: str, x: Tensor, y: Tensor, n_classes: int, model: Model, ids: Tensor,
         l2: float) -> tuple[Tensor, Any]:
    """Directions ``[class d]`` (centred over classes) and a scoring function ``x -> [n class]``."""
    m = x.mean(0)
    if method == "probe":
        sd = x.std(0)
        sd = sd.clamp(min=max(1e-3 * float(sd.max()), 1e-8))  # near-constant coordinates
        # would otherwise get huge raw-space weights from noise
        w = fit_logistic((x - m) / sd, y, n_classes, l2=l2)  # [d+1 class], standardised
        u = (w[:-1] / sd[:, None]).T  # raw coordinates: score = (x - m) . u_c + b_c
        bias = w[-1]
        return u - u.mean(0), lambda z: (z - m) @ u.T + bias
    if method == "mean":
        mu = torch.stack([x[y == c].mean(0) if (y == c).any() else m for c in range(n_classes)])
        u = mu - mu.mean(0)
    else:
        u = unembed_directions(model, ids)
        u = u - u.mean(0)
    return u, lambda z: (z - m) @ u.T


def _cos_rows(a: Tensor, b: Tensor) -> float:
    """Mean over classes of ``cos(a_c, b_c)`` (rows ``[class d]``)."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def direction_agreement(directions: Directions) -> pd.DataFrame:
    """Cosine agreement of attribute directions across methods and across layers.

    Returns:
        Rows ``method="representation/agreement"`` with ``kind`` ``"methods"`` (``method_a``,
        ``method_b`` at one ``layer`` and ``role``) or ``"layers"`` (one ``direction`` method,
        ``layer_a`` < ``layer_b``; ``layer`` is ``layer_a``), ``effect`` the mean over
        attributes of the cosine, ``relation``.
    """
    rows: list[dict[str, Any]] = []
    keys = sorted(directions.vectors)
    sites = sorted({(r, lay, ro) for r, lay, ro, _ in keys})
    for rel, layer, role in sites:
        ms = [m for r, lay, ro, m in keys if (r, lay, ro) == (rel, layer, role)]
        for a, b in itertools.combinations(ms, 2):
            rows.append({"method": "representation/agreement", "kind": "methods",
                         "layer": layer, "role": role, "method_a": a, "method_b": b,
                         "effect": _cos_rows(directions.vectors[(rel, layer, role, a)],
                                             directions.vectors[(rel, layer, role, b)]),
                         "relation": rel})
    tracks = sorted({(r, ro, m) for r, _, ro, m in keys})
    for rel, role, m in tracks:
        ls = sorted(lay for r, lay, ro, mm in keys if (r, ro, mm) == (rel, role, m))
        for la, lb in itertools.combinations(ls, 2):
            rows.append({"method": "representation/agreement", "kind": "layers",
                         "layer": la, "role": role, "direction": m, "layer_a": la,
                         "layer_b": lb,
                         "effect": _cos_rows(directions.vectors[(rel, la, role, m)],
                                             directions.vectors[(rel, lb, role, m)]),
                         "relation": rel})
    return tidy(rows)


def direction_patches(pairs: FactPairs, directions: Directions, *, layers: Iterable[int],
                      roles: Iterable[Role | str], methods: Sequence[str] = METHODS
                      ) -> list[SubspacePatch]:
    """The full, rank-1 and rank-k :class:`~factfind.localize.subspace.SubspacePatch` es at each
    (layer, role) for each direction method (module docstring)."""
    comp = Component(directions.component)
    layer_l, role_l = list(layers), [Role(r) for r in roles]
    rel_c = max(len(c) for c in directions.classes.values())
    d = next(iter(directions.vectors.values())).shape[-1]
    idx = []
    for i, (clean, bad) in enumerate(pairs):
        cls = directions.classes.get(clean.relation)
        if cls is None or clean.attribute not in cls or bad.attribute not in cls:
            raise ArgumentError(f"pair {i} ({clean.prompt!r}): relation {clean.relation!r} "
                             f"attributes {clean.attribute!r}/{bad.attribute!r} have no "
                             "directions; fit them on facts of that relation")
        idx.append((clean.relation, cls.index(clean.attribute), cls.index(bad.attribute)))
    patches = []
    for layer, role in itertools.product(layer_l, role_l):
        patches.append(SubspacePatch(FULL, comp, layer, role, info={"direction": "none"}))
        for m in methods:
            one = torch.zeros(len(pairs), d, 1)
            span = torch.zeros(len(pairs), d, rel_c)
            for i, (rel, a, b) in enumerate(idx):
                u = directions.get(rel, layer, role, m)  # [class d]
                one[i, :, 0] = u[a] - u[b]
                span[i, :, :len(u)] = u.T
            patches.append(SubspacePatch(f"{m}/rank1", comp, layer, role, basis=one,
                                         info={"direction": m}))
            patches.append(SubspacePatch(f"{m}/rank_k", comp, layer, role, basis=span,
                                         info={"direction": m}))
    return patches


@validated
def direction_patching(
    model: Model,
    pairs: FactPairs,
    directions: Directions,
    *,
    layers: Iterable[int] | None = None,
    roles: Iterable[Role | str] | None = None,
    methods: Sequence[str] | None = None,
    batch_size: int = 16,
    per_prompt: bool = False,
) -> pd.DataFrame:
    """Denoise along the attribute directions only, against the full activation patch, at
    every layer, role and method ``directions`` has (or those given).

    Returns:
        :func:`~factfind.localize.subspace.patch_ratio` rows (one per layer, role, direction method
        and rank: ``subspace`` ``"<method>/rank1"``, ``"<method>/rank_k"`` or ``"full"``,
        ``effect``, ``full_effect``, ``ratio``); per-prompt
        :func:`~factfind.localize.subspace.subspace_patching` rows with ``per_prompt=True``.
    """
    layer_l = sorted({k[1] for k in directions.vectors}) if layers is None else list(layers)
    role_l = list(dict.fromkeys(k[2] for k in directions.vectors)) if roles is None else roles
    method_l = (list(dict.fromkeys(k[3] for k in directions.vectors)) if methods is None
                else methods)
    patches = direction_patches(pairs, directions, layers=layer_l, roles=role_l,
                                methods=method_l)
    df = subspace_patching(model, pairs, patches, batch_size=batch_size)
    return df if per_prompt else patch_ratio(df)
