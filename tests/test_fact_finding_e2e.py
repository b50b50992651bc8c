"""The README's main job end to end on the organism: report, cache hits, resume, browser check."""

import re
import runpy
from pathlib import Path

import pytest

import factfind as ff
from factfind.graph import read_graphml
from factfind.organism import CHECKPOINT_DIR
from factfind.report.browser import Browser, find_chromium

pytestmark = pytest.mark.skipif(not (CHECKPOINT_DIR / "model.safetensors").exists(),
                                reason="organism checkpoint not built")
SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "fact_finding.py"
ARGS = ["--n-prompts", "8", "--tracing-prompts", "4", "--tracing-samples", "2", "--batch-size",
        "8"]


@pytest.fixture(scope="module")
def script():
    return runpy.run_path(str(SCRIPT), run_name="fact_finding_test")


@pytest.mark.slow
def test_report_cache_and_resume(script, tmp_path, monkeypatch, capfd):
    args = [*ARGS, "--out", str(tmp_path / "reports"), "--cache", str(tmp_path / "runs")]
    # a run that dies in the middle (in attention knockout) keeps what it finished
    real = ff.attention_knockout

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ff, "attention_knockout", boom)
    with pytest.raises(KeyboardInterrupt):
        script["main"](args)
    monkeypatch.setattr(ff, "attention_knockout", real)
    # first contact with a real model: causal tracing ran for 11 minutes without a sign of
    # life; every long step now draws a progress bar with an ETA on stderr
    err = capfd.readouterr().err
    for step in ("known facts", "causal tracing", "activation patching"):
        assert re.search(rf"{step}: +\d+%.*<\d\d:\d\d", err), step
    resumed = script["main"](args)
    hits, computed = resumed.cache.hits, resumed.cache.computed
    assert any(h.startswith("attribute_scores") for h in hits)
    assert any(h.startswith("causal_tracing[") for h in hits)
    assert any(h.startswith("activation_patching[") for h in hits)
    assert not any(c.startswith(("causal_tracing", "activation_patching")) for c in computed)
    assert "attention_knockout" in computed
    report = resumed.report
    assert report.exists() and report.with_suffix(".graphml").exists()
    html = report.read_text()
    for section in ("causal-tracing", "patching", "knockout", "circuit", "faithfulness",
                    "atp-star", "neuron-resample", "neuron-and", "mlp-norms", "neuron-dla",
                    "config"):
        assert f'id="{section}"' in html
    assert "head/neuron x role nodes, mean ablation" in html  # the neuron-level curve
    # a second run with the same configuration is served entirely from the cache
    again = script["main"](args)
    assert again.cache.computed == [] and len(again.cache.hits) >= 10
    graph = read_graphml(report.with_suffix(".graphml"))
    assert graph.graph.number_of_nodes() > 2 and graph.provenance.model == "factfind-organism"
    _check_in_browser(report)


def _check_in_browser(report: Path) -> None:
    """The real report in headless Chromium: no errors, no network, every figure, table and
    graph node rendered with a size."""
    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (CI installs Debian's chromium)")
    with Browser(timeout=60) as browser:
        page = browser.new_page()
        page.goto(report.as_uri())
        got = page.evaluate("""(() => {
          const size = (el) => { const r = el.getBoundingClientRect();
                                 return r.width > 0 && r.height > 0; };
          const figs = Array.from(document.querySelectorAll("figure.plot"));
          const tables = Array.from(document.querySelectorAll("table.sortable"));
          const nodes = Array.from(document.querySelectorAll("#circuit-graph svg .node"));
          return {figures: figs.length,
                  sized: figs.map((f) => f.querySelector(":scope > svg, :scope > img"))
                             .filter((g) => g && size(g)).length,
                  tables: tables.length,
                  rows: tables.filter((t) => t.tBodies[0].rows.length > 0).length,
                  nodes: nodes.length, sizedNodes: nodes.filter(size).length};
        })()""")
        page.evaluate("1")
        events = page.events()
    assert got["figures"] >= 8 and got["sized"] == got["figures"], got
    assert got["tables"] >= 5 and got["rows"] == got["tables"], got
    assert got["nodes"] > 2 and got["sizedNodes"] == got["nodes"], got
    bad = [e for e in events if e["method"] in ("Runtime.exceptionThrown",
                                                 "Page.javascriptDialogOpening")
           or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
           or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
           or (e["method"] == "Network.requestWillBeSent" and not e["params"]["request"][
               "url"].startswith(("file:", "data:")))]
    assert not bad, bad[:3]


def test_the_thread_count_does_not_name_the_cache(script, tmp_path):
    """--threads changes how fast a run goes, not what it computes: two runs that differ only
    in it share one cache folder; any other setting (here the seed) gets its own."""
    one, _ = script["parse_args"](["--threads", "1"])
    two, _ = script["parse_args"](["--threads", "2"])
    seed, _ = script["parse_args"](["--threads", "2", "--seed", "1"])
    key = script["cache_key"]
    assert "threads" not in key(one) and key(one) == key(two) != key(seed)
    roots = [ff.RunCache.open(tmp_path, model="m", dataset="d", config=key(c)).root
             for c in (one, two, seed)]
    assert roots[0] == roots[1] != roots[2]
