"""The run cache: hits on re-run, chunk-level resume after a crash, atomic files."""

import pandas as pd
import pytest

from factfind.cache import RunCache


def test_second_open_serves_from_disk(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"layer": [0, 1], "effect": [0.5, -1.25]})

    a = RunCache.open(tmp_path, model="m", dataset="d", config={"seed": 0})
    first = a.table("tracing", compute)
    b = RunCache.open(tmp_path, model="m", dataset="d", config={"seed": 0})
    second = b.table("tracing", compute)
    assert calls == [1] and b.hits == ["tracing"] and a.computed == ["tracing"]
    pd.testing.assert_frame_equal(first, second)
    other = RunCache.open(tmp_path, model="m", dataset="d", config={"seed": 1})
    assert other.root != a.root
    assert b.json("meta", lambda: {"x": 1}) == {"x": 1}
    assert b.json("meta", lambda: {"x": 2}) == {"x": 1}


def test_killed_chunked_step_resumes_without_recomputing(tmp_path):
    done = []

    def compute(start, stop, crash_at=None):
        if start == crash_at:
            raise KeyboardInterrupt
        done.append(start)
        return pd.DataFrame({"prompt": list(range(start, stop)),
                             "effect": [float(i) ** 2 for i in range(start, stop)]})

    cache = RunCache.open(tmp_path, model="m")
    with pytest.raises(KeyboardInterrupt):
        cache.chunked("patching", 10, lambda s, e: compute(s, e, crash_at=6), chunk=3)
    assert done == [0, 3]
    assert not [p for p in cache.files() if p.name.endswith(".tmp")]
    resumed = RunCache.open(tmp_path, model="m")
    df = resumed.chunked("patching", 10, compute, chunk=3)
    assert done == [0, 3, 6, 9]  # chunks 0 and 3 were not computed again
    full = pd.concat([compute(s, min(10, s + 3)) for s in range(0, 10, 3)], ignore_index=True)
    pd.testing.assert_frame_equal(df, full)
    assert resumed.hits == ["patching[0]", "patching[3]"]


def test_bad_step_name(tmp_path):
    with pytest.raises(ValueError, match="step names"):
        RunCache.open(tmp_path).table("../escape", pd.DataFrame)
