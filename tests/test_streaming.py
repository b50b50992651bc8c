"""Streaming sweeps: chunked results on disk equal a one-shot run, and a killed run (an injected
exception, or a real subprocess killed with SIGKILL) resumes without recomputing any finished
chunk and ends with the uninterrupted run's table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import factfind as ff
from factfind.streaming import stream

HERE = Path(__file__).parent
KW = dict(components=["resid_pre", "mlp_out"], positions=["subject_last", "final"],
          progress=False)


def logged_patching(model, pairs, **kw):
    """Activation patching that notes each chunk it computes (first prompt's subject) in the
    file named by $FF_STREAM_LOG and, with $FF_STREAM_DELAY, takes its time (so a kill lands
    mid-run)."""
    log = os.environ.get("FF_STREAM_LOG")
    if log:
        with open(log, "a") as f:
            f.write(pairs.clean[0].subject + "\n")
    df = ff.activation_patching(model, pairs, **kw)
    time.sleep(float(os.environ.get("FF_STREAM_DELAY", "0")))
    return df


def _sorted(df):
    return df.sort_values(["prompt", "component", "layer", "role"]).reset_index(drop=True)


def test_stream_equals_one_shot_run(gpt2_model, pairs, tmp_path):
    res = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=3, **KW)
    assert len(res.files()) == -(-len(pairs) // 3) and res.reused == ()
    got, want = _sorted(res.read()), _sorted(ff.activation_patching(gpt2_model, pairs, **KW))
    assert sorted(set(got["prompt"])) == list(range(len(pairs)))  # global prompt indices
    assert np.abs(want["effect"]).max() > 1e-3
    # chunks pad to their own longest prompt; padding does not change results (left padding,
    # explicit positions), so only float noise separates them (resumed patched runs round
    # differently per chunk shape; effects are normalised by clean - corrupt, up to ~13 here)
    scale = float(np.abs(want["effect"]).max())
    np.testing.assert_allclose(got["effect"], want["effect"], atol=2e-5 * max(1.0, scale))
    agg = res.aggregate()
    ref = ff.aggregate(res.read())
    key = ["component", "layer", "role"]
    a, b = agg.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(
        drop=True)
    pd.testing.assert_frame_equal(a[[*key, "n"]], b[[*key, "n"]])
    np.testing.assert_allclose(a[["effect", "ci_low", "ci_high"]].to_numpy(float),
                               b[["effect", "ci_low", "ci_high"]].to_numpy(float), rtol=1e-9)


def test_crash_after_a_chunk_resumes_without_recomputing(gpt2_model, pairs, tmp_path):
    calls: list[int] = []
    crash = {"at": None}  # not an option: the resumed call must be the same call
    subjects = [p.subject for p in pairs.clean]

    def flaky(model, chunk_pairs, **kw):
        start = subjects.index(chunk_pairs.clean[0].subject)
        if start == crash["at"]:
            raise RuntimeError("preempted")
        calls.append(start)
        return ff.activation_patching(model, chunk_pairs, **kw)

    full = stream(flaky, gpt2_model, pairs, out=tmp_path / "full", chunk=2, **KW).read()
    n_chunks = len(calls)
    calls.clear()
    crash["at"] = 6
    with pytest.raises(RuntimeError, match="preempted"):
        stream(flaky, gpt2_model, pairs, out=tmp_path / "run", chunk=2, **KW)
    first = list(calls)
    assert first == [0, 2, 4]
    calls.clear()
    crash["at"] = None
    res = stream(flaky, gpt2_model, pairs, out=tmp_path / "run", chunk=2, **KW)
    assert set(res.reused) == set(first) and set(calls).isdisjoint(first)
    assert sorted(first + calls) == list(range(0, len(pairs), 2))
    assert len(res.files()) == n_chunks == len(res.reused) + len(res.computed)
    pd.testing.assert_frame_equal(res.read(), full)


def _child(out: str) -> None:
    """The process the SIGKILL test kills: a slow streamed sweep."""
    import torch

    from factfind.testing.models import tiny_model

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from conftest_data import fact_records

    model = tiny_model("gpt2")
    pairs = ff.data.from_records(fact_records(), name="tiny-sports").corrupt(
        model, seed=0, on_missing="skip")
    stream(logged_patching, model, pairs, out=out, chunk=2, **KW)


def test_sigkilled_run_resumes_losing_no_finished_chunk(gpt2_model, pairs, tmp_path,
                                                        monkeypatch):
    out, log = tmp_path / "runs", tmp_path / "computed.log"
    env = dict(os.environ, FF_STREAM_LOG=str(log), FF_STREAM_DELAY="1.0",
               OMP_NUM_THREADS="1")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_streaming as t; " \
           f"t._child({str(out)!r})"
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 120
        while len(list(out.rglob("chunk-*.parquet"))) < 2:
            assert child.poll() is None, "the child ended before it could be killed"
            assert time.time() < deadline, "the child made no progress"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    finished = {p.name for p in out.rglob("chunk-*.parquet")}
    assert 2 <= len(finished) < -(-len(pairs) // 2), "killed midway"
    before = log.read_text().splitlines()

    monkeypatch.setenv("FF_STREAM_LOG", str(log))
    monkeypatch.setenv("FF_STREAM_DELAY", "0")
    res = stream(logged_patching, gpt2_model, pairs, out=out, chunk=2, **KW)
    after = log.read_text().splitlines()[len(before):]
    assert len(res.reused) == len(finished)
    subjects = [p.subject for p in pairs.clean]
    done_before = {subjects[s] for s in res.reused}
    assert done_before.isdisjoint(after), "a chunk finished before the kill was recomputed"
    assert len(after) == len(res.computed) == len(set(after))
    assert not [p for p in out.rglob("*") if p.suffix == ".parquet" and p.name.startswith(".")]

    monkeypatch.delenv("FF_STREAM_LOG")
    fresh = stream(logged_patching, gpt2_model, pairs, out=tmp_path / "fresh", chunk=2, **KW)
    pd.testing.assert_frame_equal(res.read(), fresh.read())


def test_options_key_the_files_and_bad_input(gpt2_model, pairs, facts, tmp_path):
    a = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4, **KW)
    b = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4,
               **{**KW, "direction": "noise"})
    assert a.path != b.path and b.reused == ()
    again = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4, **KW)
    assert again.computed == () and again.path == a.path
    (a.path / ".chunk-00000000.parquet.abc.tmp").write_bytes(b"half a file")  # a killed write
    assert len(again.files()) == len(a.files())
    with pytest.raises(ValueError, match="empty"):
        stream(ff.activation_patching, gpt2_model, pairs[:0], out=tmp_path)
    with pytest.raises(ValueError, match="'prompt' column"):
        stream(lambda m, f: pd.DataFrame({"effect": [1.0]}), gpt2_model, facts, out=tmp_path)


def test_stream_keys_survive_the_move_into_subpackages(gpt2_model, pairs, tmp_path):
    """A streamed run is keyed by the analysis' v0.1 module name, so runs cached before the
    package moved (``factfind.patching`` -> ``factfind.localize.patching``) resume."""

    from factfind.cache import _digest

    res = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4, **KW)
    params = {"analysis": "factfind.patching.activation_patching",
              "options": {k: v for k, v in KW.items() if k != "progress"}}  # stream's own
    digest = _digest(dict(params, chunk=4, n=len(pairs)))[:10]
    assert res.path.name == f"activation_patching-{digest}"
