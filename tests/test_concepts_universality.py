"""Circuit comparison: identical graphs score 1, graphs with nothing in common 0, the same
circuit at the same relative depth of a deeper model in between; the organism's EAP circuits."""

import pytest

from factfind.concepts.universality import (
    compare_graphs,
    graph_edit_similarity,
    n_layers_of,
    signature,
    signature_counts,
)
from factfind.graph import CircuitGraph, Node, Provenance
from factfind.testing.planted import planted_circuit


def _graph(ids, edges, *, n_layers=3, model="m"):
    g = CircuitGraph(Provenance(model, None, "data", "test"))
    for i in ids:
        g.add_node(Node.parse(i, n_layers=n_layers), score=1.0)
    for u, v in edges:
        g.add_edge(u, v, score=1.0)
    return g


@pytest.fixture(scope="module")
def planted_graph():
    t = planted_circuit()
    return _graph({x for e in t.edges for x in e}, t.edges)


def test_identical_graphs_score_one(planted_graph):
    t = planted_circuit()
    other = _graph({x for e in t.edges for x in e}, t.edges, model="another-seed")
    df = compare_graphs(planted_graph, other)
    assert len(df) == 8
    assert df["effect"].to_numpy() == pytest.approx(1.0)
    ged = df.set_index("measure").loc["graph_edit_similarity"]
    assert ged["ged"] == 0 and ged["ged_exact"]


def test_disjoint_graphs_score_zero(planted_graph):
    other = _graph({"L0.h1@relation", "L2.mlp@subject_first"},
                   [("L0.h1@relation", "L2.mlp@subject_first")])
    df = compare_graphs(planted_graph, other).set_index("measure")["effect"].to_dict()
    for m in ("nodes/id", "edges/id", "nodes/signature", "edges/signature",
              "graph_edit_similarity"):
        assert df[m] == 0.0, m
    assert 0 < df["nodes/kind"] < 1  # one head and one MLP on each side


def test_same_circuit_deeper_model(planted_graph):
    """The planted circuit in a 6-layer model at the same relative depth (but its previous-token
    head in the second quarter) with another head index: ids differ, signatures mostly agree."""
    ids = {"embed@subject_first", "L1.h0@subject_last", "embed@subject_last",
           "L3.mlp@subject_last", "L5.h3@final", "logits@final"}
    edges = [("embed@subject_first", "L1.h0@subject_last"),
             ("L1.h0@subject_last", "L3.mlp@subject_last"),
             ("embed@subject_last", "L3.mlp@subject_last"),
             ("L3.mlp@subject_last", "L5.h3@final"), ("L5.h3@final", "logits@final")]
    deep = _graph(ids, edges, n_layers=6)
    assert n_layers_of(deep) == 6 and n_layers_of(planted_graph) == 3
    df = compare_graphs(planted_graph, deep).set_index("measure")["effect"].to_dict()
    assert df["edges/id"] == 0.0
    assert df["nodes/role"] == 1.0 and df["nodes/kind"] == 1.0
    assert df["nodes/signature"] == pytest.approx(5 / 7)
    # one of six nodes changes signature: delete + insert it and its two edges (6 of 22)
    assert df["graph_edit_similarity"] == pytest.approx(1 - 6 / 22)
    counts = signature_counts([("a", planted_graph), ("b", deep)])
    assert counts[["a", "b"]].sum().tolist() == [6, 6]


def test_graph_edit_search_improves_on_greedy():
    """Greedy matching pairs the strongest nodes first and loses an edge; the search finds the
    mapping that keeps both edges."""
    a = _graph({"L0.h0@final", "L1.h1@final", "L2.h2@final"},
               [("L0.h0@final", "L2.h2@final")], n_layers=4)
    a.add_node(Node.parse("L1.h1@final"), score=9.0)  # strongest: matched first
    b = _graph({"L0.h0@final", "L1.h0@final", "L2.h2@final", "L2.h3@final"},
               [("L0.h0@final", "L2.h2@final")], n_layers=4)
    b.add_node(Node.parse("L2.h3@final"), score=9.0)  # same signature (q3) as L2.h2
    out = graph_edit_similarity(a, b, timeout=5.0)
    assert out["ged"] == 1.0  # insert one node; the edge is kept
    assert out["ged_exact"]


def test_signature_bins():
    assert signature(Node.parse("L0.mlp@subject_last"), 4) == ("q1", "mlp", "subject_last")
    assert signature(Node.parse("L7.h1@final"), 8) == ("q4", "head", "final")
    assert signature(Node.parse("logits@final", n_layers=8), 8)[0] == "out"


def test_organism_circuits_compare():
    """A circuit and a sparser prune of the same EAP scores: the sparser one's nodes are a
    subset, so the id overlap is the ratio of the sizes."""
    import factfind as ff
    from factfind import graph as cg
    from factfind.edges.eap import eap, to_graph

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").sample(60, seed=0).known_by(model)
    pairs = facts[:8].corrupt(model, seed=0, on_missing="skip")
    full = to_graph(eap(model, pairs), model, pairs)
    small, large = cg.prune(full, top_n=40), cg.prune(full, top_n=80)
    assert 0 < len(small) <= len(large)
    df = compare_graphs(small, large, timeout=2.0).set_index("measure")["effect"].to_dict()
    assert all(0 <= v <= 1 for v in df.values())
    assert df["nodes/id"] == pytest.approx(len(set(small.graph) & set(large.graph))
                                           / len(set(small.graph) | set(large.graph)))
    assert df["nodes/role"] > 0.3
