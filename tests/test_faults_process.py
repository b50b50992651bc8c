"""Faults that need a second process (issue 27): ``kill -9`` at random moments and during a
write, two runs sharing one cache at once, a real full file system (a 600 KB tmpfs, where a
mount is allowed), and permission denied on ``--cache`` and ``--out`` of the command line.

Each case ends in a run whose results equal an uninterrupted run's, or in one line naming the
file. The tiny-model cases stream activation patching (``factfind.stream``) in a child
process; the organism cases run ``factfind fact-finding`` with a small configuration.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

import factfind as ff
from factfind import integrity
from factfind.streaming import stream

HERE = Path(__file__).parent
ROOT = HERE.parent
KW = dict(components=["resid_pre", "mlp_out"], positions=["subject_last", "final"],
          progress=False)


def slow_patching(model, pairs, **kw):
    """Activation patching that takes $FF_FAULT_DELAY seconds more per chunk (so kills and a
    second run land mid-run)."""
    df = ff.activation_patching(model, pairs, **kw)
    time.sleep(float(os.environ.get("FF_FAULT_DELAY", "0")))
    return df


def _pause_in_write(flag: str, when: str) -> None:
    """Make the third chunk's write stop and wait to be killed: ``"data"`` after half of the
    chunk's bytes are in its temporary file; ``"sidecar"`` after its sidecar is in place and
    before the chunk is moved to its name."""
    real_tmp, real_replace = integrity._write_tmp, os.replace
    seen: list[str] = []

    def pause() -> None:
        Path(flag).touch()
        time.sleep(120)

    def write_tmp(folder, name, data, written=None):
        if name.startswith("chunk-"):
            seen.append(name)
            if when == "data" and len(seen) == 3 and isinstance(data, bytes):
                fd, _ = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                pause()
        return real_tmp(folder, name, data, written)

    def replace(src, dst):
        if when == "sidecar" and Path(dst).name.startswith("chunk-") and len(seen) == 3:
            pause()
        return real_replace(src, dst)

    integrity._write_tmp = write_tmp  # type: ignore[assignment]
    integrity.os.replace = replace  # type: ignore[assignment]


def _child(out: str, pause: str = "") -> None:
    """The process the tests kill or run twice: a streamed sweep on the tiny model."""
    import torch

    from factfind.testing.models import tiny_model

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from conftest_data import fact_records

    if pause:
        _pause_in_write(os.environ["FF_FAULT_FLAG"], pause)
    model = tiny_model("gpt2")
    pairs = ff.data.from_records(fact_records(), name="tiny-sports").corrupt(
        model, seed=0, on_missing="skip")
    stream(slow_patching, model, pairs, out=out, chunk=2, **KW)


def _spawn(out: Path, *, delay: float, pause: str = "", flag: Path | None = None
           ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FF_FAULT_DELAY=str(delay), OMP_NUM_THREADS="1",
               FF_FAULT_FLAG=str(flag or ""))
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_faults_process as t; "
            f"t._child({str(out)!r}, {pause!r})")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)


def _kill(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()


def _chunks(out: Path) -> list[Path]:
    return sorted(out.rglob("chunk-*.parquet"))


@pytest.fixture(scope="module")
def reference(gpt2_model, pairs, tmp_path_factory):
    """The uninterrupted run's table."""
    out = tmp_path_factory.mktemp("reference")
    return stream(slow_patching, gpt2_model, pairs, out=out, chunk=2, **KW).read()


def _resume_equals(reference, gpt2_model, pairs, out: Path) -> ff.streaming.StreamResult:
    res = stream(slow_patching, gpt2_model, pairs, out=out, chunk=2, **KW)
    pd.testing.assert_frame_equal(res.read(), reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / integrity.QUARANTINE).exists()  # nothing was damaged: nothing moved
    return res


def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(
        reference, gpt2_model, pairs, tmp_path):
    out = tmp_path / "runs"
    rng = random.Random(27)
    for _ in range(3):
        child = _spawn(out, delay=0.15)
        try:
            start = time.time()  # wait for the child to reach the sweep, then a random moment
            while not out.exists() and time.time() - start < 60:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            _kill(child)
    res = _resume_equals(reference, gpt2_model, pairs, out)
    assert res.reused, "no kill left a finished chunk"


@pytest.mark.parametrize("when", ["data", "sidecar"])
def test_kill_9_during_a_write_leaves_nothing_that_is_read(when, reference, gpt2_model, pairs,
                                                           tmp_path):
    out, flag = tmp_path / "runs", tmp_path / "paused"
    child = _spawn(out, delay=0, pause=when, flag=flag)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        _kill(child)
    assert len(_chunks(out)) == 2  # two chunks done, the third killed in its write
    if when == "data":  # a half-written temporary file is left by the kill...
        assert [p for p in out.rglob(".chunk-00000004.parquet.*.tmp")]
    else:  # ...or a sidecar whose chunk never got its name
        assert [p for p in out.rglob("_chunk-00000004.parquet.time.json")]
    res = _resume_equals(reference, gpt2_model, pairs, out)  # ...and neither is read
    assert len(res.reused) == 2


def test_two_runs_sharing_one_cache_at_once_both_finish_correctly(reference, gpt2_model, pairs,
                                                                  tmp_path):
    out = tmp_path / "runs"
    children = [_spawn(out, delay=0.1) for _ in range(2)]
    try:
        for child in children:
            _, err = child.communicate(timeout=300)
            assert child.returncode == 0, err.decode()[-2000:]
            assert b"damaged" not in err
    finally:
        for child in children:
            _kill(child)
    res = _resume_equals(reference, gpt2_model, pairs, out)
    assert res.computed == ()  # everything was on disk, every chunk passed its check
    for path in res.files():
        assert integrity.check(path, sidecar=path.with_name(f"_{path.name}.time.json")) is None


# --- the organism, through the command line ------------------------------------------------------

ARGS = ["--n-prompts", "8", "--tracing-prompts", "4", "--tracing-samples", "2", "--batch-size",
        "8", "--threads", "1", "--circuit-prompts", "4", "--prune-exact-max", "0"]
REPORT = "fact_finding-organism-organism_sport.html"


def _cli(*args: str, unprivileged: bool = False,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "factfind.cli", "fact-finding", *ARGS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=_drop_dac_override if unprivileged else None)


def _drop_dac_override() -> None:
    """In the child before it execs: as root, drop the capabilities that let root write where
    the permission bits say no (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set,
    so the command meets EACCES as any user would. A no-op for other users."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("factfind: error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return errors[0]


def _tables(cache: Path) -> dict[str, pd.DataFrame]:
    """Every cached table of a run folder, by its path below the run."""
    (run,) = [p for p in cache.iterdir() if p.is_dir() and p.name != integrity.QUARANTINE]
    return {str(p.relative_to(run)): pd.read_parquet(p) for p in sorted(run.rglob("*.parquet"))}


def _equal_runs(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], obj=name)


@pytest.fixture(scope="module")
def organism_run(tmp_path_factory):
    """The uninterrupted organism run (in this process): its cache and report folders."""
    import runpy

    base = tmp_path_factory.mktemp("organism")
    main = runpy.run_path(str(ROOT / "analyses" / "fact_finding.py"),
                          run_name="fact_finding_faults")["main"]
    outcome = main([*ARGS, "--cache", str(base / "cache"), "--out", str(base / "out")])
    return base / "cache", base / "out", main, outcome


def _shared_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="factfind-faults-"))


@pytest.mark.slow
def test_organism_run_heals_a_damaged_cache(organism_run, tmp_path):
    cache, _, main, _ = organism_run
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    (run,) = copy.iterdir()
    tracing = next(run.glob("causal_tracing-*")) / "chunk-00000000.parquet"
    damaged = {"atp_star": run / "atp_star.parquet", "causal_tracing[0]": tracing,
               "eap_ig": run / "eap_ig.parquet"}
    damage_mod = __import__("test_faults")
    damage_mod.damage(damaged["atp_star"], "truncate", Path())
    damage_mod.damage(tracing, "random", Path())
    damage_mod.damage(damaged["eap_ig"], "empty", Path())
    damage_mod.damage(run / "attention_knockout.parquet", "no_sidecar",
                      run / "attention_knockout.parquet.time.json")
    healed = main([*ARGS, "--cache", str(copy), "--out", str(tmp_path / "out")])
    assert sorted(healed.cache.rebuilt) == sorted(damaged)
    assert "attention_knockout" in healed.cache.hits  # no record, but it reads: served
    _equal_runs(cache, copy)
    moved = {p.name for p in (copy / integrity.QUARANTINE).rglob("*.parquet")}
    assert moved == {p.name for p in damaged.values()}
    html = healed.report.read_text()
    assert "cache entries rebuilt (damaged; quarantined)" in html and "atp_star" in html


def test_permission_denied_on_cache_is_one_line(tmp_path):
    base = _shared_tmp()
    try:
        locked = base / "cache"
        locked.mkdir()
        locked.chmod(0o555)
        done = _cli("--cache", str(locked / "runs"), "--out", str(base / "out"),
                    unprivileged=True)
        line = _one_error_line(done)
        assert f"cannot write {locked / 'runs'}" in line and "bytes)" in line
        assert "permission denied" in line and "--cache DIR" in line
        assert list(locked.iterdir()) == [] and not (base / "out").exists()
    finally:
        for folder in base.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_permission_denied_on_out_keeps_the_report_and_the_cache(organism_run):
    cache, out, _, _ = organism_run
    base = _shared_tmp()
    try:
        shutil.copytree(cache, base / "cache")
        shutil.copytree(out, base / "out")
        old = {p.name: p.read_bytes() for p in (base / "out").iterdir()}
        (base / "out").chmod(0o555)
        done = _cli("--cache", str(base / "cache"), "--out", str(base / "out"), "--overwrite",
                    unprivileged=True)
        line = _one_error_line(done)
        assert f"cannot write {base / 'out' / REPORT} (" in line and "bytes)" in line
        assert "permission denied" in line and "--out DIR" in line and "stays cached" in line
        assert {p.name: p.read_bytes() for p in (base / "out").iterdir()} == old
        _equal_runs(cache, base / "cache")
    finally:
        for folder in base.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs "
                           f"{tempfile.gettempdir()}"], capture_output=True, timeout=30)
    return done.returncode == 0


CHECK_ENTRIES = """
import sys
from pathlib import Path
from factfind import integrity
cache = Path(sys.argv[1])
bad = [str(p) for p in cache.rglob('*.parquet')
       if integrity.check(p, sidecar=p.with_name(('_' if p.name.startswith('chunk-') else '')
                                                 + p.name + '.time.json')) is not None
       or not integrity.verified_by_record(p, sidecar=p.with_name(
           ('_' if p.name.startswith('chunk-') else '') + p.name + '.time.json'))]
tmp = [str(p) for p in cache.rglob('*') if p.name.endswith('.tmp')]
print('entries', len(list(cache.rglob('*.parquet'))), 'bad', bad, 'tmp', tmp)
"""


LATE_STEPS = ("atp_star", "neuron_resample", "neuron_and", "mlp_norms", "neuron_dla")


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace to mount a tmpfs in")
def test_full_tmpfs_ends_in_one_line_and_leaves_only_whole_entries(organism_run, tmp_path):
    cache, _, _, _ = organism_run
    seed = tmp_path / "seed"  # the run's early steps (~400 KB): the tmpfs fills at AtP*
    shutil.copytree(cache, seed, ignore=lambda d, names: [n for n in names
                                                          if n.startswith(LATE_STEPS)])
    mount = tmp_path / "small"
    mount.mkdir()
    script = tmp_path / "check.py"
    script.write_text(CHECK_ENTRIES)
    cli = " ".join([sys.executable, "-m", "factfind.cli", "fact-finding", *ARGS,
                    "--cache", str(mount / "cache"), "--out", str(tmp_path / "out")])
    shell = (f"mount -t tmpfs -o size=600k tmpfs {mount} && cp -r {seed} {mount / 'cache'} && "
             f"cd {ROOT} && {cli}; echo exit=$?; {sys.executable} {script} {mount / 'cache'}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "exit=2" in done.stdout, done.stdout + done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("factfind: error")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "no space left" in errors[0] and "bytes" in errors[0] and "--cache DIR" in errors[0]
    assert str(mount / "cache") in errors[0] and "stay cached" in errors[0]
    summary = done.stdout.splitlines()[-1]
    assert "bad [] tmp []" in summary and not summary.startswith("entries 0 "), summary


@pytest.mark.slow
def test_organism_run_killed_at_random_moments_resumes_to_the_same_results(organism_run,
                                                                           tmp_path):
    cache, _, _, _ = organism_run
    rng = random.Random(9)
    cmd = [sys.executable, "-m", "factfind.cli", "fact-finding", *ARGS, "--cache",
           str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    for _ in range(3):  # after start-up (~4 s) and into the steps
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
        time.sleep(rng.uniform(4.0, 10.0))
        _kill(child)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / REPORT).is_file()
    _equal_runs(cache, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_two_organism_runs_sharing_one_cache_at_once_equal_the_uninterrupted_run(
        organism_run, tmp_path):
    cache, _, _, _ = organism_run
    runs = [subprocess.Popen(
        [sys.executable, "-m", "factfind.cli", "fact-finding", *ARGS, "--cache",
         str(tmp_path / "cache"), "--out", str(tmp_path / f"out{i}")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1")) for i in range(2)]
    try:
        for run in runs:
            _, err = run.communicate(timeout=600)
            assert run.returncode == 0, err[-3000:]
            assert "damaged" not in err
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    _equal_runs(cache, tmp_path / "cache")
    assert not (tmp_path / "cache" / integrity.QUARANTINE).exists()
    assert (tmp_path / "out0" / REPORT).is_file() and (tmp_path / "out1" / REPORT).is_file()
