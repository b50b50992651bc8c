"""The report's counterfactual feature graph (factfind.report.feature_circuits.pairs_graph_section).

From a hand-made edge frame (``ff.feature_edges``' columns) and head split (``ff.split_edge_heads``'
columns) whose answers are known: the table lists the strongest edges first with their labels,
``effect [95% CI]`` and who carries each (heads' shares of the edge in %, the same-position part,
``not split`` / ``same role (not split)`` for the edges the split did not reach, ``no head``);
the summary lines name the strongest edge and the heads of the strongest split cross-position
edge; the section holds the explorer; missing columns are typed one-line errors.
"""

from __future__ import annotations

import pandas as pd
import pytest

from factfind.errors import ArgumentError
from factfind.graph import CircuitGraph
from factfind.graph.provenance import Provenance
from factfind.report import feature_circuits as rfc

F3 = "L1.stc.f3@subject_last"
ERR = "L2.stc.err@final"


def _edges() -> pd.DataFrame:
    rows = [("embed@subject_last", F3, 2.0), (F3, ERR, -1.5), (ERR, "logits@final", 1.0),
            ("embed@subject_first", "logits@final", 0.25), (F3, "logits@final", 0.125),
            ("L1.stc.f7@final", "logits@final", 0.0625)]
    df = pd.DataFrame(rows, columns=["sender", "receiver", "effect"])
    return df.assign(method="feature-eap-ig/5", n=16, ci_low=df["effect"] - 0.5,
                     ci_high=df["effect"] + 0.5, score=df["effect"].abs())


def _heads() -> pd.DataFrame:
    """Shares that sum with the local part to each split edge (split_edge_heads' contract)."""
    rows = [(F3, ERR, 2, 0, -1.2, 0.0, -1.5), (F3, ERR, 1, 1, -0.3, 0.0, -1.5),
            (ERR, "logits@final", 2, 1, 0.1, 0.9, 1.0),
            (F3, "logits@final", pd.NA, pd.NA, 0.0, 0.125, 0.125),
            ("L1.stc.f7@final", "logits@final", pd.NA, pd.NA, 0.0, 0.0, 0.0625)]
    df = pd.DataFrame(rows, columns=["sender", "receiver", "layer", "head", "share", "local",
                                     "edge"])
    return df.astype({"layer": "Int64", "head": "Int64"}).assign(n=16)


def _graph() -> CircuitGraph:
    prov = Provenance(model="m", revision="r", dataset="d", method="feature-eap-ig/5")
    g = CircuitGraph.from_edge_scores(_edges(), prov, n_layers=3)
    g.graph.nodes[F3]["label"] = "fires on 'Paris'"
    return g


def test_the_table_says_who_carries_each_edge_strongest_first() -> None:
    table = rfc.pairs_edge_table(_edges(), _heads(), graph=_graph(),
                                 labels={"L2.stc.err": "the error of L2"})
    assert list(table.columns) == ["sender", "receiver", "effect [95% CI]", "n", "carried by"]
    assert list(table["effect [95% CI]"])[:3] == ["2.000 [1.500, 2.500]",
                                                  "-1.500 [-2.000, -1.000]",
                                                  "1.000 [0.500, 1.500]"]
    # labels: the graph node's, and the mapping's by unit
    assert table["receiver"].iloc[0] == f"{F3} (fires on 'Paris')"
    assert table["sender"].iloc[1] == f"{F3} (fires on 'Paris')"
    assert table["receiver"].iloc[1] == f"{ERR} (the error of L2)"
    assert list(table["carried by"]) == [
        "same role (not split)",          # embed@subject_last -> F3, not in the split
        "L2.h0 80%, L1.h1 20%",           # -1.2 and -0.3 of -1.5
        "same position 90%, L2.h1 10%",   # local 0.9, head 0.1 of 1.0
        "not split",                      # a cross-position edge the split did not reach
        "same position 100%",             # head <NA>: no head carries it, all local
        "no head"]                        # nothing carries it at all
    assert list(table["n"]) == [16] * 6
    assert len(rfc.pairs_edge_table(_edges(), _heads(), top=2)) == 2
    assert rfc.pairs_edge_table(_edges(), _heads())["receiver"].iloc[0] == F3  # no labels


def test_the_summary_names_the_strongest_edge_and_its_heads() -> None:
    first, second = rfc.pairs_graph_points(_edges(), _heads())
    assert first == ("Counterfactual graph over the pairs (EAP-IG): 6 edges scored; the "
                     f"strongest, embed@subject_last -> {F3}, has effect 2.000 [1.500, 2.500] "
                     "on the logit difference.")
    assert second == (f"The strongest cross-position edge split over heads, {F3} -> {ERR} "
                      "(effect -1.500), is carried 80% by L2.h0 and 20% by L1.h1.")
    lines = rfc.features_summary(pairs_edges=_edges(), pairs_heads=_heads())
    assert lines == [first, second]
    # no head split: only the strongest edge
    assert len(rfc.pairs_graph_points(_edges(), _heads().iloc[:0])) == 1
    assert rfc.features_summary(pairs_edges=_edges()) == []  # both frames or neither


def test_the_section_holds_the_explorer_the_table_and_the_lines() -> None:
    sec = rfc.pairs_graph_section(_graph(), _edges(), _heads(), facts={"pairs": 16},
                                  caption="the pairs graph", top_edges=4)
    assert sec.id == "features-pairs-graph" and len(sec.graphs) == 1
    assert sec.graphs[0].n_edges == 6 and "the pairs graph" in sec.graphs[0].caption
    assert len(sec.tables) == 1 and len(sec.tables[0].data) == 4
    assert sec.facts["edges scored"] == 6 and sec.facts["pairs"] == 16
    assert sec.facts["cross-position edges split over heads"] == 4
    assert len(sec.points) == 2 and "EAP-IG" in sec.explanation


@pytest.mark.parametrize(("frame", "drop", "what"), [
    ("edges", "ci_low", "a feature-edge table"), ("edges", "n", "a feature-edge table"),
    ("heads", "share", "a head-split table"), ("heads", "local", "a head-split table")])
def test_missing_columns_are_typed_one_line_errors(frame: str, drop: str, what: str) -> None:
    edges, heads = _edges(), _heads()
    if frame == "edges":
        edges = edges.drop(columns=[drop])
    else:
        heads = heads.drop(columns=[drop])
    for call in (lambda: rfc.pairs_graph_section(_graph(), edges, heads),
                 lambda: rfc.pairs_edge_table(edges, heads),
                 lambda: rfc.pairs_graph_points(edges, heads)):
        with pytest.raises(ArgumentError, match=f"{what} needs columns") as err:
            call()
        assert "\n" not in str(err.value) and drop in str(err.value)
