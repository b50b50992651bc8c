"""The features step of analyses/fact_finding.py (issue 24) and its report sections.

Fast: the report's feature sections and summary lines from hand-made tables (the lines say
where features lose, with the numbers; flags above 30%; typed errors), and the step's flags.
Slow: the organism run with ``--features on`` and a tiny dictionary set trained for the test
(``$FACTFIND_CACHE`` in tmp): the report has the Features section and each part, the feature
graph's three exports exist and load back (circuit-tracer's JSON against its schema as
tests/test_features_linear_graph.py checks it), and a second run is all cache hits.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from test_features_linear_graph import _check_circuit_tracer_schema

import factfind as ff
from factfind.errors import ArgumentError
from factfind.organism import CHECKPOINT_DIR
from factfind.report import feature_circuits as rfc

ROOT = Path(__file__).resolve().parents[1]
STEP = ROOT / "analyses" / "_features_step.py"


def _bases(*, no_errors: bool = False) -> pd.DataFrame:
    """A basis table; ``no_errors`` adds the features without error nodes (full basis 0.4 under
    mean, 0.3 under resample ablation)."""
    rows = []
    for how, f, n, h, x in (("mean", (0.2, 0.5, 0.9), (0.4, 0.45, 0.8), (0.1, 0.3, 0.7),
                             (-0.05, 0.1, 0.25, 0.4)),
                            ("resample", (0.6, 0.7, 0.95), (0.3, 0.5, 0.9), (0.2, 0.4, 0.6),
                             (0.01, 0.02, 0.05, 0.3))):
        bases = [("features", (*f, 1.0)), ("neurons", (*n, 1.0)), ("heads_mlps", (*h, 1.0))]
        if no_errors:
            bases.insert(1, ("features_no_errors", x))
        for basis, vals in bases:
            rows += [{"basis": basis, "budget": b, "how": how, "faithfulness": v,
                      "n_nodes": 999 if b is pd.NA else b}
                     for b, v in zip((10, 50, 200, pd.NA), vals, strict=True)]
    return pd.DataFrame(rows).astype({"budget": "Int64"})


def _interventions() -> pd.DataFrame:
    rows = []
    for role, att, rnd in (("subject_last", 0.5, 0.0), ("final", 0.25, 0.125)):
        for sel, rate in (("attributed", att), ("random", rnd)):
            rows += [{"role": role, "intervention": "swap", "scale": 1.0, "selection": sel,
                      "n_features": 10, "n": 64, "success_rate": rate,
                      "success_low": rate / 2, "success_high": min(1.0, rate * 1.5 + 0.05),
                      "effect": 1.0, "ci_low": 0.5, "ci_high": 1.5, "base_rate": 0.0,
                      "source_rate": 1.0, "fraction": 0.4},
                     {"role": role, "intervention": "steer x2", "scale": 2.0,
                      "selection": sel, "n_features": 10, "n": 64, "success_rate": rate + 0.1,
                      "success_low": rate, "success_high": rate + 0.2, "effect": 2.0,
                      "ci_low": 1.0, "ci_high": 3.0, "base_rate": 0.0, "source_rate": 1.0,
                      "fraction": 0.8}]
    return pd.DataFrame(rows)


def _error_share() -> pd.DataFrame:
    return pd.DataFrame({"layer": [0, 1, 2, 3], "error_share": [0.01, 0.2, 0.05, 0.1],
                         "error_share_of_layer": [0.1, 0.65, 0.3, 0.31],
                         "flagged": [False, True, False, True]})


def test_basis_lines_say_where_features_lose_with_the_numbers() -> None:
    mean, resample = rfc.basis_points(_bases())
    assert mean.startswith("Mean ablation, faithfulness at 10/50/200 nodes:")
    assert "features 0.20/0.50/0.90" in mean and "neurons 0.40/0.45/0.80" in mean
    # features lose to neurons only at 10 nodes, and beat heads/MLPs everywhere
    assert "Features lose to neurons at 10 nodes (0.20 vs 0.40)." in mean
    assert "50 nodes (0.50" not in mean
    assert "Features match or beat heads/MLPs at every budget." in mean
    assert "Features match or beat neurons at every budget." in resample
    flipped = _bases()
    flipped.loc[(flipped["basis"] == "features") & (flipped["how"] == "resample"),
                "faithfulness"] = 0.1
    assert "Features lose to neurons at 10 nodes (0.10 vs 0.30), 50 nodes (0.10 vs 0.50)" \
        in rfc.basis_points(flipped)[1]
    tie = _bases()  # equal as shown (two decimals): neither loses
    tie.loc[(tie["basis"] == "features") & (tie["how"] == "mean") & (tie["budget"] == 10),
            "faithfulness"] = -0.0012
    tie.loc[(tie["basis"] == "neurons") & (tie["how"] == "mean") & (tie["budget"] == 10),
            "faithfulness"] = -0.0004
    assert "Features lose to neurons" not in rfc.basis_points(tie)[0]
    with pytest.raises(ArgumentError, match="basis table"):
        rfc.basis_points(pd.DataFrame({"basis": ["features"]}))


def test_basis_lines_add_one_line_on_the_features_without_error_nodes() -> None:
    plain = rfc.basis_points(_bases())
    *lines, extra = rfc.basis_points(_bases(no_errors=True))
    assert lines == plain  # the per-ablation lines and where features lose are unchanged
    assert extra == ("Without error nodes (each ablated like any node outside the circuit), "
                     "features score -0.05/0.10/0.25 at 10/50/200 nodes under mean ablation "
                     "(with them 0.20/0.50/0.90) and 0.01/0.02/0.05 at 10/50/200 nodes under "
                     "resample ablation (with them 0.60/0.70/0.95); every head and feature but "
                     "no error node: 0.40 (mean), 0.30 (resample).")
    sec = rfc.bases_section(_bases(no_errors=True))
    assert sec.points[-1] == extra and len(sec.tables[0].data) == len(_bases(no_errors=True))
    assert "dashed: the features without their error nodes" in sec.figures[0].caption
    assert "dashed" not in rfc.bases_section(_bases()).figures[0].caption


def test_the_summary_reads_every_number_off_its_table() -> None:
    stability = pd.DataFrame({"k": [10, 50, 200], "effect": [0.6, 0.42, 0.3],
                              "ci_low": [0.5, 0.4, 0.25], "ci_high": [0.7, 0.44, 0.35],
                              "n": 20, "n_prompts": 32})
    verification = pd.DataFrame({"node": ["a", "b", "c"], "estimate": [1.0, -0.5, 0.2],
                                 "effect": [1.2, 0.1, 0.3]})
    lines = rfc.features_summary(scores={"replacement": 0.84, "completeness": 0.951},
                                 error_share=_error_share(), stability=stability,
                                 interventions=_interventions(), bases=_bases(),
                                 verification=verification)
    assert lines[0] == ("Single-prompt graph: replacement score 0.84, completeness 0.95; error "
                        "nodes hold > 30% of their layer's influence at 2 of 4 layers (L1, L3).")
    assert "top-50 nodes" in lines[1] and "Jaccard 0.42 [0.40, 0.44]" in lines[1]
    assert "20 random splits into halves of 32 pairs" in lines[1]
    assert lines[2].startswith("Swapping the top 10 features at subject_last")
    assert "flips 32 of 64 answers (50%" in lines[2] and "random features: 0%" in lines[2]
    assert "flips 16 of 64 answers (25%" in lines[3] and "random features: 12%" in lines[3]
    assert "sign for 2" in lines[4] and "largest exact effect is 1.200" in lines[4]
    assert any("Features lose to neurons" in line for line in lines[5:])
    assert rfc.features_summary() == []
    assert rfc.flagged_layers(_error_share()) == [1, 3]


def test_the_feature_sections_hold_their_parts_and_refuse_wrong_tables() -> None:
    inter = rfc.interventions_section(_interventions())
    assert inter.id == "features-interventions" and len(inter.points) == 2
    assert len(inter.figures) == 1 and len(inter.tables[0].data) == 8
    bases = rfc.bases_section(_bases())
    assert bases.id == "features-bases" and len(bases.figures) == 1
    assert len(bases.tables[0].data) == len(_bases())
    circuit = pd.DataFrame({"node": ["L1.stc.f3@final", "L0.stc.err@final", "L2.stc.f1@final"],
                            "effect": [0.5, -0.9, 0.1], "ci_low": [0.4, -1.0, 0.0],
                            "ci_high": [0.6, -0.8, 0.2], "n": 8, "group": "all"})
    stability = pd.DataFrame({"k": [10, 50], "effect": [0.5, 0.4], "ci_low": [0.4, 0.3],
                              "ci_high": [0.6, 0.5], "n": 20, "n_nodes": 3})
    bound = pd.DataFrame({"rank_start": [16, 32], "rank_stop": [32, 64], "nodes": [16, 32],
                          "covered": [16, 30], "effect": [0.2, 0.05]})
    sec = rfc.feature_circuit_section(circuit, stability, bound=bound)
    assert list(sec.tables[-1].data["bound"]) == [0.2, 0.05]
    assert len(rfc.feature_circuit_section(circuit, stability).tables) == len(sec.tables) - 1
    shown = sec.tables[0].data
    assert list(shown["node"]) == ["L0.stc.err@final", "L1.stc.f3@final", "L2.stc.f1@final"]
    assert sec.facts["nodes attributed"] == 3
    with pytest.raises(ArgumentError, match="interventions table"):
        rfc.interventions_section(pd.DataFrame({"role": ["final"]}))
    with pytest.raises(ArgumentError, match="error-share table"):
        rfc.flagged_layers(pd.DataFrame({"layer": [0]}))
    with pytest.raises(ArgumentError, match="'all' group"):
        rfc.feature_circuit_section(circuit.assign(group="P17"), stability)


def test_the_steps_flags_default_and_refuse_bad_values() -> None:
    import argparse

    step = runpy.run_path(str(STEP), run_name="features_step_test")
    p = argparse.ArgumentParser()
    step["add_arguments"](p)
    fc = step["config_from"](p.parse_args([]))
    assert fc.features == "auto" and fc.budgets == [10, 50, 200] and fc.feature_pairs >= 50

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

    assert step["enabled"](fc, Named("smollm2-135m"))
    assert not step["enabled"](fc, Named("factfind-organism"))
    on = step["config_from"](p.parse_args(["--features", "on"]))
    assert step["enabled"](on, Named("factfind-organism"))
    assert not step["enabled"](step["config_from"](p.parse_args(["--features", "off"])),
                               Named("smollm2-135m"))
    with pytest.raises(SystemExit):
        p.parse_args(["--features", "maybe"])
    with pytest.raises(ArgumentError, match="--feature-budgets"):
        step["config_from"](p.parse_args(["--feature-budgets", "10,x"]))
    with pytest.raises(ArgumentError, match="--feature-pairs"):
        step["config_from"](p.parse_args(["--feature-pairs", "0"]))
    # the counterfactual graph's knobs
    assert (fc.edge_nodes, fc.edge_pairs, fc.edge_steps, fc.edge_split) == (50, 16, 5, 10)
    for flag, bad in (("--edge-nodes", "0"), ("--edge-pairs", "0"), ("--edge-steps", "-1"),
                      ("--edge-split", "-1"), ("--edge-graph-edges", "-2")):
        with pytest.raises(ArgumentError, match=f"{flag} must be >= [01], got {bad}") as err:
            step["config_from"](p.parse_args([flag, bad]))
        assert "\n" not in str(err.value)
    assert step["config_from"](p.parse_args(["--edge-steps", "0", "--edge-split", "0"])
                               ).edge_steps == 0
    # the fact-finding script's parser takes every flag beside its own (no clash)
    ff_script = runpy.run_path(str(ROOT / "analyses" / "fact_finding.py"),
                               run_name="fact_finding_flags_test")
    cfg, a = ff_script["parse_args"](["--feature-pairs", "50", "--bound-nodes", "7"])
    assert cfg.bound_nodes == 7 and step["config_from"](a).feature_pairs == 50
    # off: no sections, no exports, nothing computed
    res = step["features_step"](p.parse_args(["--features", "off"]), cfg=None, cache=None,
                                model=Named("smollm2-135m"), pairs=None)
    assert res.sections == [] and res.files(Path("x.html")) == {}


def test_one_per_pair_pass_gives_feature_atps_node_frame(gpt2_model, pairs) -> None:
    """The step ranks nodes from the per-pair AtP frame (no second pass): equal to
    feature_atp's own node frame, on non-zero values, over all pairs and over the first k."""
    from factfind.features import Dictionaries, Dictionary

    step = runpy.run_path(str(STEP), run_name="features_step_test")
    dicts = Dictionaries([Dictionary.random(kind="skip_transcoder", activation="topk",
                                            layer=layer, d_in=gpt2_model.d_model,
                                            d_sae=4 * gpt2_model.d_model, k=8, seed=layer)
                          for layer in range(gpt2_model.n_layers)])
    rows = ff.feature_atp(gpt2_model, pairs, dicts, per_prompt=True, progress=False)
    for k in (None, 3):
        want = ff.feature_atp(gpt2_model, pairs if k is None else pairs[:k], dicts,
                              progress=False).set_index("node").sort_index()
        got = step["node_frame"](rows, prompts=k)
        got = pd.DataFrame(got[got["effect"].to_numpy() != 0]).set_index("node").sort_index()
        want = pd.DataFrame(want[want["effect"].to_numpy() != 0])
        assert len(want) > 10 and list(got.index) == list(want.index)
        assert bool((want["effect"].abs() > 0).all())
        for col in ("effect", "ci_low", "ci_high", "score"):
            assert got[col].to_numpy() == pytest.approx(want[col].to_numpy(), rel=1e-9,
                                                        abs=1e-12, nan_ok=True), col
        assert (got["n"].to_numpy() == want["n"].to_numpy()).all()
        assert bool(got["prompt"].isna().all()) and set(got["direction"]) == {"noise"}
    ver = ff.verify_features(gpt2_model, pairs, dicts, step["node_frame"](rows), top=3,
                             progress=False)
    assert ver.n_verified == 3


def test_the_pairs_graphs_nodes_and_split_edges_are_the_strongest() -> None:
    """edge_nodes: the circuit's 'all' group's strongest feature and error nodes by |effect|
    (no heads, no zero effects, no other group); cross_edges: the strongest edges whose roles
    differ."""
    step = runpy.run_path(str(STEP), run_name="features_step_test")
    circuit = pd.DataFrame({
        "node": ["L0.stc.f1@final", "L1.stc.err@final", "L2.h0@final", "L1.stc.f9@final",
                 "L0.stc.f5@subject_last", "L3.stc.f2@final"],
        "effect": [0.5, -0.9, 2.0, 0.7, 0.0, 3.0],
        "group": ["all", "all", "all", "all", "all", "P17"]})
    assert step["edge_nodes"](circuit, 2) == ["L1.stc.err@final", "L1.stc.f9@final"]
    assert step["edge_nodes"](circuit, 50) == ["L1.stc.err@final", "L1.stc.f9@final",
                                               "L0.stc.f1@final"]
    edges = pd.DataFrame({
        "sender": ["embed@final", "L0.stc.f1@subject_last", "embed@subject_last",
                   "L1.stc.f9@subject_last"],
        "receiver": ["logits@final", "L1.stc.err@final", "L1.stc.f9@subject_last",
                     "logits@final"],
        "effect": [5.0, -0.2, 4.0, 0.3]})
    assert step["cross_edges"](edges, 1) == [["L1.stc.f9@subject_last", "logits@final"]]
    assert step["cross_edges"](edges, 10) == [["L1.stc.f9@subject_last", "logits@final"],
                                              ["L0.stc.f1@subject_last", "L1.stc.err@final"]]
    assert step["cross_edges"](edges.iloc[:1], 10) == []


def test_the_pairs_graph_keeps_its_strongest_edges_on_paths_to_the_logits() -> None:
    """pairs_graph: the top ``keep`` edges on embed -> logits paths; when they leave no path,
    every edge (the explorer cannot draw an empty graph); 0 keeps every edge."""
    step = runpy.run_path(str(STEP), run_name="features_step_test")

    class Model:
        name, revision, n_layers = "m", "r", 3

    class Pairs:
        def fingerprint(self) -> str:
            return "p"

        def __len__(self) -> int:
            return 4

    f1, f2 = "L0.stc.f1@final", "L1.stc.f2@final"
    edges = pd.DataFrame({"method": "feature-eap-ig/5",
                          "sender": ["embed@final", f1, f1, "embed@final"],
                          "receiver": [f1, f2, "logits@final", "logits@final"],
                          "effect": [0.5, 3.0, 0.4, 0.1]})
    on_paths = {("embed@final", f1), (f1, "logits@final"), ("embed@final", "logits@final")}
    g, kept = step["pairs_graph"](edges, Model(), Pairs(), keep=2, config={})
    # the top 2 (f1 -> f2, embed -> f1) reach no logits: every edge on a path (f2 reaches none)
    assert set(g.graph.edges) == on_paths and kept == (
        "the 3 of its 4 edges (on paths from the embeddings to the logits) (its strongest 2 "
        "leave no such path)")
    g, kept = step["pairs_graph"](edges, Model(), Pairs(), keep=3, config={})
    assert set(g.graph.edges) == {("embed@final", f1), (f1, "logits@final")}
    assert kept.startswith("the strongest 2 of its 4 edges")
    g, kept = step["pairs_graph"](edges, Model(), Pairs(), keep=0, config={})
    assert set(g.graph.edges) == on_paths and kept.startswith("the 3 of its 4 edges (on")
    edges["receiver"] = edges["receiver"].replace({f2: "logits@final"})
    edges = edges.drop_duplicates(["sender", "receiver"])
    assert step["pairs_graph"](edges, Model(), Pairs(), keep=0, config={})[1] == "all 3 edges"


def test_small_relations_share_one_circuit_group(pairs) -> None:
    step = runpy.run_path(str(STEP), run_name="features_step_test")
    labels = step["relation_groups"](pairs)
    assert len(labels) == len(pairs)
    counts = pd.Series([str(p.relation) for p in pairs.clean]).value_counts()
    for label, p in zip(labels, pairs.clean, strict=True):
        assert label == (str(p.relation) if counts[str(p.relation)] >= step["MIN_GROUP"]
                         else "other")


def test_interventions_pair_the_clean_prompts_with_partners_the_model_knows(
        facts, gpt2_model) -> None:
    """known_partners keeps each pair's clean prompt and draws its partner from the known
    facts only; with too few such partners (or no known set) it keeps the run's pairs."""
    step = runpy.run_path(str(STEP), run_name="features_step_test")
    fn = step["known_partners"]
    known = ff.FactDataset(list(facts)[::2], name="known")
    # as in the run: known clean prompts, partners drawn from every fact
    pairs = known.corrupt(gpt2_model, seed=0, on_missing="skip", pool=facts)
    assert any(c.subject not in {f.subject for f in known} for c in pairs.corrupt)
    assert fn(pairs, None, gpt2_model, seed=0) is pairs
    assert len(pairs) < step["MIN_KNOWN_PARTNERS"]  # too few here: the run's pairs
    assert fn(pairs, known, gpt2_model, seed=0) is pairs
    fn.__globals__["MIN_KNOWN_PARTNERS"] = 1
    got = fn(pairs, known, gpt2_model, seed=0)
    assert got is not pairs and len(got) >= 1
    subjects = {f.subject for f in known}
    assert all(c.subject in subjects for c in got.corrupt)
    assert {c for c in got.clean} <= set(pairs.clean)
    assert all(a.attribute != b.attribute for a, b in zip(got.clean, got.corrupt, strict=True))


@pytest.mark.slow
@pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                    reason="organism checkpoint not built")
def test_the_organism_run_with_features_reports_exports_and_caches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACTFIND_CACHE", str(tmp_path / "cache"))
    script = runpy.run_path(str(ROOT / "analyses" / "fact_finding.py"),
                            run_name="fact_finding_features_test")
    args = ["--n-prompts", "8", "--tracing-prompts", "4", "--tracing-samples", "2",
            "--batch-size", "8", "--threads", "1", "--features", "on",
            "--feature-tokens", "6000", "--feature-epochs", "1", "--quality-tokens", "1500",
            "--dashboard-tokens", "1500", "--feature-dashboards", "3", "--graph-edges", "40",
            "--edge-nodes", "16", "--edge-steps", "2", "--edge-split", "4",
            "--edge-graph-edges", "30", "--out", str(tmp_path / "reports"),
            "--cache", str(tmp_path / "runs")]
    first = script["main"](args)
    html = first.report.read_text()
    for part in ("features", "dictionaries-quality", "features-graph", "features-pairs-graph",
                 "features-circuit",
                 "features-interventions", "features-bases", "dictionaries-dashboards"):
        assert f'id="{part}"' in html, part
    for text in ("replacement score", "completeness score", "Error share per layer",
                 "Jaccard of the top-k nodes", "Faithfulness per basis",
                 "Missed-effect bound of the unverified nodes",
                 "features: feature_pairs", "features: edge_nodes", "carried by",
                 "Counterfactual graph over the pairs (EAP-IG)"):
        assert text in html, text
    computed = set(first.cache.computed)
    assert {"features_quality", "features_atp", "features_circuit", "features_stability",
            "features_verification", "features_bound", "features_graph",
            "features_interventions", "features_bases", "features_dashboards",
            "features_edges", "features_edge_heads"} <= computed
    # the pairs graph comes after the single-prompt one
    assert html.index('id="features-graph"') < html.index('id="features-pairs-graph"')
    # the feature graph beside the report: GraphML and node-link JSON give the same graph,
    # circuit-tracer's JSON passes its schema
    stem = first.report.with_name(first.report.stem + "-features")
    graph = ff.graph.read_graphml(stem.with_suffix(".graphml"))
    assert ff.graph.read_json(stem.with_suffix(".json")) == graph
    # cut to its 40 strongest edges on embed -> logits paths (the organism's has hundreds)
    assert 0 < graph.graph.number_of_edges() <= 40 and "the strongest" in html
    kinds = {d["kind"] for _, d in graph.graph.nodes(data=True)}
    assert {"feature", "embed", "logits"} <= kinds and graph.provenance.method == "linear_graph"
    tracer = json.loads(stem.with_name(stem.name + ".circuit-tracer.json").read_text())
    _check_circuit_tracer_schema(tracer)
    assert tracer["metadata"]["slug"] == stem.name + ".circuit-tracer"
    _pairs_graph_checked(first)
    _graph_drawn(first.report)
    # a second run is served from the cache, the features step included
    again = script["main"](args)
    assert again.cache.computed == []
    assert {"features_graph", "features_bases", "features_dashboards", "features_edges",
            "features_edge_heads"} <= set(again.cache.hits)


def _pairs_graph_checked(run: Any) -> None:
    """The counterfactual graph: its cached edge frame (16 nodes, embeddings, logits) is
    non-empty, its 4 split edges' head shares plus the local part sum to each edge, and its
    exports load back equal, cut to the 30 strongest edges on embed -> logits paths."""
    edges = pd.read_parquet(next(run.cache.root.glob("features_edges-*.parquet")))
    heads = pd.read_parquet(next(run.cache.root.glob("features_edge_heads-*.parquet")))
    assert len(edges) > 30 and bool((edges["score"] > 0).any())
    assert set(edges["method"]) == {"feature-eap-ig/2"}
    sums = heads.groupby(["sender", "receiver"]).agg(
        share=("share", "sum"), local=("local", "first"), edge=("edge", "first"))
    assert len(sums) == 4
    scale = float(np.abs(edges["effect"].to_numpy(dtype=float)).max())
    gap = np.abs((sums["share"] + sums["local"] - sums["edge"]).to_numpy(dtype=float))
    assert float(gap.max()) <= 1e-4 * scale and bool((sums["edge"].abs() > 0).all())
    split = edges.set_index(["sender", "receiver"]).loc[sums.index, "effect"]
    assert split.to_numpy() == pytest.approx(sums["edge"].to_numpy(), rel=1e-4, abs=1e-6)
    stem = run.report.with_name(run.report.stem + "-features-pairs")
    graph = ff.graph.read_graphml(stem.with_suffix(".graphml"))
    assert ff.graph.read_json(stem.with_suffix(".json")) == graph
    assert 0 < graph.graph.number_of_edges() <= 30
    kinds = {d["kind"] for _, d in graph.graph.nodes(data=True)}
    assert {"feature", "embed", "logits"} <= kinds
    assert graph.provenance.method == "feature-eap-ig/2"


def _graph_drawn(report: Path) -> None:
    """The feature graphs' explorers in headless Chromium (the single-prompt graph's and the
    counterfactual graph's): their nodes are drawn with a size."""
    from factfind.report.browser import Browser, find_chromium

    if find_chromium() is None:
        return  # CI installs Debian's chromium; the export checks above still ran
    with Browser(timeout=60) as browser:
        page = browser.new_page()
        page.goto(report.as_uri())
        for section in ("features-graph", "features-pairs-graph"):
            n = page.evaluate("""(() => Array.from(document.querySelectorAll(
                "#SECTION svg .node")).filter((el) => {
                  const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0;
                }).length)()""".replace("SECTION", section))
            assert n > 2, (section, n)
