"""Formats out: factfind writes dictionaries, the libraries themselves read them back.

``tests/test_features_formats.py`` checks the *in* direction in CI (files the libraries wrote,
read by factfind). This script checks *out*: factfind saves every (format, kind, activation)
the format can express, then SAELens 6.54 (``SAE.load_from_disk``, and its ``gemma_3`` loader
on the Gemma Scope 2 layout), sparsify 1.3.3 (``SparseCoder.load_from_disk``) and
circuit-tracer 0.5.0 (``load_transcoder_set``, ``load_gemma_scope_2_transcoder``) load the
folders with their own code and encode/decode the same fixed activations; their outputs must
match factfind's to 1e-5. The libraries live in their own virtualenvs (see
``tests/data/formats/make_goldens.py`` for how to build them)::

    .venv/bin/python benchmarks/reference_formats.py all       # 1 torch thread; prints a table
    # or by hand: ... write OUT; /tmp/saelens-venv/bin/python ... check saelens OUT; ...

Environment: ``SAELENS_PY``, ``SPARSIFY_PY``, ``CT_PY`` name the venvs' pythons (default
``/tmp/{saelens,sparsify,ct}-venv/bin/python``).
"""
# pyright: reportMissingImports=false, reportAttributeAccessIssue=false

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE, N = 16, 40, 7
TOL = 1e-5
PYTHONS = {"saelens": os.environ.get("SAELENS_PY", "/tmp/saelens-venv/bin/python"),
           "sparsify": os.environ.get("SPARSIFY_PY", "/tmp/sparsify-venv/bin/python"),
           "circuit_tracer": os.environ.get("CT_PY", "/tmp/ct-venv/bin/python")}


# ------------------------------------------------------------------ factfind side (main venv)


def write(out: Path) -> None:
    """Save one set per format with factfind, and factfind's own outputs beside it."""
    from factfind.features import Activation, Dictionaries, Dictionary, DictKind
    from factfind.types import Component

    def rand(kind: DictKind, act: Activation, layer: int, seed: int, *,
             site: Component | None = None, subtract: bool | None = None) -> Dictionary:
        d = Dictionary.random(kind=kind, activation=act, layer=layer, d_in=D_IN, d_sae=D_SAE,
                              k=6, seed=seed, site=site)
        g = torch.Generator().manual_seed(1000 + seed)
        d.W_enc = torch.randn(D_IN, D_SAE, generator=g) * 0.4
        for f in ("b_enc", "b_dec", "W_skip"):
            t = getattr(d, f)
            if t is not None:
                setattr(d, f, torch.randn(t.shape, generator=g) * 0.2)
        if d.threshold is not None:
            d.threshold = torch.rand(d.threshold.shape, generator=g) * 0.3
        if subtract is not None:
            d.subtract_b_dec = subtract
        d.model = "tiny-llama"
        return d

    S, T, ST = DictKind.SAE, DictKind.TRANSCODER, DictKind.SKIP_TRANSCODER
    R, K, B, J = Activation.RELU, Activation.TOPK, Activation.BATCHTOPK, Activation.JUMPRELU
    C = Component
    sets = {
        "saelens": [rand(S, R, 0, 1, site=C.RESID_POST), rand(S, K, 1, 2, site=C.RESID_PRE),
                    rand(S, J, 2, 3, site=C.MLP_OUT, subtract=False),
                    rand(S, B, 3, 4, site=C.ATTN_OUT), rand(T, R, 0, 5), rand(ST, R, 1, 6),
                    rand(T, J, 2, 7), rand(ST, J, 3, 8), rand(T, B, 4, 9)],
        "sparsify": [rand(S, K, 0, 11, site=C.RESID_POST), rand(S, K, 1, 12, site=C.MLP_OUT),
                     rand(T, K, 2, 13), rand(ST, K, 3, 14)],
        "circuit_tracer": [rand(ST, J, layer, 20 + layer) for layer in range(3)],
        "gemmascope": [rand(S, J, 0, 31, site=C.RESID_POST, subtract=False),
                       rand(T, J, 1, 32), rand(ST, J, 2, 33)],
    }
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(7))
    for fmt, ds in sets.items():
        folder = Dictionaries(ds).save(out / fmt, format=fmt, overwrite=True)
        want = {"x": x}
        for d in ds:
            acts = d.encode(x)
            assert (acts > 0).any(), d.name
            want |= {f"{d.name}/acts": acts, f"{d.name}/decoded": d.decode(acts),
                     f"{d.name}/out": d.reconstruct(x)}
        save_file({k: v.contiguous() for k, v in want.items()},
                  str(folder / "factfind_expected.safetensors"))
        (folder / "factfind_names.json").write_text(json.dumps(
            {d.name: [d.layer, d.short, str(d.kind), str(d.activation)] for d in ds}))


# ------------------------------------------------------------------ library side (its venv)


@torch.no_grad()
def check(lib: str, out: Path) -> list[dict[str, object]]:
    rows = []
    for fmt, outputs in {"saelens": _saelens, "sparsify": _sparsify,
                         "circuit_tracer": _circuit_tracer}[lib](out).items():
        want = load_file(str(out / fmt / "factfind_expected.safetensors"))
        for name, got in outputs.items():
            diffs = {k: float((got[k].float() - want[f"{name}/{k}"]).abs().max())
                     for k in ("acts", "decoded", "out")}
            rows.append({"library": lib, "format": fmt, "dictionary": name, **diffs,
                         "ok": max(diffs.values()) <= TOL})
    return rows


def _names(folder: Path) -> dict[str, list]:
    return json.loads((folder / "factfind_names.json").read_text())


def _saelens(out: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    x = load_file(str(out / "saelens" / "factfind_expected.safetensors"))["x"]
    res: dict[str, dict[str, dict[str, torch.Tensor]]] = {"saelens": {}, "gemmascope": {}}
    folders = sorted(p.parent for p in (out / "saelens").rglob("cfg.json"))
    for folder, name in zip(folders, _by_layer_and_hook(folders, _names(out / "saelens")),
                            strict=True):
        sae = SAE.load_from_disk(folder)
        acts = sae.encode(x)
        res["saelens"][name] = {"acts": acts, "decoded": sae.decode(acts), "out": sae(x)}

    # the Gemma Scope 2 layout through SAELens' own gemma_3 hub loader, the hub patched to disk
    gs = out / "gemmascope"
    loaders.hf_hub_download = lambda repo_id, filename, subfolder=None, **_: str(
        gs / (f"{subfolder}/{filename}" if subfolder else filename))

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in load_file(str(gs / filename)).items()}

    loaders.get_safetensors_tensor_shapes = shapes
    for name, (layer, _, _, _) in _names(gs).items():
        sub = next(p for p in gs.rglob(f"layer_{layer}_width_*") if p.is_dir())
        folder_name = str(sub.relative_to(gs))
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
            "google/gemma-scope-2-270m-pt", folder_name, device="cpu")
        cfg = loaders.handle_config_defaulting(cfg)
        sae_cfg = SAE.get_sae_config_class_for_architecture(cfg["architecture"]).from_dict(cfg)
        sae = SAE.get_sae_class_for_architecture(sae_cfg.architecture())(sae_cfg)
        sae.process_state_dict_for_loading(state)
        sae.load_state_dict(state)
        acts = sae.encode(x)
        res["gemmascope"][name] = {"acts": acts, "decoded": sae.decode(acts), "out": sae(x)}
    return res


def _by_layer_and_hook(folders: list[Path], names: dict[str, list]) -> list[str]:
    """The factfind name of each SAELens folder (``blocks.3.hook_attn_out`` -> ``L3.att``)."""
    short = {"hook_resid_post": "res", "hook_resid_pre": "rpre", "hook_mlp_out": "mlp",
             "hook_attn_out": "att", "ln2.hook_normalized": "tc",
             "ln2.hook_normalized-stc": "stc"}
    out = []
    for f in folders:
        _, layer, hook = f.name.split(".", 2)
        s = short[hook]
        if s == "tc" and f"L{layer}.tc" not in names:
            s = "stc"
        out.append(f"L{layer}.{s}")
    return out


def _sparsify(out: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    from sparsify import SparseCoder

    folder = out / "sparsify"
    x = load_file(str(folder / "factfind_expected.safetensors"))["x"]
    res = {}
    for name, (layer, short, _, _) in _names(folder).items():
        hook = {"res": "layers.{l}", "mlp": "layers.{l}.mlp", "tc": "layers.{l}.mlp",
                "stc": "layers.{l}.mlp", "att": "layers.{l}.self_attn"}[short].format(l=layer)
        sc = SparseCoder.load_from_disk(folder / hook)
        top, idx, _ = sc.encode(x)
        acts = torch.zeros(N, sc.num_latents).scatter(-1, idx, top)
        res[name] = {"acts": acts, "decoded": sc.decode(top, idx), "out": sc(x).sae_out}
    return {"sparsify": res}


def _circuit_tracer(out: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    import yaml
    from circuit_tracer.transcoder.single_layer_transcoder import (
        load_gemma_scope_2_transcoder,
        load_transcoder_set,
    )

    cpu = torch.device("cpu")
    folder = out / "circuit_tracer"
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    x = load_file(str(folder / "factfind_expected.safetensors"))["x"]
    names = _names(folder)
    tset = load_transcoder_set({i: str(folder / f"layer_{i}.safetensors")
                                for i in range(len(names))}, scan=cfg["scan"],
                               feature_input_hook=cfg["feature_input_hook"],
                               feature_output_hook=cfg["feature_output_hook"], device=cpu,
                               lazy_encoder=False, lazy_decoder=False)
    res: dict[str, dict[str, dict[str, torch.Tensor]]] = {"circuit_tracer": {},
                                                          "gemmascope": {}}
    for name, (layer, _, _, _) in names.items():
        tc = tset[layer]
        acts = tc.encode(x)
        res["circuit_tracer"][name] = {"acts": acts, "decoded": acts @ tc.W_dec + tc.b_dec,
                                       "out": tc(x)}
    gs = out / "gemmascope"
    for name, (layer, short, _, _) in _names(gs).items():
        if short not in ("tc", "stc"):
            continue  # circuit-tracer reads Gemma Scope 2's transcoders only
        path = next(gs.rglob(f"layer_{layer}_width_*/params.safetensors"))
        tc = load_gemma_scope_2_transcoder(str(path), layer, device=cpu)
        acts = tc.encode(x)
        res["gemmascope"][name] = {"acts": acts, "decoded": acts @ tc.W_dec + tc.b_dec,
                                   "out": tc(x)}
    return res


# ------------------------------------------------------------------ driver


def main() -> None:
    torch.set_num_threads(1)
    cmd = sys.argv[1] if len(sys.argv) > 1 else "all"
    if cmd == "write":
        write(Path(sys.argv[2]))
    elif cmd == "check":
        rows = check(sys.argv[2], Path(sys.argv[3]))
        print(json.dumps(rows))
    else:
        out = Path(tempfile.mkdtemp(prefix="ff-formats-out-"))
        write(out)
        rows = []
        for lib, py in PYTHONS.items():
            if not Path(py).exists():
                print(f"{lib}: no virtualenv at {py}, skipped")
                continue
            done = subprocess.run([py, __file__, "check", lib, str(out)], capture_output=True,
                                  text=True, check=True)
            rows += json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{'library':<15}{'format':<16}{'dictionary':<10}{'acts':>10}{'decoded':>10}"
              f"{'out':>10}  ok   (max |library - factfind|, 1 torch thread)")
        for r in rows:
            print(f"{r['library']:<15}{r['format']:<16}{r['dictionary']:<10}"
                  f"{r['acts']:>10.1e}{r['decoded']:>10.1e}{r['out']:>10.1e}  {r['ok']}")
        bad = [r for r in rows if not r["ok"]]
        print(f"{len(rows)} dictionaries read back by the libraries, "
              f"{len(bad)} above {TOL:g}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
