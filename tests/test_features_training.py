"""Training sparse dictionaries: recovery of planted features, determinism, resume after a
kill, the activation cache, the dictionary cache, and typed errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from factfind.errors import ArgumentError, DegenerateResultError, EmptyInputError
from factfind.features.activations import collect_activations, plan_batches
from factfind.features.corpus import Corpus
from factfind.features.dictionary import Activation, DictKind
from factfind.features.training import fit_dictionary, train_dictionaries
from factfind.testing.superposition import feature_recovery, planted_superposition

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Michael Jordan plays the sport of basketball in Chicago.",
         "Paris is the capital of France.", "one two three four five six seven",
         "Serena Williams plays the sport of tennis.", "Rome is the capital of Italy."] * 6


@pytest.fixture(scope="module")
def organism():
    from factfind.model import load_model

    return load_model("organism")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _toy(n=4096, seed=1):
    planted = planted_superposition(64, 16, seed=0)
    x, _ = planted.sample(n, seed=seed)
    return planted, x


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_fit_dictionary_recovers_planted_features(activation, one_thread):
    planted, x = _toy(16384)
    d = fit_dictionary(x, kind="sae", activation=activation, width=128, k=4, batch_size=256,
                       epochs=4, lr_scale=8 if activation == "topk" else 4, dead_after=4096,
                       progress=False)
    rec = feature_recovery(planted.directions, d)
    assert rec["best_cos"].mean() >= 0.95 and rec["found"].mean() >= 0.9
    assert d.activation is Activation(activation) and d.kind is DictKind.SAE
    ev = 1 - ((x - d.reconstruct(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert ev > 0.8
    if activation == "batchtopk":
        assert d.threshold is not None and float(d.threshold) > 0
        l0 = (d.encode(x) > 0).sum(-1).float().mean()
        assert 1 < l0 < 12  # the inference threshold keeps about k = 4 per token


def test_skip_transcoder_learns_a_linear_map_through_its_skip_path(one_thread):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g)
    A = torch.randn(16, 12, generator=g)
    y = x @ A + 0.5
    d = fit_dictionary(x, y, kind="skip_transcoder", width=64, k=4, batch_size=256, epochs=3,
                       lr_scale=8, progress=False)
    assert d.W_skip is not None and d.d_out == 12
    ev = 1 - ((y - d.reconstruct(x)) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert ev > 0.95
    assert d.meta["training"]["steps"] == 3 * (8192 // 256)


def test_same_seed_same_dictionary_bitwise(one_thread):
    _, x = _toy(2048)
    kw = dict(kind="sae", width=64, k=4, batch_size=256, epochs=2, progress=False,
              dead_after=512)
    a, b = fit_dictionary(x, seed=3, **kw), fit_dictionary(x, seed=3, **kw)
    c = fit_dictionary(x, seed=4, **kw)
    for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert not torch.equal(a.W_dec, c.W_dec)
    assert a.b_enc.abs().sum() > 0  # it trained


def test_typed_errors():
    x = torch.randn(64, 8)
    with pytest.raises(ArgumentError, match="width must be > 0"):
        fit_dictionary(x, kind="sae", width=0, k=1)
    with pytest.raises(ArgumentError, match="k must be > 0"):
        fit_dictionary(x, kind="sae", width=8, k=0)
    with pytest.raises(ArgumentError, match=r"k \(9\) must be <= width"):
        fit_dictionary(x, kind="sae", width=8, k=9)
    with pytest.raises(EmptyInputError):
        fit_dictionary(torch.empty(0, 8), kind="sae", width=8, k=2)
    with pytest.raises(EmptyInputError):
        fit_dictionary(iter([]), kind="sae", width=8, k=2)
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ArgumentError, match="NaN"):
        fit_dictionary(bad, kind="sae", width=8, k=2)
    with pytest.raises(ArgumentError, match="pass the targets y"):
        fit_dictionary(x, kind="transcoder", width=8, k=2)
    with pytest.raises(ArgumentError, match="activation"):
        fit_dictionary(x, kind="sae", activation="jumprelu", width=8, k=2)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from factfind.features.training import fit_dictionary
    from factfind.testing.superposition import planted_superposition
    x, _ = planted_superposition(64, 16, seed=0).sample(32768, seed=1)
    d = fit_dictionary(x, kind="sae", width=512, k=4, batch_size=64, epochs=1,
                       checkpoint=sys.argv[1], checkpoint_every=0.0, progress=False)
""")


def _resume_kwargs(ckpt):
    return dict(kind="sae", width=512, k=4, batch_size=64, epochs=1, checkpoint=ckpt,
                checkpoint_every=0.0, progress=False)


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_result(tmp_path, one_thread):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(ckpt)],
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    meta = ckpt.with_suffix(".json")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if meta.exists():
            try:
                if json.loads(meta.read_text())["step"] >= 5:
                    break
            except ValueError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(meta.read_text())["step"]
    assert 5 <= killed_at < 512, "the kill must land mid-run"
    x, _ = planted_superposition(64, 16, seed=0).sample(32768, seed=1)
    resumed = fit_dictionary(x, **_resume_kwargs(ckpt))
    fresh = fit_dictionary(x, **_resume_kwargs(tmp_path / "other"))
    for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, f), getattr(fresh, f)), f
    assert resumed.meta["training"]["steps"] == 512


def test_plan_batches_buckets_by_length():
    lengths = [3, 10, 4, 9, 3, 10, 5]
    batches = plan_batches(lengths, batch_tokens=20, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        ls = [lengths[i] for i in b]
        assert len(b) * max(ls) <= 20 or len(b) == 1
        assert max(ls) - min(ls) <= 2  # near-equal lengths: little padding


def test_activation_cache_resumes_and_matches(organism, tmp_path):
    corpus = Corpus(TEXTS, {"source": "test"})
    sites = [("mlp_in", 1), ("mlp_out", 1)]
    a = collect_activations(organism, corpus, sites=sites, folder=tmp_path / "a",
                            shard_tokens=64, batch_tokens=64, progress=False)
    assert len(a.shards) > 2
    x = a.tensor(("mlp_in", 1))
    assert x.shape == (a.tokens, organism.d_model) and x.dtype == torch.float32
    assert x.abs().sum() > 0
    # kill: drop a shard and the manifest; the rerun rebuilds that shard alone
    (tmp_path / "a" / "manifest.json").unlink()
    victim = a.shards[1]
    victim.unlink()
    untouched = a.shards[0].stat().st_mtime_ns
    b = collect_activations(organism, corpus, sites=sites, folder=tmp_path / "a",
                            shard_tokens=64, batch_tokens=64, progress=False)
    assert victim.exists() and a.shards[0].stat().st_mtime_ns == untouched
    assert torch.equal(b.tensor(("mlp_in", 1)), x)
    # the rows are the model's own activations at real tokens
    enc = organism.tokenizer(TEXTS[:1], return_tensors="pt")
    run = organism.run(dict(enc), save=[("mlp_out", 1)])
    ids = enc["input_ids"][0]
    ref = run.acts[("mlp_out", 1)][0][ids != organism.tokenizer.bos_token_id]  # BOS left out
    rows = b.tensor(("mlp_out", 1))
    hits = [(rows - r.half().float()).abs().amax(1).min() for r in ref]
    assert len(hits) > 5 and max(float(h) for h in hits) < 1e-2
    bos = organism.tokenizer.bos_token_id
    total = sum(sum(t != bos for t in i) for i in organism.tokenizer(TEXTS)["input_ids"])
    assert b.tokens == total  # every token but the BOS


def test_nan_activations_name_the_layer(organism, tmp_path, monkeypatch):
    real_run = organism.run

    def nan_run(*args, **kwargs):
        run = real_run(*args, **kwargs)
        run.acts[("mlp_out", 2)] = run.acts[("mlp_out", 2)] * float("nan")
        return run

    monkeypatch.setattr(organism, "run", nan_run)
    with pytest.raises(DegenerateResultError, match="layer 2"):
        collect_activations(organism, Corpus(TEXTS, {}), sites=[("mlp_out", 2)],
                            folder=tmp_path / "n", progress=False)


def test_train_dictionaries_caches_and_reloads(organism, tmp_path):
    corpus = Corpus(TEXTS * 4, {"source": "test"})
    kw = dict(layers=[0, 2], width=64, k=4, tokens=None, epochs=1, batch_size=64,
              cache_dir=tmp_path, progress=False)
    dicts = train_dictionaries(organism, corpus, **kw)
    assert sorted(dicts) == ["L0.stc", "L2.stc"] and dicts.layers == [0, 2]
    assert dicts.meta["corpus"]["fingerprint"] == corpus.fingerprint()
    assert dicts.meta["activation_tokens"] > 0
    again = train_dictionaries(organism, corpus, **kw)
    assert again.meta["loaded_from_cache"]
    for name in dicts:
        assert torch.equal(dicts[name].W_enc, again[name].W_enc)
    with pytest.raises(ArgumentError, match="unknown site"):
        train_dictionaries(organism, corpus, layers=[99], cache_dir=tmp_path, progress=False)
    with pytest.raises(ArgumentError, match="k must be > 0"):
        train_dictionaries(organism, corpus, k=0, cache_dir=tmp_path, progress=False)
    with pytest.raises(ArgumentError, match="unknown site"):
        train_dictionaries(organism, corpus, kind="sae", sae_site="mlp_in",
                           cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("fault", ["truncated", "random bytes", "zero length",
                                   "missing manifest and truncated"])
def test_a_damaged_dictionary_cache_is_quarantined_and_rebuilt(organism, tmp_path, fault):
    """Issue 27 for the feature work's caches: a damaged file of a cached dictionary set (and
    of one layer's folder) is moved into ``quarantine/``, never deleted, and the set is
    retrained to the same weights (same seed)."""
    corpus = Corpus(TEXTS * 2, {"source": "test"})
    kw = dict(layers=[1], width=32, k=4, tokens=None, epochs=1, batch_size=64,
              cache_dir=tmp_path, progress=False)
    first = train_dictionaries(organism, corpus, **kw)
    root = tmp_path / "dictionaries" / first.meta["key"]
    for folder in (root / "dictionaries", root / "layers" / "L1"):
        victim = next(p for p in sorted(folder.rglob("*.safetensors")))
        data = victim.read_bytes()
        if fault == "truncated":
            victim.write_bytes(data[: len(data) // 2])
        elif fault == "random bytes":
            victim.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8)
                               .numpy().tobytes())
        elif fault == "zero length":
            victim.write_bytes(b"")
        else:
            folder.with_name(folder.name + ".manifest.json").unlink()
            victim.write_bytes(data[:100])
    again = train_dictionaries(organism, corpus, **kw)
    assert not again.meta.get("loaded_from_cache")  # rebuilt, not served
    assert torch.equal(again["L1.stc"].W_enc, first["L1.stc"].W_enc)
    moved = list((tmp_path / "dictionaries" / "quarantine").rglob("*.safetensors"))
    assert len(moved) == 2  # the set's file and the layer's, both kept
    third = train_dictionaries(organism, corpus, **kw)
    assert third.meta["loaded_from_cache"]


@pytest.mark.parametrize("fault", ["truncated", "random bytes", "zero length",
                                   "missing sidecar and truncated"])
def test_a_damaged_activation_shard_is_quarantined_and_collected_again(organism, tmp_path,
                                                                       fault):
    corpus = Corpus(TEXTS, {"source": "test"})
    sites = [("mlp_in", 1)]
    kw = dict(sites=sites, folder=tmp_path / "acts" / "k", shard_tokens=64, batch_tokens=64,
              progress=False)
    a = collect_activations(organism, corpus, **kw)
    x = a.tensor(("mlp_in", 1))
    victim = a.shards[1]
    data = victim.read_bytes()
    if fault == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif fault == "random bytes":
        victim.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8)
                           .numpy().tobytes())
    elif fault == "zero length":
        victim.write_bytes(b"")
    else:
        victim.with_name(victim.name + ".time.json").unlink()
        victim.write_bytes(data[:200])
    b = collect_activations(organism, corpus, **kw)
    assert torch.equal(b.tensor(("mlp_in", 1)), x)
    moved = list((tmp_path / "acts" / "quarantine").rglob(victim.name))
    assert len(moved) == 1 and moved[0].read_bytes() != data  # the damaged bytes, kept


@pytest.mark.slow
def test_a_kill_between_the_checkpoints_two_files_still_resumes_exactly(tmp_path, one_thread,
                                                                         monkeypatch):
    """A checkpoint is two files written one after the other (weights, then counters): a run
    killed between the two leaves the weights of step n beside the counters of step n - 1. The
    resume must still reproduce the uninterrupted run (the counters ride in the weights file)."""
    import factfind.features.trainer as tr

    x, _ = planted_superposition(64, 16, seed=0).sample(8192, seed=1)
    kw = dict(kind="sae", width=128, k=4, batch_size=64, epochs=1, checkpoint_every=0.0,
              progress=False)
    real = tr.atomic_write_bytes
    writes = {"json": 0}

    def killed_before_the_counters(path, data, *args, **kwargs):
        if str(path).endswith(".json"):
            writes["json"] += 1
            if writes["json"] == 10:
                raise KeyboardInterrupt("killed")
        return real(path, data, *args, **kwargs)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(tr, "atomic_write_bytes", killed_before_the_counters)
    with pytest.raises(KeyboardInterrupt):
        fit_dictionary(x, checkpoint=ckpt, **kw)
    monkeypatch.setattr(tr, "atomic_write_bytes", real)
    counters = json.loads(ckpt.with_suffix(".json").read_text())["step"]
    inner = json.loads(tr._safetensors_metadata(ckpt.with_suffix(".safetensors").read_bytes())[
        tr.CHECKPOINT_META])["step"]
    assert inner == counters + 1  # the two files disagree, as after a kill between them
    resumed = fit_dictionary(x, checkpoint=ckpt, **kw)
    fresh = fit_dictionary(x, checkpoint=tmp_path / "other", **kw)
    for f in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, f), getattr(fresh, f)), f
