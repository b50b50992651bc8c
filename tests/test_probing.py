"""Probes: logistic fitting on known-separable data, and mechanistic probes against knockout."""

import pytest
import torch

from factfind.errors import ArgumentError
from factfind.localize.probing import (
    _gather_role,
    _logistic_loss,
    fit_logistic,
    fit_logistic_newton,
    linear_probes,
    mechanistic_probes,
)
from factfind.types import Component as C
from factfind.types import Role


def test_fit_logistic_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 5
    y = torch.arange(200) % 4
    x = centers[y] + 0.3 * torch.randn(200, 8, generator=g)
    w = fit_logistic(x, y, 4)
    pred = (torch.cat([x, torch.ones(200, 1)], 1) @ w).argmax(-1)
    assert (pred == y).float().mean() == 1.0


def _problem(P, n, d, C, seed):
    """``P`` probes' standardised features ``[P n d]`` (class-dependent means, so the fit has
    something to find) sharing labels ``[n]`` with every class present."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(P, C, d, generator=g)[:, y] + torch.randn(P, n, d, generator=g)
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True), y


def _loss_and_grad(x, y, w, l2):
    w = w.double().clone().requires_grad_(True)
    fb = torch.cat([x.double(), torch.ones(*x.shape[:2], 1, dtype=torch.float64)], 2)
    loss = _logistic_loss(fb, torch.nn.functional.one_hot(y).double(), w, l2)
    loss.sum().backward()
    return loss.detach(), w.grad.flatten(1).norm(dim=1)


@pytest.mark.parametrize(("n", "d", "C"), [(12, 40, 3), (30, 8, 4), (9, 64, 2), (20, 20, 6)])
def test_newton_fit_is_the_minimiser_lbfgs_approaches(n, d, C):
    """Fewer rows than features (the probes' case, the span reduction matters), more rows
    than features, binary and 6-way: at a well-conditioned penalty L-BFGS converges and the two
    weights agree; at the probes' default penalty (1e-3, nearly separable data, where L-BFGS
    stops early) Newton's loss is never above L-BFGS's, its gradient vanishes, and every
    prediction agrees."""
    x, y = _problem(5, n, d, C, seed=n + d)
    for l2 in (0.05, 1e-3):
        w = fit_logistic_newton(x, y, C, l2=l2)
        ref = torch.stack([fit_logistic(xp, y, C, l2=l2, steps=2000) for xp in x])
        loss, grad = _loss_and_grad(x, y, w, l2)
        loss_ref, _ = _loss_and_grad(x, y, ref, l2)
        assert w.shape == (5, d + 1, C) and w.abs().max() > 0.1
        assert (grad < 1e-5).all(), grad
        assert (loss <= loss_ref + 1e-7).all(), (loss, loss_ref)
        xb = torch.cat([x, torch.ones(5, n, 1)], 2)
        assert torch.equal((xb @ w).argmax(-1), (xb @ ref).argmax(-1))
        if l2 == 0.05:  # float32 L-BFGS stops at a gradient ~1e-4, so weights within
            # |g| / (2 l2) = 1e-3; the bias (curvature from the data only, and softmax blind to
            # a shift of every class's) is compared through the class-centred logits
            torch.testing.assert_close(w[:, :-1], ref[:, :-1], atol=1e-3, rtol=1e-3)
            logits, lref = xb @ w, xb @ ref
            torch.testing.assert_close(logits - logits.mean(-1, keepdim=True),
                                       lref - lref.mean(-1, keepdim=True), atol=3e-3, rtol=0)


def test_newton_fit_chunks_and_falls_back_to_lbfgs_on_the_reduced_features():
    """Chunking the probes by Hessian size changes nothing; past ``max_params`` each probe is
    fitted by L-BFGS over the span's coordinates, the same minimiser."""
    x, y = _problem(6, 10, 30, 3, seed=1)
    w = fit_logistic_newton(x, y, 3, l2=0.05)
    torch.testing.assert_close(fit_logistic_newton(x, y, 3, l2=0.05, max_hessian=1), w,
                               atol=1e-6, rtol=1e-6)
    lb = fit_logistic_newton(x, y, 3, l2=0.05, max_params=1)
    torch.testing.assert_close(lb[:, :-1], w[:, :-1], atol=2e-4, rtol=1e-3)


def test_newton_fit_refuses_a_class_without_training_examples():
    x, y = _problem(2, 8, 5, 2, seed=0)
    with pytest.raises(ArgumentError, match="needs a training example"):
        fit_logistic_newton(x, y, 3)
    with pytest.raises(ArgumentError, match=r"\[probes n d\]"):
        fit_logistic_newton(x[0], y, 2)


def test_linear_probes_newton_equals_the_lbfgs_reference(family_model, facts):
    """The batched Newton fit against one L-BFGS fit per probe, on three families (GQA Llama
    included): the same held-out and training accuracy in every (layer, role) row."""
    kw = dict(roles=["subject_last", "final"], test_fraction=0.34, l2=0.05)
    fast = linear_probes(family_model, facts, **kw)
    ref = linear_probes(family_model, facts, reference=True, **kw)
    assert len(fast) == family_model.n_layers * 2
    assert (fast["train_accuracy"] > fast["chance"]).any()
    for col in ("effect", "train_accuracy", "chance", "n"):
        assert fast[col].tolist() == ref[col].tolist(), col


def test_linear_probes_shape_and_chance(gpt2_model, facts):
    df = linear_probes(gpt2_model, facts, roles=["subject_last", "final"], test_fraction=0.34)
    assert len(df) == gpt2_model.n_layers * 2
    assert df["effect"].between(0, 1).all() and df["chance"].between(0, 1).all()
    assert (df["n"] == df["n"].iloc[0]).all() and df["n"].iloc[0] >= 4


def test_linear_probes_skip_relations_without_held_out_subjects(gpt2_model, facts, caplog):
    """ROME-style data: a handful of facts per relation (first contact with rome_known crashed
    with 'too few subjects to split'); such relations are skipped and logged, once."""
    import dataclasses

    from factfind.data.dataset import FactDataset

    small = FactDataset([dataclasses.replace(f, relation="r3") for f in facts[:3]])
    mixed = small + facts
    with caplog.at_level("INFO", logger="factfind.localize.probing"):
        df = linear_probes(gpt2_model, mixed, roles=["final"], test_fraction=0.34)
    assert set(df["relation"]) == {facts[0].relation}
    assert "1 of 2 relations skipped" in caplog.text and "r3" in caplog.text
    assert linear_probes(gpt2_model, small, roles=["final"]).empty


def test_mechanistic_probe_is_the_head_attending_only_to_the_subject(gpt2_model, facts):
    """With every key but the last subject token blocked for the final query at layer l, the
    head's output at the final position is exactly the probe's v[subject_last] @ W_O[h]."""
    model = gpt2_model
    layer = model.n_layers - 1
    batch = model.tokenize(list(facts))
    n = batch.input_ids.shape[1]
    block = torch.ones(len(batch), n, n, dtype=torch.bool)
    block[torch.arange(len(batch)), -1, batch.positions[Role.SUBJECT_LAST]] = False
    knocked = model.run(batch, block_attention={layer: block}, save=[(C.HEAD_OUT, layer)])
    clean = model.run(batch, save=[(C.V, layer)])
    v = _gather_role(clean.acts[(C.V, layer)], batch, Role.SUBJECT_LAST)
    probe_out = torch.einsum("bhd,hdm->bhm", v, model.W_O(layer))
    got = knocked.acts[(C.HEAD_OUT, layer)][:, -1]
    assert probe_out.abs().max() > 1e-3
    torch.testing.assert_close(got, probe_out, atol=1e-5, rtol=1e-5)
    df = mechanistic_probes(model, facts)
    assert len(df) == model.n_layers * model.n_heads
    assert df["effect"].between(0, 1).all()


def test_newton_fit_does_not_hang_with_two_threads():
    """First contact with the 64-pair SmolLM2 run: a relation with 10 attributes and 14
    training subjects (150 parameters a probe) hung in torch 2.13's batched LU (MKL "DLASWP
    parameter 6") at two threads; the Newton step solves by Cholesky. Run in a subprocess so a
    regression fails on the timeout instead of hanging the suite."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(2)\n"
            "from factfind.localize.probing import fit_logistic_newton\n"
            "g = torch.Generator().manual_seed(0); y = torch.arange(14) % 10\n"
            "x = torch.randn(60, 14, 576, generator=g)\n"
            "w = fit_logistic_newton(x, y, 10)\n"
            "assert w.shape == (60, 577, 10) and bool(w.isfinite().all())\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
