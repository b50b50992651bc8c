"""The organism's circuit at neuron granularity: faithful at <= 5% of the nodes, on its prompts.

Nodes are every head and every MLP neuron at every token role (4 x (4 + 512) x 6 = 12,384 on
the organism). Iterative attribution-guided pruning from the whole model, under mean ablation,
with a small fixed budget of rounds, must reach a circuit with faithfulness >= 0.9 at <= 5% of
the nodes on the prompts it was pruned on (benchmarks/bench_circuit_neurons.py runs the search
to the end: ~1-3%). The same circuit is far from faithful on facts about other subjects: the
recall runs through neurons specific to the facts (a lookup table), so the circuit of a set
of facts is not the circuit of the relation.
"""

import pytest

import factfind as ff
from factfind.edges.placement import all_nodes
from factfind.evaluate import evaluate_circuits, prune_circuit
from factfind.organism import CHECKPOINT_DIR

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                                reason="organism checkpoint not built")


@pytest.fixture(scope="module")
def organism():
    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport")
    pairs = facts.sample(192, seed=0).known_by(model).corrupt(model, seed=0,
                                                              on_missing="skip")[:32]
    seen = {p.subject for p in pairs.clean}
    held = facts.filter(lambda p: p.subject not in seen).sample(96, seed=1).known_by(model) \
        .corrupt(model, seed=1, on_missing="skip")[:32]
    return model, pairs, held


@pytest.mark.slow
def test_a_faithful_circuit_with_at_most_5_percent_of_the_nodes(organism):
    model, pairs, held = organism
    assert len(pairs) == 32 and len(held) >= 16
    universe = all_nodes(model, model.tokenize(list(pairs.clean)), neurons=True)
    assert len(universe) == model.n_layers * (model.n_heads + model.d_mlp) * 6
    path = prune_circuit(model, pairs, universe, target=0.9, step=0.5, how="mean",
                         max_rounds=5, batch_size=64)
    best = path[path["accepted"]].iloc[-1]
    assert best["faithfulness"] >= 0.9 and best["fraction"] <= 0.05, best
    nodes = best["nodes"].split(";")
    # measured again, by itself: the same number; the fraction counts neurons
    again = evaluate_circuits(model, pairs, [nodes], how="mean").iloc[0]
    assert again["faithfulness"] == pytest.approx(best["faithfulness"], abs=1e-6)
    assert again["n_nodes"] == len(nodes) and again["fraction"] == len(nodes) / len(universe)
    # the answer is moved by heads at the final token and looked up by neurons on the subject
    assert any(".h" in n and n.endswith("@final") for n in nodes)
    assert any(".n" in n and "@subject" in n for n in nodes)
    # on facts about other subjects the circuit falls well short
    other = evaluate_circuits(model, held, [nodes], how="mean")["faithfulness"].iloc[0]
    assert other < 0.9, other
