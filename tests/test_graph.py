"""CircuitGraph: ids, building, pruning to input→logits paths, round trips and provenance."""

import json
import math

import networkx as nx
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from factfind.errors import ArgumentError
from factfind.graph import (
    KINDS,
    ROLES,
    STRUCTURAL,
    CircuitGraph,
    Node,
    Provenance,
    ProvenanceMismatchError,
    compare,
    layout,
    prune,
    prune_nodes,
    read_graphml,
    read_json,
    to_graphml,
    to_json,
    union,
)
from factfind.results import tidy
from factfind.types import DICTIONARY_NAMES

PROV = Provenance("gpt2", "abc123", "ds-1", "eap", {"seed": 0, "batch": 8},
                  created="2025-01-01T00:00:00+00:00", version="0.1.0")


def prov(**kw) -> Provenance:
    return Provenance(**{**PROV.__dict__, **kw})


# ------------------------------------------------------------------------------------ node ids


@pytest.mark.parametrize("node, expected", [
    (Node("mlp", 5, None, "subject_last"), "L5.mlp@subject_last"),
    (Node("head", 3, 2, "final"), "L3.h2@final"),
    (Node("neuron", 4, 311, "subject_last"), "L4.n311@subject_last"),
    (Node("attn", 0, None, "all"), "L0.attn@all"),
    (Node("resid", 7, None, "relation"), "L7.resid@relation"),
    (Node("embed", -1, None, "subject_last"), "embed@subject_last"),
    (Node("logits", 12, None, "final"), "logits@final"),
])
def test_node_id_format(node, expected):
    assert node.id == expected
    assert Node.parse(expected, n_layers=12) == node


@st.composite
def nodes(draw):
    n_layers = draw(st.integers(1, 100))
    kind = draw(st.sampled_from(KINDS))
    layer = {"embed": -1, "logits": n_layers, "resid": draw(st.integers(0, n_layers))}.get(
        kind, draw(st.integers(0, n_layers - 1)))
    index = draw(st.integers(0, 10**5)) if kind in ("head", "neuron", "feature") else None
    dictionary = draw(st.sampled_from(DICTIONARY_NAMES)) if kind in ("feature", "error") \
        else None
    return Node(kind, layer, index, draw(st.sampled_from(ROLES)), dictionary), n_layers


@given(nodes())
def test_id_parse_round_trip(node_and_depth):
    node, n_layers = node_and_depth
    assert Node.parse(node.id, n_layers=n_layers) == node
    if node.kind != "logits":
        assert Node.parse(node.id) == node


@pytest.mark.parametrize("bad", [
    "L5.mlp", "L5.mlp@nowhere", "5.mlp@final", "L5.h@final", "L-1.mlp@final", "L5.foo@final",
    "L5.mlp@final ", "embed", "L5.n3.mlp@final", "",
])
def test_parse_rejects_malformed_ids(bad):
    with pytest.raises(ValueError, match="node"):
        Node.parse(bad, n_layers=12)


def test_parse_needs_depth_for_logits_and_checks_range():
    with pytest.raises(ValueError, match="n_layers"):
        Node.parse("logits@final")
    with pytest.raises(ValueError, match="outside"):
        Node.parse("L12.mlp@final", n_layers=12)
    assert Node.parse("L12.resid@final", n_layers=12) == Node("resid", 12, None, "final")


@pytest.mark.parametrize("args, match", [
    (("head", 1, None, "final"), "need"), (("mlp", 1, 3, "final"), "take no"),
    (("neuron", 1, -2, "final"), ">= 0"), (("embed", 0, None, "final"), "-1"),
    (("mlp", -1, None, "final"), "-1"), (("mlp", 1, None, "middle"), "role"),
    (("block", 1, None, "final"), "kind"),
])
def test_node_validators(args, match):
    with pytest.raises(ValueError, match=match):
        Node(*args)


def test_node_order():
    ids = ["logits@final", "L1.n0@final", "L1.mlp@final", "L1.h10@final", "L1.h2@final",
           "L1.attn@final", "L1.resid@final", "L0.mlp@final", "embed@final", "embed@subject_last"]
    got = [n.id for n in sorted(Node.parse(i, n_layers=2) for i in ids)]
    assert got == ["embed@subject_last", "embed@final", "L0.mlp@final", "L1.resid@final",
                   "L1.attn@final", "L1.h2@final", "L1.h10@final", "L1.mlp@final",
                   "L1.n0@final", "logits@final"]


# ------------------------------------------------------------------------------------ building


def node_frame(extra=()):
    rows = [
        dict(component="mlp_out", layer=0, head=pd.NA, role="subject_last", effect=0.5),
        dict(component="head_out", layer=1, head=0, role="final", effect=-0.25),
        dict(component="mlp_out", layer=1, head=pd.NA, role="final", effect=0.125),
        *extra,
    ]
    return pd.DataFrame(rows)


SEQUENTIAL_EDGES = {
    ("embed@subject_last", "L0.mlp@subject_last"), ("embed@subject_last", "L1.h0@final"),
    ("embed@final", "L1.h0@final"), ("embed@final", "L1.mlp@final"),
    ("embed@final", "logits@final"), ("L0.mlp@subject_last", "L1.h0@final"),
    ("L1.h0@final", "L1.mlp@final"), ("L1.h0@final", "logits@final"),
    ("L1.mlp@final", "logits@final"),
}


def test_from_node_scores_nodes_and_edges():
    g = CircuitGraph.from_node_scores(node_frame(), PROV, n_layers=2)
    nf = g.nodes_frame()
    assert list(nf["id"]) == ["embed@subject_last", "embed@final", "L0.mlp@subject_last",
                              "L1.h0@final", "L1.mlp@final", "logits@final"]
    assert list(nf["score"]) == [0.0, 0.0, 0.5, -0.25, 0.125, 0.0]
    assert list(nf["sign"]) == [0, 0, 1, -1, 1, 0]
    assert list(nf["method"]) == [STRUCTURAL, STRUCTURAL, "eap", "eap", "eap", STRUCTURAL]
    assert nf["index"].tolist() == [pd.NA, pd.NA, pd.NA, 0, pd.NA, pd.NA]
    assert nf.loc[5, "layer"] == 2
    assert set(g.graph.edges) == SEQUENTIAL_EDGES
    assert set(g.edges_frame()["method"]) == {STRUCTURAL}


def test_parallel_blocks_cut_attention_to_mlp_of_the_same_layer():
    g = CircuitGraph.from_node_scores(node_frame(), PROV, n_layers=2, parallel=True)
    assert set(g.graph.edges) == SEQUENTIAL_EDGES - {("L1.h0@final", "L1.mlp@final")}


def test_from_node_scores_maps_components():
    rows = [dict(component="resid_post", layer=0, role="final", effect=1.0),
            dict(component="neurons", layer=1, neuron=7, role=pd.NA, effect=2.0, method="dla"),
            dict(component="z", layer=0, head=1, role="final", effect=3.0),
            dict(component="attn_out", layer=1, role="final", effect=4.0)]
    g = CircuitGraph.from_node_scores(pd.DataFrame(rows), PROV, n_layers=2)
    assert {n.id for n in g.nodes()} == {"L1.resid@final", "L1.n7@all", "L0.h1@final",
                                         "L1.attn@final", "embed@final", "embed@all",
                                         "logits@final"}
    assert g.graph.nodes["L1.n7@all"]["method"] == "dla"
    assert g.graph.has_edge("L0.h1@final", "L1.resid@final")
    assert g.graph.has_edge("L1.resid@final", "L1.n7@all")  # "all" meets every role
    assert not g.graph.has_edge("L1.attn@final", "L1.resid@final")  # resid[1] is read before


def test_from_tidy_result_frame():
    """The frames analyses return (nullable Int64 and string columns) build the same graph."""
    df = tidy(node_frame().assign(method="eap", position=pd.NA, n=10))
    assert set(CircuitGraph.from_node_scores(df, PROV, n_layers=2).graph.edges) == SEQUENTIAL_EDGES


@pytest.mark.parametrize("row, match", [
    (dict(component="mlp_out", layer=1, role="final", effect=9.0), "two rows"),
    (dict(component="mlp_out", layer=1, role=pd.NA, position=3, effect=9.0), "position"),
    (dict(component="unembed", layer=1, role="final", effect=9.0), "component"),
    (dict(component="mlp_out", layer=2, role="final", effect=9.0), "outside"),
    (dict(component="mlp_out", layer=0, role="final", effect=math.nan), "finite"),
])
def test_from_node_scores_rejects(row, match):
    with pytest.raises(ValueError, match=match):
        CircuitGraph.from_node_scores(node_frame([row]), PROV, n_layers=2)


def test_from_edge_scores():
    df = pd.DataFrame({"sender": ["embed@final", "embed@final", "L3.h1@final"],
                       "receiver": ["L3.h1@final", "logits@final", "logits@final"],
                       "effect": [0.5, -2.0, 0.25]})
    g = CircuitGraph.from_edge_scores(df, PROV)
    assert g.node("logits@final") == Node("logits", 4, None, "final")
    assert g.graph.nodes["embed@final"]["score"] == -1.5  # sum of outgoing
    assert g.graph.nodes["L3.h1@final"]["score"] == 0.25
    assert g.graph.nodes["logits@final"]["score"] == -1.75  # sum of incoming
    assert g.graph.edges["embed@final", "logits@final"]["sign"] == -1
    assert CircuitGraph.from_edge_scores(df, PROV, n_layers=6).node("logits@final").layer == 6
    with pytest.raises(ValueError, match="two rows"):
        CircuitGraph.from_edge_scores(pd.concat([df, df.iloc[:1]]), PROV)
    loop = pd.DataFrame({"sender": ["L1.mlp@final", "L2.mlp@final"],
                         "receiver": ["L2.mlp@final", "L1.mlp@final"], "effect": [1.0, 1.0]})
    with pytest.raises(ValueError, match="cycle"):
        CircuitGraph.from_edge_scores(loop, PROV)


def test_from_edge_scores_reads_v01_frames_and_names_missing_columns():
    new = pd.DataFrame({"sender": ["embed@final", "L3.h1@final"],
                        "receiver": ["L3.h1@final", "logits@final"], "effect": [0.5, -0.25]})
    old = new.rename(columns={"sender": "src", "receiver": "dst", "effect": "score"})
    assert CircuitGraph.from_edge_scores(old, PROV) == CircuitGraph.from_edge_scores(new, PROV)
    with pytest.raises(ArgumentError, match="missing effect"):
        CircuitGraph.from_edge_scores(new.drop(columns="effect"), PROV)


def test_add_edge_needs_its_nodes_and_finite_scores():
    g = CircuitGraph(PROV)
    g.add_node(Node("embed", -1, None, "final"), score=0.0)
    with pytest.raises(KeyError, match=r"L1\.mlp@final"):
        g.add_edge("embed@final", "L1.mlp@final", score=1.0)
    with pytest.raises(ValueError, match="finite"):
        g.add_node(Node("mlp", 1, None, "final"), score=math.inf)


# ------------------------------------------------------------------------------------- pruning

E, ES, M0, H, H1 = "embed@final", "embed@subject_last", "L0.mlp@subject_last", "L1.h0@final", \
    "L1.h1@final"
M2, T, ORPHAN, SOURCELESS = "L2.mlp@final", "logits@final", "L0.h3@final", "L2.h5@final"
EDGES = {(ES, M0): 4.0, (M0, H): 3.0, (H, T): 2.0, (E, M2): 0.5, (M2, T): -1.0, (E, H1): 0.25,
         (H1, T): -0.75, (E, ORPHAN): 10.0, (SOURCELESS, T): -9.0}  # |scores| sum to 30.5


def edge_graph(p=PROV) -> CircuitGraph:
    g = CircuitGraph(p)
    for i in (E, ES, M0, H, H1, M2, T, ORPHAN, SOURCELESS):
        g.add_node(Node.parse(i, n_layers=3), score=0.0)
    for (u, v), s in EDGES.items():
        g.add_edge(u, v, score=s)
    return g


@pytest.mark.parametrize("kw, nodes", [
    (dict(threshold=1.0), {ES, M0, H, T}),  # ORPHAN (10) dead-ends, SOURCELESS (9) has no input
    (dict(top_n=6), {ES, M0, H, T}),
    (dict(top_n=8), {ES, M0, H, T, E, M2}),  # H1 lost its input edge (0.25)
    (dict(top_n=3), set()),
    (dict(cumulative=0.9), {ES, M0, H, T}),  # 10 + 9 + 4 + 3 + 2 = 28 >= 27.45
    (dict(cumulative=0.6), set()),  # 10 + 9 >= 18.3
    (dict(cumulative=1.0), {E, ES, M0, H, H1, M2, T}),
    (dict(threshold=1.0, top_n=4), set()),  # both hold: H→T is 5th
])
def test_prune_edges_keeps_only_input_to_logits_paths(kw, nodes):
    g = prune(edge_graph(), **kw)
    assert set(g.graph.nodes) == nodes
    assert set(g.graph.edges) == {e for e in EDGES if e[0] in nodes and e[1] in nodes}
    assert g.provenance == PROV


def test_prune_does_not_touch_its_input_and_validates():
    g = edge_graph()
    prune(g, threshold=1.0)
    assert g == edge_graph()
    with pytest.raises(ValueError, match="prune_nodes"):
        prune(CircuitGraph.from_node_scores(node_frame(), PROV, n_layers=2), top_n=3)
    unscored = CircuitGraph(PROV)
    unscored.add_node(Node("mlp", 0, None, "final"), score=1.0, method=STRUCTURAL)
    with pytest.raises(ValueError, match=r"use prune$"):
        prune_nodes(unscored, top_n=1)


@pytest.mark.parametrize("kw, match", [
    ({}, "at least one"), (dict(cumulative=0.0), r"\(0, 1\]"), (dict(cumulative=1.5), r"\(0, 1\]"),
    (dict(top_n=-1), ">= 0"),
])
def test_prune_validates_criteria(kw, match):
    with pytest.raises(ValueError, match=match):
        prune(edge_graph(), **kw)
    if "cumulative" not in kw:  # prune_nodes has no cumulative criterion
        with pytest.raises(ValueError, match=match):
            prune_nodes(CircuitGraph.from_node_scores(node_frame(), PROV, n_layers=2), **kw)


OFF_PATH = dict(component="mlp_out", layer=1, role="subject_last", effect=0.9)


@pytest.mark.parametrize("kw, nodes", [
    (dict(top_n=1), {"embed@final", T}),  # L1.mlp@subject_last (0.9) never reaches the logits
    (dict(top_n=2), {"embed@final", T}),  # L0.mlp@subject_last needs the head to get there
    (dict(top_n=3), {"embed@final", "embed@subject_last", M0, "L1.h0@final", T}),
    (dict(threshold=0.2), {"embed@final", "embed@subject_last", M0, "L1.h0@final", T}),
    (dict(top_n=4), {"embed@final", "embed@subject_last", M0, "L1.h0@final", "L1.mlp@final", T}),
])
def test_prune_nodes(kw, nodes):
    g = CircuitGraph.from_node_scores(node_frame([OFF_PATH]), PROV, n_layers=2)
    pruned = prune_nodes(g, **kw)
    assert set(pruned.graph.nodes) == nodes
    assert set(pruned.graph.edges) == {e for e in g.graph.edges if set(e) <= nodes}


def test_pruned_circuits_keep_their_order_whatever_the_hash_seed():
    """A sub-circuit lists its nodes and edges in its graph's order: networkx's ``subgraph``
    iterates a small node set in string-hash order, so the same fact-finding run wrote its
    circuit's nodes in another order each time (PYTHONHASHSEED differs by process). The same
    pruning in processes with different seeds writes the same lists."""
    import os
    import subprocess
    import sys

    code = ("import json\n"
            "from factfind.graph import CircuitGraph, Node, prune, prune_nodes\n"
            "from factfind.graph import Provenance\n"
            "g = CircuitGraph(Provenance('m', None, 'd', 'eap', created='2025-01-01'))\n"
            "ids = ['embed@final', 'logits@final'] + [f'L{l}.h{h}@final' for l in range(6) "
            "for h in range(40)]\n"
            "for k, i in enumerate(ids):\n"
            "    g.add_node(Node.parse(i, n_layers=6), score=1.0 + k * 37 % 101)\n"
            "for k, i in enumerate(ids[2:]):\n"
            "    g.add_edge('embed@final', i, score=k * 53 % 97 / 10 + 0.1)\n"
            "    g.add_edge(i, 'logits@final', score=k * 29 % 89 / 10 + 0.1)\n"
            "a, b = prune(g, top_n=240), prune_nodes(g, top_n=60)\n"
            "assert 50 < a.graph.number_of_nodes() < 200, a.graph.number_of_nodes()\n"
            "print(json.dumps([list(a.graph.nodes), list(a.graph.edges), list(b.graph.nodes)]))\n")
    outs = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                           text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": seed}
                           ).stdout for seed in ("1", "2", "3")]
    assert outs[0] and outs[0] == outs[1] == outs[2]


# ------------------------------------------------------------------------------- serialisation


def rich_graph() -> CircuitGraph:
    g = edge_graph(prov(revision=None, config={"nested": {"b": [1, 2.5], "a": None}}))
    g.add_node(Node("neuron", 1, 311, "subject_last"), score=-0.1 - 0.2, method="atp")
    g.add_edge(ES, "L1.n311@subject_last", score=-1 / 3, method="eap-ig")
    g.graph.nodes[H]["note"] = "name mover?"
    return g


@pytest.mark.parametrize("write, read, suffix", [(to_graphml, read_graphml, "graphml"),
                                                 (to_json, read_json, "json")])
def test_round_trip_equal(tmp_path, write, read, suffix):
    g = rich_graph()
    back = read(write(g, tmp_path / f"g.{suffix}"))
    assert back == g
    assert back.provenance == g.provenance and back.provenance.revision is None
    assert back.graph.nodes["L1.n311@subject_last"]["score"] == -0.30000000000000004
    assert back.graph.nodes[E]["index"] is None and back.graph.nodes[H]["index"] == 0
    assert back.edges_frame().equals(g.edges_frame())
    assert back.nodes_frame().equals(g.nodes_frame())


def test_equality_is_exact():
    a, b = rich_graph(), rich_graph()
    assert a == b
    b.graph.edges[ES, M0]["score"] = math.nextafter(4.0, 5.0)
    assert a != b
    c = rich_graph()
    c.graph.graph["provenance"] = prov(dataset="ds-2")
    assert a != c
    d = rich_graph()
    d.graph.nodes[H]["note"] = "other"
    assert a != d


@pytest.mark.parametrize("write, read", [(to_graphml, read_graphml), (to_json, read_json)])
def test_round_trip_empty_graph(tmp_path, write, read):
    empty = prune(edge_graph(), top_n=3)
    assert len(empty) == 0
    assert read(write(empty, tmp_path / "empty")) == empty


@pytest.mark.parametrize("write", [to_graphml, to_json])
def test_refuses_to_overwrite(tmp_path, write):
    path = tmp_path / "g.out"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write(edge_graph(), path)
    assert path.read_text() == "keep me"
    write(edge_graph(), path, overwrite=True)
    assert path.read_text() != "keep me"


@pytest.mark.parametrize("write", [to_graphml, to_json])
def test_failed_write_leaves_no_partial_file(tmp_path, write):
    g = edge_graph()
    g.graph.nodes[H]["bad"] = object()  # serialisable by neither format
    old = tmp_path / "old.out"
    old.write_text("keep me")
    with pytest.raises((TypeError, nx.NetworkXError)):
        write(g, old, overwrite=True)
    with pytest.raises((TypeError, nx.NetworkXError)):
        write(g, tmp_path / "new.out")
    assert [p.name for p in tmp_path.iterdir()] == ["old.out"]
    assert old.read_text() == "keep me"


def test_json_is_node_link(tmp_path):
    data = json.loads(to_json(edge_graph(), tmp_path / "g.json").read_text())
    assert set(data) >= {"nodes", "edges", "graph"}
    assert data["graph"]["provenance"]["config"] == '{"batch": 8, "seed": 0}'


def test_read_graphml_rejects_plain_graphs(tmp_path):
    nx.write_graphml(nx.path_graph(3, create_using=nx.DiGraph), tmp_path / "plain.graphml")
    with pytest.raises(ValueError, match="no factfind circuit graph"):
        read_graphml(tmp_path / "plain.graphml")


# ------------------------------------------------------------------------------- combining


@pytest.mark.parametrize("other, names", [
    (prov(model="pythia-70m", revision="step143000"), ["gpt2@abc123", "pythia-70m@step143000"]),
    (prov(revision="def456"), ["gpt2@abc123", "gpt2@def456"]),
    (prov(dataset="ds-2"), ["ds-1", "ds-2"]),
])
def test_mixing_models_or_datasets_raises(other, names):
    a, b = edge_graph(), edge_graph(other)
    for combine in (union, compare):
        with pytest.raises(ProvenanceMismatchError) as err:
            combine(a, b)
        assert all(n in str(err.value) for n in names)
        assert isinstance(err.value, ValueError)
    assert compare(a, b, allow_mismatch=True)["nodes_jaccard"] == 1.0


def small(p, nodes, edges):
    g = CircuitGraph(p)
    for i in nodes:
        g.add_node(Node.parse(i, n_layers=3), score=1.0)
    for u, v in edges:
        g.add_edge(u, v, score=2.0)
    return g


def test_compare_and_union():
    X, Y, Z = "L0.mlp@final", "L1.mlp@final", "L2.mlp@final"
    a = small(PROV, [E, X, Y, T], [(E, X), (X, T), (E, Y), (Y, T)])
    b = small(prov(method="atp"), [E, X, Z, T], [(E, X), (X, T), (E, Z)])
    b.graph.nodes[X]["score"] = -5.0
    assert compare(a, b) == {"nodes_a": 4, "nodes_b": 4, "nodes_shared": 3, "nodes_jaccard": 0.6,
                             "edges_a": 4, "edges_b": 3, "edges_shared": 2, "edges_jaccard": 0.4}
    u = union(a, b)
    assert set(u.graph.nodes) == {E, X, Y, Z, T} and u.graph.number_of_edges() == 5
    assert u.graph.nodes[X]["score"] == 1.0  # a's attributes win
    assert u.provenance.method == "eap+atp" and u.provenance.dataset == "ds-1"
    assert union(a, a).provenance == PROV
    assert compare(CircuitGraph(PROV), CircuitGraph(PROV))["edges_jaccard"] == 1.0


def test_layout_by_layer_and_role():
    g = small(PROV, [ES, E, M0, H, H1, M2, T], [])
    assert layout(g) == {ES: (-1.0, 3.0), E: (-1.0, 5.0), M0: (0.5, 3.0), H: (1.25, 5.0),
                         H1: (1.25, 5.5), M2: (2.5, 5.0), T: (3.0, 5.0)}


def test_container_protocol_and_repr():
    g = edge_graph()
    assert len(g) == 9 and ES in g and Node.parse(ES) in g and "L9.mlp@final" not in g
    assert repr(g) == "CircuitGraph(9 nodes, 9 edges, model=gpt2@abc123, method=eap)"


def test_frames_of_empty_graph_have_columns():
    assert list(CircuitGraph(PROV).nodes_frame().columns)[:4] == ["id", "kind", "layer", "index"]
    assert list(CircuitGraph(PROV).edges_frame().columns) == ["sender", "receiver", "score",
                                                              "abs_score", "sign", "method"]


def test_from_edge_scores_equals_building_edge_by_edge():
    """The vectorised builder equals adding each node and edge by hand (the reference), and
    ``prune`` equals sorting the edges by (|score|, node order) one by one."""
    import random

    rng = random.Random(0)
    layers = 4
    inner = [f"L{layer}.{u}@{r}" for layer in range(layers) for u in ("h0", "h1", "mlp")
             for r in ("subject_last", "final")]
    ids = ["embed@subject_last", "embed@final", *inner, "logits@final"]
    order = {i: Node.parse(i, n_layers=layers) for i in ids}
    edges = [(u, v) for u in ids for v in ids if order[u] < order[v] and rng.random() < 0.5
             and not u.startswith("logits") and not v.startswith("embed")]
    effect = [round(rng.uniform(-1, 1), 2) for _ in edges]  # rounded: ties in |score|
    df = pd.DataFrame({"sender": [u for u, _ in edges], "receiver": [v for _, v in edges],
                       "effect": effect, "method": ["eap-ig"] * len(edges)})
    fast = CircuitGraph.from_edge_scores(df, PROV, n_layers=layers)
    slow = CircuitGraph(PROV)
    out: dict[str, float] = {}
    into: dict[str, float] = {}
    for (u, v), e in zip(edges, effect, strict=True):
        out[u] = out.get(u, 0.0) + e
        into[v] = into.get(v, 0.0) + e
    for n in sorted({order[i] for e in edges for i in e}):
        slow.add_node(n, score=out.get(n.id, into.get(n.id, 0.0)))
    for (u, v), e in zip(edges, effect, strict=True):
        slow.add_edge(u, v, score=e, method="eap-ig")
    assert len(edges) > 100 and fast == slow
    ranked = sorted(zip(edges, effect, strict=True),
                    key=lambda x: (-abs(x[1]), order[x[0][0]], order[x[0][1]]))
    top = {e for e, _ in ranked[:25]}
    kept = set(prune(fast, top_n=25).graph.edges)
    assert kept <= top and kept  # the top 25, then only edges on embed -> logits paths
