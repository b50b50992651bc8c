"""The concepts' report sections render (planted model: seconds), and the analysis script
writes a report with all four sections (organism, opt-in: slow)."""

import pytest

from factfind import report as rp
from factfind.concepts.polysemanticity import (
    basis_comparison,
    monosemantic_fraction,
    neuron_selectivity,
)
from factfind.concepts.representation import (
    attribute_directions,
    direction_agreement,
    direction_patching,
)
from factfind.concepts.superposition import interference, lookup_effective_rank, storage_counts
from factfind.concepts.universality import compare_graphs, signature_counts
from factfind.report import concepts as rc
from factfind.testing.planted import planted_model

IDS = ("concepts-representation", "concepts-polysemanticity", "concepts-superposition",
       "concepts-universality")


def test_sections_render(tmp_path):
    from factfind.graph import CircuitGraph, Node, Provenance
    from factfind.testing.planted import planted_circuit

    model, facts, _ = planted_model("gpt2")
    pairs = facts.corrupt(model, seed=0)
    dirs = attribute_directions(model, facts, layers=[1, 2], test_fraction=0.25)
    ratios = direction_patching(model, pairs, dirs)
    sel = neuron_selectivity(model, facts, [(1, n) for n in range(20)])
    basis = basis_comparison(model, pairs, layer=1, ks=(1, 4, 16))
    inter = interference(dirs.get("sport", 1, "subject_last", "mean"))
    g = CircuitGraph(Provenance("planted", None, "d", "truth"))
    t = planted_circuit()
    for n in sorted({x for e in t.edges for x in e}):
        g.add_node(Node.parse(n, n_layers=3), score=1.0)
    for u, v in t.edges:
        g.add_edge(u, v, score=1.0)
    sections = [
        rc.representation_section(dirs.decodability, direction_agreement(dirs), ratios),
        rc.polysemanticity_section(sel, monosemantic_fraction(sel), basis),
        rc.superposition_section(storage_counts(model, facts, layers=[1]), inter,
                                 lookup_effective_rank(model, facts, layers=[1])),
        rc.universality_section(compare_graphs(g, g), signature_counts([("a", g), ("b", g)]),
                                [("a", g), ("b", g)]),
    ]
    assert [s.id for s in sections] == list(IDS)
    for s in sections:
        assert len(s.explanation) > 300 and s.tables and s.figures
    html = rp.render_report(rp.ReportData(title="concepts", sections=sections))
    for sid in IDS:
        assert f'id="{sid}"' in html
    assert "Welch bound" in html and "graph_edit_similarity" in html
    rp.write_report(rp.ReportData(title="concepts", sections=sections), tmp_path / "c.html")


@pytest.mark.slow
def test_analysis_script(tmp_path, monkeypatch):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analyses" / "concepts.py"
    spec = importlib.util.spec_from_file_location("concepts_script", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    out = mod.main(["--models", "organism", "--world-sizes", "--n-prompts", "60",
                    "--n-pairs", "6", "--top-neurons", "8", "--eap-ig-steps", "1",
                    "--circuit-pairs", "6", "--circuit-edges", "30", "--rank-subjects", "60",
                    "--out", str(tmp_path)])
    html = out.read_text()
    for sid in IDS:
        assert f'id="{sid}"' in html
    summary = json.loads(out.with_suffix(".json").read_text())
    uni = {r["measure"]: r["effect"] for r in summary["universality"]}
    assert uni["nodes/id"] == 1.0  # the organism against itself
