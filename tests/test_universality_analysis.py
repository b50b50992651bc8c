"""Universality across models (analyses/universality.py): the measures sit on relative depth,
the agreement paragraph is computed from the numbers (and flips when they do), the circuits'
kinds and signatures compare across sizes, a model that knows none of the shared facts is one
typed line, and the organism end to end (report, the fact-finding run's cache folder, a second
run served from the cache)."""

import csv
import re
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import factfind as ff
from factfind.concepts.universality import (
    MEASURES,
    agreement,
    circuit_composition,
    circuit_nodes_of,
    layer_depth,
    model_measures,
    node_signature_similarity,
)
from factfind.graph import Node
from factfind.organism import CHECKPOINT_DIR
from factfind.report.universality import agreement_paragraphs, measure_sentence

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "universality.py"
organism = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                              reason="organism checkpoint not built")


# ----------------------------------------------------------------------------- synthetic models


def _model(name: str, n_layers: int, *, early: int, late: int, ko: int, k: int, onset: int,
           early_peak: float = 0.4, circuit: pd.DataFrame | None = None,
           max_rounds: int | None = None) -> pd.DataFrame:
    """:func:`model_measures` of a model whose curves peak where the arguments say (its
    findings by :func:`ff.literature_findings`)."""
    layers = np.arange(n_layers)

    def bump(at: int, height: float) -> np.ndarray:
        return height * np.exp(-0.5 * ((layers - at) / 1.0) ** 2)

    tracing = pd.concat([
        pd.DataFrame({"method": "causal_tracing/mlp", "role": "subject_last", "layer": layers,
                      "effect": bump(early, early_peak)}),
        pd.DataFrame({"method": "causal_tracing/mlp", "role": "final", "layer": layers,
                      "effect": bump(early, 0.05)}),
        pd.DataFrame({"method": "causal_tracing/attn", "role": "final", "layer": layers,
                      "effect": bump(late, 0.3)})], ignore_index=True)
    knockout = pd.concat([
        pd.DataFrame({"role": "subject", "layer": layers, "effect": -bump(ko, 0.5)}),
        pd.DataFrame({"role": "relation", "layer": layers, "effect": -bump(max(0, ko - 2), 0.2)}),
    ], ignore_index=True)
    effective = pd.DataFrame({"layer": np.arange(n_layers + 1),
                              "accuracy": np.where(np.arange(n_layers + 1) >= k, 1.0, 0.2),
                              "clean_accuracy": 1.0})
    probes = pd.DataFrame({"role": "subject_last", "layer": layers, "chance": 0.25,
                           "effect": np.where(layers >= onset, 0.95, 0.3)})
    findings = ff.literature_findings(n_layers=n_layers, tracing=tracing, knockout=knockout,
                                      effective=effective, probes=probes)
    return model_measures(name, n_layers, findings, knockout=knockout, circuit=circuit,
                          max_rounds=max_rounds)


def _circuit(ids: list[str], start: int, faithfulness: float = 0.93) -> pd.DataFrame:
    """A pruning path: the whole model, then the circuit ``ids``."""
    return pd.DataFrame([
        {"round": 0, "size": start, "fraction": 1.0, "faithfulness": 1.0, "accepted": True,
         "dropped": 0, "nodes": ""},
        {"round": 1, "size": len(ids), "fraction": len(ids) / start,
         "faithfulness": faithfulness, "accepted": True, "dropped": start - len(ids),
         "nodes": ";".join(ids)},
        {"round": 2, "size": 1, "fraction": 1 / start, "faithfulness": 0.2, "accepted": False,
         "dropped": len(ids) - 1, "nodes": ids[0]}])


@pytest.fixture(scope="module")
def two_models() -> pd.DataFrame:
    """A 30-layer and an 18-layer model: the early sites agree (9/29 = 0.31 vs 5/17 = 0.29),
    the late sites differ (20/29 = 0.69 vs 6/17 = 0.35)."""
    big = _model("big", 30, early=9, late=20, ko=15, k=3, onset=8,
                 circuit=_circuit(["L9.n4@subject_last", "L10.n7@subject_last",
                                   "L20.h1@final"], 1000))
    small = _model("small", 18, early=5, late=6, ko=9, k=2, onset=4,
                   circuit=_circuit(["L5.n1@subject_last", "L6.h0@final", "L7.h2@final",
                                     "L8.h3@final"], 500))
    return pd.concat([big, small], ignore_index=True)


def test_measures_sit_on_relative_depth(two_models):
    m = two_models.set_index(["model", "measure"])
    assert list(two_models.loc[two_models["model"] == "big", "measure"]) == list(MEASURES)
    assert m.loc[("big", "early site"), "layer"] == 9
    assert m.loc[("small", "early site"), "layer"] == 5
    assert m.loc[("big", "late site"), "layer"] == 20
    assert m.loc[("small", "knockout peak"), "layer"] == 9
    assert m.loc[("big", "effective model onset"), "layer"] == 3
    assert m.loc[("small", "probe onset"), "layer"] == 4
    have = two_models.loc[two_models["depth"].notna()]
    assert len(have) == 14  # 7 depth measures x 2 models
    assert m.loc[("big", "knockout peak"), "value"] == pytest.approx(0.5)  # the drop
    expected = [layer_depth(la, n) for la, n in zip(have["layer"], have["n_layers"], strict=True)]
    assert have["depth"].to_numpy() == pytest.approx(expected, abs=1e-3)
    assert m.loc[("small", "early site"), "depth"] == pytest.approx(5 / 17, abs=1e-3)
    assert layer_depth(0, 4) == 0 and layer_depth(3, 4) == 1  # first and last layer
    # the circuit: its share of all nodes, F >= 0.9, the median layer of its nodes
    assert m.loc[("big", "circuit size"), "value"] == pytest.approx(3 / 1000)
    assert m.loc[("big", "circuit size"), "holds"]
    assert m.loc[("small", "circuit depth"), "layer"] == 6.5
    assert m.loc[("small", "circuit depth"), "depth"] == pytest.approx(6.5 / 17, abs=1e-3)


def test_agreement_is_computed_from_the_depths(two_models):
    agree = agreement(two_models, within=0.15).set_index("measure")
    assert agree.loc["early site", "agree"]
    assert agree.loc["early site", "spread"] == pytest.approx(9 / 29 - 5 / 17, abs=2e-3)
    assert not agree.loc["late site", "agree"]
    assert (agree.loc["late site", "earliest"], agree.loc["late site", "latest"]) == \
        ("small", "big")
    assert agree.loc["late site", "spread"] == pytest.approx(20 / 29 - 6 / 17, abs=2e-3)
    # circuit shares 0.3% vs 0.8%: 2.7x apart
    assert agree.loc["circuit size", "ratio"] == pytest.approx((4 / 500) / (3 / 1000))
    assert not agree.loc["circuit size", "agree"]
    # the threshold is the rule: a looser one makes the late sites agree
    assert agreement(two_models, within=0.4).set_index("measure").loc["late site", "agree"]


def test_the_paragraph_cites_the_numbers_and_flips_with_them(two_models):
    agree = agreement(two_models)
    findings = pd.DataFrame([{"finding": "ROME early site", "model": "big", "holds": True,
                              "measured": "peak at 9"},
                             {"finding": "ROME early site", "model": "small", "holds": False,
                              "measured": "peak 0.01 below 0.02"}])
    lines = agreement_paragraphs(two_models, agree, findings, pd.DataFrame(
        columns=["model", "kind", "nodes", "share", "layers", "median_depth", "role"]))
    text = "\n".join(lines)
    assert "agree within 0.15" in lines[1] and lines[1].startswith("Early site")
    assert "0.31 (layer 9 of 30)" in lines[1] and "0.29 (layer 5 of 18)" in lines[1]
    assert lines[2].startswith("Late site: the models differ")
    assert "the spread 0.34 exceeds 0.15" in lines[2]
    assert "small 0.35 (layer 6 of 18)" in lines[2]
    assert "ROME early site: holds on big; differs on small (peak 0.01 below" in text
    assert re.search(r"the largest share \(small\) is 2\.7x the smallest \(big\), more than "
                     r"2x apart", text)
    # the headline counts what the sentences say
    n_agree = int(agree.loc[agree["measure"] != "circuit size", "agree"].sum())
    assert f"{n_agree} of 7 depth measures" in lines[0]
    # move the small model's early site: the same sentence now says they differ
    moved = two_models.copy()
    at = (moved["model"] == "small") & (moved["measure"] == "early site")
    moved.loc[at, ["layer", "depth"]] = [15, round(15 / 17, 3)]
    rows = moved.loc[moved["measure"] == "early site"]
    row = agreement(moved).set_index("measure").loc["early site"].to_dict()
    sentence = measure_sentence("early site", rows, {**row, "measure": "early site"})
    assert "the models differ" in sentence and "0.88 (layer 15 of 18)" in sentence


def test_a_reference_model_is_cited_beside_the_comparison(two_models):
    ref = _model("ref", 4, early=3, late=2, ko=3, k=2, onset=1)
    three = pd.concat([two_models, ref], ignore_index=True)
    agree = agreement(three, among=["big", "small"]).set_index("measure")
    # the organism's early site at depth 1.0 does not widen the compared models' spread
    assert agree.loc["early site", "agree"]
    assert agree.loc["early site", "spread"] == pytest.approx(9 / 29 - 5 / 17, abs=2e-3)
    assert not agreement(three).set_index("measure").loc["early site", "agree"]
    lines = agreement_paragraphs(three, agree.reset_index(), pd.DataFrame(
        columns=["finding", "model", "holds", "measured"]), pd.DataFrame(
        columns=["model", "kind", "nodes", "share", "layers", "median_depth", "role"]),
        reference=["ref"])
    assert "Across 2 compared models (big and small)" in lines[0]
    assert "The reference ref is cited beside them" in lines[0]
    assert lines[1].endswith("; beside them ref (reference) 1.00 (layer 3 of 4).")


def test_a_search_that_never_shrinks_has_no_circuit_and_a_capped_one_is_a_bound():
    stuck = _circuit(["L1.h0@final"], 1000)
    stuck.loc[1, "accepted"] = False
    m = _model("m", 12, early=4, late=8, ko=6, k=2, onset=3, circuit=stuck).set_index(
        "measure")
    assert np.isnan(m.loc["circuit size", "value"]) and np.isnan(m.loc["circuit depth", "depth"])
    assert "no smaller circuit: none of 2 trial circuits kept faithfulness >= 0.9 (best 0.93 " \
        "at 1 of 1,000 nodes)" in m.loc["circuit size", "detail"]
    capped = _model("m", 12, early=4, late=8, ko=6, k=2, onset=3, circuit=_circuit(
        ["L1.h0@final", "L2.n3@subject_last"], 1000), max_rounds=2).set_index("measure")
    assert capped.loc["circuit size", "value"] == pytest.approx(0.002)
    assert "round limit, so this is an upper bound" in capped.loc["circuit size", "detail"]


def test_a_site_without_restoration_has_no_depth():
    df = _model("m", 12, early=4, late=8, ko=6, k=2, onset=3, early_peak=-0.05)
    early = df.set_index("measure").loc["early site"]
    assert np.isnan(early["depth"]) and early["value"] < 0
    assert "peak indirect effect -0.0" in early["detail"]
    sentence = measure_sentence("early site", df.loc[df["measure"] == "early site"],
                                {"agree": None})
    assert sentence.startswith("Early site: none of the compared models has a value; no value "
                               "on m (peak indirect effect -0.0")


def test_circuit_kinds_and_signatures_compare_across_sizes():
    a = ["L9.n4@subject_last", "L10.n7@subject_last", "L20.h1@final"]
    nodes = circuit_nodes_of(_circuit(a, 1000), 30)
    assert [v.id for v in nodes] == a  # the last accepted row, not the rejected one
    comp = circuit_composition("big", nodes, 30).set_index("kind")
    assert comp.loc["neuron", "nodes"] == 2 and comp.loc["head", "nodes"] == 1
    assert comp.loc["neuron", "share"] == pytest.approx(2 / 3)
    assert comp.loc["neuron", "layers"] == 2 and comp.loc["neuron", "role"] == "subject_last"
    assert comp.loc["head", "median_depth"] == pytest.approx(20 / 29, abs=1e-3)
    # the same circuit at the same relative depth of a 15-layer model: signatures identical
    half = [Node(v.kind, v.layer // 2, v.index, v.role) for v in nodes]
    sim = node_signature_similarity({"big": (nodes, 30), "half": (half, 15)})
    assert sim["effect"].to_numpy() == pytest.approx(1.0)
    other = [Node("head", 0, 0, "relation")]
    sim = node_signature_similarity({"big": (nodes, 30), "other": (other, 4)}).set_index(
        "measure")
    assert sim.loc["nodes/signature", "effect"] == 0
    assert sim.loc["nodes/kind", "effect"] == pytest.approx(1 / 3)  # one head of max(1, 3)


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT), run_name="universality_test")


def test_empty_models_is_a_typed_error(script):
    with pytest.raises(ff.ArgumentError, match="--models is empty"):
        script["parse_args"](["--models", " , "])
    with pytest.raises(ff.ArgumentError, match="names smollm2-135m more than once"):
        script["parse_args"](["--models", "smollm2-135m,gemma-3-270m, smollm2-135m"])


@organism
def test_a_model_that_knows_none_of_the_shared_facts_is_one_line(script, tmp_path,
                                                                monkeypatch, capsys):
    facts = ff.load_facts("organism:country")[:24]
    path = tmp_path / "country.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "template", "attribute", "relation"])
        for fact in facts:
            w.writerow([fact.subject, fact.template, fact.attribute, fact.relation])
    real = ff.load_model
    from factfind.testing.models import tiny_model

    def load(name, **kw):
        return tiny_model("gpt_neox") if name == "tiny" else real(name, **kw)

    monkeypatch.setattr(ff, "load_model", load)
    args = ["--models", "organism,tiny", "--facts", str(path), "--reference", "none",
            "--threads", "1", "--out", str(tmp_path / "reports"), "--cache",
            str(tmp_path / "runs")]
    with pytest.raises(ff.NotEnoughFactsError) as err:
        script["main"](args)
    message = str(err.value)
    tiny = tiny_model("gpt_neox").name
    assert f"{tiny} knows 0 of 24 scored" in message
    assert f"{tiny} knows none of the facts the others know" in message
    assert re.search(r"factfind-organism knows (\d+) of 24 scored", message)
    assert "Fix:" in message
    capsys.readouterr()
    assert ff.run_cli(script["main"], args, prog="universality") == 2
    err_lines = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert len(err_lines) == 1 and err_lines[0].startswith("universality: error: the models")


@organism
@pytest.mark.slow
def test_organism_end_to_end(script, tmp_path):
    args = ["--models", "organism", "--facts", "organism:country", "--reference",
            "organism:sport", "--n-pairs", "4", "--tracing-prompts", "2", "--prune-rounds",
            "3", "--known-target", "16", "--threads", "1", "--out", str(tmp_path / "reports"),
            "--cache", str(tmp_path / "runs")]
    out = script["main"](args)
    m = out.measures
    assert set(m["model"]) == {"factfind-organism", "factfind-organism (organism:sport)"}
    assert (m["n_layers"] == 4).all()
    have = m.loc[m["depth"].notna()]
    assert len(have) >= 8
    assert have["depth"].to_numpy() == pytest.approx(have["layer"].to_numpy() / 3, abs=1e-3)
    html = out.report.read_text()
    for section in ("universality-summary", "universality-models", "universality-findings",
                    "universality-early-site", "universality-late-site",
                    "universality-knockout-peak", "universality-effective-model-onset",
                    "universality-probe-onset", "universality-circuits", "config"):
        assert f'id="{section}"' in html, section
    assert html.count("<svg") >= 7  # overview + 5 curves + circuit size + kinds
    # the paragraph cites each model's number for each depth measure it has
    for r in have.to_dict("records"):
        cited = f"{r['depth']:.2f} (layer {r['layer']:.3g} of 4)"
        assert cited in html, (r["model"], r["measure"], cited)
    # each model's steps live in the folder `factfind fact-finding` opens for it
    ff_cfg = script["FF"]["Config"](model="organism", facts="organism:country")
    model = ff.load_model("organism")
    root = ff.RunCache.open(tmp_path / "runs", model=[model.name, model.revision,
                                                      model.fingerprint()],
                            dataset=ff.load_facts("organism:country").fingerprint(),
                            config=__import__("dataclasses").asdict(ff_cfg)).root
    assert out.ff_caches["factfind-organism"].root == root
    assert (root / "linear_probes.parquet").exists()  # the fact-finding step's own name
    assert any(p.name.startswith("attribute_scores-000000-") for p in root.iterdir())
    # this analysis' own steps live beside it, in a folder that fact-finding options leave be
    own = out.caches["factfind-organism"].root
    assert own != root and any(p.name.startswith("neuron_circuit-") for p in own.iterdir())
    again = script["main"](args)
    assert all(c.computed == [] for c in [*again.caches.values(), *again.ff_caches.values()])
    pd.testing.assert_frame_equal(again.measures, out.measures)


def test_factfind_universality_runs_the_script(capsys):
    from factfind.cli import main

    with pytest.raises(SystemExit) as done:
        main(["universality", "--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--models", "--facts", "--reference", "--n-pairs", "--known-target",
                 "--prune-rounds", "--agree-within"):
        assert flag in out
    assert "(default: smollm2-135m,gemma-3-270m)" in out and "(default: 16)" in out
