"""AtP, AtP* and verification against exact patching.

The fast-vs-slow checks follow the house habit: AtP equals exact patching where the metric is
linear in the node (a tiny model whose final norm is made affine), stacked exact patching
equals a plain loop, the q/k/v patch through ``z`` equals a hook on the raw projection, and
GradDrop's terms equal hand-computed path effects. The organism test reports how AtP ranks the
real neurons (Spearman vs exact) and checks AtP*'s verified set recovers the exact top 20.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from factfind.attribute.atp import atp, atp_star, estimate
from factfind.attribute.exact import exact_patching, exact_patching_reference, patch_node_sets
from factfind.attribute.node_index import node_frame
from factfind.attribute.running_stats import RunningStats
from factfind.attribute.verification import missed_effect_bound, verify
from factfind.data.batch import encode_pairs
from factfind.localize.patching import PatchSite
from factfind.results import aggregate, tidy
from factfind.testing.models import tiny_model
from factfind.types import RESULT_COLUMNS, Component, Role

ALL = ["neurons", "mlp_out", "head_out", "q", "k", "v"]
KEYS = ["component", "layer", "head", "neuron", "position", "role"]


@pytest.fixture(scope="module")
def neox():
    return tiny_model("gpt_neox")


def _affine_final_norm(family):
    """A tiny GPT-NeoX whose final LayerNorm is affine: with eps = 1e12 the variance is lost
    in float32 (``sqrt(var + 1e12) == 1e6`` exactly) and a 1e6 gain restores the scale, so the
    logits are an affine function of the last residual stream - and the metric is linear in
    every node of the last layer (neurons, MLP, head outputs and values; queries and keys
    after the softmax)."""
    model = tiny_model(family)
    norm = model.hf.gpt_neox.final_layer_norm
    with torch.no_grad():
        norm.eps = 1e12
        norm.weight.mul_(1e6)
    return model


@pytest.fixture(scope="module")
def linear_neox():
    return _affine_final_norm("gpt_neox")


@pytest.fixture(scope="module")
def neox_pairs(neox, facts):
    pairs = facts.corrupt(neox, seed=0, on_missing="skip")
    assert len(pairs) >= 6
    return pairs[:6]


def _join(a, b):
    return a.set_index([*KEYS, "prompt"])["effect"].sort_index(), \
        b.set_index([*KEYS, "prompt"])["effect"].sort_index()


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_atp_equals_exact_where_linear(linear_neox, neox_pairs, direction):
    kw = dict(components=ALL, layers=[1], positions=["subject_last", "relation", "final", -3],
              direction=direction)
    fast = atp_star(linear_neox, neox_pairs, per_prompt=True, batch_size=4, grad_drop=False,
                    **kw)
    slow = exact_patching(linear_neox, neox_pairs, per_prompt=True, **kw)
    a, b = _join(fast, slow)
    assert list(a.index) == list(b.index)
    for comp in ALL:
        sel = b.index.get_level_values("component") == comp
        assert np.nanmax(np.abs(b[sel])) > 1e-2, f"{comp}: effects must be non-zero"
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-5, rtol=0)
    # without the QK fix the softmax is linearised and queries/keys are off
    plain = atp(linear_neox, neox_pairs, per_prompt=True, batch_size=4, **kw)
    a, b = _join(plain, slow)
    qk = a.index.get_level_values("component").isin(["q", "k"])
    assert np.nanmax(np.abs(a[qk] - b[qk])) > 1e-2
    np.testing.assert_allclose(a[~qk].to_numpy(), b[~qk].to_numpy(), atol=1e-5, rtol=0)


SETS = [
    [PatchSite(Component.NEURONS, 0, Role.SUBJECT_LAST, neuron=3)],
    [PatchSite(Component.NEURONS, 1, -1, neuron=5), PatchSite(Component.MLP_OUT, 0, Role.FINAL),
     PatchSite(Component.NEURONS, 1, Role.RELATION, neuron=5)],
    [PatchSite(Component.Z, 0, Role.SUBJECT_LAST, head=2)],
    [PatchSite(Component.Q, 1, Role.FINAL, head=1)],
    [PatchSite(Component.K, 1, Role.SUBJECT_LAST, head=0)],
    [PatchSite(Component.V, 0, Role.SUBJECT, head=3)],
    [PatchSite(Component.Q, 0, -2, head=1), PatchSite(Component.K, 0, Role.SUBJECT_FIRST, head=1),
     PatchSite(Component.V, 0, Role.RELATION, head=2), PatchSite(Component.Z, 1, -1, head=0),
     PatchSite(Component.NEURONS, 1, -1, neuron=7)],
]


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_stacked_patching_matches_reference(family_model, facts, direction):
    if direction == "denoise" and family_model.spec.name != "gpt_neox":
        pytest.skip("denoising only swaps base and source; one family suffices")
    pairs = facts.corrupt(family_model, seed=0, on_missing="skip")[:4]
    fast = patch_node_sets(family_model, pairs, SETS, per_prompt=True, batch_size=3, chunk=3,
                           direction=direction)
    slow = exact_patching_reference(family_model, pairs, SETS, direction=direction)
    assert torch.equal(fast.isnan(), slow.isnan())
    assert slow.nan_to_num().abs().max() > 1e-2
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4, equal_nan=True)


@pytest.mark.parametrize("comp", ["q", "k", "v"])
def test_head_input_patch_matches_projection_hook(neox, neox_pairs, comp):
    """Patching q/k/v through z equals overwriting the slice of GPT-NeoX's fused
    ``query_key_value`` output directly (rotation is per position, so pre-rotary is fine)."""
    layer, head, model = 0, 2, neox
    pb = encode_pairs(model, neox_pairs)
    which = "qkv".index(comp)
    dh = model.d_head
    t = int(pb.clean.positions[Role.SUBJECT_LAST][0])  # same index in every row? use per row
    pos = pb.clean.positions[Role.SUBJECT_LAST]
    proj = model.hf.gpt_neox.layers[layer].attention.query_key_value
    captured = {}

    def capture(_m, _i, out):
        captured["src"] = out.detach().clone()

    def patch(_m, _i, out):
        out = out.clone()
        view = out.view(*out.shape[:2], model.n_heads, 3 * dh)
        src = captured["src"].view(*out.shape[:2], model.n_heads, 3 * dh)
        rows = torch.arange(len(pos))
        view[rows, pos, head, which * dh:(which + 1) * dh] = \
            src[rows, pos, head, which * dh:(which + 1) * dh]
        return out

    def forward(batch):
        return model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids).logits[:, -1]

    def metric(lg):
        return (lg.gather(-1, pb.correct[:, None]) - lg.gather(-1, pb.wrong[:, None]))[:, 0]

    with torch.no_grad():
        h = proj.register_forward_hook(capture)
        forward(pb.corrupt)
        h.remove()
        clean = metric(forward(pb.clean))
        h = proj.register_forward_hook(patch)
        patched = metric(forward(pb.clean))
        h.remove()
    site = PatchSite(Component(comp), layer, Role.SUBJECT_LAST, head=head)
    ours = patch_node_sets(model, neox_pairs, [[site]], per_prompt=True)[0]
    assert t >= 0 and (patched - clean).abs().max() > 1e-3
    torch.testing.assert_close(ours, (patched - clean).float(), atol=1e-5, rtol=1e-4)


def test_grad_drop_terms(facts):
    """With two layers GradDrop has one term per node: for layer-1 nodes it is |AtP*|; for
    layer-0 neurons it drops every path through layer 1, leaving only the direct path - zero
    away from the final token, the neuron's direct logit effect at it. (Sequential blocks, so
    that layer 0's MLP at the final token sees the subject through layer 0's attention.)"""
    model = _affine_final_norm("gpt_neox_sequential")
    neox_pairs = facts.corrupt(model, seed=0, on_missing="skip")[:6]
    est = estimate(model, neox_pairs, components=["neurons", "head_out", "q"],
                   positions=["subject_last", "final"], qk_fix=True, grad_drop=True,
                   per_prompt=True)
    df = est.frame
    assert df["grad_drop"].notna().all()
    l1 = df[df.layer == 1]
    np.testing.assert_allclose(l1["grad_drop"], l1["effect"].abs(), atol=1e-7)
    l0 = df[(df.layer == 0) & (df.component == "neurons")]
    np.testing.assert_allclose(l0[l0.role == "subject_last"]["grad_drop"], 0.0, atol=1e-9)
    # direct effect of each layer-0 neuron at the final token, from the weights
    pb = encode_pairs(model, neox_pairs)
    keys = [(Component.NEURONS, 0), (Component.RESID_POST, 1)]
    clean, bad = model.run(pb.clean, save=keys), model.run(pb.corrupt, save=keys)
    d = (bad.acts[keys[0]] - clean.acts[keys[0]])[:, -1]  # [batch neuron]
    scale = model.final_norm_scale(clean.acts[keys[1]][:, -1])  # the frozen (affine) scale
    w = model.final_norm_frozen(model.W_out(0), scale[:, None], bias=False)  # [b n d]
    direction = model.W_U[:, pb.correct].T - model.W_U[:, pb.wrong].T
    direct = (d * torch.einsum("bnd,bd->bn", w, direction)).mean(0)
    got = l0[l0.role == "final"].sort_values("neuron")["grad_drop"].to_numpy()
    assert direct.abs().max() > 1e-3
    np.testing.assert_allclose(got, direct.abs().numpy(), atol=1e-5)


def test_verify_and_bound(neox, neox_pairs):
    kw = dict(components=["neurons", "head_out", "k"], positions=["final"])
    est = atp_star(neox, neox_pairs, **kw)
    exact = exact_patching(neox, neox_pairs, **kw).set_index(KEYS)["effect"]
    ver = verify(neox, neox_pairs, est, patience=5, chunk=4, rel_threshold=0.5)
    assert ver.stopped == "patience" and 5 <= ver.n_verified < len(est)
    got = ver.frame.set_index(KEYS)["effect"]
    np.testing.assert_allclose(got, exact.loc[got.index], atol=1e-5)
    # the candidates come in score order and the last `patience` are below theta
    assert (np.diff(ver.frame["score"]) <= 0).all()
    assert (ver.frame["effect"].abs().iloc[-5:] < ver.threshold).all()
    assert verify(neox, neox_pairs, est, budget=3).stopped == "budget"
    # top-k rule: theta is the k-th largest exact |c| verified, the last `patience` fall short
    top = verify(neox, neox_pairs, est, top_k=3, patience=4, chunk=5)
    sizes = top.frame["effect"].abs()
    assert top.threshold == pytest.approx(sizes.nlargest(3).iloc[-1])
    assert top.stopped == "patience" and (sizes.iloc[-4:] < top.threshold).all()
    with pytest.raises(ValueError, match="top_k"):
        verify(neox, neox_pairs, est, top_k=0)
    # singleton subsets make the bound exact: u(n) = |c(n)| for every unverified node
    bound = missed_effect_bound(neox, neox_pairs, ver, subset_size=1, coverage=1)
    nodes = bound.nodes.set_index(KEYS)
    np.testing.assert_allclose(nodes["bound"], exact.loc[nodes.index].abs(), atol=1e-5)
    assert bound.max == pytest.approx(exact.loc[nodes.index].abs().max(), abs=1e-5)
    # larger subsets: each node's bound is the smallest |effect| of its two subsets
    coarse = missed_effect_bound(neox, neox_pairs, ver, subset_size=8, coverage=2, seed=1)
    assert coarse.subsets < len(nodes) and coarse.nodes["bound"].notna().all()
    assert coarse.buckets["covered"].sum() == len(nodes)
    assert set(coarse.buckets.columns) >= set(RESULT_COLUMNS) | {"rank_start", "rank_stop"}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 20), st.integers(1, 3), st.integers(0, 10_000))
def test_bound_subsets_cover_each_node_coverage_times_in_few_adjacent_subsets(n, size, coverage,
                                                                               seed):
    """Each node lands in exactly ``coverage`` distinct subsets of at most ``subset_size`` nodes
    of one bucket and component, consecutive in layer order, and there are at most
    ``coverage * (ceil(n_group / size) + 1)`` subsets per group: the cost the bound promises."""
    from factfind.attribute.verification import bound_subsets

    rng = np.random.default_rng(seed)
    layer, bucket = rng.integers(0, 30, n), rng.integers(1, 4, n)
    comp = rng.choice(["z", "q", "neurons"], n)
    subsets = bound_subsets(bucket, list(comp), layer, subset_size=size, coverage=coverage,
                            seed=seed)
    seen = np.zeros(n, dtype=int)
    for m in subsets:
        assert 1 <= len(m) <= size and len(set(m.tolist())) == len(m)
        assert len(set(bucket[m].tolist())) == 1 and len(set(comp[m].tolist())) == 1
        seen[m] += 1
        # consecutive in layer order: no node of the group lies strictly between its layers
        group = (bucket == bucket[m[0]]) & (comp == comp[m[0]])
        inside = group & (layer > layer[m].min()) & (layer < layer[m].max())
        assert inside.sum() <= len(m) and set(np.flatnonzero(inside)) <= set(m.tolist())
    assert (seen == coverage).all()
    groups = {(b, c): int(((bucket == b) & (comp == c)).sum())
              for b, c in zip(bucket, comp, strict=True)}
    assert len(subsets) <= sum(coverage * (-(-g // size) + 1) for g in groups.values())
    # the rounds cut at shifted places: with one node per layer no subset repeats
    one_per_layer = bound_subsets(np.ones(16, int), ["z"] * 16, np.arange(16), subset_size=4,
                                  coverage=2, seed=seed)
    keys = [tuple(sorted(m.tolist())) for m in one_per_layer]
    assert len(keys) == len(set(keys)) == 9
    assert keys[:2] == [(0, 1, 2, 3), (4, 5, 6, 7)] and keys[4:6] == [(0, 1), (2, 3, 4, 5)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=5), st.integers(0, 10_000))
def test_running_stats_stream_equals_in_memory(chunks, seed):
    rng = np.random.default_rng(seed)
    n = sum(chunks)
    x = rng.normal(size=(n, 3))
    valid = rng.random((n, 3)) < 0.8
    valid[0] = True
    s = RunningStats(3)
    i = 0
    for c in chunks:
        s.update(torch.from_numpy(x[i:i + c]), torch.from_numpy(valid[i:i + c]))
        i += c
    for j in range(3):
        col = x[valid[:, j], j]
        assert s.count[j] == len(col)
        assert s.mean[j].item() == pytest.approx(col.mean())
        if len(col) > 1:
            assert s.var[j].item() == pytest.approx(col.var(ddof=1))
        assert s.abs_max[j].item() == pytest.approx(np.abs(col).max())
    # the interval agrees with results.aggregate on the same numbers
    long = pd.DataFrame({"method": "m", "layer": np.repeat([0, 1, 2], n), "prompt": 0,
                         "effect": np.where(valid, x, np.nan).T.ravel()})
    agg = aggregate(tidy(long)).sort_values("layer")
    low, high = s.ci()
    finite = agg["n"].to_numpy() > 1
    np.testing.assert_allclose(agg["ci_low"].to_numpy()[finite], low.numpy()[finite])
    np.testing.assert_allclose(agg["ci_high"].to_numpy()[finite], high.numpy()[finite])


def test_running_stats_float32_blocks_and_nan_outside_the_mask():
    """Blocks are reduced in their own dtype (float32 here), merged in float64; masked
    entries may hold anything, NaN included."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 5))
    valid = rng.random((40, 5)) < 0.7
    valid[:2] = True
    s64, s32 = RunningStats(5), RunningStats(5)
    for i in range(0, 40, 16):
        block = torch.from_numpy(x[i:i + 16])
        s64.update(block, torch.from_numpy(valid[i:i + 16]))
        dirty = torch.where(torch.from_numpy(valid[i:i + 16]), block, torch.nan).float()
        s32.update(dirty, torch.from_numpy(valid[i:i + 16]))
    assert s32.mean.dtype == torch.float64 and torch.isfinite(s32.mean).all()
    for a, b in ((s32.mean, s64.mean), (s32.var, s64.var), (s32.abs_mean, s64.abs_mean),
                 (s32.abs_max, s64.abs_max)):
        assert b.abs().min() > 0.1
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(s32.count.numpy(), valid.sum(0))


def test_frames_are_tidy(neox, neox_pairs):
    df = atp(neox, neox_pairs, components=ALL, positions=["final", -2])
    assert list(df.columns[:len(RESULT_COLUMNS)]) == list(RESULT_COLUMNS)
    again = tidy(df)
    pd.testing.assert_frame_equal(df, again)
    assert set(df["component"]) == {"neurons", "mlp_out", "head_out", "q", "k", "v"}
    assert df["prompt"].isna().all() and (df["n"] == len(neox_pairs)).all()
    per = atp(neox, neox_pairs, components=["neurons"], positions=["final"], per_prompt=True)
    assert len(per) == len(neox_pairs) * neox.n_layers * neox.d_mlp
    mean = per.groupby(["layer", "neuron"])["effect"].mean().to_numpy()
    agg = df[(df.component == "neurons") & (df.role == "final")]
    np.testing.assert_allclose(mean, agg.sort_values(["layer", "neuron"])["effect"], atol=1e-6)
    assert len(node_frame(est_index(neox), "x", {})) == neox.n_layers * neox.d_mlp


def est_index(model):
    from factfind.attribute.node_index import NodeIndex

    return NodeIndex.build(model, components=["neurons"], positions=["final"])


def test_bad_input_is_clear(neox, neox_pairs):
    with pytest.raises(ValueError, match="node component"):
        atp(neox, neox_pairs, components=["resid_pre"])
    with pytest.raises(ValueError, match="direction"):
        atp(neox, neox_pairs, direction="sideways")
    with pytest.raises(IndexError, match="layer 9"):
        atp(neox, neox_pairs, layers=[9])
    with pytest.raises(ValueError, match="empty"):
        atp(neox, neox_pairs[:0])
    bad = [[PatchSite(Component.NEURONS, 0, Role.FINAL, neuron=1),
            PatchSite(Component.K, 1, Role.FINAL, head=0)]]
    with pytest.raises(ValueError, match="earlier layer"):
        patch_node_sets(neox, neox_pairs, bad)
    per = atp(neox, neox_pairs, positions=["final"], per_prompt=True)
    with pytest.raises(ValueError, match="aggregate"):
        verify(neox, neox_pairs, per)
    with pytest.raises(ValueError, match="subset_size"):
        missed_effect_bound(neox, neox_pairs, verify(neox, neox_pairs, atp(
            neox, neox_pairs, positions=["final"]), budget=2), subset_size=0)


# ----------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism():
    from factfind.organism import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "model.safetensors").is_file():
        pytest.skip(f"the organism checkpoint is not built yet ({CHECKPOINT_DIR})")
    from factfind import load_facts, load_model

    model = load_model("organism")
    known = load_facts("organism:sport").sample(200, seed=0).known_by(model)
    return model, known.corrupt(model, seed=0, on_missing="skip")[:8]


@pytest.mark.slow
def test_atp_star_on_organism(organism, record_property, capsys):
    """AtP ranks the organism's neurons at the last subject token like exact patching does, and
    AtP*'s verification (top-20 stopping rule) recovers the exact top 20 from a small share."""
    model, pairs = organism
    kw = dict(components=["neurons"], positions=["subject_last"])
    exact = exact_patching(model, pairs, **kw).set_index(KEYS)["effect"]
    star = atp_star(model, pairs, **kw)
    est = star.set_index(KEYS)["effect"].loc[exact.index]
    rho = spearmanr(est.to_numpy(), exact.to_numpy()).statistic
    ver = verify(model, pairs, star, top_k=20, patience=48)
    top = set(exact.abs().nlargest(20).index)
    recall = len(top & set(ver.frame.set_index(KEYS).index)) / len(top)
    record_property("spearman_atp_exact_subject_last", rho)
    record_property("atp_star_top20_recall", recall)
    with capsys.disabled():
        print(f"\norganism, {len(pairs)} pairs, {len(exact)} neurons at subject_last: "
              f"Spearman(AtP, exact) = {rho:.3f}; AtP* verified {ver.n_verified} "
              f"({ver.stopped}), exact top-20 recall {recall:.0%}")
    assert exact.abs().max() > 1e-2
    assert rho > 0.8
    assert recall >= 0.95
    assert ver.n_verified < len(exact) / 10
