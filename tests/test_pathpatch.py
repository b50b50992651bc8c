"""Path patching: the stacked two-run method against the literal freeze-everything recipe,
identities it must satisfy, and recovery of the planted circuit."""

import numpy as np
import pytest
import torch

from factfind.edges.edge_patching import edge_patching, path_patching_circuit
from factfind.edges.engine import attend
from factfind.edges.path_patching import path_patching, path_patching_reference, path_patching_sweep
from factfind.edges.placement import all_nodes
from factfind.graph import Node
from factfind.types import Component, Site


@pytest.fixture(scope="module")
def tiny_pairs(family_model, facts):
    pairs = facts.corrupt(family_model, seed=0, on_missing="skip")
    assert len(pairs) >= 3
    return family_model, pairs[:3]


# overlapping on purpose: the MLP at the subject's last token and one of its neurons everywhere
SENDERS = [Site("mlp_out", 0, position="subject_last"), Site("z", 0, head=1, position="subject"),
           Site("neurons", 0, neuron=5), Site("z", 0, head=3, position="final")]
RECEIVERS = [Site("z", 1, head=2, position="final"), Site("mlp_out", 1, position="final"),
             Site("neurons", 1, neuron=3, position="subject_last")]


def _close(fast, slow):
    a, b = fast["metric"].to_numpy(), slow["metric"].to_numpy()
    moved = np.abs(b - slow["clean"].to_numpy())
    assert moved.max() > 1e-3, "the patch must move the metric for the comparison to mean much"
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("receiver_input,direct", [("qkv", False), ("q", False), ("kv", True)])
def test_sweep_matches_reference(tiny_pairs, receiver_input, direct):
    model, pairs = tiny_pairs
    kw = dict(receiver_input=receiver_input, direct=direct)
    fast = path_patching_sweep(model, pairs, SENDERS, RECEIVERS, chunk=4, **kw)
    slow = path_patching_sweep(model, pairs, SENDERS, RECEIVERS, reference=True, **kw)
    _close(fast, slow)
    assert list(fast["component"].unique()) == ["mlp_out", "head_out", "neurons"]


def test_sets_and_direct_effects_match_reference(tiny_pairs):
    model, pairs = tiny_pairs
    senders = [*SENDERS, Site("embed", 0, position="subject_first")]
    for receivers in (None, RECEIVERS[:2]):
        fast = path_patching(model, pairs, senders, receivers, direction="denoise")
        slow = path_patching_reference(model, pairs, senders, receivers, direction="denoise")
        _close(fast, slow)


def test_everything_into_the_logits_is_the_corrupt_run(tiny_pairs):
    """The residual stream is a sum: patching every sender's direct path to the logits is
    exactly the other run (biases cancel)."""
    model, pairs = tiny_pairs
    every = [Site("embed", 0)] + [Site(c, layer) for layer in range(model.n_layers)
                                  for c in ("z", "mlp_out")]
    for direction, target in (("noise", "corrupt"), ("denoise", "clean")):
        df = path_patching(model, pairs, every, direction=direction)
        np.testing.assert_allclose(df["metric"], df[target], atol=1e-4)
        np.testing.assert_allclose(df["effect"], 1.0, atol=1e-4)


def test_attend_reproduces_heads(family_model, facts):
    batch = family_model.tokenize(list(facts[:3]))
    layer = family_model.n_layers - 1
    keys = [(c, layer) for c in (Component.Q, Component.K, Component.V, Component.Z)]
    acts = family_model.run(batch, save=keys).acts
    z = attend(family_model, layer, *(acts[k] for k in keys[:3]), batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(z[real], acts[keys[3]][real], atol=1e-5, rtol=1e-4)


def test_edge_patching_fast_matches_reference(gpt2_model, pairs):
    pairs = pairs[:3]
    edges = [("embed@subject_last", "L0.h1@final"), ("L0.mlp@subject_last", "L1.mlp@subject_last"),
             ("L0.h2@final", "L0.mlp@final"), ("L1.h0@final", "logits@final"),
             ("L0.h3@relation", "L1.h1@final")]
    fast = edge_patching(gpt2_model, pairs, edges)
    slow = edge_patching(gpt2_model, pairs, edges, reference=True)
    assert np.abs(slow["effect"]).max() > 1e-3
    np.testing.assert_allclose(fast["effect"], slow["effect"], atol=1e-5)


def test_roles_partition_tokens(gpt2_model, facts):
    batch = gpt2_model.tokenize(list(facts))
    labels = batch.role_labels()
    assert torch.equal(labels >= 0, batch.attention_mask.bool())
    nodes = all_nodes(gpt2_model, batch)
    assert len(nodes) == 5 * gpt2_model.n_layers * (gpt2_model.n_heads + 1)


def test_bad_input_is_a_clear_error(gpt2_model, pairs):
    with pytest.raises(ValueError, match="receiver_input"):
        path_patching(gpt2_model, pairs, SENDERS[:1], RECEIVERS[:1], receiver_input="x")
    with pytest.raises(ValueError, match="direction"):
        path_patching(gpt2_model, pairs, SENDERS[:1], direction="sideways")
    with pytest.raises(ValueError, match="receiver"):
        path_patching(gpt2_model, pairs, SENDERS[:1], [Site("embed", 0)])
    with pytest.raises(ValueError, match="sends from"):
        path_patching(gpt2_model, pairs, [Site("resid_pre", 1)])
    with pytest.raises(IndexError):
        path_patching(gpt2_model, pairs, [Site("z", 0, head=99)])
    with pytest.raises(ValueError, match="senders must be a non-empty list"):
        path_patching(gpt2_model, pairs, [])


# ----------------------------------------------------------------------------- planted truth


def test_path_patching_finds_each_planted_link(planted):
    """Wang et al.'s manual procedure: direct effects, then senders into each found receiver."""
    model, _, pairs, _ = planted
    L, H = model.n_layers, model.n_heads
    heads = [Site("z", layer, head=h, position="final") for layer in range(L) for h in range(H)]
    mlps = [Site("mlp_out", layer, position=r) for layer in range(L)
            for r in ("subject_first", "subject_last", "final")]
    direct = path_patching_sweep(model, pairs, heads + mlps).groupby(
        ["component", "layer", "head", "role"], dropna=False)["effect"].mean()
    assert direct.idxmax() == ("head_out", 2, 2 - 2, "final") and direct.max() == pytest.approx(1)
    assert (direct.drop(direct.idxmax()).abs() < 1e-5).all()
    # the extraction head reads the lookup through its values, not its query or key
    into = path_patching_sweep(model, pairs, mlps, [Site("z", 2, head=0, position="final")],
                               receiver_input="v").groupby(["layer", "role"])["effect"].mean()
    assert into.idxmax() == (1, "subject_last") and into.max() == pytest.approx(1)
    assert (into.drop(into.idxmax()).abs() < 1e-5).all()
    qk = path_patching(model, pairs, mlps, [Site("z", 2, head=0, position="final")],
                       receiver_input="qk")
    assert qk["effect"].abs().max() < 1e-5
    # the lookup MLP reads the previous-token head (heads at the subject's last token)
    prev = [Site("z", 0, head=h, position="subject_last") for h in range(H)]
    into = path_patching_sweep(model, pairs, prev, [Site("mlp_out", 1, position="subject_last")])
    by_head = into.groupby("head")["effect"].mean()
    assert by_head.idxmax() == 0 and by_head[0] > 0.4 and (by_head.drop(0).abs() < 1e-5).all()


def test_path_patching_circuit_recovers_the_planted_circuit(planted):
    model, _, pairs, truth = planted
    graph = path_patching_circuit(model, pairs, threshold=0.01)
    assert truth.precision_recall(graph.graph.nodes) == (1.0, 1.0)
    assert set(graph.graph.edges) == set(truth.edges)
    assert graph.provenance.method == "path_patching"
    assert Node.parse("logits@final", n_layers=3).id in graph
    scores = nx_scores = {e: graph.graph.edges[e]["score"] for e in graph.graph.edges}
    assert all(s < 0 for s in nx_scores.values()), "noising every planted edge hurts"
    assert len(scores) == len(truth.edges)


@pytest.mark.parametrize("receiver_input", ["qkv", "q"])
def test_run1_starts_at_the_first_reached_receiver_layer(family_model, facts, receiver_input):
    """Receivers below (or at) every sender keep their base values and the incremental run 1
    starts at the first layer a sender reaches; a sender above every receiver skips run 1.
    Equal to the literal recipe on GPT-2, GPT-NeoX (parallel blocks) and Llama (GQA)."""
    from factfind.testing.models import tiny_model

    model = tiny_model(family_model.spec.name, n_layers=4)
    pairs = facts.corrupt(model, seed=0, on_missing="skip")[:3]
    senders = [Site("mlp_out", 2, position="subject_last"), Site("z", 1, head=0, position="final"),
               Site("mlp_out", 3, position="final")]
    receivers = [Site("z", 0, head=1, position="final"), Site("z", 1, head=2, position="final"),
                 Site("mlp_out", 2, position="final"), Site("z", 3, head=1, position="final")]
    kw = dict(receiver_input=receiver_input, chunk=1)
    fast = path_patching_sweep(model, pairs, senders, receivers, **kw)
    slow = path_patching_sweep(model, pairs, senders, receivers, reference=True, **kw)
    _close(fast, slow)
