"""Probes: logistic fitting on known-separable data, and mechanistic probes against knockout."""

import torch

from factfind.localize.probing import _gather_role, fit_logistic, linear_probes, mechanistic_probes
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
