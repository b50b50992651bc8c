"""The circuit explorer's Python side: the vendored d3, the JSON it draws, notebooks, ff.show.

What a reader does with the explorer in a browser is tested in ``test_explorer_browser.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

import factfind as ff
from factfind import report as R
from factfind.errors import EmptyGraphError, FactfindError, MissingLayerError, NoFigureError
from factfind.graph import CircuitGraph, Node, Provenance
from factfind.report.document import library
from factfind.report.explorer import explorer_data, explorer_html
from factfind.testing.graphs import synthetic_graph

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "factfind" / "report" / "vendor"
REPORTS = ROOT / "reports"
#: bytes of the committed reports before the explorer (the SmolLM2 report at 3d7e08c; the
#: organism report as `make report` wrote it at 3d7e08c): the explorer may add at most 1 MB
SIZE_BEFORE = {"fact_finding-smollm2-135m-rome_known.html": 1_497_204,
               "fact_finding-organism-organism_sport.html": 706_595}


def _graph() -> CircuitGraph:
    g = CircuitGraph(Provenance(model="m", revision="r", dataset="d", method="eap-ig/5"))
    for node, score in ((Node("embed", -1, None, "subject_last"), 0.0),
                        (Node("mlp", 1, None, "subject_last"), 0.9),
                        (Node("head", 2, 0, "final"), -0.4),
                        (Node("head", 2, 1, "final"), 0.5),
                        (Node("logits", 3, None, "final"), 0.0)):
        g.add_node(node, score=score)
    for u, v, s in (("embed@subject_last", "L1.mlp@subject_last", 0.9),
                    ("L1.mlp@subject_last", "L2.h0@final", -0.4),
                    ("L1.mlp@subject_last", "L2.h1@final", 0.5),
                    ("L2.h0@final", "logits@final", -0.3),
                    ("L2.h1@final", "logits@final", 0.45)):
        g.add_edge(u, v, score=s)
    return g


# ----------------------------------------------------------------------------- the vendored d3


def test_vendored_d3_is_the_pinned_release_with_its_licence() -> None:
    manifest = json.loads((VENDOR / "manifest.json").read_text())["d3"]
    code = (VENDOR / manifest["file"]).read_bytes()
    assert hashlib.sha256(code).hexdigest() == manifest["sha256"]
    assert code.startswith(f"// https://d3js.org v{manifest['version']} ".encode())
    assert manifest["version"] == "7.9.0" and manifest["npm"] == "d3@7.9.0"
    licence = (VENDOR / manifest["license_file"]).read_text()
    assert manifest["license"] == "ISC" and "Copyright 2010-2023 Mike Bostock" in licence
    assert "Permission to use, copy, modify, and/or distribute this software" in licence
    lib = library()
    assert (lib.version, lib.sha256) == (manifest["version"], manifest["sha256"])
    # the README of vendor/ names the same version
    assert "| 7.9.0 | ISC" in (VENDOR / "README.md").read_text()


def test_reports_inline_d3_with_its_licence_and_load_nothing() -> None:
    html = R.render_report(R.ReportData(title="t", sections=[R.circuit_section(_graph())]))
    lib = library()
    start = html.index("<script>/*! d3 7.9.0 | ISC licence")
    assert html[start:].startswith(f"<script>{lib.script}</script>")
    assert "Permission to use, copy, modify, and/or distribute" in lib.script
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html)


# ----------------------------------------------------------------------------- the data


def test_explorer_data_is_columns_with_edges_strongest_first() -> None:
    data = explorer_data(_graph())
    nodes = data["nodes"]
    assert nodes["id"] == ["embed@subject_last", "L1.mlp@subject_last", "L2.h0@final",
                           "L2.h1@final", "logits@final"]
    assert nodes["kind"] == ["embed", "mlp", "head", "head", "logits"]
    assert nodes["layer"] == [-1, 1, 2, 2, 3] and nodes["index"] == [None, None, 0, 1, None]
    assert data["lanes"] == ["subject_last", "final"] and nodes["lane"] == [0, 0, 1, 1, 1]
    assert data["edges"]["effect"] == [0.9, 0.5, 0.45, -0.4, -0.3]
    assert [nodes["id"][i] for i in data["edges"]["sender"]][:2] == ["embed@subject_last",
                                                                     "L1.mlp@subject_last"]
    assert data["graph"]["provenance"]["method"] == "eap-ig/5"
    assert data["node_method"] == "eap-ig/5" and data["n_layers"] == 3
    assert data["edges_total"] == 5 and data["nodes_total"] == 5


def test_max_edges_keeps_the_strongest_and_the_nodes_they_touch() -> None:
    data = explorer_data(_graph(), max_edges=2)
    assert data["edges"]["effect"] == [0.9, 0.5]
    # the endpoints stay, L2.h0 (only in weaker edges) goes
    assert data["nodes"]["id"] == ["embed@subject_last", "L1.mlp@subject_last", "L2.h1@final",
                                   "logits@final"]
    view = R.graph_view(_graph(), max_edges=2)
    assert "The strongest 2 of 5 edges and the 4 of 5 nodes they touch." in view.caption


def test_evidence_gives_each_node_its_per_prompt_values_mean_and_interval() -> None:
    rows = [{"method": "activation_patching/denoise", "component": "mlp_out", "layer": 1,
             "head": None, "neuron": None, "role": "subject_last", "prompt": p, "effect": v}
            for p, v in enumerate([1.0, 2.0, 3.0])]
    rows += [{"method": "activation_patching/denoise", "component": "head_out", "layer": 2,
              "head": 1, "neuron": None, "role": "final", "prompt": 0, "effect": 0.25},
             {"method": "activation_patching/denoise", "component": "mlp_out", "layer": 0,
              "head": None, "neuron": None, "role": "final", "prompt": 0, "effect": 7.0},
             {"method": "other", "component": "mlp_out", "layer": 1, "head": None,
              "neuron": None, "role": "subject_last", "prompt": 0, "effect": 99.0}]
    data = explorer_data(_graph(), evidence=pd.DataFrame(rows))
    mlp = data["evidence"]["1"]  # L1.mlp@subject_last
    assert mlp["values"] == [1.0, 2.0, 3.0] and mlp["mean"] == 2.0 and mlp["n"] == 3
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert mlp["ci_low"] == pytest.approx(2 - half) and mlp["ci_high"] == pytest.approx(2 + half)
    assert mlp["method"] == "activation_patching/denoise"
    one = data["evidence"]["3"]  # L2.h1@final: one prompt, no interval
    assert one["values"] == [0.25] and one["n"] == 1 and one["ci_low"] is None
    assert set(data["evidence"]) == {"1", "3"}  # L0.mlp@final is not in the graph


def test_position_lanes_for_per_prompt_graphs() -> None:
    g = nx.DiGraph()
    g.add_node("a", kind="mlp", layer=0, position=3, score=1.0)
    g.add_node("b", kind="head", layer=1, index=0, position=1, score=-1.0)
    g.add_node("out", kind="logits", layer=2, score=0.0)
    g.add_edge("a", "out", score=1.0)
    data = explorer_data(g)
    assert data["lane_kind"] == "position" and data["lanes"] == ["1", "3"]
    assert data["nodes"]["lane"] == [1, 0, 1]  # the logits sit at the last position
    assert data["extra"]["0"] == {"position": 3}


def test_a_graph_with_no_nodes_or_a_node_without_a_layer_is_refused() -> None:
    empty = CircuitGraph(Provenance(model="m", revision=None, dataset="d", method="x"))
    for draw in (explorer_data, R.graph_view, explorer_html, ff.show):
        with pytest.raises(EmptyGraphError, match="no nodes"):
            draw(empty)
    with pytest.raises(EmptyGraphError):
        R.circuit_section(nx.DiGraph())
    g = nx.DiGraph()
    g.add_node("embed@final", kind="embed", role="final", score=0.0)  # needs no layer
    g.add_node("L?.mlp@final", kind="mlp", role="final", score=1.0)
    with pytest.raises(MissingLayerError, match=r"node 'L\?.mlp@final' has no layer"):
        R.graph_view(g)
    g.nodes["L?.mlp@final"]["layer"] = float("nan")
    with pytest.raises(MissingLayerError):
        explorer_data(g)
    assert issubclass(MissingLayerError, FactfindError)


# ----------------------------------------------------------------------------- notebooks


def test_circuit_graph_renders_the_explorer_in_jupyter() -> None:
    html = _graph()._repr_html_()
    assert html is not None and html.startswith('<div class="ffx-notebook"><style>')
    assert "if (typeof window.d3 === 'undefined') {\n/*! d3 7.9.0 | ISC licence" in html
    m = re.search(r'<script type="application/json" class="ffx-data">(.*?)</script>', html,
                  re.DOTALL)
    assert m is not None and json.loads(m.group(1))["nodes"]["id"][1] == "L1.mlp@subject_last"
    assert html.count('class="graph-view ffx"') == 1 and "ffx-threshold" in html
    assert html.rstrip().endswith("})();\n</script></div>")


def test_show_draws_each_analysis_frame_as_its_report_figure() -> None:
    rng = np.random.default_rng(0)
    tracing = pd.DataFrame([{"method": f"causal_tracing/{k}", "component": k, "layer": layer,
                             "role": role, "prompt": p, "effect": float(rng.random())}
                            for k in ("mlp", "attn") for layer in range(4)
                            for role in ("subject_last", "final") for p in range(2)])
    shown = ff.show(tracing)
    assert shown.what == "layer x role heatmaps"
    assert shown.html.count('<figure class="plot"') == 2 and "<svg" in shown.html
    assert shown._repr_html_() == shown.html
    heads = pd.DataFrame([{"method": "atp", "component": "head_out", "layer": layer,
                           "head": h, "role": None, "effect": float(rng.normal())}
                          for layer in range(3) for h in range(4)])
    assert ff.show(heads).what == "head x layer heatmaps"
    by_layer = pd.DataFrame({"method": "effective_model", "layer": [0, 1, 2, 0, 1, 2],
                             "prompt": [0, 0, 0, 1, 1, 1], "effect": [0.1, 0.5, 0.9] * 2})
    shown = ff.show(by_layer)
    assert shown.what == "effect by layer" and shown.html.count('<figure class="plot"') == 1
    faith = pd.DataFrame({"size": [1, 2, 4], "faithfulness": [0.2, 0.6, 0.9]})
    assert ff.show(faith).what == "faithfulness curve"
    edges = pd.DataFrame({"method": "eap", "sender": ["embed@final", "L0.h0@final"],
                          "receiver": ["L0.h0@final", "logits@final"], "effect": [0.5, -0.2]})
    shown = ff.show(edges)
    assert shown.what == "explorer of eap" and "ffx-data" in shown.html
    assert ff.show(_graph()).what == "circuit explorer"
    section = R.circuit_section(_graph())
    assert ff.show(section).html.count('class="graph-view ffx"') == 1


def test_show_of_something_without_a_figure_is_a_typed_error() -> None:
    with pytest.raises(NoFigureError, match="no figure for a int"):
        ff.show(42)
    with pytest.raises(NoFigureError, match="columns a, b"):
        ff.show(pd.DataFrame({"a": [1], "b": [2]}))
    with pytest.raises(NoFigureError, match="empty frame"):
        ff.show(pd.DataFrame({"effect": []}))
    assert issubclass(NoFigureError, TypeError) and issubclass(NoFigureError, FactfindError)


# ----------------------------------------------------------------------------- reports


def test_the_circuit_table_speaks_the_api_vocabulary() -> None:
    section = R.circuit_section(_graph(), full=synthetic_graph(60, 200, n_layers=4),
                                full_edges=50)
    table = section.tables[0].data
    assert list(table.columns) == ["sender", "receiver", "effect"]
    assert table["effect"].tolist() == [0.9, 0.5, 0.45, -0.4, -0.3]
    assert len(section.graphs) == 2 and section.graphs[1].n_edges == 50


def test_synthetic_graph_has_the_asked_size_and_runs_forward() -> None:
    g = synthetic_graph(300, 1200, n_layers=18)
    assert (len(g), g.graph.number_of_edges()) == (300, 1200)
    assert nx.is_directed_acyclic_graph(g.graph)
    assert all(g.graph.degree(n) > 0 for n in g.graph)
    assert all(g.graph.nodes[u]["layer"] < g.graph.nodes[v]["layer"] for u, v in g.graph.edges)
    assert synthetic_graph(300, 1200, n_layers=18) == g


@pytest.mark.parametrize("name", sorted(SIZE_BEFORE))
def test_committed_reports_grow_by_at_most_one_megabyte(name: str) -> None:
    path = REPORTS / name
    html = path.read_text(encoding="utf-8")
    assert 'class="graph-view ffx" id="circuit-graph"' in html  # made with the explorer
    assert path.stat().st_size - SIZE_BEFORE[name] <= 1_000_000


def test_a_notebook_holds_the_strongest_edges_of_a_big_graph() -> None:
    from factfind.report.explorer import NOTEBOOK_EDGES

    g = synthetic_graph(1000, NOTEBOOK_EDGES + 500, n_layers=12)
    html = g._repr_html_()
    assert html is not None
    m = re.search(r'class="ffx-data">(.*?)</script>', html, re.DOTALL)
    data = json.loads(m.group(1))  # type: ignore[union-attr]
    assert len(data["edges"]["effect"]) == NOTEBOOK_EDGES
    assert data["edges_total"] == NOTEBOOK_EDGES + 500
    strongest = sorted((abs(d["score"]) for _, _, d in g.graph.edges(data=True)), reverse=True)
    assert [abs(e) for e in data["edges"]["effect"]] == strongest[:NOTEBOOK_EDGES]


def test_the_organism_report_carries_the_current_explorer() -> None:
    # the browser tests drive the committed organism report: after a change to the explorer,
    # regenerate it (`python analyses/fact_finding.py --overwrite`), so they test this code
    html = (REPORTS / "fact_finding-organism-organism_sport.html").read_text(encoding="utf-8")
    templates = ROOT / "factfind" / "report" / "templates"
    for name in ("explorer.js", "explorer.css"):
        assert (templates / name).read_text(encoding="utf-8") in html, name
