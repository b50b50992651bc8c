"""analyses/dictionaries.py end to end on the organism, and the report's dictionary sections."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

from factfind.errors import ArgumentError
from factfind.report import features as rf

ROOT = Path(__file__).resolve().parents[1]


def _script() -> object:
    spec = importlib.util.spec_from_file_location("dictionaries_analysis",
                                                  ROOT / "analyses" / "dictionaries.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _quality() -> pd.DataFrame:
    return pd.DataFrame({"dictionary": ["L1.tc", "L0.tc"], "layer": [1, 0],
                         "explained_variance": [0.75, 0.9], "l0": [70.0, 20.0],
                         "dead_fraction": [0.1, 0.0], "dense_fraction": [0.0, 0.01],
                         "ce_recovered": [0.85, 0.95], "kl_recovered": [0.8, 0.9]})


def test_the_quality_table_flags_each_missed_aim_in_layer_order() -> None:
    df = rf.quality_table(_quality())
    assert list(df["dictionary"]) == ["L0.tc", "L1.tc"]
    assert list(df["misses"]) == ["", "explained_variance < 0.8; l0 > 64"]
    section = rf.dictionary_quality_section(_quality(), training={"threads": 2})
    assert section.facts["meet every aim"] == "1 of 2" and section.facts["threads"] == 2
    assert len(section.figures) == 3
    with pytest.raises(ArgumentError, match="needs columns"):
        rf.quality_table(pd.DataFrame({"layer": [0]}))
    with pytest.raises(ArgumentError, match="at least one"):
        rf.dashboards_section([])


@pytest.mark.slow
def test_the_organism_run_trains_measures_reads_and_reuses_its_dictionaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two layers of the organism, few tokens: the report and the quality CSV are written, each
    layer's explained variance and L0 are finite and plausible, the dashboards section names
    the features it shows, a second run loads the dictionaries from the cache instead of
    training, and an existing report is not replaced without --overwrite."""
    monkeypatch.setenv("FACTFIND_CACHE", str(tmp_path / "cache"))
    script = _script()
    args = ["--layers", "0,1", "--tokens", "6000", "--epochs", "1", "--eval-tokens", "1500",
            "--dashboards", "2", "--n-facts", "200", "--threads", "1", "--out",
            str(tmp_path / "out")]
    report = script.main(args)  # type: ignore[attr-defined]
    html = report.read_text()
    for title in ("Training corpus", "Dictionary quality per layer",
                  "Features that name an attribute", "Feature dashboards"):
        assert title in html
    quality = pd.read_csv(report.with_suffix(".csv"))
    assert list(quality["layer"]) == [0, 1]
    assert ((quality["explained_variance"] > 0.3) & (quality["explained_variance"] <= 1)).all()
    assert ((quality["l0"] > 0) & (quality["l0"] <= 32)).all()
    assert quality["ce_recovered"].notna().all()
    assert ".stc.f" in html  # dashboards of named features
    with pytest.raises(ArgumentError, match="--overwrite"):
        script.main(args)  # type: ignore[attr-defined]
    again = script.main([*args, "--overwrite"])  # type: ignore[attr-defined]
    assert "training (cached)" in again.read_text()
