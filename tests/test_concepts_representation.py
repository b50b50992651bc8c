"""Linear representations and subspace patching: batched == loop reference, and known answers
on the planted model, whose attribute lives in known residual directions."""

import pytest
import torch

from factfind.concepts.representation import (
    Directions,
    attribute_directions,
    direction_agreement,
    direction_patching,
    unembed_directions,
)
from factfind.localize.subspace import (
    FULL,
    SubspacePatch,
    orthonormal,
    patch_ratio,
    subspace_patching,
    subspace_patching_reference,
)
from factfind.testing.planted import ANSWER, ATTR, D_MODEL, SINK, SPORTS


def _feature_basis(features) -> torch.Tensor:
    """``[d_model k]``: the planted features, each written as ``e_f - e_sink``."""
    b = torch.zeros(D_MODEL, len(features))
    for k, f in enumerate(features):
        b[f, k], b[SINK, k] = 1.0, -1.0
    return b


def test_subspace_patching_matches_reference(gpt2_model, pairs):
    torch.manual_seed(0)
    d, n = gpt2_model.d_model, len(pairs)
    patches = [SubspacePatch(FULL, "resid_post", 0, "subject_last"),
               SubspacePatch("shared-3", "resid_post", 0, "subject_last",
                             basis=torch.randn(d, 3)),
               SubspacePatch("per-pair", "mlp_out", 1, "final", basis=torch.randn(n, d, 2)),
               SubspacePatch("relation", "attn_out", 0, "relation", basis=torch.randn(d, 5)),
               SubspacePatch("neurons", "neurons", 1, "final",
                             basis=torch.eye(gpt2_model.d_mlp)[:, :7])]
    fast = subspace_patching(gpt2_model, pairs, patches, batch_size=3, max_rows=7)
    slow = subspace_patching_reference(gpt2_model, pairs, patches)
    assert len(fast) == len(slow) == len(patches) * n
    assert (fast["subspace"].tolist(), fast["prompt"].tolist()) == (
        slow["subspace"].tolist(), slow["prompt"].tolist())
    change = fast["change"].to_numpy()
    assert (abs(change) > 1e-3).mean() > 0.8  # the compared values are not zero
    assert abs(change - slow["change"].to_numpy()).max() < 1e-4


def test_orthonormal_drops_dependent_columns():
    b = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = orthonormal(b)
    assert torch.allclose(q.T @ q, torch.diag(torch.tensor([1.0, 0.0, 0.0])), atol=1e-6)


def test_known_direction_rank1_equals_full(planted):
    """The lookup writes the sport into the ATTR features only: patching that subspace (or the
    pair's one contrast direction) at the last subject token restores exactly what the full
    patch does; a random subspace restores little; the unembedding directions (which read the
    ANSWER features) restore nothing there but everything at the final token after layer 2."""
    model, pairs = planted.model, planted.pairs
    n = len(pairs)
    attr = _feature_basis(ATTR)
    idx = {s: i for i, s in enumerate(SPORTS)}
    contrast = torch.stack([attr[:, idx[c.attribute]] - attr[:, idx[k.attribute]]
                            for c, k in pairs])[..., None]  # [pair d 1]
    torch.manual_seed(0)
    site = ("resid_post", 1, "subject_last")
    df = subspace_patching(model, pairs, [
        SubspacePatch(FULL, *site), SubspacePatch("attr", *site, basis=attr),
        SubspacePatch("contrast", *site, basis=contrast),
        SubspacePatch("random", *site, basis=torch.randn(D_MODEL, 4)),
        SubspacePatch("answer", *site, basis=_feature_basis(ANSWER))])
    r = patch_ratio(df).set_index("subspace")["ratio"].to_dict()
    assert r[FULL] == pytest.approx(1.0)
    assert r["attr"] == pytest.approx(1.0, abs=1e-4)
    assert r["contrast"] == pytest.approx(1.0, abs=1e-4)
    assert abs(r["answer"]) < 1e-4
    assert r["random"] < 0.5
    assert len(df) == 5 * n


def test_fitted_directions_on_planted(planted):
    model, facts, pairs = planted.model, planted.facts, planted.pairs
    dirs = attribute_directions(model, facts, layers=[1, 2], roles=["subject_last", "final"],
                                test_fraction=0.25)
    dec = dirs.decodability.set_index(["layer", "role", "direction"])["effect"].to_dict()
    assert dec[(2, "final", "unembed")] == 1.0  # the answer is in the unembedding's direction
    assert dec[(1, "subject_last", "mean")] == 1.0
    assert dec[(1, "subject_last", "unembed")] < 1.0  # ATTR is not what W_U reads
    r = direction_patching(model, pairs, dirs)
    r = r.set_index(["layer", "role", "subspace"])["ratio"].to_dict()
    assert r[(2, "final", "unembed/rank1")] == pytest.approx(1.0, abs=1e-4)
    assert r[(2, "final", "unembed/rank_k")] == pytest.approx(1.0, abs=1e-4)
    assert abs(r[(1, "subject_last", "unembed/rank1")]) < 1e-4
    # class means from 12 of 16 subjects: close to, not exactly, the ATTR features
    assert r[(1, "subject_last", "mean/rank1")] > 0.95
    agree = direction_agreement(dirs)
    layers = agree[(agree["kind"] == "layers") & (agree["direction"] == "unembed")]
    assert list(layers["effect"]) == pytest.approx([1.0] * len(layers))  # one W_U, every layer
    m = agree[(agree["kind"] == "methods") & (agree["layer"] == 2) & (agree["role"] == "final")]
    assert m.set_index(["method_a", "method_b"])["effect"].to_dict()[("mean", "unembed")] > 0.95


def test_unembed_direction_reads_logits(planted):
    """``u . resid / scale`` is the logit (up to the bias): the direction is the readout."""
    model, facts = planted.model, planted.facts
    from factfind.types import Component

    batch = model.tokenize(list(facts[:4]))
    run = model.run(batch, save=[(Component.RESID_POST, model.n_layers - 1)])
    resid = run.acts[(Component.RESID_POST, model.n_layers - 1)][:, -1]
    ids = batch.attribute_ids
    u = unembed_directions(model, ids)
    scale = model.final_norm_scale(resid)
    got = (resid @ u.T) / scale  # [b ids]
    want = run.logits[:, ids] - model.b_U[ids]
    assert got.abs().max() > 1.0
    assert torch.allclose(got, want, atol=1e-3)


def test_errors_name_the_record(planted, gpt2_model, pairs):
    model, facts, ppairs = planted.model, planted.facts, planted.pairs
    with pytest.raises(ValueError, match="basis has 3 rows"):
        subspace_patching(model, ppairs, [SubspacePatch("x", "resid_post", 0, "final",
                                                        basis=torch.ones(3, 1))])
    with pytest.raises(ValueError, match="cannot patch"):
        SubspacePatch("x", "z", 0, "final")
    df = subspace_patching(gpt2_model, pairs[:2], [
        SubspacePatch("only", "resid_post", 0, "final", basis=torch.ones(gpt2_model.d_model, 1))])
    with pytest.raises(ValueError, match="full"):
        patch_ratio(df)
    dirs = Directions({("other", 1, "final", "mean"): torch.ones(2, D_MODEL)},
                      {"other": ["a", "b"]}, df.iloc[:0], "resid_post")
    with pytest.raises(ValueError, match="pair 0"):
        direction_patching(model, ppairs, dirs)
    with pytest.raises(ValueError, match="unknown direction methods"):
        attribute_directions(model, facts, methods=["pca"])


def test_organism_representation_runs():
    """On the organism (in seconds): the attribute is decodable at the final token of the last
    layer, and the unembedding direction there carries most of the full patch."""
    import factfind as ff

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").sample(160, seed=0).known_by(model)
    dirs = attribute_directions(model, facts, layers=[model.n_layers - 1], roles=["final"])
    dec = dirs.decodability.set_index("direction")
    assert bool((dec["effect"] > dec["chance"] + 0.2).all())
    pairs = facts[:8].corrupt(model, seed=0, on_missing="skip")
    r = direction_patching(model, pairs, dirs).set_index("subspace")
    assert r.loc[FULL, "effect"] > 0.5
    assert r.loc["unembed/rank_k", "ratio"] > 0.5
