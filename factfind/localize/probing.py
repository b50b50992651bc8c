"""Probes: is the attribute linearly present in an activation, and can a head read it out?

**Linear probes.** For each layer and position role, fit a multinomial logistic regression from
the residual stream to the attribute (one class per attribute of the relation) on a training
split of *subjects* and report accuracy on held-out subjects. High held-out accuracy at the
last subject token from some layer on says the attribute has been looked up by then (Fact
Finding finds it after MLPs 2-6 in Pythia 2.8B); a probe can read what the model never uses,
so probes locate information, patching locates use.

**Mechanistic probes** (Fact Finding's L16H20 probe) need no training: they ask what one head
would write if it attended fully to the subject's last token. The value vector there, through
the head's output projection ``W_O``, the final norm (scale frozen at the clean run's) and the
unembedding of the relation's attribute tokens, gives one score per attribute; accuracy is how
often the true attribute scores highest. A head with high accuracy is an *attribute extractor*
whose OV circuit already maps the subject's representation to its attribute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from factfind.errors import ArgumentError
from factfind.results import tidy
from factfind.types import Component, Role
from factfind.validation import validated

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.model import Model

log = logging.getLogger(__name__)


def _gather_role(act: Tensor, batch: Any, role: Role) -> Tensor:
    """``[batch ...]`` activation at a point role, or the mean over a group role."""
    if role in batch.positions:
        idx = batch.positions[role].to(act.device)
        return act[torch.arange(act.shape[0], device=act.device), idx]
    m = batch.masks[role].to(act.device).to(act.dtype)
    m = m.reshape(*m.shape, *([1] * (act.dim() - 2)))
    return (act * m).sum(1) / m.sum(1).clamp(min=1)


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, *, l2: float = 1e-3,
                 steps: int = 200) -> Tensor:
    """Multinomial logistic regression by L-BFGS on standardised features; returns weights
    ``[d+1 classes]`` (last row = bias) for standardised inputs."""
    w = torch.zeros(x.shape[1] + 1, n_classes, requires_grad=True)
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xb @ w, y) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


@validated
def linear_probes(
    model: Model,
    facts: FactDataset,
    *,
    roles: Iterable[Role | str] = (Role.SUBJECT_LAST, Role.FINAL),
    component: str = "resid_post",
    test_fraction: float = 0.3,
    seed: int = 0,
    l2: float = 1e-3,
    batch_size: int = 64,
    min_subjects: int = 8,
) -> pd.DataFrame:
    """Held-out accuracy of a logistic probe per (layer, role), split by subject.

    A relation with fewer than ``min_subjects`` subjects or a single attribute is skipped
    (logged): with a handful of facts per relation, as in ROME's known facts, there is nothing
    to hold out. With no relation left the frame is empty.

    Returns:
        Rows with ``method = "probe/linear"``, ``layer``, ``role``, ``effect`` (held-out
        accuracy), ``train_accuracy``, ``chance`` (majority-class rate on the test split),
        ``n`` (test prompts), ``relation``.
    """
    roles_l = [Role(r) for r in roles]
    comp = Component(component)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for relation in facts.relations:
        data = facts.by_relation(relation)
        subjects = sorted({f.subject for f in data})
        if len(subjects) < min_subjects or len({f.attribute for f in data}) < 2:
            skipped.append(relation)  # nothing to learn, or no held-out subjects
            continue
        rng = np.random.default_rng(seed)
        test_subj = set(rng.choice(subjects, size=max(1, int(len(subjects) * test_fraction)),
                                   replace=False).tolist())
        if len(test_subj) == len(subjects):
            raise ArgumentError(f"relation {relation!r} has too few subjects to split")
        classes = sorted({f.attribute for f in data})
        y = torch.tensor([classes.index(f.attribute) for f in data])
        is_test = torch.tensor([f.subject in test_subj for f in data])
        feats: dict[tuple[int, Role], list[Tensor]] = {}
        keys = [(comp, layer) for layer in range(model.n_layers)]
        for start in range(0, len(data), batch_size):
            batch = model.tokenize(list(data[start:start + batch_size]))
            run = model.run(batch, save=keys)
            for layer in range(model.n_layers):
                for role in roles_l:
                    feats.setdefault((layer, role), []).append(
                        _gather_role(run.acts[(comp, layer)], batch, role).float().cpu())
        for (layer, role), parts in feats.items():
            x = torch.cat(parts)
            mu, sd = x[~is_test].mean(0), x[~is_test].std(0).clamp(min=1e-6)
            z = (x - mu) / sd
            w = fit_logistic(z[~is_test], y[~is_test], len(classes), l2=l2)
            pred = (torch.cat([z, torch.ones(len(z), 1)], 1) @ w).argmax(-1)
            acc_test = float((pred[is_test] == y[is_test]).float().mean())
            acc_train = float((pred[~is_test] == y[~is_test]).float().mean())
            chance = float(torch.bincount(y[is_test], minlength=len(classes)).max()
                           / is_test.sum())
            rows.append({"method": "probe/linear", "component": str(comp), "layer": layer,
                         "role": str(role), "effect": acc_test, "train_accuracy": acc_train,
                         "chance": chance, "n": int(is_test.sum()), "relation": relation})
    if skipped:
        log.info("linear probes: %d of %d relations skipped (fewer than %d subjects or one "
                 "attribute): %s", len(skipped), len(facts.relations), min_subjects,
                 ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return tidy(rows)


@validated
def mechanistic_probes(
    model: Model,
    facts: FactDataset,
    *,
    source: Role | str = Role.SUBJECT_LAST,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Accuracy of each head's OV circuit read at ``source`` as an attribute classifier.

    For head ``h`` at layer ``l``: ``scores[a] = norm_frozen(v[source, h] @ W_O[h]) @
    W_U[:, a]`` over the relation's attribute tokens ``a``; the final norm's scale is the clean
    run's at the final position (in post-norm families so is the head's post norm's:
    :meth:`~factfind.model.Model.attn_write_scale`).
    Returns rows ``method = "probe/mechanistic"``, ``layer``,
    ``head``, ``role`` (the source), ``effect`` (accuracy), ``n``, ``relation``.
    """
    src = Role(source)
    layer_list = list(range(model.n_layers)) if layers is None else list(layers)
    L = model.n_layers
    rows: list[dict[str, Any]] = []
    for relation in facts.relations:
        data = facts.by_relation(relation)
        cand_ids = model.tokenize(list(data)).attribute_ids.unique()
        hits = torch.zeros(len(layer_list), model.n_heads)
        for start in range(0, len(data), batch_size):
            batch = model.tokenize(list(data[start:start + batch_size]))
            save = [(Component.V, layer) for layer in layer_list] + [(Component.RESID_POST,
                                                                      L - 1)]
            post = model.spec.attn_post_norm is not None
            if post:
                save += [(Component.Z, layer) for layer in layer_list]
            run = model.run(batch, save=save)
            scale = model.final_norm_scale(run.acts[(Component.RESID_POST, L - 1)][:, -1])
            target = (batch.attribute_ids[:, None] == cand_ids[None]).float().argmax(-1)
            for i, layer in enumerate(layer_list):
                v = _gather_role(run.acts[(Component.V, layer)], batch, src)  # [b head dh]
                out = torch.einsum("bhd,hdm->bhm", v, model.W_O(layer))
                if post:
                    z = run.acts[(Component.Z, layer)][:, -1]
                    out = out * model.attn_write_scale(layer, z)[:, None]
                normed = model.final_norm_frozen(out, scale[:, None], bias=False)
                scores = normed @ model.W_U[:, cand_ids]  # [b head n_attr]
                hits[i] += (scores.argmax(-1) == target[:, None].to(scores.device)).float(
                    ).sum(0).cpu()
        for i, layer in enumerate(layer_list):
            for h in range(model.n_heads):
                rows.append({"method": "probe/mechanistic", "component": "head_out",
                             "layer": layer, "head": h, "role": str(src),
                             "effect": float(hits[i, h] / len(data)), "n": len(data),
                             "relation": relation})
    return tidy(rows)
