"""The circuit explorer in real headless Chromium, driven the way a reader uses it.

Playwright for Python drives Debian's ``/usr/bin/chromium`` (``launch_playwright``: never a
downloaded browser build). The page is the committed organism report
(``reports/fact_finding-organism-organism_sport.html``, written by ``make report``); what each
test expects is computed from the circuit saved beside it (``.json``), not read from the page.
The mouse clicks, drags and scrolls, the keyboard types; the page is only read, never poked.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from factfind import report as R
from factfind.graph import read_json
from factfind.testing.graphs import synthetic_graph

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "fact_finding-organism-organism_sport.html"
CIRCUIT = REPORT.with_suffix(".json")
VIEW = "#circuit-graph"


@pytest.fixture(scope="module")
def browser(playwright_browser: Any) -> Any:
    """The shared Chromium of ``conftest.playwright_browser``, under this module's name."""
    return playwright_browser


class Watched:
    """A page with every request, console message and page error it caused."""

    def __init__(self, browser: Any, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900},
                                     accept_downloads=True)
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.goto(url)
        self.page.locator(f".ffx[data-ready]{VIEW}").wait_for(timeout=20_000)
        self.view = self.page.locator(VIEW)
        self.view.scroll_into_view_if_needed()

    def count(self) -> dict[str, int]:
        c = self.view.locator(".ffx-count")
        return {"nodes": int(c.get_attribute("data-nodes") or -1),
                "edges": int(c.get_attribute("data-edges") or -1),
                "drawn_nodes": self.view.locator("path.node").count(),
                "drawn_edges": self.view.locator("path.edge").count()}

    def search(self, text: str) -> None:
        box = self.view.locator(".ffx-search")
        box.click()
        box.fill("")
        box.type(text)
        box.press("Enter")

    def panel(self) -> str:
        return self.view.locator(".ffx-panel").inner_text()


@pytest.fixture
def page(browser: Any) -> Iterator[Watched]:
    w = Watched(browser, REPORT.as_uri())
    yield w
    w.page.close()
    # every test: nothing but the file itself (and a download's blob) was requested, and the
    # console stayed clean
    assert all(u.startswith(("file:", "blob:", "data:")) for u in w.requests), w.requests
    assert w.requests and w.requests[0] == REPORT.as_uri()
    assert not w.problems, w.problems


@pytest.fixture(scope="module")
def circuit() -> Any:
    return read_json(CIRCUIT)


def test_the_explorer_draws_every_node_of_the_circuit(page: Watched, circuit: Any) -> None:
    got = page.count()
    n, m = len(circuit), circuit.graph.number_of_edges()
    assert got["nodes"] == got["drawn_nodes"] == n
    assert got["edges"] == got["drawn_edges"] == m  # a small graph opens with every edge
    assert page.view.locator(".ffx-count").inner_text().startswith(f"{n} nodes · {m} of {m}")
    boxes = [page.view.locator("path.node").nth(i).bounding_box() for i in range(n)]
    svg = page.view.locator("svg.ffx-svg").bounding_box()
    assert svg is not None and all(b and b["width"] > 2 and b["height"] > 2 for b in boxes)
    assert all(b and svg["x"] <= b["x"] and b["x"] + b["width"] <= svg["x"] + svg["width"]
               for b in boxes)  # the first view fits the whole circuit
    # the layer axis runs from the embeddings to the logits
    labels = [t.strip() for t in page.view.locator(".layer-label").all_text_contents()]
    assert labels[0] == "embed" and labels[-1] == "logits" and "L0" in labels


def test_the_threshold_slider_shows_the_edges_above_it(page: Watched, circuit: Any) -> None:
    effects = sorted((abs(d["score"]) for _, _, d in circuit.graph.edges(data=True)),
                     reverse=True)
    slider = page.view.locator(".ffx-threshold")
    box = slider.bounding_box()
    assert box is not None
    # drag the thumb from the left end to 60% of the track, as a reader would
    y = box["y"] + box["height"] / 2
    page.page.mouse.move(box["x"] + 4, y)
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=8)
    page.page.mouse.up()
    t = float(page.view.locator(".ffx-threshold-value").get_attribute("data-value") or "nan")
    expected = sum(e >= t for e in effects)
    got = page.count()
    assert 0 < expected < len(effects), (t, effects)
    assert got["edges"] == got["drawn_edges"] == expected
    assert page.view.locator(".ffx-threshold-value").inner_text() == f"{t:.4g}" or math.isclose(
        float(page.view.locator(".ffx-threshold-value").inner_text()), t, rel_tol=1e-3)
    # the keyboard moves it too: one step right hides no more edges than are above the new value
    slider.press("ArrowRight")
    t2 = float(page.view.locator(".ffx-threshold-value").get_attribute("data-value") or "nan")
    assert t2 > t and page.count()["edges"] == sum(e >= t2 for e in effects)
    # top-k caps what the threshold lets through
    slider.press("Home")
    page.view.locator(".ffx-topk").fill("5")
    assert page.count()["drawn_edges"] == 5
    drawn = [abs(float(page.view.locator("path.edge").nth(i).get_attribute("data-effect") or 0))
             for i in range(5)]
    assert sorted(drawn, reverse=True) == pytest.approx(effects[:5])


def test_clicking_a_node_shows_its_panel_with_its_score(page: Watched, circuit: Any) -> None:
    inner = [(n, d) for n, d in circuit.graph.nodes(data=True)
             if d["kind"] not in ("embed", "logits")]
    node, attrs = max(inner, key=lambda nd: abs(nd[1]["score"]))
    page.view.locator(f'path.node[data-id="{node}"]').click()
    assert page.view.locator(".ffx-panel h3").inner_text() == node
    text = page.panel()
    score = float(text.split("score\n", 1)[1].split("\n", 1)[0])
    assert math.isclose(score, attrs["score"], rel_tol=1e-3)
    assert f"method\n{attrs['method']}" in text
    # its strongest input, as listed, is its strongest incoming edge; clicking it follows it
    ins = sorted(circuit.graph.in_edges(node, data=True), key=lambda e: -abs(e[2]["score"]))
    first = page.view.locator(".ffx-panel .ffx-links").first.locator("button").first
    assert first.locator(".id").inner_text() == ins[0][0]
    first.click()
    assert page.view.locator(".ffx-panel h3").inner_text() == ins[0][0]
    assert page.view.locator(f'path.node.active[data-id="{ins[0][0]}"]').count() == 1


def test_hovering_previews_a_node_and_the_wheel_and_a_drag_move_the_view(page: Watched) -> None:
    node = page.view.locator("path.node.kind-mlp").first
    node.hover()
    assert page.view.locator(".ffx-panel h3").inner_text() == node.get_attribute("data-id")
    view = page.view.locator("g.ffx-view")
    before = view.get_attribute("transform")
    svg = page.view.locator("svg.ffx-svg").bounding_box()
    assert svg is not None
    page.page.mouse.move(svg["x"] + svg["width"] / 2, svg["y"] + svg["height"] / 2)
    page.page.mouse.wheel(0, -400)  # zoom in
    page.page.wait_for_function(
        f"document.querySelector('{VIEW} g.ffx-view').getAttribute('transform') !== {before!r}")
    zoomed = view.get_attribute("transform")
    assert zoomed is not None and float(zoomed.split("scale(")[1].rstrip(")")) > float(
        (before or "scale(1)").split("scale(")[1].rstrip(")"))
    page.page.mouse.move(svg["x"] + 60, svg["y"] + svg["height"] - 20)
    page.page.mouse.down()
    page.page.mouse.move(svg["x"] + 260, svg["y"] + svg["height"] - 60, steps=5)
    page.page.mouse.up()
    assert view.get_attribute("transform") != zoomed  # panned


def test_search_finds_a_node_by_id(page: Watched, circuit: Any) -> None:
    target = sorted(circuit.graph.nodes)[len(circuit) // 2]
    page.search(target)
    assert page.view.locator(".ffx-panel h3").inner_text() == target
    assert page.view.locator(f'path.node.active[data-id="{target}"]').count() == 1
    # a part of an id lists every match
    part = target.split("@")[1]
    page.search(f"@{part}")
    n = sum(1 for v in circuit.graph.nodes if f"@{part}" in v)
    assert page.view.locator(".ffx-search-count").inner_text() == (
        f"{n} match{'' if n == 1 else 'es'}")
    assert page.view.locator("path.node.match").count() == n


def test_pin_and_export_give_node_link_json_that_loads_back(page: Watched, circuit: Any,
                                                            tmp_path: Path) -> None:
    heads = sorted(n for n, d in circuit.graph.nodes(data=True) if d["kind"] == "head")[:3]
    chosen = [*heads, "logits@final"]
    for node in chosen:
        page.search(node)
        page.view.locator(".ffx-panel .ffx-pin").click()
    assert page.view.locator(".ffx-pin-count").inner_text() == f"{len(chosen)} pinned"
    with page.page.expect_download() as download:
        page.view.locator(".ffx-export").click()
    path = tmp_path / "pinned.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["directed"] is True and {n["id"] for n in data["nodes"]} == set(chosen)
    loaded = read_json(path)
    expected = circuit.graph.subgraph(chosen)
    assert dict(loaded.graph.nodes(data=True)) == dict(expected.nodes(data=True))
    assert {(u, v): d for u, v, d in loaded.graph.edges(data=True)} == {
        (u, v): d for u, v, d in expected.edges(data=True)}
    assert loaded.provenance == circuit.provenance
    # the same JSON is shown for copying
    assert json.loads(page.view.locator(".ffx-export-text").input_value()) == data
    # "pinned only" shows the pinned subgraph alone
    page.view.locator(".ffx-pinned-only").check()
    got = page.count()
    assert got["drawn_nodes"] == len(chosen)
    assert got["drawn_edges"] == expected.number_of_edges()


def test_a_supernode_sums_its_members_edges(page: Watched, circuit: Any) -> None:
    members = sorted(u for u, _ in circuit.graph.in_edges("logits@final"))[:2]
    for node in members:
        page.search(node)
        page.view.locator(".ffx-panel .ffx-pin").click()
    page.view.locator(".ffx-group-name").fill("movers")
    page.view.locator(".ffx-group").click()
    got = page.count()
    assert got["drawn_nodes"] == len(circuit) - 1
    assert page.view.locator('path.node.kind-group[data-id="movers"]').count() == 1
    assert page.view.locator(".ffx-panel h3").inner_text() == "movers"
    edge = page.view.locator('path.edge[data-sender="movers"][data-receiver="logits@final"]')
    total = sum(circuit.graph.edges[m, "logits@final"]["score"] for m in members)
    assert float(edge.get_attribute("data-effect") or "nan") == pytest.approx(total)
    page.view.locator(".ffx-panel .ffx-ungroup").click()
    assert page.count()["drawn_nodes"] == len(circuit)


@pytest.mark.parametrize("layers", [18, 30, 80])
def test_the_layout_reads_on_deep_models(browser: Any, tmp_path: Path, layers: int) -> None:
    graph = synthetic_graph(12 * layers, 40 * layers, n_layers=layers, seed=layers)
    path = R.write_report(R.ReportData(title=f"{layers} layers", sections=[
        R.Section(id="circuit", title="Circuit", graphs=[R.graph_view(graph)])]),
        tmp_path / "deep.html")
    w = Watched(browser, path.as_uri())
    got = w.page.evaluate("""() => {
      const root = document.querySelector('#circuit-graph');
      const svg = root.querySelector('svg.ffx-svg').getBoundingClientRect();
      const shown = (e) => e.style.display !== 'none';
      const labels = [...root.querySelectorAll('.layer-label')].filter(shown)
        .map((e) => [e.textContent, e.getBoundingClientRect()]);
      const overlaps = labels.slice(1).filter(([, b], i) => b.left < labels[i][1].right).length;
      const lanes = [...root.querySelectorAll('.lane-label')].filter(shown)
        .map((e) => e.getBoundingClientRect());
      const laneOverlaps = lanes.slice(1).filter((b, i) => b.top < lanes[i].bottom).length;
      const cut = labels.filter(([, b]) => b.left < svg.left || b.right > svg.right).length;
      const nodes = [...root.querySelectorAll('path.node')].map((e) => e.getBoundingClientRect());
      const outside = nodes.filter((b) => b.left < svg.left || b.right > svg.right
        || b.top < svg.top || b.bottom > svg.bottom).length;
      // two nodes overlap when their boxes cross by more than the stroke
      let clashes = 0;
      const sorted = nodes.slice().sort((a, b) => a.left - b.left);
      for (let i = 0; i < sorted.length; i++) {
        for (let j = i + 1; j < sorted.length && sorted[j].left < sorted[i].right - 1; j++) {
          const a = sorted[i], b = sorted[j];
          if (Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 1
              && Math.min(a.right, b.right) - Math.max(a.left, b.left) > 1) clashes++;
        }
      }
      return {labels: labels.map(([t]) => t), overlaps, outside, clashes, n: nodes.length,
              lanes: lanes.length, laneOverlaps, cut};
    }""")
    w.page.close()
    assert got["n"] == len(graph)
    assert got["labels"][0] == "embed" and got["labels"][-1] == "logits"
    assert len(got["labels"]) >= 6  # some layers are named, thinned so that none overlap
    assert got["overlaps"] == 0 and got["outside"] == 0 and got["clashes"] == 0, got
    assert got["lanes"] == 5 and got["laneOverlaps"] == 0 and got["cut"] == 0, got  # 5 roles
    assert not w.problems


def test_a_graph_of_tied_edges_opens_on_top_k(browser: Any, tmp_path: Path) -> None:
    # node-score graphs (to_graph of a patching result) carry every structural edge at effect 0
    graph = synthetic_graph(300, 1500, n_layers=6)
    for _, _, d in graph.graph.edges(data=True):
        d.update(score=0.0, abs_score=0.0, sign=0, method="structural")
    path = R.write_report(R.ReportData(title="ties", sections=[
        R.Section(id="circuit", title="Circuit", graphs=[R.graph_view(graph)])]),
        tmp_path / "ties.html")
    w = Watched(browser, path.as_uri())
    first = w.count()["drawn_edges"]
    topk = w.view.locator(".ffx-topk").input_value()
    w.view.locator(".ffx-topk").fill("")  # a reader clears the box: every edge
    every = w.count()["drawn_edges"]
    w.page.close()
    assert (first, topk, every) == (400, "400", 1500)
    assert not w.problems


@pytest.mark.slow
def test_a_10k_node_graph_is_interactive_within_two_seconds(browser: Any,
                                                            tmp_path: Path) -> None:
    graph = synthetic_graph(10_000, 50_000, n_layers=80)
    path = R.write_report(R.ReportData(title="10k", sections=[
        R.Section(id="circuit", title="Circuit", graphs=[R.graph_view(graph)])]),
        tmp_path / "big.html")
    w = Watched(browser, path.as_uri())
    ready_ms = float(w.view.get_attribute("data-ready-ms") or "nan")
    got = w.count()
    assert got["drawn_nodes"] == 10_000
    assert 400 <= got["drawn_edges"] < 500  # the initial view draws the strongest edges
    # the rest appear as the threshold moves
    w.view.locator(".ffx-threshold").press("Home")
    assert w.count()["drawn_edges"] == 50_000
    w.page.close()
    assert ready_ms <= 2000, f"interactive after {ready_ms:.0f} ms"
    assert not w.problems


def test_feature_nodes_sit_where_their_dictionary_reads(browser: Any, tmp_path: Path) -> None:
    from factfind.graph import CircuitGraph, Node, Provenance

    g = CircuitGraph(Provenance(model="m", revision=None, dataset="d", method="attribution"))
    nodes = [Node("embed", -1, None, "final"), Node("head", 0, 0, "final"),
             Node("feature", 0, 1, "final", "att"), Node("feature", 0, 3, "final", "tc"),
             Node("error", 0, None, "final", "tc"), Node("logits", 1, None, "final")]
    for i, n in enumerate(nodes):
        g.add_node(n, score=0.1 * (i + 1))
    for u, v in itertools.pairwise(nodes):
        g.add_edge(u, v, score=0.5)
    path = R.write_report(R.ReportData(title="features", sections=[
        R.circuit_section(g)]), tmp_path / "features.html")
    w = Watched(browser, path.as_uri())
    x = {n.id: (w.view.locator(f'path.node[data-id="{n.id}"]').bounding_box() or {})["x"]
         for n in nodes}
    drawn = w.count()["drawn_nodes"]
    w.search("L0.tc.f3@final")
    text = w.panel()
    w.page.close()
    assert drawn == len(nodes)
    assert x["L0.att.f1@final"] < x["L0.tc.f3@final"]  # attention's stage, then the MLP's
    assert abs(x["L0.h0@final"] - x["L0.att.f1@final"]) < abs(x["L0.h0@final"]
                                                              - x["L0.tc.f3@final"])
    assert "kind\nfeature" in text and "dictionary\ntc" in text
    assert not w.problems


def _dense_feature_graph(n_dense: int = 40, n_layers: int = 6) -> tuple[Any, list[Any], Any]:
    """A feature graph with ``n_dense`` transcoder features in one (layer 1, relation) cell,
    their |scores| shuffled against their indexes, and a few features at other layers."""
    import numpy as np

    from factfind.graph import CircuitGraph, Node, Provenance

    rng = np.random.default_rng(7)
    g = CircuitGraph(Provenance(model="m", revision=None, dataset="d", method="attribution"))
    roles = ("subject_last", "relation", "final")
    embeds = [Node("embed", -1, None, r) for r in roles]
    logits = Node("logits", n_layers, None, "final")
    dense = [Node("feature", 1, i, "relation", "tc") for i in range(n_dense)]
    others = [Node("feature", layer, 100 + layer, role, "tc")
              for layer in (0, 3, n_layers - 1) for role in roles]
    scores = rng.permutation(np.linspace(0.05, 2.0, n_dense))
    for n in [*embeds, logits]:
        g.add_node(n, score=0.0)
    for n, s in zip(dense, scores, strict=True):
        g.add_node(n, score=float(s))
    for n in others:
        g.add_node(n, score=0.3)
    for n in dense + others:
        g.add_edge(embeds[roles.index(n.role)], n, score=0.1 + 0.01 * (n.index or 0))
        g.add_edge(n, logits, score=0.2)
    return g, dense, scores


DENSE_JS = """() => {
  const root = document.querySelector('#circuit-graph');
  const svg = root.querySelector('svg.ffx-svg').getBoundingClientRect();
  const gutter = +root.querySelector('.ffx-lane-axis rect').getAttribute('width');
  const nodes = [...root.querySelectorAll('path.node')].map((e) => {
    const b = e.getBoundingClientRect();
    return {id: e.dataset.id, left: b.left, right: b.right, top: b.top, bottom: b.bottom,
            x: (b.left + b.right) / 2, y: (b.top + b.bottom) / 2};
  });
  const clashes = [];
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const a = nodes[i], b = nodes[j];
      if (Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 0.5
          && Math.min(a.right, b.right) - Math.max(a.left, b.left) > 0.5) {
        clashes.push([a.id, b.id]);
      }
    }
  }
  return {nodes, clashes, plotLeft: svg.left + gutter, plotWidth: svg.width - gutter,
          svgHeight: svg.height};
}"""


def _drawn_dense(browser: Any, tmp_path: Path, g: Any) -> dict[str, Any]:
    """The node boxes of ``g``'s explorer, as drawn: none overlap, all lie within the plot,
    they span >= 70% of its width, and the drawing is at most 900 px tall."""
    path = R.write_report(R.ReportData(title="dense", sections=[
        R.Section(id="circuit", title="Circuit", graphs=[R.graph_view(g)])]),
        tmp_path / "dense.html")
    w = Watched(browser, path.as_uri())
    got = w.page.evaluate(DENSE_JS)
    w.page.close()
    assert not w.problems
    assert len(got["nodes"]) == len(g) and not got["clashes"], got["clashes"][:5]
    left = min(n["left"] for n in got["nodes"])
    right = max(n["right"] for n in got["nodes"])
    assert right - left >= 0.7 * got["plotWidth"], (left, right, got["plotWidth"])
    assert got["plotLeft"] - 1 <= left and right <= got["plotLeft"] + got["plotWidth"] + 1
    assert got["svgHeight"] <= 900
    return got


def test_a_dense_cell_is_a_grid_of_nodes_that_never_overlap(browser: Any,
                                                            tmp_path: Path) -> None:
    g, dense, scores = _dense_feature_graph()
    nodes = {n["id"]: n for n in _drawn_dense(browser, tmp_path, g)["nodes"]}
    cell = [nodes[n.id] for n in dense]
    # wrapped into several sub-columns and rows, not one tall column: the cell is at most
    # half as tall as its nodes stacked one above another
    xs = {round(n["x"]) for n in cell}
    ys = {round(n["y"]) for n in cell}
    height = max(n["bottom"] for n in cell) - min(n["top"] for n in cell)
    one = max(n["bottom"] - n["top"] for n in cell)
    assert len(xs) >= 2 and len(ys) >= 2 and height <= 0.5 * len(cell) * one, (xs, ys, height)
    # the strongest sit nearest the cell's centre: distance grows with falling |score|
    cx = (min(n["left"] for n in cell) + max(n["right"] for n in cell)) / 2
    cy = (min(n["top"] for n in cell) + max(n["bottom"] for n in cell)) / 2
    dist = [math.hypot(nodes[n.id]["x"] - cx, nodes[n.id]["y"] - cy) for n in dense]
    by_strength = [d for _, d in sorted(zip(scores.tolist(), dist, strict=True), reverse=True)]
    assert max(by_strength[:4]) < min(by_strength[-4:]), by_strength
    assert by_strength[0] == min(by_strength)


@pytest.mark.parametrize(("n_dense", "n_layers"), [(120, 3), (400, 18)])
def test_denser_cells_still_never_overlap_and_fill_the_width(browser: Any, tmp_path: Path,
                                                             n_dense: int,
                                                             n_layers: int) -> None:
    g, _, _ = _dense_feature_graph(n_dense, n_layers)
    _drawn_dense(browser, tmp_path, g)


def test_many_position_lanes_fit_the_height_without_overlaps(browser: Any,
                                                             tmp_path: Path) -> None:
    # a per-prompt graph of a 40-token prompt: 40 position lanes, one with 30 features in a cell
    import networkx as nx
    import numpy as np

    rng = np.random.default_rng(3)
    g = nx.DiGraph()
    g.add_node("embed", kind="embed", score=0.0)
    g.add_node("logits", kind="logits", layer=18, score=0.0)
    for pos, layer in itertools.product(range(40), range(18)):
        for i in range(30 if (pos, layer) == (3, 1) else int(rng.integers(0, 3))):
            n = f"L{layer}.tc.f{i}@{pos}"
            g.add_node(n, kind="feature", layer=layer, index=i, position=pos, dictionary="tc",
                       score=float(rng.normal()))
            g.add_edge("embed", n, score=float(rng.normal()))
            g.add_edge(n, "logits", score=float(rng.normal()))
    got = _drawn_dense(browser, tmp_path, g)
    cell = [n for n in got["nodes"] if n["id"].startswith("L1.") and n["id"].endswith("@3")]
    assert len(cell) == 30 and len({round(n["y"]) for n in cell}) >= 2  # rows inside its lane
