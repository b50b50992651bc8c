"""Write the reference-library goldens that ``tests/test_features_formats.py`` checks factfind
against: each library saves small dictionaries with its own code, then encodes and decodes fixed
activations with its own code; the test loads the same folders with factfind and must match the
library's outputs to 1e-5.

The libraries do not install beside factfind's pins (sae-lens 6.54 needs transformer-lens 3.9,
circuit-tracer 0.5 needs transformers <= 4.57), so each runs in its own virtualenv (torch 2.13.0
CPU first, then the library)::

    python3 -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 sae-lens
    /tmp/saelens-venv/bin/python tests/data/formats/make_goldens.py saelens
    python3 -m venv /tmp/sparsify-venv && /tmp/sparsify-venv/bin/pip install torch==2.13.0 \
        eai-sparsify==1.3.3
    /tmp/sparsify-venv/bin/python tests/data/formats/make_goldens.py sparsify
    python3 -m venv /tmp/ct-venv && /tmp/ct-venv/bin/pip install torch==2.13.0 circuit-tracer==0.5.0
    /tmp/ct-venv/bin/python tests/data/formats/make_goldens.py circuit_tracer

Each dictionary lands in ``tests/data/formats/<library>/<case>/`` as the library wrote it, with
``expected.safetensors`` beside it: ``x`` (the fixed input ``[6 d_in]``), ``acts`` (the
library's ``encode(x)``), ``decoded`` (its ``decode(acts)``) and ``out`` (its full forward,
the skip path included). ``versions.json`` records the library versions. d_in 16, width 48:
a few KB per case.
"""
# pyright: reportMissingImports=false, reportAttributeAccessIssue=false

from __future__ import annotations

import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
D_IN, D_SAE, K, N = 16, 48, 5, 6


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int, *, thresholds: tuple[str, ...] = ()) -> None:
    """Fill every parameter with N(0, 0.3²) (thresholds: uniform in [0, 0.4]) so that biases,
    b_dec and the skip path all matter and some features sit below their threshold."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.split(".")[-1] in thresholds:
            p.copy_(torch.rand(p.shape, generator=g) * 0.4)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _fresh(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _expected(folder: Path, **tensors: torch.Tensor) -> None:
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()},
              str(folder / "expected.safetensors"))
    for k, v in tensors.items():
        if k in ("acts",):
            assert v.abs().sum() > 0, f"{folder.name}: all-zero {k}"


# ---------------------------------------------------------------------------------- SAELens


def saelens() -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    root = _fresh(HERE / "saelens")

    def meta(hook: str, hook_out: str | None = None) -> SAEMetadata:
        m = SAEMetadata(model_name="tiny-llama", hook_name=hook)
        if hook_out is not None:
            m.hook_name_out = hook_out
        return m

    tc_in, tc_out = "blocks.{l}.ln2.hook_normalized", "blocks.{l}.hook_mlp_out"
    cases = {
        "standard": (StandardSAE, StandardSAEConfig(
            d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True,
            metadata=meta("blocks.2.hook_resid_post"))),
        "topk": (TopKSAE, TopKSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True,
            metadata=meta("blocks.1.hook_resid_pre"))),
        "topk_rescaled": (TopKSAE, TopKSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True,
            apply_b_dec_to_input=False, metadata=meta("blocks.0.hook_attn_out"))),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(
            d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
            metadata=meta("blocks.1.hook_mlp_out"))),
        "transcoder": (Transcoder, TranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
            metadata=meta(tc_in.format(l=3), tc_out.format(l=3)))),
        "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
            metadata=meta(tc_in.format(l=0), tc_out.format(l=0)))),
        "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
            metadata=meta(tc_in.format(l=2), tc_out.format(l=2)))),
        "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig(
            d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
            metadata=meta(tc_in.format(l=1), tc_out.format(l=1)))),
    }
    x = _x()
    for i, (name, (cls, cfg)) in enumerate(cases.items()):
        sae = cls(cfg)
        _randomise(sae, seed=100 + i, thresholds=("threshold",))
        folder = root / name
        sae.save_model(folder)
        _check_and_write(SAE, folder, x)

    # BatchTopK: trained with a batch rule, saved for inference by SAELens as a JumpReLU SAE
    # whose threshold is the learned topk_threshold for every feature
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True))
    bt.cfg.metadata = meta("blocks.2.hook_resid_post")
    _randomise(bt, seed=99)
    bt.topk_threshold = torch.tensor(0.15)
    folder = root / "batchtopk"
    bt.save_inference_model(folder)
    _check_and_write(SAE, folder, x)
    (root / "versions.json").write_text(json.dumps(
        {"sae-lens": version("sae-lens"), "torch": torch.__version__}, indent=1) + "\n")


@torch.no_grad()
def _check_and_write(SAE, folder: Path, x: torch.Tensor) -> None:
    sae = SAE.load_from_disk(folder)  # what SAELens itself reads back from the folder
    sae.eval()
    acts = sae.encode(x)
    decoded = sae.decode(acts)
    out = sae(x)
    _expected(folder, x=x, acts=acts, decoded=decoded, out=out)
    print(f"saelens/{folder.name}: {sae.cfg.architecture()} L0 "
          f"{(acts > 0).sum(-1).float().mean():.1f}")


# ---------------------------------------------------------------------------------- sparsify


@torch.no_grad()
def sparsify() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    root = _fresh(HERE / "sparsify")
    cases = {  # set name -> (hookpoint folder, config)
        "sae": ("layers.2", SparseCoderConfig(num_latents=D_SAE, k=K)),
        "transcoder": ("layers.3.mlp", SparseCoderConfig(num_latents=D_SAE, k=K,
                                                         transcode=True)),
        "skip_transcoder": ("layers.1.mlp", SparseCoderConfig(
            num_latents=D_SAE, k=K, transcode=True, skip_connection=True)),
    }
    x = _x()
    for i, (name, (hookpoint, cfg)) in enumerate(cases.items()):
        sc = SparseCoder(D_IN, cfg)
        _randomise(sc, seed=200 + i)
        folder = root / name / hookpoint
        sc.save_to_disk(folder)
        sc = SparseCoder.load_from_disk(folder)  # what sparsify itself reads back
        top_acts, top_idx, _ = sc.encode(x)
        acts = torch.zeros(N, D_SAE).scatter(-1, top_idx, top_acts)
        decoded = sc.decode(top_acts, top_idx)
        out = sc(x).sae_out
        _expected(folder, x=x, acts=acts, decoded=decoded, out=out)
        print(f"sparsify/{name}/{hookpoint}: L0 {(acts > 0).sum(-1).float().mean():.1f}")
    (root / "versions.json").write_text(json.dumps(
        {"eai-sparsify": version("eai-sparsify"), "torch": torch.__version__}, indent=1) + "\n")


# ---------------------------------------------------------------------------- circuit-tracer


@torch.no_grad()
def circuit_tracer() -> None:
    import numpy as np
    import yaml
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
        load_gemma_scope_2_transcoder,
        load_gemma_scope_transcoder,
        load_transcoder_set,
    )

    root = _fresh(HERE / "circuit_tracer")
    cpu = torch.device("cpu")
    x = _x()
    n_layers = 2
    # one set per activation: ReLU skip transcoders and JumpReLU transcoders, as circuit-tracer
    # writes them (TranscoderSet.to_safetensors: layer_{i}.safetensors) with the config.yaml its
    # cache writes beside them (utils/caching.save_transcoders_to_cache)
    for s, (name, skip, jump) in enumerate([("relu_skip", True, False),
                                            ("jumprelu", False, True)]):
        tcs = {}
        for layer in range(n_layers):
            act = JumpReLU(torch.zeros(D_SAE), 0.1) if jump else torch.nn.functional.relu
            tc = SingleLayerTranscoder(D_IN, D_SAE, act, layer, skip_connection=skip,
                                       device=cpu, dtype=torch.float32)
            _randomise(tc, seed=300 + 10 * s + layer, thresholds=("threshold",))
            tcs[layer] = tc
        folder = root / name
        TranscoderSet(tcs, feature_input_hook="mlp.hook_in",
                      feature_output_hook="mlp.hook_out").to_safetensors(str(folder))
        (folder / "config.yaml").write_text(yaml.dump({
            "model_kind": "transcoder_set", "model_name": "tiny-llama",
            "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
            "scan": f"tiny-llama/{name}"}))
        loaded = load_transcoder_set(
            {i: str(folder / f"layer_{i}.safetensors") for i in range(n_layers)},
            scan=name, feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
            device=cpu, lazy_encoder=False, lazy_decoder=False)
        for layer in range(n_layers):
            tc = loaded[layer]
            acts = tc.encode(x)
            decoded = acts @ tc.W_dec + tc.b_dec
            _expected(folder, **{"x": x, f"acts.{layer}": acts, f"decoded.{layer}": decoded,
                                 f"out.{layer}": tc(x)} | _previous(folder))
            print(f"circuit_tracer/{name} layer {layer}: L0 "
                  f"{(acts > 0).sum(-1).float().mean():.1f}")

    # Gemma Scope (params.npz) and Gemma Scope 2 (params.safetensors) transcoders laid out as
    # Google publishes them, read by circuit-tracer's own loaders for those files
    g = torch.Generator().manual_seed(400)
    gs = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.3,
          "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.3,
          "b_enc": torch.randn(D_SAE, generator=g) * 0.3,
          "b_dec": torch.randn(D_IN, generator=g) * 0.3,
          "threshold": torch.rand(D_SAE, generator=g) * 0.4}
    folder = root.parent / "gemmascope" / "gemma-scope-2b-pt-transcoders" / "layer_3" / \
        "width_16k" / "average_l0_5"
    _fresh(folder)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in gs.items()})
    tc = load_gemma_scope_transcoder(str(folder / "params.npz"), 3, device=cpu)
    acts = tc.encode(x)
    _expected(folder, x=x, acts=acts, decoded=tc.decode(acts), out=tc(x))
    print(f"gemmascope transcoder: L0 {(acts > 0).sum(-1).float().mean():.1f}")

    folder = root.parent / "gemmascope" / "gemma-scope-2-270m-pt" / "transcoder" / \
        "layer_5_width_16k_l0_small_affine"
    _fresh(folder)
    gs2 = {"w_enc": gs["W_enc"], "w_dec": gs["W_dec"], "b_enc": gs["b_enc"],
           "b_dec": gs["b_dec"], "threshold": gs["threshold"],
           "affine_skip_connection": torch.randn(D_IN, D_IN, generator=g) * 0.3}
    save_file({k: v.contiguous() for k, v in gs2.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output",
        "affine_connection": True}, indent=1))
    tc = load_gemma_scope_2_transcoder(str(folder / "params.safetensors"), 5, device=cpu)
    acts = tc.encode(x)
    _expected(folder, x=x, acts=acts, decoded=acts @ tc.W_dec + tc.b_dec, out=tc(x))
    print(f"gemmascope-2 affine transcoder: L0 {(acts > 0).sum(-1).float().mean():.1f}")
    (root / "versions.json").write_text(json.dumps(
        {"circuit-tracer": version("circuit-tracer"), "torch": torch.__version__}, indent=1)
        + "\n")


def _previous(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / "expected.safetensors"
    return load_file(str(path)) if path.exists() else {}


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"saelens": saelens, "sparsify": sparsify, "circuit_tracer": circuit_tracer}[sys.argv[1]]()
