"""Reports a reader can follow (issue #25, Build 5): relation ids shown with their names, a
"findings first" summary built from the run's tables, and long tables that show their top rows
and open on click (in real headless Chromium, driven by the mouse)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import factfind as ff
from factfind import report as R
from factfind.data import relations as rel
from factfind.errors import ArgumentError, FactDataError
from factfind.report.findings import SUMMARY_COLUMNS, findings_summary, literature_findings

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "fact_finding-organism-organism_sport.html"

# ----------------------------------------------------------------------------- relation names


def test_every_relation_of_the_shipped_datasets_has_a_name() -> None:
    ids = {r["relation_id"] for r in json.loads(
        (ROOT / "datasets" / "rome_known" / "known_1000.json").read_text(encoding="utf-8"))}
    names = rel.relation_names()
    assert len(ids) == 33 and not ids - set(names), sorted(ids - set(names))
    assert names["P641"].source == "wikidata" and names["P17"].source == "lama"
    assert sum(n.source == "lama" for n in names.values()) == 41  # LAMA's (ParaRel's) T-REx set


def test_relation_name_and_label() -> None:
    assert ff.relation_name("P17") == "country"
    assert ff.relation_name("P1412") == "languages spoken, written or signed"
    assert ff.relation_name("P9999") is None and ff.relation_name("sport") is None
    assert ff.relation_label("P101") == "P101 (field of work)"
    assert ff.relation_label(" P17") == "P17 (country)"
    for bare in ("sport", "person plays pro sport", "P9999"):  # names and unknown ids as they are
        assert ff.relation_label(bare) == bare
    assert ff.relation_label("P17 (country)") == "P17 (country)"  # idempotent
    assert ff.relation_label(None) == ff.relation_label(np.nan) == ff.relation_label(pd.NA) == ""


@pytest.mark.parametrize(("text", "match"), [
    ("relation,label\nP17,country\n", "header must be 'id,name,source'"),
    ("", "header must be 'id,name,source'"),
    ("id,name,source\nP17,country,lama\nP17,nation,lama\n", r"line 3: relation 'P17' is named"),
    ("id,name,source\nP17,country\n", "line 2: 2 fields"),
    ("id,name,source\nP17,,lama\n", "line 2: an empty id or name"),
])
def test_a_bad_table_is_one_located_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "names.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(FactDataError, match=match) as err:
        rel.relation_names(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_missing_table_is_an_error_when_named_and_bare_ids_when_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FactDataError, match="no such file"):
        rel.relation_names(tmp_path / "nope.csv")
    monkeypatch.setenv("FACTFIND_DATASETS", str(tmp_path))
    assert ff.relation_label("P17") == "P17 (country)"  # falls back to the shipped table
    monkeypatch.setattr(rel, "SHIPPED", tmp_path / "nope.csv")
    with caplog.at_level("WARNING"):
        assert ff.relation_label("P17") == "P17" and rel.relation_names() == {}
    assert "relation ids are shown bare" in caplog.text
    own = tmp_path / "relations" / "relations.csv"  # $FACTFIND_DATASETS's own table wins
    own.parent.mkdir()
    own.write_text("id,name,source\nP17,sovereign state,mine\n", encoding="utf-8")
    assert ff.relation_label("P17") == "P17 (sovereign state)"


def test_reports_show_relation_ids_with_their_names() -> None:
    facts = pd.DataFrame({"subject": ["Paris", "Rome", "Tokyo", "Kyoto"],
                          "relation": ["P17", "P17", "P36", "sport"],
                          "correct": [True, False, True, True]})
    html = R.render_report(R.ReportData(title="t", sections=[
        R.dataset_section({"relations": "P17, P36, sport"}, facts),
        R.accuracy_section(R.accuracy_table(facts)),
    ]))
    # the dataset's facts, the sample table, the accuracy table and the accuracy bars
    assert "<dd>P17 (country), P36 (capital), sport</dd>" in html
    assert html.count('data-sort="P17 (country)">P17 (country)</td>') == 3  # 2 sample + 1 accuracy
    assert html.count(">P36 (capital)</td>") == 2 and ">sport</td>" in html
    figure = html[html.index('id="accuracy-fig0"'):]
    assert "P17 (country)" in figure[:figure.index("</figure>")]
    assert ">P17</td>" not in html and ">P17<" not in html
    # any section's facts: a list of ids, or one (the dictionaries report's provenance)
    html = R.render_report(R.ReportData(title="t", sections=[
        R.dataset_section({"relations": ["P17", "P101"]}),
        R.config_section({"seed": 0}, {"relation": "P641", "note": "P17"})]))
    assert '<dd>[&#34;P17 (country)&#34;, &#34;P101 (field of work)&#34;]</dd>' in html
    assert "<dd>P641 (sport)</dd>" in html and "<dd>P17</dd>" in html  # only relation facts


# ----------------------------------------------------------------------------- long tables


def _long(n: int) -> pd.DataFrame:
    return pd.DataFrame({"name": [f"row{i}" for i in range(n)],
                         "effect": np.round(np.linspace(1.0, 0.0, n), 4)})


def test_a_long_table_holds_every_row_and_a_button_for_the_rest() -> None:
    html = R.render_report(R.ReportData(title="t", sections=[R.Section(
        id="s", title="S", tables=[R.Table(_long(57), caption="long"),
                                   R.Table(_long(R.PREVIEW_ROWS), caption="short"),
                                   R.Table(_long(900), caption="capped", max_rows=600)])]))
    long_ = html[html.index('id="s-table0"'):html.index('id="s-table1"')]
    assert 'data-preview="20"' in long_ and long_.count("<tr><td") == 57
    assert re.search(r'<button type="button" class="table-more" aria-expanded="true" hidden>'
                     r"Show all 57 rows</button>", long_)
    short = html[html.index('id="s-table1"'):html.index('id="s-table2"')]
    assert "data-preview" not in short and "table-more" not in short  # 20 rows fit
    capped = html[html.index('id="s-table2"'):]
    assert capped.count("<tr><td") == 600 and "Showing 600 of 900 rows." in capped
    with pytest.raises(ArgumentError, match="max_rows"):
        R.Table(_long(3), max_rows=2.5)  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="DataFrame"):
        R.Table([1, 2])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- findings first

L = 8


def _tracing(peak_mlp: int, peak_attn: int, n: int = 6) -> pd.DataFrame:
    """Per-prompt tracing: prompt p's effect is the bump plus 0.01 * (p - mean), and its last
    subject token sits at position 3 or 4 (so per-position aggregates have unequal n)."""
    rows = []
    for p in range(n):
        noise = 0.01 * (p - (n - 1) / 2)
        for method, role, peak, h in (("causal_tracing/mlp", "subject_last", peak_mlp, 0.4),
                                      ("causal_tracing/mlp", "final", 7, 0.05),
                                      ("causal_tracing/attn", "final", peak_attn, 0.6)):
            for layer in range(L):
                rows.append({"method": method, "component": method.split("/")[1],
                             "layer": layer, "role": role, "prompt": p,
                             "position": (3 + (p % 3 == 0)) if role == "subject_last" else 9,
                             "effect": h * np.exp(-0.5 * (layer - peak) ** 2) + noise})
    return ff.tidy(pd.DataFrame(rows))


def _knockout(n: int = 10) -> pd.DataFrame:
    rows = [{"method": "attention_knockout", "component": "attn", "layer": layer, "role": role,
             "prompt": p, "effect": -(0.5 + 0.02 * (p % 2) if (role, layer) == ("subject", 5)
                                     else 0.3 if (role, layer) == ("relation", 1) else 0.0)}
            for p in range(n) for layer in range(L) for role in ("subject", "relation")]
    return ff.tidy(pd.DataFrame(rows))


def _summary(tracing: pd.DataFrame) -> pd.DataFrame:
    knockout = _knockout()
    eff = pd.DataFrame({"layer": np.arange(L + 1), "accuracy": [0.2, 0.5] + [0.95] * (L - 1),
                        "clean_accuracy": 1.0, "n": 12})
    findings = literature_findings(n_layers=L, tracing=ff.aggregate(tracing),
                                   knockout=ff.aggregate(knockout), effective=eff)
    accuracy = R.accuracy_table(pd.DataFrame({"relation": ["P17"] * 30 + ["P36"] * 10,
                                              "correct": [True] * 24 + [False] * 16}))
    circuit = pd.DataFrame({"size": [400, 200, 50, 25], "faithfulness": [1.0, 0.97, 0.92, 0.6],
                            "accepted": [True, True, True, False],
                            "nodes": ["", "", ";".join(["L1.h0@final"] * 20
                                                       + ["L2.n7@subject_last"] * 30), ""]})
    heads = ff.tidy(pd.DataFrame([{"method": "activation_patching/denoise",
                                   "component": "head_out", "layer": layer, "head": h,
                                   "role": "final", "prompt": p,
                                   "effect": (0.7 if (layer, h) == (6, 1) else 0.05) + 0.1 * p}
                                  for p in range(4) for layer in range(L) for h in range(2)]))
    return findings_summary(findings, n_layers=L, accuracy=accuracy, pairs=16, tracing=tracing,
                            heads=heads, knockout=knockout, circuit=circuit, circuit_n=16)


def test_the_summary_cites_the_numbers_of_the_tables() -> None:
    tracing = _tracing(peak_mlp=2, peak_attn=6)
    s = _summary(tracing)
    assert list(s.columns) == list(SUMMARY_COLUMNS)
    assert 5 <= len(s) <= 8 and all(re.search(r"\d", t) for t in s["text"])
    by = s.set_index("topic")
    assert list(by.index) == ["knows", "lookup", "readout", "knockout", "effective model",
                              "circuit", "verdict"]
    # knows: 24 of 40 (60%), the Wilson interval of the accuracy table
    assert by.loc["knows", "text"].startswith("The model knows 24 of 40 scored facts over 2 "
                                              "relations (60% [45%, 74%]); the analyses below "
                                              "use 16 clean/corrupt pairs")
    # lookup: the mean over the 6 prompts at layer 2 is the bump's 0.4 (noise sums to 0), with
    # a t interval of the noise: sd of 0.01 * (p - 2.5) over p = 0..5, t(5) = 2.5706
    half = 2.5706 * np.std(0.01 * (np.arange(6) - 2.5), ddof=1) / np.sqrt(6)
    lookup = by.loc["lookup"]
    assert lookup["layer"] == 2 and lookup["value"] == pytest.approx(0.4)
    assert lookup["ci_low"] == pytest.approx(0.4 - half) and lookup["n"] == 6
    assert lookup["holds"] is True or lookup["holds"] == True  # noqa: E712
    assert ("The fact is looked up by MLPs at the last subject token, layers 1–3: causal "
            "tracing peaks at layer 2 of 8 (depth 0.29), indirect effect 0.40 "
            f"[{0.4 - half:.2f}, {0.4 + half:.2f}], n=6 prompts") in lookup["text"]
    assert "ROME's early site holds" in lookup["text"]
    assert by.loc["readout", "layer"] == 6 and "ROME's late site holds" in by.loc["readout",
                                                                                 "text"]
    assert "strongest single head there is L6.h1@final (activation patching 0.85" \
        in by.loc["readout", "text"] and "n=4 pairs" in by.loc["readout", "text"]
    # knockout: the worst layer 5, 50% + 1% mean drop, the relation read earlier (layer 1)
    ko = by.loc["knockout"]
    assert ko["layer"] == 5 and ko["value"] == pytest.approx(0.51) and ko["n"] == 10
    assert "blocking final → subject at layer 5 (depth 0.71) cuts p(answer) by 51% [50%, 52%]" \
        in ko["text"] and "damage centroid at layer 1.0 vs 5.0" in ko["text"]
    assert "2 of 2 of Geva et al.'s findings hold" in ko["text"]
    assert by.loc["effective model", "text"].startswith(
        "The subject's tokens need attention only in layers 0–1: mean-ablating their attention "
        "from layer 2 on keeps >= 90% of the clean accuracy 1.00 (from layer 0 on: 0.20), n=12")
    assert by.loc["circuit", "text"] == (
        "A circuit of 50 of 400 nodes (12.5%: 30 neurons, 20 heads) has faithfulness 0.92 (its "
        "share of the model's logit difference over the fully ablated model's) with every other "
        "node ablated, n=16 pairs.")
    assert by.loc["verdict", "text"].startswith("6 of 6 findings of the papers hold")


def test_the_summary_follows_the_data_not_a_script() -> None:
    s = _summary(_tracing(peak_mlp=7, peak_attn=1)).set_index("topic")  # both sites misplaced
    assert "Restoring MLPs at the last subject token helps most, layers 6–7: causal tracing " \
        "peaks at layer 7 of 8" in s.loc["lookup", "text"]
    assert "unlike ROME's early site: 1% of the positive effect at depth <= 0.6" in \
        s.loc["lookup", "text"]
    assert "unlike ROME's late site" in s.loc["readout", "text"]
    # a site whose interval includes 0 says so (the MLPs at the final token, layer 1: ~0)
    assert "(the interval includes 0)" not in s.loc["lookup", "text"]
    weak = _summary(_tracing(2, 6).assign(effect=lambda d: d["effect"] - 0.4 * (
        (d["method"] == "causal_tracing/mlp") & (d["role"] == "subject_last")).astype(float)
        + 0.005)).set_index("topic")
    assert "n=6 prompts (the interval includes 0)" in weak.loc["lookup", "text"]
    assert s.loc["verdict", "text"] == ("4 of 6 findings of the papers hold on this model; "
                                        "differs: ROME early site, ROME late site.")
    # without tables, their lines are left out; the verdict stays
    only = findings_summary(literature_findings(n_layers=L, knockout=ff.aggregate(_knockout())),
                            n_layers=L)
    assert list(only["topic"]) == ["verdict"]


def test_the_summary_reads_what_cannot_be_judged_and_what_never_happens() -> None:
    """SmolLM2-like edge cases: a probe on too few held-out prompts, attention needed in every
    layer, knockout that never hurts, no damage from the relation, no head at the final token,
    no accepted circuit."""
    knockout = _knockout().assign(effect=lambda d: np.where(d["role"] == "subject", 0.01, 0.0))
    probes = pd.DataFrame({"layer": np.arange(L), "role": "subject_last", "effect": 0.6,
                           "chance": 0.25, "n": 3, "relation": "P17"})
    eff = pd.DataFrame({"layer": np.arange(L + 1), "accuracy": [0.1] * L + [1.0],
                        "clean_accuracy": 1.0, "n": 12})
    tracing = _tracing(2, 6)
    findings = literature_findings(n_layers=L, tracing=ff.aggregate(tracing),
                                   knockout=ff.aggregate(knockout), effective=eff, probes=probes)
    heads = ff.tidy(pd.DataFrame([{"method": "p", "component": "head_out", "layer": 1,
                                   "head": 0, "role": "subject_last", "prompt": 0,
                                   "effect": 0.5}]))
    circuit = pd.DataFrame({"size": [10, 5], "faithfulness": [1.0, 0.2],
                            "accepted": [False, False]})
    s = findings_summary(findings, n_layers=L, tracing=tracing, heads=heads,
                         knockout=knockout, circuit=circuit).set_index("topic")
    assert ("never lowers p(answer) (at most 1% [1%, 1%] higher), n=10 prompts; 0 of 1 of "
            "Geva et al.'s findings hold.") in s.loc["knockout", "text"]
    assert "relation's tokens" not in s.loc["knockout", "text"]
    assert s.loc["effective model", "text"].startswith("The subject's tokens need attention in "
                                                       "every layer: mean-ablating their "
                                                       f"attention from layer {L} on")
    assert s.loc["probe", "text"] == (
        "Where the attribute becomes linearly readable is not judged: not measurable: 3 "
        "held-out prompts in 1 relation(s) with enough subjects to split, fewer than 20 (best "
        "held-out accuracy 0.60 vs chance 0.25).")
    assert "strongest single head" not in s.loc["readout", "text"]  # none at the final token
    assert "circuit" not in s.index
    assert s.loc["verdict", "text"].endswith("; 2 could not be judged.")


def test_the_summary_needs_per_prompt_results() -> None:
    tracing = _tracing(2, 6)
    findings = literature_findings(n_layers=L, tracing=ff.aggregate(tracing))
    with pytest.raises(ArgumentError, match="per-prompt causal tracing"):
        findings_summary(findings, n_layers=L, tracing=ff.aggregate(tracing))


def test_findings_pool_token_positions_by_prompt() -> None:
    """The last subject token sits at position 3 in some prompts and 4 in others: the finding's
    peak is the mean over prompts (aggregate by role), not the mean of the positions' means."""
    tracing = _tracing(2, 6).assign(effect=lambda d: d["effect"] + 0.3 * (d["position"] == 4))
    early = literature_findings(n_layers=L, tracing=ff.aggregate(tracing)).iloc[0]
    by_prompt = ff.aggregate(tracing, by=("method", "layer", "role"))
    at = by_prompt.loc[(by_prompt["method"] == "causal_tracing/mlp")
                       & (by_prompt["role"] == "subject_last") & (by_prompt["layer"] == 2)]
    assert early["value"] == pytest.approx(float(at["effect"].iloc[0]))
    assert early["value"] == pytest.approx(0.4 + 0.3 * 2 / 6)  # 2 of 6 prompts at position 4
    assert early["n"] == 6


def test_the_summary_opens_the_report_as_a_list() -> None:
    s = _summary(_tracing(2, 6))
    section = R.summary_section(s)
    html = R.render_report(R.ReportData(title="t", sections=[
        section, R.model_section({"name": "m"})]))
    assert html.index('id="summary"') < html.index('id="model"')
    items = re.findall(r"<li>(.*?)</li>", html[html.index('<ul class="points">'):])
    assert len(items) == len(s) and items[0].startswith("The model knows 24 of 40")
    with pytest.raises(ArgumentError, match="list of lines"):
        R.Section(id="x", title="X", points="one string")  # type: ignore[arg-type]


def test_the_committed_organism_report_opens_with_its_findings() -> None:
    html = REPORT.read_text(encoding="utf-8")
    first = re.search(r'<section id="([a-z-]+)"', html)
    assert first is not None and first.group(1) == "summary"
    block = html[html.index('<ul class="points">'):html.index("</ul>")]
    items = re.findall(r"<li>(.*?)</li>", block, flags=re.DOTALL)
    assert 5 <= len(items) <= 8 and all(re.search(r"\d", i) for i in items)
    assert "n=" in block and "[" in block  # sample sizes and intervals


# ----------------------------------------------------------------------------- in Chromium
# (the playwright_browser fixture: tests/conftest.py)

def _visible_rows(page: Any, wrap: str) -> list[str]:
    rows = page.locator(f"{wrap} tbody tr")
    return [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())
            if rows.nth(i).is_visible()]


@pytest.mark.browser
def test_a_click_opens_a_long_table_and_a_sort_keeps_the_top_rows(playwright_browser: Any,
                                                                   tmp_path: Path) -> None:
    frame = _long(57).sample(frac=1.0, random_state=0).reset_index(drop=True)  # shuffled
    path = R.write_report(R.ReportData(title="t", sections=[R.Section(
        id="s", title="S", tables=[R.Table(frame, caption="long")])]), tmp_path / "r.html")
    page = playwright_browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(path.as_uri())
    wrap = "#s-table0"
    button = page.locator(f"{wrap} button.table-more")
    assert _visible_rows(page, wrap) == list(frame["name"][:20])
    assert button.inner_text() == "Show all 57 rows"
    assert button.get_attribute("aria-expanded") == "false"
    button.click()
    assert _visible_rows(page, wrap) == list(frame["name"])
    assert button.inner_text() == "Show the top 20 rows"
    assert button.get_attribute("aria-expanded") == "true"
    button.click()
    assert len(_visible_rows(page, wrap)) == 20
    # sorting by effect (descending on the second click) shows the 20 largest, in order
    header = page.locator(f"{wrap} th", has_text="effect").locator("button")
    header.click()
    header.click()
    assert _visible_rows(page, wrap) == [f"row{i}" for i in range(20)]
    page.close()
    assert not problems, problems


@pytest.mark.browser
def test_the_organism_report_opens_its_long_tables_on_click(playwright_browser: Any) -> None:
    page = playwright_browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(REPORT.as_uri())
    wraps = page.locator(".table-wrap[data-preview]")
    assert wraps.count() >= 1
    for i in range(wraps.count()):
        wrap = f"#{wraps.nth(i).get_attribute('id')}"
        total = page.locator(f"{wrap} tbody tr").count()
        assert total > 20 and len(_visible_rows(page, wrap)) == 20
        page.locator(f"{wrap} button.table-more").click()
        assert len(_visible_rows(page, wrap)) == total
    assert page.locator("#summary ul.points li").count() >= 5
    page.close()
