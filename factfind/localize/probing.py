"""Probes: is the attribute linearly present in an activation, and can a head read it out?

**Linear probes.** For each layer and position role, fit a multinomial logistic regression from
the residual stream to the attribute (one class per attribute of the relation) on a training
split of *subjects* and report accuracy on held-out subjects. High held-out accuracy at the
last subject token from some layer on says the attribute has been looked up by then (Fact
Finding finds it after MLPs 2-6 in Pythia 2.8B); a probe can read what the model never uses,
so probes locate information, patching locates use.

The probes of one relation (every layer x role) are fitted together by
:func:`fit_logistic_newton`: the training rows span the part of the weights the penalised loss
can use (fewer subjects than ``d_model``), so each probe is solved exactly by Newton's method
over that span, every probe in one batched step. :func:`fit_logistic` (L-BFGS on the full
weights, one probe at a time) is the reference it is tested against (``reference=True``).
A probe predicts the attributes of its training subjects only: a held-out fact whose attribute
no training subject has counts as a miss (a class with no training example has no finite
optimum, its bias runs to minus infinity).

**Mechanistic probes** (Fact Finding's L16H20 probe) need no training: they ask what one head
would write if it attended fully to the subject's last token. The value vector there, through
the head's output projection ``W_O``, the final norm (scale frozen at the clean run's) and the
unembedding of the relation's attribute tokens, gives one score per attribute; accuracy is how
often the true attribute scores highest. A head with high accuracy is an *attribute extractor*
whose OV circuit already maps the subject's representation to its attribute.
"""

from __future__ import annotations

import logging
from collections import Counter
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


def _logistic_loss(fb: Tensor, y1: Tensor, theta: Tensor, l2: float) -> Tensor:
    """``[P]`` penalised mean cross-entropy of ``P`` probes: features ``[P n k]`` (last column
    the bias's ones), one-hot labels ``[n C]``, parameters ``[P k C]`` (last row unpenalised)."""
    logits = fb @ theta
    ce = -(y1 * torch.log_softmax(logits, -1)).sum(-1).mean(-1)
    return ce + l2 * theta[:, :-1].pow(2).sum((1, 2))


def fit_logistic_newton(x: Tensor, y: Tensor, n_classes: int, *, l2: float = 1e-3,
                        max_iter: int = 100, max_params: int = 1024,
                        max_hessian: int = 2 ** 24) -> Tensor:
    """The minimiser of :func:`fit_logistic`'s loss for ``P`` probes at once: standardised
    features ``x [P n d]`` sharing the labels ``y [n]`` (every class in ``range(n_classes)``
    present); returns weights ``[P d+1 classes]`` (last row = bias) like :func:`fit_logistic`.

    1. **The span of the training rows.** A weight component orthogonal to every training row
       changes no training logit and only adds penalty, so the minimiser lies in the rows' span
       (the representer theorem). With the thin SVD ``x = U S V^T`` the loss is minimised over
       ``r = min(n, d)`` coordinates ``F = U S`` and mapped back by ``w = V w_r``: exactly the
       same minimiser, with ``(r+1) * classes`` parameters instead of ``(d+1) * classes``.
    2. **Newton's method**, in float64 with the exact Hessian
       ``sum_i f_i f_i^T (x) (diag(p_i) - p_i p_i^T) / n + 2 l2`` on the weights (solved by
       Cholesky), batched over the probes, each with its own backtracking (Armijo) line
       search, until the Newton decrement says every probe's loss is within ``1e-14`` of its
       minimum. Adding one constant to every class's bias changes nothing (softmax): the
       Hessian's null direction, which the gradient never has a component along, so a
       ``1e-10`` ridge leaves the step unchanged. Regularised logistic regression is strictly
       convex in the rest, so the quadratic convergence is global with the line search.

    Where ``(r+1) * classes`` exceeds ``max_params`` (a Hessian solve per probe per step costs
    its cube) each probe is fitted by :func:`fit_logistic` on the reduced features instead.
    ``max_hessian`` bounds the Hessian entries held at once (probes are chunked by it).
    """
    if x.dim() != 3 or y.shape != (x.shape[1],):
        raise ArgumentError(f"x must be [probes n d] and y [n], got {tuple(x.shape)} and "
                            f"{tuple(y.shape)}")
    if set(y.tolist()) != set(range(n_classes)):
        raise ArgumentError(f"every class of range({n_classes}) needs a training example; "
                            f"present: {sorted(set(y.tolist()))}")
    P, n = x.shape[:2]
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)  # [P n r] [P r] [P r d]
    feats = u * s[:, None, :]  # [P n r]: x = feats @ vh
    r = feats.shape[2]
    k = (r + 1) * n_classes
    if k > max_params:
        thetas = torch.stack([fit_logistic(f.float(), y, n_classes, l2=l2).double()
                              for f in feats])
    else:
        fb = torch.cat([feats, feats.new_ones(P, n, 1)], 2)
        y1 = torch.nn.functional.one_hot(y, n_classes).double()
        step = max(1, max_hessian // (k * k))
        thetas = torch.cat([_newton(fb[i:i + step], y1, l2, max_iter)
                            for i in range(0, P, step)])
    w = vh.transpose(1, 2) @ thetas[:, :-1]  # [P d C]
    return torch.cat([w, thetas[:, -1:]], 1).to(x.dtype)


def _newton(fb: Tensor, y1: Tensor, l2: float, max_iter: int) -> Tensor:
    """Damped Newton on :func:`_logistic_loss` for a chunk of probes (see
    :func:`fit_logistic_newton`); returns ``[P r+1 C]``."""
    P, n, r1 = fb.shape
    C = y1.shape[1]
    k = r1 * C
    reg = torch.ones(r1, C, dtype=fb.dtype)
    reg[-1] = 0.0  # the bias is not penalised
    ridge = 2 * l2 * torch.diag(reg.flatten()) + 1e-10 * torch.eye(k, dtype=fb.dtype)
    theta = fb.new_zeros(P, r1, C)
    loss = _logistic_loss(fb, y1, theta, l2)
    active = torch.ones(P, dtype=torch.bool)
    for _ in range(max_iter):
        p = torch.softmax(fb @ theta, -1)  # [P n C]
        g = fb.transpose(1, 2) @ (p - y1) / n + 2 * l2 * reg * theta  # [P r+1 C]
        a = (fb[..., :, None] * p[..., None, :]).reshape(P, n, k)  # f_i (x) p_i
        diag = torch.einsum("pia,pib,pic->pabc", fb, fb, p)  # sum_i f f^T (x) diag(p_i)
        h = torch.diag_embed(diag).permute(0, 1, 3, 2, 4).reshape(P, k, k)
        h = (h - a.transpose(1, 2) @ a) / n + ridge
        # Cholesky (h is positive definite), not torch.linalg.solve: torch 2.13's batched LU
        # hangs in MKL ("DLASWP parameter 6") at 150 x 150 doubles with two threads
        chol, info = torch.linalg.cholesky_ex(h)
        if info.any():  # round-off on the bias null direction: a larger ridge
            chol = torch.linalg.cholesky(h + 1e-6 * torch.eye(k, dtype=fb.dtype))
        delta = -torch.cholesky_solve(g.reshape(P, k, 1), chol).reshape(P, r1, C)
        decrement = -(g * delta).sum((1, 2))  # g^T H^-1 g: twice the quadratic model's gain
        active &= decrement > 2e-14
        if not active.any():
            break
        t = torch.ones(P, dtype=fb.dtype)
        accepted = ~active
        for _ in range(60):  # backtracking (Armijo) per probe
            trial = theta + t[:, None, None] * delta
            new = _logistic_loss(fb, y1, trial, l2)
            ok = ~accepted & (new <= loss - 1e-4 * t * decrement)
            theta = torch.where(ok[:, None, None], trial, theta)
            loss = torch.where(ok, new, loss)
            accepted |= ok
            if accepted.all():
                break
            t = torch.where(accepted, t, t / 2)
        active &= accepted  # no decrease at 2^-60 of the step: converged to round-off
    return theta


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
    reference: bool = False,
) -> pd.DataFrame:
    """Held-out accuracy of a logistic probe per (layer, role), split by subject.

    The probes of a relation are fitted together by :func:`fit_logistic_newton`;
    ``reference=True`` fits each alone by :func:`fit_logistic` (L-BFGS, 200 iterations: the
    slow reference, which stops near the same minimum).

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
        is_test = torch.tensor([f.subject in test_subj for f in data])
        # the attributes of the training subjects; a held-out attribute is a miss (-1)
        classes = sorted({f.attribute for f, t in zip(data, is_test.tolist(), strict=True)
                          if not t})
        y = torch.tensor([classes.index(f.attribute) if f.attribute in classes else -1
                          for f in data])
        held_out = Counter(f.attribute for f, t in zip(data, is_test.tolist(), strict=True) if t)
        feats: dict[tuple[int, Role], list[Tensor]] = {}
        keys = [(comp, layer) for layer in range(model.n_layers)]
        for start in range(0, len(data), batch_size):
            batch = model.tokenize(list(data[start:start + batch_size]))
            run = model.run(batch, save=keys)
            for layer in range(model.n_layers):
                for role in roles_l:
                    feats.setdefault((layer, role), []).append(
                        _gather_role(run.acts[(comp, layer)], batch, role).float().cpu())
        x = torch.stack([torch.cat(parts) for parts in feats.values()])  # [probe n d]
        mu, sd = x[:, ~is_test].mean(1, keepdim=True), x[:, ~is_test].std(1, keepdim=True)
        z = (x - mu) / sd.clamp(min=1e-6)
        if len(classes) < 2:  # one training attribute: the probe predicts it everywhere
            w = torch.zeros(len(z), z.shape[2] + 1, 1)
        elif reference:
            w = torch.stack([fit_logistic(zp[~is_test], y[~is_test], len(classes), l2=l2)
                             for zp in z])
        else:
            w = fit_logistic_newton(z[:, ~is_test], y[~is_test], len(classes), l2=l2)
        preds = (torch.cat([z, torch.ones(*z.shape[:2], 1)], 2) @ w).argmax(-1)  # [probe n]
        chance = max(held_out.values()) / sum(held_out.values())  # the majority attribute
        for (layer, role), pred in zip(feats, preds, strict=True):
            acc_test = float((pred[is_test] == y[is_test]).float().mean())
            acc_train = float((pred[~is_test] == y[~is_test]).float().mean())
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
