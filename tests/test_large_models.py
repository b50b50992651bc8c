"""Large-model plumbing on the CPU: half-precision dtypes, device_map pass-through and automatic
batch sizing from (mocked) free memory. Sharding over real GPUs needs a GPU machine
(``benchmarks/bench_gpu_atp.py``)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import factfind as ff
from factfind.localize.patching import auto_chunk
from factfind.model import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, gpt2_model):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    gpt2_model.hf.save_pretrained(path)
    gpt2_model.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_fp32(saved, facts, dtype):
    full = load_model(saved)
    half = load_model(saved, dtype=dtype)
    assert half.dtype == getattr(torch, dtype) and full.dtype == torch.float32
    batch = full.tokenize(list(facts))
    a = full.run(batch).logits
    b = half.run(batch).logits
    assert b.dtype == half.dtype
    scale = float(a.abs().max())
    assert scale > 1.0
    assert float((a - b.float()).abs().max()) < 0.03 * scale
    # a ranking of the vocabulary survives: the top token agrees on most prompts
    assert float((a.argmax(-1) == b.float().argmax(-1)).float().mean()) >= 0.75


def test_bf16_patching_sweep_close_to_fp32(saved, facts):
    full, half = load_model(saved), load_model(saved, dtype="bfloat16")
    pairs = facts.corrupt(full, seed=0, on_missing="skip")
    kw = dict(components=["resid_pre", "mlp_out"], positions=["subject_last", "final"],
              progress=False)
    a = ff.activation_patching(full, pairs, **kw)
    b = ff.activation_patching(half, pairs, **kw)
    # compare the patched logit differences (effects divide by small clean-corrupt gaps)
    x, y = a["metric"].to_numpy(float), b["metric"].to_numpy(float)
    assert np.abs(x).max() > 1.0
    assert np.abs(x - y).max() < 0.05 * np.abs(x).max()
    d16 = ff.direct_logit_attribution(half, pairs, sources=False)
    d32 = ff.direct_logit_attribution(full, pairs, sources=False)
    x, y = d32["effect"].to_numpy(float), d16["effect"].to_numpy(float)
    assert np.abs(x - y).max() < 0.05 * np.abs(x).max()


def test_device_map_passes_through(saved, facts, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    plain = load_model(saved)
    batch = plain.tokenize(list(facts))
    for device_map in ("auto", {"": "cpu"}):
        sharded = load_model(saved, device_map=device_map, dtype="bfloat16")
        assert seen[-1]["device_map"] == device_map and seen[-1]["dtype"] == torch.bfloat16
        assert sharded.devices == [torch.device("cpu")] and sharded.device.type == "cpu"
        assert sharded.dtype == torch.bfloat16
        torch.testing.assert_close(sharded.run(batch).logits.float(), plain.run(batch).logits,
                                   atol=0.1, rtol=0.05)


def test_device_map_errors_are_clear(gpt2_model, saved):
    with pytest.raises(ValueError, match="device_map shards a checkpoint"):
        load_model((gpt2_model.hf, gpt2_model.tokenizer), device_map="auto")
    with pytest.raises(ValueError, match="not both"):
        load_model(saved, device="cpu", device_map="auto")


def _fake_ram(monkeypatch, available):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(
        available=available))


def test_batch_size_from_free_ram(gpt2_model, monkeypatch):
    m = gpt2_model
    _fake_ram(monkeypatch, 8 * 2**30)
    assert m.free_memory() == 8 * 2**30
    per_row = m.activation_bytes(20)
    assert per_row == 20 * (m.n_layers * (8 * m.d_model + 2 * m.d_mlp) + m.d_vocab) * 4
    assert m.rows_that_fit(per_row) == (2 * 2**30) // per_row  # a quarter of free memory
    assert m.rows_that_fit(per_row, fraction=0.5) == (4 * 2**30) // per_row
    assert m.rows_that_fit(per_row, cap=7) == 7
    assert m.rows_that_fit(10**15) == 1  # never zero
    big = auto_chunk(m, 4, 20)
    _fake_ram(monkeypatch, 2**20)
    small = auto_chunk(m, 4, 20)
    assert big == 256 and 1 <= small < 256  # the cap, and shrinking with less memory
    assert small == max(1, (2**18) // (per_row * 4))


def test_batch_size_from_the_tightest_gpu(gpt2_model, monkeypatch):
    """With a device_map over two GPUs the least free memory decides (mocked CUDA)."""
    m = gpt2_model
    free = {0: 40 * 2**30, 1: 3 * 2**30}
    monkeypatch.setattr(type(m), "devices", property(
        lambda self: [torch.device("cuda", 0), torch.device("cuda", 1)]))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda d: (free[torch.device(d).index], 80 * 2**30))
    assert m.free_memory() == 3 * 2**30
    assert m.rows_that_fit(2**20) == (3 * 2**30 // 4) // 2**20


def test_half_precision_halves_the_estimate(gpt2_model, saved):
    half = load_model(saved, dtype="bfloat16")
    assert half.activation_bytes(10) * 2 == gpt2_model.activation_bytes(10)


def test_saving_keeps_the_fingerprint(tmp_path):
    """save_pretrained writes ``architectures`` and ``dtype`` into the live config; keys stay."""
    from factfind.testing.models import tiny_model

    model = tiny_model("gpt2")
    before = model.fingerprint()
    model.hf.config.architectures = None
    model.hf.save_pretrained(tmp_path / "m")
    assert model.hf.config.architectures  # transformers did write it
    assert model.fingerprint() == before
    model.hf.config.n_embd_extra = 1  # a real config change still moves it
    assert model.fingerprint() != before
