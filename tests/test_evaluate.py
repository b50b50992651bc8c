"""Circuit evaluation: the stacked ablation engine against ablate_sets, edge-level path patching
against node ablation, and the known answers on the planted circuit."""

import random

import numpy as np
import pandas as pd
import pytest
import torch

from factfind.edges.eap import eap, to_graph
from factfind.edges.placement import all_nodes
from factfind.evaluate import (
    circuit_nodes,
    completeness,
    evaluate_circuits,
    faithfulness,
    faithfulness_curve,
    greedy_circuit,
    minimality,
    minimize_circuit,
    node_scores,
    proportion_explained,
)
from factfind.graph import CircuitGraph, Node, Provenance
from factfind.localize.ablation import ablate_sets
from factfind.types import Role, Site

BLOCKS = (Role.PREFIX, Role.SUBJECT, Role.RELATION, Role.FINAL)  # Role.SUBJECT = every token


def _complement(model, kept):
    """ablate_sets sites for everything outside a circuit given per (kind, layer, unit) as the
    set of kept roles among BLOCKS."""
    out = []
    for layer in range(model.n_layers):
        for h in range(model.n_heads):
            for role in BLOCKS:
                if role not in kept.get(("z", layer, h), ()):
                    out.append(Site("z", layer, head=h, position=role))
        for role in BLOCKS:
            if role not in kept.get(("mlp_out", layer, None), ()):
                out.append(Site("mlp_out", layer, position=role))
    return out


def _as_sites(kept):
    return [Site(c, layer, head=h, position=r) for (c, layer, h), roles in kept.items()
            for r in roles]


@pytest.fixture(scope="module")
def known(gpt2_model, facts):
    """Prompts that all have resample partners among themselves."""
    return facts.corrupt(gpt2_model, seed=0, on_missing="skip").clean


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_matches_ablate_sets(gpt2_model, known, how):
    rng = random.Random(0)
    circuits = []
    for _ in range(3):
        kept = {}
        for layer in range(gpt2_model.n_layers):
            for h in range(gpt2_model.n_heads):
                kept[("z", layer, h)] = {r for r in BLOCKS[1:] if rng.random() < 0.5}
            kept[("mlp_out", layer, None)] = {r for r in BLOCKS[1:] if rng.random() < 0.5}
        circuits.append(kept)
    ours = evaluate_circuits(gpt2_model, known, [_as_sites(k) for k in circuits], how=how,
                             resamples=2, batch_size=4, chunk=2)
    theirs = ablate_sets(gpt2_model, known, [_complement(gpt2_model, k) for k in circuits],
                         how=how, resamples=2)
    expected = theirs.groupby("set")["metric"].mean().to_numpy()
    np.testing.assert_allclose(ours["metric"], expected, atol=1e-5)
    assert np.ptp(expected) > 1e-2, "different circuits must give different metrics"
    assert ours["full"].iloc[0] == pytest.approx(theirs["clean"].mean(), abs=1e-5)


def test_neuron_circuits_match_ablate_sets(gpt2_model, known):
    keep = [5, 17]
    circuit = [Site("neurons", 1, neuron=n, position="final") for n in keep]
    complement = [Site("z", layer, head=h, position=r) for layer in range(2)
                  for h in range(gpt2_model.n_heads) for r in BLOCKS]
    complement += [Site("mlp_out", 0, position=r) for r in BLOCKS]
    complement += [Site("mlp_out", 1, position=r) for r in BLOCKS[:3]]
    complement += [Site("neurons", 1, neuron=n, position="final")
                   for n in range(gpt2_model.d_mlp) if n not in keep]
    ours = evaluate_circuits(gpt2_model, known, [circuit], neurons=True)
    theirs = ablate_sets(gpt2_model, known, [complement])
    assert ours["metric"].iloc[0] == pytest.approx(theirs["metric"].mean(), abs=1e-5)
    assert ours["fraction"].iloc[0] == pytest.approx(
        2 / len(all_nodes(gpt2_model, gpt2_model.tokenize(list(known)), neurons=True)))


@pytest.fixture(scope="module")
def tiny_pairs(family_model, facts):
    return family_model, facts.corrupt(family_model, seed=0, on_missing="skip")[:5]


@pytest.mark.parametrize("how", ["mean", "resample"])
def test_the_full_circuit_is_exactly_faithful(tiny_pairs, how):
    """Nothing ablated: the circuit of every node (and of every neuron) is the full model, so
    its metric is the clean run's and its faithfulness exactly 1."""
    model, pairs = tiny_pairs
    batch = model.tokenize(list(pairs.clean))
    df = pd.concat([evaluate_circuits(model, pairs, [all_nodes(model, batch, neurons=n)],
                                      how=how, neurons=n) for n in (False, True)])
    gap = np.abs(df["full"].to_numpy() - df["empty"].to_numpy())
    assert gap.min() > 1e-2, "ablating everything must matter"
    np.testing.assert_allclose(df["metric"], df["full"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(df["faithfulness"], 1.0, atol=1e-6, rtol=0)
    np.testing.assert_allclose(df["fraction"], 1.0)


def test_a_known_baseline_changes_nothing_and_skips_two_circuits(tiny_pairs, monkeypatch):
    """``baseline=(full, empty)`` from an earlier call gives the same rows while running one
    circuit instead of three per batch (what the pruning search measures each round); the
    vectorised keep masks and the counted universe equal their node-by-node definitions."""
    import factfind.evaluate.engine as engine

    model, pairs = tiny_pairs
    batch = model.tokenize(list(pairs.clean))
    roles = batch.roles_present()
    rng = random.Random(3)
    circuit = [n for n in all_nodes(model, batch, neurons=True) if rng.random() < 0.3]
    circuit += [Node("mlp", 0, None, roles[0])]
    keys = [(c, layer) for layer in range(model.n_layers) for c in ("z", "neurons")]
    means = engine.mean_activations(model, pairs.clean, keys)
    first = evaluate_circuits(model, pairs, [circuit], how="mean", means=means)
    rows: list[int] = []
    real_run = model.run

    def counting_run(b, **kw):
        rows.append(len(b))
        return real_run(b, **kw)

    monkeypatch.setattr(model, "run", counting_run)
    again = evaluate_circuits(model, pairs, [circuit], how="mean", means=means,
                              baseline=(first["full"].iloc[0], first["empty"].iloc[0]))
    monkeypatch.undo()
    pd.testing.assert_frame_equal(first, again)
    assert abs(first["faithfulness"].iloc[0]) > 1e-3 and sum(rows) == len(pairs)
    kz, kn = engine._keep_masks(model, circuit)
    lz, ln = np.zeros(kz.shape, bool), np.zeros(kn.shape, bool)
    for n in circuit:
        r = list(engine.ROLE_NAMES).index(n.role)
        if n.kind == "head":
            lz[n.layer, r, n.index] = True
        elif n.kind == "mlp":
            ln[n.layer, r, :] = True
        else:
            ln[n.layer, r, n.index] = True
    assert lz.any() and ln.any()
    np.testing.assert_array_equal(kz.numpy(), lz)
    np.testing.assert_array_equal(kn.numpy(), ln)
    full = engine._keep_masks(model, all_nodes(model, batch, neurons=False))
    for got, want in zip(engine._full_masks(model, roles), full, strict=True):
        assert torch.equal(got, want)
    for neurons in (False, True):
        assert engine.universe_size(model, roles, neurons=neurons) == len(
            all_nodes(model, batch, neurons=neurons))


def test_proportion_explained_of_a_node_set_is_resample_faithfulness(tiny_pairs):
    """Edge-level path patching of the graph a node set induces is node-level resample
    ablation: two independent computations of one number."""
    model, pairs = tiny_pairs
    roles = model.tokenize(list(pairs.clean)).roles_present()
    nodes = all_nodes(model, model.tokenize(list(pairs.clean)))
    rng = random.Random(1)
    circuit = [n for n in nodes if rng.random() < 0.4]
    pe = proportion_explained(model, pairs, circuit)
    f = faithfulness(model, pairs, circuit, how="resample")
    assert pe == pytest.approx(f, abs=1e-4) and abs(pe - 1) > 0.05 and abs(pe) > 0.05
    assert proportion_explained(model, pairs, nodes) == pytest.approx(1.0, abs=1e-4)
    assert proportion_explained(model, pairs, []) == pytest.approx(0.0, abs=1e-4)
    assert len(circuit_nodes(model, circuit, roles)) == len(circuit)


def test_proportion_explained_of_edges(gpt2_model, pairs):
    """A graph with every edge is the clean run; dropping the edges into the logits leaves only
    the embeddings' direct path, i.e. the corrupt run's logits up to that path."""
    batch = gpt2_model.tokenize(list(pairs.clean))
    nodes = all_nodes(gpt2_model, batch)
    prov = Provenance("m", None, "d", "test")
    full = CircuitGraph.from_node_scores(
        _frame(nodes), prov, n_layers=gpt2_model.n_layers)
    assert proportion_explained(gpt2_model, pairs[:4], full) == pytest.approx(1.0, abs=1e-4)
    cut = CircuitGraph(prov, full.graph.copy())
    cut.graph.remove_edges_from([e for e in full.graph.edges if e[1] == "logits@final"
                                 and not e[0].startswith("embed@")])
    assert proportion_explained(gpt2_model, pairs[:4], cut) == pytest.approx(0.0, abs=1e-4)


def _frame(nodes):
    return pd.DataFrame({"component": ["z" if n.kind == "head" else "mlp_out" for n in nodes],
                         "layer": [n.layer for n in nodes], "head": [n.index for n in nodes],
                         "neuron": None, "role": [n.role for n in nodes], "effect": 1.0})


# ----------------------------------------------------------------------------- planted truth


def test_planted_circuit_is_faithful_complete_and_minimal(planted):
    model, facts, pairs, truth = planted
    for data in (pairs, facts):
        for how in ("mean", "resample"):
            df = evaluate_circuits(model, data, [truth.nodes, truth.neuron_nodes(),
                                                 truth.distractors], how=how)
            np.testing.assert_allclose(df["faithfulness"], [1, 1, 0], atol=1e-6)
    assert completeness(model, pairs, truth.nodes) == pytest.approx(1.0, abs=1e-6)
    assert completeness(model, pairs, truth.distractors) == pytest.approx(0.0, abs=1e-6)
    assert completeness(model, pairs, truth.neurons) == pytest.approx(1.0, abs=1e-6)
    m = minimality(model, pairs, truth.nodes)
    assert set(m["node"]) == truth.nodes and np.allclose(m["drop"], 1.0, atol=1e-6)
    assert proportion_explained(model, pairs, truth.nodes) == pytest.approx(1.0, abs=1e-6)
    assert proportion_explained(model, pairs, truth.distractors) == pytest.approx(0, abs=1e-6)


def test_planted_curve_from_eap_scores(planted):
    model, _, pairs, truth = planted
    graph = to_graph(eap(model, pairs), model, pairs)
    scores = node_scores(graph)
    curve = faithfulness_curve(model, pairs, graph, sizes=[1, 2, 3, 5, 10])
    assert list(curve.columns[:4]) == ["size", "n_nodes", "fraction", "faithfulness"]
    row = curve.set_index("size").loc[3]
    assert row["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert set(row["nodes"].split(";")) == truth.nodes
    n_all = len(all_nodes(model, model.tokenize(list(pairs.clean))))
    assert row["fraction"] == pytest.approx(3 / n_all) and n_all == 75
    assert curve.set_index("size").loc[2, "faithfulness"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(scores, key=lambda k: -abs(scores[k]))[:3] == sorted(
        truth.nodes, key=lambda k: -abs(scores[k]))


def test_search_by_faithfulness(planted):
    """Backward elimination from EAP's top ten nodes keeps exactly the planted AND; forward
    selection cannot see an AND (each planted node alone explains nothing) until it has two."""
    model, _, pairs, truth = planted
    scores = node_scores(eap(model, pairs))
    top = sorted(scores, key=lambda k: -abs(scores[k]))[:10]
    path = minimize_circuit(model, pairs, top, target=0.99)
    assert path["size"].iloc[0] == 10 and path["size"].iloc[-1] == 3
    assert set(path["nodes"].iloc[-1].split(";")) == truth.nodes
    assert (path["faithfulness"] >= 0.99).all()
    forward = greedy_circuit(model, pairs, candidates=top, max_nodes=3, how="mean")
    assert list(forward["size"]) == [1, 2, 3] and forward["faithfulness"].iloc[0] == 0


def test_bad_circuits_are_clear_errors(gpt2_model, known):
    with pytest.raises(ValueError, match="how"):
        faithfulness(gpt2_model, known, [], how="zero")
    with pytest.raises(ValueError, match="roles"):
        faithfulness(gpt2_model, known, [Site("z", 0, head=1, position=3)])
    with pytest.raises(ValueError, match="residual"):
        faithfulness(gpt2_model, known, ["L1.resid@final"])
    with pytest.raises(ValueError, match="circuit holds"):
        faithfulness(gpt2_model, known, [Site("resid_pre", 1)])
    with pytest.raises(ValueError, match="no inner nodes"):
        minimality(gpt2_model, known, [])
    assert circuit_nodes(gpt2_model, ["L0.attn@final"], ["final"]) == {
        Node("head", 0, h, "final") for h in range(gpt2_model.n_heads)}
