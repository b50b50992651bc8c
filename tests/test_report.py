"""Tests of factfind.report: the HTML is complete, inert (no network, every dataset string escaped),
deterministic and written atomically; and, in headless Chromium, it renders without console errors
or requests, its figures, tables and graph view have a size, and hovering a node shows its scores.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import pytest

from factfind import report as R
from factfind.report.browser import Browser, find_chromium

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SECTION_IDS = ("model", "dataset", "accuracy", "causal-tracing", "patching", "top-units", "circuit",
               "faithfulness", "config")
ROLES = ("subject_first", "subject", "subject_last", "relation", "final")


def _row(**kw: object) -> dict[str, object]:
    base = {"method": "m", "component": "mlp", "layer": 0, "head": pd.NA, "neuron": pd.NA,
            "position": pd.NA, "role": pd.NA, "prompt": pd.NA, "effect": 0.0, "ci_low": np.nan,
            "ci_high": np.nan, "n": 8}
    return base | kw


def _tidy(rows: list[dict[str, object]]) -> pd.DataFrame:
    """The dtypes of factfind.results.tidy: nullable integers and strings."""
    df = pd.DataFrame(rows)
    for col in ("layer", "head", "neuron", "position", "prompt", "n"):
        df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
    for col in ("method", "component", "role"):
        df[col] = df[col].astype("string")
    return df


def _frames() -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    # per prompt and position, as causal_tracing returns them; position 0 has no role
    tracing = _tidy([
        _row(method=f"causal_tracing/{w}", component=w, layer=layer, position=pos, prompt=p,
             role=pd.NA if pos == 0 else ROLES[pos - 1],
             effect=float(np.exp(-((layer - 2) ** 2)) * (pos == 3) + 0.1 * rng.random()))
        for w in ("mlp", "attn") for layer in range(6) for pos in range(6) for p in range(2)])
    patching = _tidy([
        _row(method="activation_patching/denoise", component=c, layer=layer, role=role,
             effect=float(rng.normal(0, 0.5)))
        for c in ("attn_out", "mlp_out") for layer in range(6) for role in ROLES])
    units = _tidy(
        [_row(method="atp", component="head_out", layer=layer, head=h, role="final",
              effect=float(rng.normal())) for layer in range(4) for h in range(4)]
        + [_row(method="atp", component="neurons", layer=layer, neuron=7 * i, role="subject_last",
                effect=float(rng.normal())) for layer in range(4) for i in range(30)]
        + [_row(method="atp", component="mlp_out", layer=1, role="subject_last", effect=9.0)])
    faith = pd.DataFrame([{"method": m, "size": k, "faithfulness": 1 - np.exp(-k / s)}
                          for m, s in (("eap", 4.0), ("atp", 6.0)) for k in (1, 2, 5, 10, 20, 50)])
    faith = faith.assign(ci_low=faith.faithfulness - 0.05, ci_high=faith.faithfulness + 0.05)
    prompts = pd.DataFrame({
        "subject": ["Michael Jordan", EVIL, "Serena Williams", "Eiffel Tower"],
        "relation": ["plays", "plays", "plays", "located in"],
        "prompt": ["Michael Jordan plays the sport of", f"{EVIL} plays the sport of",
                   "Serena Williams plays the sport of", "The Eiffel Tower is located in"],
        "target": [" basketball", " golf", " tennis", " Paris"],
        "correct": [True, False, True, True],
    })
    return {"tracing": tracing, "patching": patching, "units": units, "faith": faith,
            "prompts": prompts}


def _graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_node("embed@subject_last", kind="embed", layer=0, role="subject_last", score=1.0)
    g.add_node("L2.mlp@subject_last", kind="mlp", layer=2, role="subject_last", score=0.8)
    g.add_node("L4.h1@final", kind="head", layer=4, role="final", score=0.6, subject=EVIL)
    g.add_node("L4.h3@final", kind="head", layer=4, role="final", score=-0.2)
    g.add_node("logits", kind="logits", layer=6, role="final", score=1.0)
    g.add_edge("embed@subject_last", "L2.mlp@subject_last", score=0.9)
    g.add_edge("L2.mlp@subject_last", "L4.h1@final", score=0.7)
    g.add_edge("L2.mlp@subject_last", "L4.h3@final", score=-0.3)
    g.add_edge("L4.h1@final", "logits", score=0.65)
    g.add_edge("L4.h3@final", "logits", score=-0.2)
    return g


def _report() -> R.ReportData:
    f = _frames()
    return R.ReportData(title="Fact recall in a tiny model", subtitle=f"subjects such as {EVIL}",
                        sections=[
        R.model_section({"name": "tiny-gpt2", "revision": "abc123", "n_layers": 6, "d_model": 64}),
        R.dataset_section({"name": "toy facts", "fingerprint": "sha256:deadbeef", "n_prompts": 4,
                           "relations": ["plays", "located in"], "example subject": EVIL},
                          f["prompts"]),
        R.accuracy_section(R.accuracy_table(f["prompts"])),
        R.tracing_section(f["tracing"]),
        R.patching_section(f["patching"]),
        R.units_section(f["units"], k=10),
        R.circuit_section(_graph()),
        R.faithfulness_section(f["faith"]),
        R.config_section({"model": "tiny-gpt2", "seed": 0, "subject_filter": EVIL},
                         {"git_commit": "21f2a42", "note": EVIL}),
    ])


@pytest.fixture(scope="module")
def report_data() -> R.ReportData:
    return _report()


@pytest.fixture(scope="module")
def html(report_data: R.ReportData) -> str:
    return R.render_report(report_data)


# ----------------------------------------------------------------------------- pure Python


def test_every_section_figure_table_and_graph_is_present(html: str,
                                                         report_data: R.ReportData) -> None:
    for sid in SECTION_IDS:
        assert f'<section id="{sid}"' in html
        assert f'href="#{sid}"' in html  # listed in the contents
    n_figures = sum(len(s.figures) for s in report_data.sections)
    n_tables = sum(len(s.tables) for s in report_data.sections)
    # 1 accuracy bar + 2 tracing + 2 patching heatmaps + 2 top-unit bars + 1 faithfulness curve
    assert n_figures == 8
    assert n_tables == 6
    assert html.count('<figure class="plot"') == n_figures
    assert html.count('<table class="sortable">') == n_tables
    assert 'id="circuit-graph"' in html
    data = _explorer_data(html)
    assert len(data["nodes"]["id"]) == 5 and len(data["edges"]["effect"]) == 5


def _explorer_data(html: str, graph_id: str = "circuit-graph") -> dict:
    """The JSON the explorer of ``graph_id`` draws."""
    m = re.search(rf'id="{graph_id}".*?<script type="application/json" class="ffx-data">'
                  r"(.*?)</script>", html, re.DOTALL)
    assert m is not None
    return json.loads(m.group(1))


def test_no_network_references_and_a_strict_content_security_policy(html: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//|@import", html, re.IGNORECASE)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp and "default-src 'none'" in csp.group(1)
    # the two scripts (the vendored d3, ours) are pinned by their hashes, so an injected script
    # could not run; the graph's JSON is data (type application/json), never executed
    scripts = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    assert len(scripts) == 2 and scripts[0].startswith("/*! d3 7.9.0 | ISC licence")
    digests = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in scripts]
    assert f"script-src 'sha256-{digests[0]}' 'sha256-{digests[1]}';" in csp.group(1)


def test_every_dataset_string_is_escaped(html: str) -> None:
    assert EVIL not in html
    assert html.count("<script") == 3  # d3, ours, the graph's JSON
    # title, subtitle, facts, sample table (2 cells), config JSON, provenance
    assert html.count(ESCAPED) >= 6
    # in the graph's JSON, < and > are escapes, so the string cannot close the element
    assert _explorer_data(html)["extra"]["2"]["subject"] == EVIL
    assert '"subject":"\\u003cscript\\u003ealert(1)\\u003c/script\\u003e"' in html


def test_svg_figures_strings_escaped_by_matplotlib() -> None:
    df = pd.DataFrame([_row(layer=0, role="final", effect=1.0),
                       _row(layer=1, role=EVIL, effect=2.0)])
    fig = R.heatmap(df, title=EVIL)
    assert fig.svg is not None and EVIL not in fig.svg and ESCAPED in fig.svg


def test_render_is_deterministic_with_unique_ids(html: str) -> None:
    again = R.render_report(_report())  # fresh frames, fresh figures
    assert again == html
    ids = re.findall(r'\sid="([^"]+)"', html)
    duplicates = {i for i in ids if ids.count(i) > 1}
    assert not duplicates


def test_heatmap_orders_roles_and_prefers_aggregate_rows() -> None:
    rows = [_row(layer=1, role=r, effect=0.5) for r in reversed(ROLES)]
    rows += [_row(layer=1, role="final", prompt=p, effect=9.0) for p in range(3)]  # per prompt
    fig = R.heatmap(pd.DataFrame(rows), annotate=True)
    assert fig.svg is not None
    labels = [m for m in re.findall(r">([a-z_]+)</text>", fig.svg) if m in ROLES]
    assert labels == list(ROLES)  # tokens in prompt order, top to bottom
    assert ">0.50<" in fig.svg and ">9.00<" not in fig.svg
    # without aggregate rows, per-prompt rows are averaged
    fig = R.heatmap(pd.DataFrame([_row(layer=0, role="final", prompt=p, effect=float(p))
                                  for p in range(3)]), annotate=True)
    assert fig.svg is not None and ">1.00<" in fig.svg


def test_top_units_site_labels_and_order() -> None:
    df = pd.DataFrame([
        _row(component="head_out", layer=3, head=2, role="final", effect=0.2),
        _row(component="head_out", layer=1, head=0, role="final", effect=-0.9),
        _row(component="neurons", layer=4, neuron=311, role="subject_last", effect=0.5),
        _row(component="mlp_out", layer=5, position=7, effect=5.0),
    ])
    heads = R.top_units(df, "head", k=5)
    assert heads["site"].tolist() == ["L1.h0@final", "L3.h2@final"]
    assert heads["effect"].tolist() == [-0.9, 0.2]
    assert R.top_units(df, "neuron")["site"].tolist() == ["L4.n311@subject_last"]
    assert R.site_label(df.iloc[3].to_dict()) == "L5.mlp_out@pos7"
    with pytest.raises(ValueError, match="unit"):
        R.top_units(df, "layer")


def test_accuracy_table_wilson_intervals() -> None:
    df = pd.DataFrame({"relation": ["a", "a", "a", "b"], "correct": [True, True, False, False]})
    t = R.accuracy_table(df)
    assert t["relation"].tolist() == ["a", "b", "all"]
    assert t["n"].tolist() == [3, 1, 4] and t["n_correct"].tolist() == [2, 0, 2]
    # Wilson 95% interval of 2/3, computed by hand: (0.2077, 0.9385)
    assert t.loc[0, "ci_low"] == pytest.approx(0.20765, abs=1e-4)
    assert t.loc[0, "ci_high"] == pytest.approx(0.93851, abs=1e-4)
    assert t.loc[1, "accuracy"] == 0.0 and t.loc[1, "ci_low"] == 0.0


def test_tables_limit_rows_and_carry_numeric_sort_keys() -> None:
    df = pd.DataFrame({"name": [f"x{i}" for i in range(30)], "effect": np.linspace(0, 1, 30),
                       "head": pd.array([1, None] * 15, dtype="Int64")})
    section = R.Section(id="t", title="T", tables=[R.Table(df, caption="cap", max_rows=10)])
    html = R.render_report(R.ReportData(title="t", sections=[section]))
    assert html.count("<tr><td") == 10
    assert "Showing 10 of 30 rows." in html
    assert f'data-sort="{float(df.effect[1])!r}"' in html
    assert '<td class="num" data-sort=""></td>' in html  # <NA> is an empty cell, sorted last


def test_graph_view_of_circuit_graph_attributes() -> None:
    # the attributes factfind.graph.CircuitGraph sets: embed at layer -1, index None, role "all"
    g = nx.DiGraph()
    for node, kind, layer, role in (("embed@subject_last", "embed", -1, "subject_last"),
                                    ("L0.resid@all", "resid", 0, "all"),
                                    ("L1.n5@subject_last", "neuron", 1, "subject_last"),
                                    ("logits@final", "logits", 2, "final")):
        g.add_node(node, kind=kind, layer=layer, index=5 if kind == "neuron" else None,
                   role=role, score=0.5, abs_score=0.5, sign=1, method="atp")
    g.add_edge("embed@subject_last", "L1.n5@subject_last", score=0.0, method="structural")
    g.add_edge("L1.n5@subject_last", "logits@final", score=float("nan"))
    view = R.graph_view(g)
    data = json.loads(view.data)  # valid JSON: NaN is gone
    assert data["lanes"] == ["subject_last", "final", "all"]  # unknown roles after known ones
    assert data["nodes"]["index"] == [None, None, 5, None]
    assert data["edges"]["effect"] == [0.0, 0.0] and "NaN" not in view.data
    assert data["edges"]["method"] == ["structural", None]
    assert data["node_method"] == "atp" and data["n_layers"] == 2


def test_graph_view_takes_a_digraph_or_a_wrapper() -> None:
    g = _graph()

    class Wrapper:  # like factfind.graph.CircuitGraph
        graph = g

    assert R.graph_view(Wrapper()).data == R.graph_view(g).data
    view = R.graph_view(g)
    assert (view.n_nodes, view.n_edges) == (5, 5)
    data = json.loads(view.data)
    # lanes in role order; edges strongest first
    assert data["lanes"] == ["subject_last", "final"]
    assert data["edges"]["effect"] == [0.9, 0.7, 0.65, -0.3, -0.2]
    i = data["nodes"]["id"].index("L4.h3@final")
    assert (data["nodes"]["kind"][i], data["nodes"]["layer"][i], data["nodes"]["score"][i]) == (
        "head", 4, -0.2)
    with pytest.raises(TypeError):
        R.graph_view({"not": "a graph"})


def test_png_figures_are_data_uris() -> None:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure()
    fig.subplots().plot([0, 1], [1, 0])
    png = R.from_matplotlib(fig, format="png", caption="c", alt="a line")
    html = R.render_report(R.ReportData(title="t", sections=[R.Section(id="s", title="S",
                                                                       figures=[png])]))
    assert '<img src="data:image/png;base64,iVBOR' in html and 'alt="a line"' in html


def test_validation() -> None:
    with pytest.raises(ValueError, match="section id"):
        R.Section(id="Bad Id", title="x")
    with pytest.raises(ValueError, match="duplicate"):
        R.ReportData(title="t", sections=[R.Section(id="a", title="A"),
                                          R.Section(id="a", title="B")])
    with pytest.raises(ValueError, match="exactly one"):
        R.Figure()
    for bad in ("<svg><script>x()</script></svg>", '<svg onload="x()"></svg>',
                '<svg><image href="https://example.org/x.png"/></svg>'):
        with pytest.raises(ValueError, match="script"):
            R.Figure(svg=bad)
    with pytest.raises(ValueError, match="max_rows"):
        R.Table(pd.DataFrame(), max_rows=0)


def test_write_report_is_atomic_and_refuses_to_overwrite(tmp_path: Path, html: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = R.write_report(html, tmp_path / "sub" / "run.html")
    assert path.read_text(encoding="utf-8") == html
    with pytest.raises(FileExistsError):
        R.write_report("other", path)
    assert path.read_text(encoding="utf-8") == html
    R.write_report("new", path, overwrite=True)
    assert path.read_text(encoding="utf-8") == "new"

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        R.write_report("half", path, overwrite=True)
    assert path.read_text(encoding="utf-8") == "new"  # the old report is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.html"]  # no temp file left


# ----------------------------------------------------------------------------- in a real browser

_PAGE_CHECKS = """(() => {
  const size = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const figures = Array.from(document.querySelectorAll("figure.plot"));
  const tables = Array.from(document.querySelectorAll("table.sortable"));
  const nodes = Array.from(document.querySelectorAll("#circuit-graph svg .node"));
  return {
    sections: Array.from(document.querySelectorAll("main > section")).map((s) => s.id),
    figures: figures.length,
    figuresWithSize: figures.map((f) => f.querySelector(":scope > svg, :scope > img"))
      .filter((g) => g && size(g)).length,
    tables: tables.length,
    tablesWithRows: tables.filter((t) => t.tBodies[0].rows.length > 0 && size(t)).length,
    nodes: nodes.length,
    nodesWithSize: nodes.filter(size).length,
    text: document.body.innerText,
    scripts: document.scripts.length,
  };
})()"""


@pytest.mark.browser
def test_report_in_headless_chromium(tmp_path: Path, report_data: R.ReportData) -> None:
    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (CI installs Debian's chromium; "
                    "apt-get install chromium)")
    path = R.write_report(report_data, tmp_path / "report.html")
    n_figures = sum(len(s.figures) for s in report_data.sections)
    n_tables = sum(len(s.tables) for s in report_data.sections)
    with Browser(timeout=30) as browser:
        page = browser.new_page()
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        page.goto(path.as_uri())

        got = page.evaluate(_PAGE_CHECKS)
        assert got["sections"] == list(SECTION_IDS)
        assert got["figures"] == got["figuresWithSize"] == n_figures
        assert got["tables"] == got["tablesWithRows"] == n_tables
        assert got["nodes"] == got["nodesWithSize"] == 5
        assert EVIL in got["text"]  # shown as literal text
        assert got["scripts"] == 3  # d3, ours, the graph's JSON

        # hover over a node with the real mouse pointer: the details panel shows its scores
        box = page.evaluate("""(() => {
          const n = document.querySelector('#circuit-graph svg .node[data-id="L4.h1@final"]');
          n.scrollIntoView({block: "center", behavior: "instant"});
          const r = n.getBoundingClientRect();
          return {x: r.x + r.width / 2, y: r.y + r.height / 2};
        })()""")
        page.mouse_move(box["x"], box["y"])
        details = page.evaluate("document.querySelector('#circuit-graph .graph-details').innerText")
        assert "L4.h1@final" in details and "score" in details and "0.6000" in details
        assert EVIL in details and "L2.mlp@subject_last" in details  # its attribute and input
        page.screenshot(tmp_path / "graph.png")
        # a synthetic mouseover on an edge shows the edge
        details = page.evaluate("""(() => {
          const e = document.querySelector('#circuit-graph svg .edge');
          e.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
          return document.querySelector('#circuit-graph .graph-details').innerText;
        })()""")
        assert "→" in details and "effect" in details

        # clicking a numeric header sorts numerically, clicking again reverses
        order = page.evaluate("""(() => {
          const table = document.querySelector("#top-units-table0 table");
          const heads = Array.from(table.tHead.rows[0].cells);
          const col = heads.findIndex((th) => th.innerText.startsWith("effect"));
          const values = () => Array.from(table.tBodies[0].rows)
            .map((r) => Number(r.cells[col].dataset.sort));
          const button = table.tHead.rows[0].cells[col].querySelector("button");
          button.click(); const up = values(); button.click(); const down = values();
          return {up, down};
        })()""")
        assert order["up"] == sorted(order["up"]) and order["down"] == sorted(order["down"])[::-1]

        page.evaluate("window.scrollTo({top: 0, behavior: \"instant\"})")
        page.screenshot(tmp_path / "top.png")
        page.screenshot(tmp_path / "full.png", full_page=True)

        page.evaluate("1")  # a round trip, so events sent before it have arrived
        events = page.events()

    def of(method: str) -> list[dict]:
        return [e["params"] for e in events if e["method"] == method]

    console = [e for e in of("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
    log = [e["entry"] for e in of("Log.entryAdded") if e["entry"]["level"] == "error"]
    assert not console and not of("Runtime.exceptionThrown") and not log, (console, log)
    remote = [e["request"]["url"][:80] for e in of("Network.requestWillBeSent")
              if not e["request"]["url"].startswith(("file:", "data:"))]
    assert not remote
    assert not of("Page.javascriptDialogOpening")
    assert (tmp_path / "full.png").stat().st_size > 10_000
