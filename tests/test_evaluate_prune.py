"""Pruning at neuron granularity: removal scores against exact removal on a model that is affine
in every activation, node counting at neuron granularity, and pruning the planted circuit."""

import random

import numpy as np
import pytest

from factfind.edges.placement import all_nodes
from factfind.evaluate import evaluate_circuits, faithfulness, prune_circuit, removal_scores
from factfind.graph import Node
from factfind.localize.ablation import mean_activations
from factfind.testing.models import linearised_model, same_length_pairs
from factfind.types import Component


def _keys(model):
    """The sites every circuit ablation edits."""
    return [(c, layer) for layer in range(model.n_layers) for c in (Component.Z,
                                                                    Component.NEURONS)]


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def linear(request, facts):
    model = linearised_model(request.param)
    return model, same_length_pairs(model, facts)


def _circuit(model, pairs, keep=0.7, seed=0):
    """A random circuit of most heads and neurons (a node's value in the circuit depends on
    the kept nodes upstream of it), plus a whole MLP at a (layer, role) where no neuron was
    drawn."""
    nodes = all_nodes(model, model.tokenize(list(pairs.clean)), neurons=True)
    mlp = Node("mlp", 0, None, nodes[-1].role)
    rest = [n for n in nodes if not (n.kind == "neuron" and (n.layer, n.role) == (0, mlp.role))]
    return [*random.Random(seed).sample(rest, int(keep * len(rest))), mlp]


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_removal_scores_equal_exact_removal_on_an_affine_model(linear, how):
    """First order is exact where the model is affine: the attribution estimate of
    ``m(C∖{v}) - m(C)`` equals the exact ablation of each node (the slow reference), heads,
    neurons and a whole MLP alike, in the context of a circuit with most nodes ablated."""
    model, pairs = linear
    circuit = _circuit(model, pairs)
    # on an affine model, means over the measured prompts themselves move the mean metric by
    # ~0: take them over the corrupt prompts
    means = mean_activations(model, pairs.corrupt, _keys(model)) if how == "mean" else None
    fast = removal_scores(model, pairs, circuit, how=how, means=means)
    assert set(fast["method"]) == {"attribution"}
    # the slow reference: ablate each of 40 nodes (the 20 largest estimates and 20 others)
    order = np.argsort(-np.abs(fast["delta"].to_numpy()))
    ids = fast["node"].to_numpy()
    check = list(ids[order[:20]]) + random.Random(0).sample(list(ids[order[20:]]), 20)
    nodes = sorted(circuit)
    df = evaluate_circuits(model, pairs, [nodes] + [[u for u in nodes if u.id != v] for v in check],
                           how=how, chunk=41, means=means)
    exact = df["metric"].to_numpy()[1:] - df["metric"].iloc[0]
    est = fast.set_index("node").loc[check, "delta"].to_numpy()
    assert (np.abs(exact) > 1e-3).sum() >= 20 and np.abs(exact).max() > 1e-2  # non-zero
    np.testing.assert_allclose(est, exact, atol=1e-6 * max(1.0, np.abs(exact).max()))
    # exact=("head", "mlp"): those kinds measured by ablation, the same numbers here
    mixed = removal_scores(model, pairs, circuit, how=how, exact=("head", "mlp"), means=means)
    assert set(mixed.loc[mixed["kind"] != "neuron", "method"]) == {"exact"}
    a = fast.set_index("node")["delta"]
    b = a.to_numpy()
    np.testing.assert_allclose(mixed.set_index("node").loc[a.index, "delta"].to_numpy(), b,
                               atol=1e-6 * max(1.0, np.abs(b).max()))
    assert fast["delta"].is_monotonic_decreasing  # the least harmful removal first


def test_neuron_circuits_are_counted_at_neuron_granularity(gpt2_model, pairs):
    """A circuit of single neurons counted against the head/MLP universe gave fractions
    above 1; now it is counted against every neuron (an MLP node = its d_mlp neurons), or it is
    an error when head/MLP granularity is asked for."""
    batch = model_batch = gpt2_model.tokenize(list(pairs.clean))
    neurons = all_nodes(gpt2_model, model_batch, neurons=True)
    coarse = all_nodes(gpt2_model, batch)
    some = [n for n in neurons if n.kind == "neuron"][:30]
    mlp = next(n for n in coarse if n.kind == "mlp")
    df = evaluate_circuits(gpt2_model, pairs[:4], [some, neurons, [mlp, *some[:2]]])
    assert list(df["n_nodes"]) == [30, len(neurons), gpt2_model.d_mlp + 2]
    assert list(df["fraction"]) == pytest.approx([30 / len(neurons), 1.0,
                                                  (gpt2_model.d_mlp + 2) / len(neurons)])
    assert df["fraction"].to_numpy().max() <= 1.0
    with pytest.raises(ValueError, match=r"circuit 0 holds 30 single-neuron nodes.*neurons=True"):
        evaluate_circuits(gpt2_model, pairs[:4], [some], neurons=False)
    coarse_df = evaluate_circuits(gpt2_model, pairs[:4], [coarse], neurons=False)
    assert coarse_df["fraction"].iloc[0] == 1.0


def test_pruning_the_planted_model_keeps_its_circuit(planted):
    """From every head and neuron at every role, pruning to faithfulness 0.99 keeps the planted
    path (previous-token head, lookup neurons, extraction head) and drops the rest of the
    model; each accepted circuit is measured exactly."""
    model, _, pairs, truth = planted
    batch = model.tokenize(list(pairs.clean))
    path = prune_circuit(model, pairs, all_nodes(model, batch, neurons=True), target=0.99,
                         step=0.5, how="mean")
    best = path[path["accepted"]].iloc[-1]
    nodes = set(best["nodes"].split(";"))
    assert {"L0.h0@subject_last", "L2.h0@final"} <= nodes
    assert nodes <= truth.neuron_nodes() | truth.nodes
    assert best["faithfulness"] >= 0.99
    assert faithfulness(model, pairs, sorted(nodes)) == pytest.approx(best["faithfulness"])
    # it was pushed to a limit: the first step is accepted, a later one is not
    assert bool(path["accepted"].iloc[0]) and not bool(path["accepted"].all())
    with pytest.raises(ValueError, match="step"):
        prune_circuit(model, pairs, sorted(nodes), step=1.5)
    with pytest.raises(ValueError, match="reserve"):
        prune_circuit(model, pairs, sorted(nodes), reserve=1.5)


@pytest.mark.parametrize("reserve", [0.0, 1.0])
def test_pruning_accepts_by_its_rule(linear, reserve):
    """Every accepted circuit keeps ``reserve`` of the faithfulness budget in proportion to its
    size and every rejected one fell short of it (real exact measurements)."""
    model, pairs = linear
    universe = all_nodes(model, model.tokenize(list(pairs.clean)), neurons=True)
    target = 0.9
    path = prune_circuit(model, pairs, universe, target=target, step=0.5, how="mean",
                         reserve=reserve)
    f0, n0 = path["faithfulness"].iloc[0], path["size"].iloc[0]
    need = target + reserve * max(0.0, f0 - target) * path["size"] / n0
    acc = path["accepted"].to_numpy(bool)
    assert (path["faithfulness"][acc] >= need[acc]).all()
    assert (path["faithfulness"][~acc] < need[~acc]).all() and (~acc).any()


@pytest.mark.parametrize(("reserve", "smallest"), [(0.0, 1 / 6), (0.5, 0.05 / 0.175), (1.0, 1.0)])
def test_the_reserve_stops_early_steps_from_spending_the_budget(linear, monkeypatch, reserve,
                                                                 smallest):
    """With faithfulness falling linearly in the nodes removed, F(s) = 0.85 + 0.3 s/n (so
    F(start) = 1.15 and the budget above target 0.9 is 0.25), the smallest circuit the rule
    admits is s/n = 1/6 without reserve, 0.05 / 0.175 with reserve 0.5 and none smaller than
    the start with reserve 1; circuits above target are refused when they spent the reserve."""
    import factfind.evaluate.prune as prune_module

    model, pairs = linear
    universe = all_nodes(model, model.tokenize(list(pairs.clean)), neurons=True)
    n = len(universe)

    def fake_evaluate(model, data, circuits, **kwargs):
        import pandas as pd

        return pd.DataFrame([{"n_nodes": len(c), "fraction": len(c) / n,
                              "faithfulness": 0.85 + 0.3 * len(c) / n, "metric": 0.0,
                              "full": 1.0, "empty": 0.0}
                             for c in circuits])

    monkeypatch.setattr(prune_module, "evaluate_circuits", fake_evaluate)
    path = prune_circuit(model, pairs, universe, target=0.9, step=0.5, how="mean",
                         reserve=reserve)
    acc = path[path["accepted"]]
    assert acc["fraction"].min() >= smallest - 1e-12
    assert acc["fraction"].min() <= smallest + 0.05  # and it got close to the limit
    refused_above = path[~path["accepted"] & (path["faithfulness"] >= 0.9)]
    assert refused_above.empty == (reserve == 0)
