"""The field's dictionary formats: reference parity, round trips, and typed errors.

* **Parity with the libraries themselves.** ``tests/data/formats/`` holds dictionaries that
  SAELens 6.54, sparsify 1.3.3 and circuit-tracer 0.5.0 saved with their own code, beside the
  outputs of their own encode/decode/forward on fixed activations
  (``tests/data/formats/make_goldens.py``, run in each library's own virtualenv). factfind loads
  each folder and must match those outputs to 1e-5; the Gemma Scope / Gemma Scope 2 files are
  laid out as Google publishes them and were read by circuit-tracer's own Gemma Scope loaders.
* **Round trips.** Every (format, kind, activation) either saves and loads back to the same
  tensors and fields, or is refused with :class:`FormatCapabilityError`; the table of which is
  which is asserted too, so a format cannot pass by refusing everything.
* **Errors.** A missing or corrupt file, bad JSON/YAML, a missing tensor, mismatched shapes, a
  hook with no factfind site, a dictionary that does not fit the model, a hub name offline: one
  typed line naming the file (or name). A hypothesis fuzz corrupts saved files at random.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import factfind as ff
from factfind.errors import (
    ArgumentError,
    DictionaryFileError,
    FactfindError,
    FormatCapabilityError,
    HubUnavailableError,
    UnknownHookError,
)
from factfind.features import Activation, Dictionaries, Dictionary, DictKind
from factfind.features.formats import FORMATS, load_dictionaries, save_dictionaries
from factfind.features.formats.hooks import parse_hf_hook, parse_tl_hook
from factfind.features.formats.hub import hub_location
from factfind.testing.models import tiny_model
from factfind.types import Component

DATA = Path(__file__).parent / "data" / "formats"
TOL = 1e-5

# ------------------------------------------------------------------ parity with the libraries

#: golden folder -> (dictionary name, kind, activation) factfind must read it as
SAELENS = {
    "standard": ("L2.res", "sae", "relu"),
    "topk": ("L1.rpre", "sae", "topk"),
    "topk_rescaled": ("L0.att", "sae", "topk"),
    "jumprelu": ("L1.mlp", "sae", "jumprelu"),
    "batchtopk": ("L2.res", "sae", "batchtopk"),
    "transcoder": ("L3.tc", "transcoder", "relu"),
    "skip_transcoder": ("L0.stc", "skip_transcoder", "relu"),
    "jumprelu_transcoder": ("L2.tc", "transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("L1.stc", "skip_transcoder", "jumprelu"),
}
SPARSIFY = {
    "sae/layers.2": ("L2.res", "sae", "topk"),
    "transcoder/layers.3.mlp": ("L3.tc", "transcoder", "topk"),
    "skip_transcoder/layers.1.mlp": ("L1.stc", "skip_transcoder", "topk"),
}
GEMMASCOPE = {
    "gemma-scope-2b-pt-transcoders/layer_3/width_16k/average_l0_5":
        ("L3.tc", "transcoder", "jumprelu"),
    "gemma-scope-2-270m-pt/transcoder/layer_5_width_16k_l0_small_affine":
        ("L5.stc", "skip_transcoder", "jumprelu"),
}
GOLDEN = {**{f"saelens/{k}": v for k, v in SAELENS.items()},
          **{f"sparsify/{k}": v for k, v in SPARSIFY.items()},
          **{f"gemmascope/{k}": v for k, v in GEMMASCOPE.items()}}


def _match(d: Dictionary, want: dict[str, torch.Tensor], suffix: str = "") -> None:
    x, acts = want["x"], want[f"acts{suffix}"]
    assert (acts > 0).sum() > 0 and want[f"out{suffix}"].abs().sum() > 0  # non-trivial goldens
    got = d.encode(x)
    assert (got - acts).abs().max() <= TOL
    assert torch.equal(got > 0, acts > 0)  # the same features fire
    assert (d.decode(acts) - want[f"decoded{suffix}"]).abs().max() <= TOL
    assert (d.reconstruct(x) - want[f"out{suffix}"]).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_encode_decode_match_the_library_to_1e5(case):
    folder = DATA / case
    dicts = load_dictionaries(folder)
    name, kind, act = GOLDEN[case]
    assert list(dicts) == [name]
    d = dicts[name]
    assert (d.kind, d.activation) == (kind, act)
    want = load_file(str(next(folder.rglob("expected.safetensors"))))
    _match(d, want)


@pytest.mark.parametrize("case", ["relu_skip", "jumprelu"])
def test_circuit_tracer_transcoder_sets_match_the_library(case):
    folder = DATA / "circuit_tracer" / case
    dicts = load_dictionaries(folder)
    assert dicts.layers == [0, 1] and dicts.model == "tiny-llama"
    want = load_file(str(folder / "expected.safetensors"))
    for d in dicts.values():
        assert d.site is Component.MLP_IN and not d.subtract_b_dec
        assert d.activation is (Activation.JUMPRELU if case == "jumprelu" else Activation.RELU)
        assert (d.kind is DictKind.SKIP_TRANSCODER) == (case == "relu_skip")
        _match(d, want, f".{d.layer}")


def test_a_release_folder_of_many_loads_as_one_set():
    dicts = load_dictionaries(DATA / "sparsify")  # three hook-point folders under three sets
    assert sorted(dicts) == ["L1.stc", "L2.res", "L3.tc"]
    assert dicts.meta["format"] == "sparsify"
    with pytest.raises(DictionaryFileError, match="several formats"):
        load_dictionaries(DATA)


def test_saelens_topk_rescaling_is_folded_exactly():
    d = load_dictionaries(DATA / "saelens" / "topk_rescaled")["L0.att"]
    raw = load_file(str(DATA / "saelens" / "topk_rescaled" / "sae_weights.safetensors"))
    assert not torch.allclose(raw["W_dec"].norm(dim=-1), torch.ones(d.d_sae))
    assert torch.allclose(d.W_dec.norm(dim=-1), torch.ones(d.d_sae), atol=1e-6)


# ------------------------------------------------------------------ round trips

#: (format, kind, activation) -> whether the format expresses it
CAN = {
    "saelens": {(k, a) for k in DictKind for a in Activation}
               - {(k, Activation.TOPK) for k in (DictKind.TRANSCODER, DictKind.SKIP_TRANSCODER)},
    "sparsify": {(k, Activation.TOPK) for k in DictKind},
    "circuit_tracer": {(k, a) for k in (DictKind.TRANSCODER, DictKind.SKIP_TRANSCODER)
                       for a in (Activation.RELU, Activation.JUMPRELU)},
    "gemmascope": {(k, Activation.JUMPRELU) for k in DictKind},
}


def _random(kind: DictKind, act: Activation, layer: int, *, seed: int, d_in: int = 8,
            d_sae: int = 24, site: Component | None = None,
            subtract: bool | None = None) -> Dictionary:
    d = Dictionary.random(kind=kind, activation=act, layer=layer, d_in=d_in, d_sae=d_sae, k=3,
                          seed=seed, site=site)
    g = torch.Generator().manual_seed(seed + 1)
    for f in ("b_enc", "b_dec", "threshold", "W_skip"):  # every tensor matters
        t = getattr(d, f)
        if t is not None:
            setattr(d, f, torch.rand(t.shape, generator=g) * 0.2 + 0.01)
    d.subtract_b_dec = subtract if subtract is not None else d.subtract_b_dec
    d.model = "tiny-llama"
    d.meta = {"trained": {"tokens": 1234, "seed": seed}}
    return d


def _same(a: Dictionary, b: Dictionary, *, meta: bool = True) -> None:
    for f in Dictionary.tensor_fields():
        ta, tb = getattr(a, f), getattr(b, f)
        assert (ta is None) == (tb is None), f
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f
    for f in ("kind", "activation", "layer", "site", "k", "subtract_b_dec", "model"):
        assert getattr(a, f) == getattr(b, f), f
    if meta:
        assert a.meta == b.meta


def _subtract_for(fmt: str, kind: DictKind) -> bool:
    return kind is DictKind.SAE and fmt in ("saelens", "sparsify")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("kind", list(DictKind))
@pytest.mark.parametrize("act", list(Activation))
def test_every_format_round_trips_what_it_can_express_and_refuses_the_rest(
        tmp_path, fmt, kind, act):
    site = Component.RESID_POST if kind is DictKind.SAE else None
    ds = Dictionaries([_random(kind, act, layer, seed=layer, site=site,
                               subtract=_subtract_for(fmt, kind)) for layer in (0, 1)])
    if (kind, act) not in CAN[fmt]:
        with pytest.raises(FormatCapabilityError, match=r"L0\.\w+: .*"):
            ds.save(tmp_path / "out", format=fmt)
        assert not (tmp_path / "out").exists()  # nothing half-written
        return
    out = ds.save(tmp_path / "out", format=fmt)
    back = load_dictionaries(out)
    assert list(back) == list(ds)
    assert back.meta["format"] == fmt
    for name in ds:
        _same(ds[name], back[name])


@pytest.mark.parametrize("fmt,sites", [
    ("saelens", [Component.RESID_PRE, Component.RESID_POST, Component.MLP_OUT,
                 Component.ATTN_OUT]),
    ("sparsify", [Component.RESID_POST, Component.MLP_OUT, Component.ATTN_OUT]),
    ("gemmascope", [Component.RESID_POST, Component.MLP_OUT]),
])
def test_sae_sites_round_trip(tmp_path, fmt, sites):
    act = {"sparsify": Activation.TOPK, "gemmascope": Activation.JUMPRELU}.get(
        fmt, Activation.TOPK)
    ds = Dictionaries([_random(DictKind.SAE, act, 2, seed=i, site=s,
                               subtract=_subtract_for(fmt, DictKind.SAE))
                       for i, s in enumerate(sites)])
    back = load_dictionaries(ds.save(tmp_path / fmt, format=fmt))
    assert sorted(back) == sorted(ds)
    for name in ds:
        _same(ds[name], back[name])


def test_saelens_round_trip_keeps_bfloat16_and_a_mixed_set(tmp_path):
    ds = Dictionaries([_random(DictKind.SAE, Activation.RELU, 0, seed=0).to(torch.bfloat16),
                       _random(DictKind.TRANSCODER, Activation.JUMPRELU, 0, seed=1),
                       _random(DictKind.SKIP_TRANSCODER, Activation.RELU, 0, seed=2)])
    back = load_dictionaries(ds.save(tmp_path / "m", format="saelens"))
    assert back["L0.res"].W_enc.dtype == torch.bfloat16
    for name in ds:
        _same(ds[name], back[name])


@pytest.mark.parametrize("bad,fmt,match", [
    ("sae_resid_pre", "sparsify", "module outputs"),
    ("sae_attn_out", "gemmascope", "not attn_out"),
    ("subtracting_transcoder", "saelens", "apply_b_dec_to_input"),
    ("non_subtracting_sae", "sparsify", "subtract_b_dec=False"),
    ("subtracting_sae", "gemmascope", "subtracts b_dec"),
    ("gap", "circuit_tracer", r"layers \[0, 2\]"),
    ("two_widths", "circuit_tracer", "one width"),
    ("same_hook", "sparsify", "both hook 'layers.1.mlp'"),
])
def test_what_a_format_cannot_hold_is_refused_in_one_line(tmp_path, bad, fmt, match):
    T, S, J, K = DictKind.TRANSCODER, DictKind.SAE, Activation.JUMPRELU, Activation.TOPK
    R = Activation.RELU
    cases = {
        "sae_resid_pre": [_random(S, K, 1, seed=0, site=Component.RESID_PRE)],
        "sae_attn_out": [_random(S, J, 1, seed=0, site=Component.ATTN_OUT, subtract=False)],
        "subtracting_transcoder": [_random(T, R, 1, seed=0, subtract=True)],
        "non_subtracting_sae": [_random(S, K, 1, seed=0, subtract=False)],
        "subtracting_sae": [_random(S, J, 1, seed=0, subtract=True)],
        "gap": [_random(T, R, 0, seed=0), _random(T, R, 2, seed=1)],
        "two_widths": [_random(T, R, 0, seed=0), _random(T, R, 1, seed=1, d_sae=32)],
        "same_hook": [_random(S, K, 1, seed=0, site=Component.MLP_OUT),
                      _random(T, K, 1, seed=1)],
    }
    with pytest.raises(FormatCapabilityError, match=match) as e:
        save_dictionaries(Dictionaries(cases[bad]), tmp_path / "x", format=fmt)
    assert "\n" not in str(e.value)


def test_save_refuses_to_overwrite_and_unknown_formats(tmp_path):
    ds = Dictionaries([_random(DictKind.SAE, Activation.TOPK, 0, seed=0)])
    out = ds.save(tmp_path / "a")
    with pytest.raises(ArgumentError, match="overwrite=True"):
        ds.save(out)
    ds.save(out, overwrite=True)
    with pytest.raises(ArgumentError, match="format must be one of"):
        ds.save(tmp_path / "b", format="pickle")
    with pytest.raises(ArgumentError, match="format must be one of"):
        load_dictionaries(out, format="npz")


# ------------------------------------------------------------------ hook names


@pytest.mark.parametrize("hook,want", [
    ("blocks.5.hook_resid_post", (Component.RESID_POST, 5)),
    ("blocks.0.hook_resid_pre", (Component.RESID_PRE, 0)),
    ("blocks.11.hook_mlp_out", (Component.MLP_OUT, 11)),
    ("blocks.3.hook_attn_out", (Component.ATTN_OUT, 3)),
    ("blocks.3.ln2.hook_normalized", (Component.MLP_IN, 3)),
    ("blocks.7.mlp.hook_in", (Component.MLP_IN, 7)),
])
def test_transformerlens_hooks_map_to_sites(hook, want):
    assert tuple(parse_tl_hook(hook, path="cfg.json"))[:2] == want


@pytest.mark.parametrize("hook,model,want", [
    ("layers.3", None, (Component.RESID_POST, 3)),
    ("model.layers.3.mlp", None, (Component.MLP_OUT, 3)),
    ("h.4.mlp", None, (Component.MLP_OUT, 4)),                       # GPT-2
    ("gpt_neox.layers.2.attention", None, (Component.ATTN_OUT, 2)),  # Pythia
    ("model.layers.5.pre_feedforward_layernorm.output", "gemma-3", (Component.MLP_IN, 5)),
    ("model.layers.5.post_feedforward_layernorm.output", "gemma-3", (Component.MLP_OUT, 5)),
    ("model.layers.5.post_attention_layernorm.output", "llama", (Component.MLP_IN, 5)),
    ("model.layers.5.post_attention_layernorm.output", "gemma-2", (Component.ATTN_OUT, 5)),
    ("model.layers.5.mlp.input", None, (Component.MLP_IN, 5)),
])
def test_hugging_face_module_paths_map_to_sites(hook, model, want):
    assert tuple(parse_hf_hook(hook, path="cfg", model_name=model))[:2] == want


@pytest.mark.parametrize("hook", ["blocks.3.attn.hook_z", "blocks.3.hook_resid_mid",
                                  "blocks.3.hook_mlp_in", "hook_embed", "blocks.x.hook_q"])
def test_hooks_without_a_factfind_site_are_refused(hook):
    with pytest.raises(UnknownHookError, match=r"^cfg\.json: hook .*factfind reads") as e:
        parse_tl_hook(hook, path="cfg.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("hook", ["embed_tokens", "model.layers.2.self_attn.o_proj.input",
                                  "lm_head"])
def test_hf_hooks_without_a_factfind_site_are_refused(hook):
    with pytest.raises(UnknownHookError, match="factfind reads"):
        parse_hf_hook(hook, path="f")


def test_circuit_tracer_resid_mid_transcoders_are_refused(tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(DATA / "circuit_tracer" / "jumprelu", folder)
    cfg = (folder / "config.yaml").read_text().replace("mlp.hook_in", "hook_resid_mid")
    (folder / "config.yaml").write_text(cfg)
    with pytest.raises(UnknownHookError, match="before the MLP's norm"):
        load_dictionaries(folder)


# ------------------------------------------------------------------ errors


def _saved(tmp_path: Path, fmt: str) -> Path:
    kind = {"saelens": DictKind.SAE, "sparsify": DictKind.TRANSCODER}.get(
        fmt, DictKind.SKIP_TRANSCODER)
    act = {"saelens": Activation.TOPK, "sparsify": Activation.TOPK}.get(fmt, Activation.JUMPRELU)
    ds = Dictionaries([_random(kind, act, layer, seed=layer, subtract=False if
                               kind is not DictKind.SAE else None) for layer in (0, 1)])
    return ds.save(tmp_path / fmt, format=fmt)


def _weights(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".npz"))


def _one_line(e: pytest.ExceptionInfo, path: Path | str) -> None:
    text = str(e.value)
    assert "\n" not in text and str(path) in text, text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_missing_and_truncated_weights_name_the_file(tmp_path, fmt):
    folder = _saved(tmp_path, fmt)
    w = _weights(folder)[0]
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryFileError, match="corrupt or truncated") as e:
        load_dictionaries(folder)
    _one_line(e, w)
    w.unlink()
    with pytest.raises(DictionaryFileError, match=r"is missing|from 0 up") as e:
        load_dictionaries(folder)
    assert e.value.path is not None and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt,config", [("saelens", "cfg.json"), ("sparsify", "cfg.json"),
                                        ("circuit_tracer", "config.yaml"),
                                        ("gemmascope", "config.json")])
def test_bad_json_or_yaml_names_the_file(tmp_path, fmt, config):
    folder = _saved(tmp_path, fmt)
    cfg = sorted(folder.rglob(config))[0]
    cfg.write_text("{not: [valid" if config.endswith("json") else "a: [1, 2\n  b: }")
    with pytest.raises(DictionaryFileError, match=r"not valid (JSON|YAML)") as e:
        load_dictionaries(folder, format=fmt)
    _one_line(e, cfg)


def test_a_missing_tensor_and_mismatched_shapes_name_the_file(tmp_path):
    folder = _saved(tmp_path, "saelens")
    w = _weights(folder)[0]
    t = load_file(str(w))
    save_file({k: v for k, v in t.items() if k != "b_dec"}, str(w))
    with pytest.raises(DictionaryFileError, match="'b_dec' is missing") as e:
        load_dictionaries(folder)
    _one_line(e, w)
    t["b_enc"] = torch.zeros(5)
    save_file(t, str(w))
    with pytest.raises(DictionaryFileError, match=r"b_enc must be \(24,\), got \(5,\)") as e:
        load_dictionaries(folder)
    _one_line(e, w)


def test_sparsify_shapes_must_match_its_config(tmp_path):
    folder = _saved(tmp_path, "sparsify")
    cfg = folder / "layers.0.mlp" / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"num_latents": 24', '"num_latents": 30'))
    with pytest.raises(DictionaryFileError, match=r"encoder.weight is \(24, 8\)") as e:
        load_dictionaries(folder)
    _one_line(e, folder / "layers.0.mlp" / "sae.safetensors")


def test_broken_npz_and_unknown_architecture(tmp_path):
    npz = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_9"
    npz.mkdir(parents=True)
    (npz / "params.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DictionaryFileError, match="corrupt or truncated"):
        load_dictionaries(npz / "params.npz")
    folder = tmp_path / "gated"
    shutil.copytree(DATA / "saelens" / "standard", folder)
    cfg = folder / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"architecture": "standard"',
                                           '"architecture": "gated"'))
    with pytest.raises(DictionaryFileError, match="architecture 'gated' has no factfind"):
        load_dictionaries(folder)


def test_gemma_scope_npz_as_published_and_the_site_from_its_repository(tmp_path):
    g = torch.Generator().manual_seed(0)
    arrays = {"W_enc": torch.randn(8, 24, generator=g), "W_dec": torch.randn(24, 8, generator=g),
              "b_enc": torch.randn(24, generator=g), "b_dec": torch.randn(8, generator=g),
              "threshold": torch.rand(24, generator=g)}
    for repo, name in [("gemma-scope-2b-pt-res", "L7.res"), ("gemma-scope-9b-pt-mlp", "L7.mlp")]:
        folder = tmp_path / repo / "layer_7" / "width_16k" / "average_l0_20"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **_np(arrays))
        d = load_dictionaries(tmp_path / repo)[name]
        assert d.activation is Activation.JUMPRELU and not d.subtract_b_dec
        assert d.model == f"google/gemma-2-{repo.split('-')[2]}"
        x = torch.randn(4, 8, generator=g)
        pre = x @ arrays["W_enc"] + arrays["b_enc"]
        assert torch.allclose(d.encode(x), pre * (pre > arrays["threshold"]))
    att = tmp_path / "gemma-scope-2b-pt-att" / "layer_7" / "width_16k" / "average_l0_20"
    att.mkdir(parents=True)
    np.savez(att / "params.npz", **_np(arrays))
    with pytest.raises(DictionaryFileError, match="heads' z"):
        load_dictionaries(att)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(att / "params.npz", bare / "params.npz")
    with pytest.raises(DictionaryFileError, match="pass site="):
        load_dictionaries(bare)
    d = load_dictionaries(bare / "params.npz", site="resid_post", layer=4)["L4.res"]
    assert d.d_sae == 24


def _np(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: v.numpy() for k, v in tensors.items()}


def test_a_dictionary_that_does_not_fit_the_model_is_refused():
    model = tiny_model("llama")
    good = Dictionaries([_random(DictKind.TRANSCODER, Activation.TOPK, 0, seed=0,
                                 d_in=model.d_model)])
    with pytest.raises(ArgumentError, match=r"reads 8 and writes 8 dimensions"):
        load_dictionaries(Dictionaries([_random(DictKind.TRANSCODER, Activation.TOPK, 0,
                                                seed=0)]).save(_tmp() / "a", format="sparsify"),
                          model=model)
    dicts = load_dictionaries(good.save(_tmp() / "b", format="sparsify"), model=model)
    assert list(dicts) == ["L0.tc"]


def test_a_module_output_before_a_post_norm_is_refused_on_that_family():
    model = tiny_model("gemma2")  # post_feedforward_layernorm after the MLP
    sae = Dictionaries([_random(DictKind.SAE, Activation.TOPK, 0, seed=0, d_in=model.d_model,
                                site=Component.MLP_OUT)])
    folder = sae.save(_tmp() / "g", format="sparsify")  # hooks layers.0.mlp: pre post-norm
    cfg = folder / "layers.0.mlp" / "cfg.json"  # as sparsify writes it: no factfind block
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items()
                               if k != "factfind"}))
    assert load_dictionaries(folder)["L0.mlp"].meta["hook_before_post_norm"]
    with pytest.raises(ArgumentError, match=r"before .* post norm"):
        load_dictionaries(folder, model=model)


def _tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="ff-formats-"))


# ------------------------------------------------------------------ hub names


@pytest.mark.parametrize("name,want", [
    ("gemma-scope-2-270m-pt-transcoders/layer_5_width_16k_l0_small",
     ("google/gemma-scope-2-270m-pt", "transcoder/layer_5_width_16k_l0_small")),
    ("gemma-scope-2-270m-pt-transcoders/transcoder/layer_9_width_16k_l0_small_affine",
     ("google/gemma-scope-2-270m-pt", "transcoder/layer_9_width_16k_l0_small_affine")),
    ("gemma-scope-2-1b-it-res-all/layer_3_width_16k_l0_big",
     ("google/gemma-scope-2-1b-it", "resid_post_all/layer_3_width_16k_l0_big")),
    ("gemma-scope-2b-pt-res/layer_3/width_16k/average_l0_5",
     ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_5")),
    ("EleutherAI/skip-transcoder-SmolLM2-135M-8x/layers.3.mlp",
     ("EleutherAI/skip-transcoder-SmolLM2-135M-8x", "layers.3.mlp")),
    ("EleutherAI/skip-transcoder-SmolLM2-135M-8x", ("EleutherAI/skip-transcoder-SmolLM2-135M-8x",
                                                    None)),
])
def test_hub_names_resolve_to_repository_and_folder(name, want):
    assert hub_location(name) == want


@pytest.mark.parametrize("name", ["gemma-scope-2-270m-pt-transcoders/layer_5_width_16k_l0_small",
                                  "EleutherAI/skip-transcoder-SmolLM2-135M-8x"])
def test_hub_names_offline_fail_in_one_line(monkeypatch, name):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match=r"download the folder .* pass its local path") \
            as e:
        ff.load_dictionaries(name)
    _one_line(e, name)
    assert isinstance(e.value, FactfindError)


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DictionaryFileError, match="no such file or folder"):
        load_dictionaries(tmp_path / "nope")
    with pytest.raises(DictionaryFileError, match="no dictionary files found"):
        load_dictionaries(tmp_path)


# ------------------------------------------------------------------ fuzz

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-src")
    return {fmt: _saved(root, fmt) for fmt in FORMATS}


@FUZZ
@given(fmt=st.sampled_from(sorted(FORMATS)), which=st.integers(0, 10),
       how=st.sampled_from(["truncate", "flip", "garbage", "empty"]),
       at=st.floats(0.0, 1.0), junk=st.binary(min_size=0, max_size=64))
def test_fuzz_corrupt_dictionary_files_raise_typed_errors(saved_sets, tmp_path_factory, fmt,
                                                          which, how, at, junk):
    folder = tmp_path_factory.mktemp("fuzz") / fmt
    shutil.copytree(saved_sets[fmt], folder)
    victims = sorted(p for p in folder.rglob("*") if p.is_file())
    victim = victims[which % len(victims)]
    data = victim.read_bytes()
    cut = int(at * len(data))
    victim.write_bytes({"truncate": data[:cut], "empty": b"",
                        "flip": data[:cut] + bytes([(data[cut] ^ 0xFF) if cut < len(data)
                                                    else 0]) + data[cut + 1:],
                        "garbage": data[:cut] + junk}[how])
    try:
        dicts = load_dictionaries(folder)
    except FactfindError as e:
        assert "\n" not in str(e)
    else:  # the change did not matter (trailing bytes of JSON whitespace, a flipped mantissa)
        assert len(dicts) >= 1


def test_two_dictionaries_for_one_site_name_both_folders():
    with pytest.raises(DictionaryFileError, match=r"two dictionaries for L2\.res, in .*batchtopk "
                                                  r"and .*standard; load one folder") as e:
        load_dictionaries(DATA / "saelens")
    assert "\n" not in str(e.value)


@FUZZ
@given(source=st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                        st.just('{"cfg": 1}'), st.just(""), st.just("not/a/real/hub/name\n")),
       fmt=st.one_of(st.none(), st.sampled_from(sorted(FORMATS)), st.text(max_size=8)))
def test_fuzz_bad_arguments_to_load_and_save_raise_typed_errors(monkeypatch, source, fmt):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FactfindError) as e:
        load_dictionaries(source, format=fmt)
    assert "\n" not in str(e.value)
    ds = Dictionaries([_random(DictKind.SAE, Activation.TOPK, 0, seed=0)])
    if fmt not in FORMATS:
        with pytest.raises(ArgumentError, match="format must be one of"):
            save_dictionaries(ds, _tmp() / "x", format=str(fmt))
    if not isinstance(source, str) or not source.strip():
        with pytest.raises(FactfindError):
            save_dictionaries(ds, source, format="saelens")  # type: ignore[arg-type]


def test_a_pre_v6_saelens_config_with_flat_fields_reads_the_same(tmp_path):
    folder = tmp_path / "v5"
    shutil.copytree(DATA / "saelens" / "topk", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    flat = {k: v for k, v in cfg.items() if k not in ("metadata", "architecture", "k",
                                                       "rescale_acts_by_decoder_norm")}
    flat |= {"model_name": "tiny-llama", "hook_name": cfg["metadata"]["hook_name"],
             "hook_layer": 1, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
             "k": 5}
    (folder / "cfg.json").write_text(json.dumps(flat))
    new, old = load_dictionaries(DATA / "saelens" / "topk"), load_dictionaries(folder)
    _same(new["L1.rpre"], old["L1.rpre"])


@pytest.mark.parametrize("style", ["paths", "records"])
def test_circuit_tracer_configs_listing_their_files(tmp_path, style):
    src = DATA / "circuit_tracer" / "jumprelu"
    files = tmp_path / "weights"
    shutil.copytree(src, files)
    folder = tmp_path / "set"
    folder.mkdir()
    listed = [str(files / f"layer_{i}.safetensors") for i in range(2)]
    if style == "records":  # circuit-tracer <= 0.2: {id, layer, filepath}, in any order
        listed = [{"id": f"tc-{i}", "layer": i, "filepath": p} for i, p in enumerate(listed)][::-1]
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_name": "tiny-llama", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": listed}))
    for name, d in load_dictionaries(folder).items():
        _same(d, load_dictionaries(src)[name])


def test_circuit_tracer_hub_uris_offline_fail_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "config.yaml").write_text(
        "model_name: google/gemma-2-2b\nfeature_input_hook: ln2.hook_normalized\n"
        "feature_output_hook: hook_mlp_out\ntranscoders:\n"
        "- hf://google/gemma-scope-2b-pt-transcoders/layer_0/width_16k/average_l0_76/params.npz\n")
    with pytest.raises(HubUnavailableError, match=r"hf://google/gemma-scope-2b-pt-transcoders/"
                                                  r".*could not be reached") as e:
        load_dictionaries(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.real
def test_sparsify_skip_transcoders_load_onto_smollm2_and_splice_exactly(smollm2, tmp_path):
    """EleutherAI's SmolLM2-135M skip transcoders are sparsify folders named layers.N.mlp;
    a set laid out the same way (random weights, 3 layers) loads onto the real model, fits
    its mlp_in, and splices in with the error term to the model's own logits."""
    from factfind.features import spliced_run

    d = smollm2.d_model
    ds = Dictionaries([_random(DictKind.SKIP_TRANSCODER, Activation.TOPK, layer, seed=layer,
                               d_in=d, d_sae=64) for layer in (0, 14, 29)], model=smollm2.name)
    folder = ds.save(tmp_path / "skip-transcoder-SmolLM2-135M", format="sparsify")
    for sub in folder.iterdir():  # as sparsify writes them: no factfind block
        if (sub / "cfg.json").is_file():
            cfg = json.loads((sub / "cfg.json").read_text())
            (sub / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                      if k != "factfind"}))
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == \
        ["layers.0.mlp", "layers.14.mlp", "layers.29.mlp"]
    dicts = load_dictionaries(folder, model=smollm2)
    assert list(dicts) == ["L0.stc", "L14.stc", "L29.stc"] and dicts.model == smollm2.name
    for name, saved in ds.items():  # the files alone (no factfind block) give the same weights
        for f in Dictionary.tensor_fields():
            a, b = getattr(saved, f), getattr(dicts[name], f)
            assert (a is None and b is None) or (a is not None and b is not None
                                                 and torch.equal(a, b)), (name, f)
    ids = torch.tensor([smollm2.tokenizer("Michael Jordan plays the sport of")["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = smollm2.run(batch, logits="all", save=[(Component.MLP_IN, 14)])
    feats: dict[str, torch.Tensor] = {}
    spliced = spliced_run(smollm2, batch, dicts, capture=feats, logits="all")
    torch.testing.assert_close(spliced.logits, base.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats["L14.stc"],
                               dicts["L14.stc"].encode(base.acts[(Component.MLP_IN, 14)]))
    assert feats["L14.stc"].abs().sum() > 0


def test_a_saelens_transcoder_on_transformerlens_folded_norms_is_flagged(tmp_path, caplog):
    d = load_dictionaries(DATA / "saelens" / "transcoder")["L3.tc"]
    assert d.meta["tl_fold_ln"] is True
    assert "ln2.hook_normalized" in caplog.text and "fold_ln" in caplog.text
    folder = tmp_path / "unfolded"
    shutil.copytree(DATA / "saelens" / "transcoder", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = {"fold_ln": False}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert "tl_fold_ln" not in load_dictionaries(folder)["L3.tc"].meta


def test_one_dictionary_saves_and_loads_cast_to_a_dtype(tmp_path):
    d = _random(DictKind.TRANSCODER, Activation.JUMPRELU, 4, seed=3, subtract=False)
    out = save_dictionaries(d, tmp_path / "one", format="gemmascope")
    back = load_dictionaries(out, dtype=torch.float64)["L4.tc"]
    assert back.W_enc.dtype == torch.float64 and back.threshold is not None
    assert torch.equal(back.W_enc, d.W_enc.double()) and back.layer == 4
