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


def test_step_times_are_stored_with_results_and_kept_on_hits(tmp_path):
    import time

    def slow():
        time.sleep(0.05)
        return pd.DataFrame({"layer": [0], "effect": [1.0]})

    def chunk(start, stop):
        time.sleep(0.02)
        return pd.DataFrame({"prompt": list(range(start, stop)), "effect": [0.5] * (stop - start)})

    a = RunCache.open(tmp_path, model="m")
    a.table("slow", slow)
    a.json("meta", lambda: {"x": 1})
    a.chunked("patching", 4, chunk, chunk=2)
    t = a.timing_table().set_index("step")
    assert list(t.index) == ["slow", "meta", "patching"]
    assert (t["status"] == "computed").all()
    assert t.loc["slow", "seconds"] >= 0.05 and t.loc["patching", "seconds"] >= 0.04
    # a chunk folder stays a readable parquet dataset (the chunks' times start with '_')
    folder = next(p for p in tmp_path.rglob("patching*") if p.is_dir())
    assert len(pd.read_parquet(folder)) == 4
    # served from the cache: the seconds are those of when it was computed
    b = RunCache.open(tmp_path, model="m")
    b.table("slow", slow)
    b.chunked("patching", 6, chunk, chunk=2)  # other n: another folder, all computed
    b.json("meta", lambda: {"x": 2})
    u = b.timing_table().set_index("step")
    assert u.loc["slow", "status"] == "cached" and u.loc["meta", "status"] == "cached"
    assert u.loc["slow", "seconds"] == pytest.approx(t.loc["slow", "seconds"])
    assert u.loc["slow", "this_run_seconds"] < u.loc["slow", "seconds"]
    # a resumed chunked step: two chunks cached, one computed; a result cached before times
    # were kept has unknown seconds
    c = RunCache.open(tmp_path, model="m")
    c.chunked("patching", 4, chunk, chunk=2)
    next(c.root.glob("slow*.time.json")).unlink()
    c.table("slow", slow)
    v = c.timing_table().set_index("step")
    assert v.loc["patching", "status"] == "cached"
    assert v.loc["patching", "seconds"] == pytest.approx(t.loc["patching", "seconds"])
    assert pd.isna(v.loc["slow", "seconds"])
    for f in folder.glob("_chunk-00000002*"):
        f.unlink()
    (folder / "chunk-00000002.parquet").unlink()
    d = RunCache.open(tmp_path, model="m")
    d.chunked("patching", 4, chunk, chunk=2)
    assert d.timing_table()["status"].tolist() == ["resumed (1 of 2 chunks computed)"]
