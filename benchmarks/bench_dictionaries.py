"""Dictionary training: throughput against sparsify, the default run's cost, load time, memory.

(a) **Throughput and quality against EleutherAI's sparsify** on the same activations (SmolLM2's
    ``mlp_in -> mlp_out`` at one layer, taken from the activation cache of the default run), the
    same kind (skip transcoder), width, k, batch size, learning rate, AuxK weight, dead-feature
    window and number of tokens, at one torch thread: factfind's ``Trainer.step`` against
    sparsify 1.3.3's ``SparseCoder`` driven by its own trainer's step (``trainer.py``: b_dec and
    the encoder bias from the first batch, forward with the dead mask, ``fvu + auxk_alpha *
    auxk``, Adam, dead-feature counters), run in a separate virtualenv (/tmp/sparsify-venv,
    ``pip install torch==2.13.0 eai-sparsify``) through a subprocess on the activations saved to
    disk. Prints tokens/s of both and their ratio, and the held-out explained variance both
    reach (SAELens' definition: ``1 - sum((y - y_hat)^2) / sum((y - mean y)^2)``).
(b) **The default run's one-off cost and the cached load**: the seconds recorded in the default
    dictionaries' provenance (``factfind train-dictionaries --threads 2``), and the wall time of
    a second ``train_dictionaries`` call with the same arguments (served from the cache).
(c) **Peak memory, flat in corpus size**: activation collection + training of skip
    transcoders at all 4 layers of the organism (8 sites; 16k tokens per 32 MiB shard) at 1x
    (20k) and 10x (200k) tokens, each in a fresh process: peak RSS (ru_maxrss) and their ratio,
    and the same above the process's RSS after loading the model and the corpus.

Run from the repository root: ``python benchmarks/bench_dictionaries.py [a] [b] [c]``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPARSIFY_PY = Path(os.environ.get("SPARSIFY_PY", "/tmp/sparsify-venv/bin/python"))

_SPARSIFY_SCRIPT = textwrap.dedent('''
    import json, sys, time, torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file
    from sparsify import SparseCoder, SparseCoderConfig
    a = load_file(sys.argv[1]); cfg = json.loads(sys.argv[2])
    X, Y, Xt, Yt = a["x"], a["y"], a["xt"], a["yt"]
    torch.manual_seed(cfg["seed"])
    sc = SparseCoder(X.shape[1], SparseCoderConfig(num_latents=cfg["width"], k=cfg["k"],
                     transcode=True, skip_connection=True), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sc.parameters(), lr=cfg["lr"])
    since = torch.zeros(cfg["width"], dtype=torch.long)
    B = cfg["batch_size"]; n = X.shape[0] // B
    t0 = time.perf_counter()
    for i in range(n):
        x, y = X[i * B:(i + 1) * B], Y[i * B:(i + 1) * B]
        if i == 0:  # sparsify trainer.py: centre the pre-activations, b_dec = mean target
            with torch.no_grad():
                sc.encoder.bias.data = -x.mean(0) @ sc.encoder.weight.data.T
                sc.b_dec.data = y.mean(0)
        dead = since > cfg["dead_after"]
        out = sc(x, y, dead_mask=dead)
        loss = out.fvu + cfg["aux_alpha"] * out.auxk_loss
        loss.backward()
        opt.step(); opt.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(cfg["width"], dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since += B; since[fired] = 0
    dt = time.perf_counter() - t0
    with torch.no_grad():
        yh = sc(Xt, Yt).sae_out
        ev = 1 - ((Yt - yh) ** 2).sum() / ((Yt - Yt.mean(0)) ** 2).sum()
    print(json.dumps({"seconds": dt, "tokens": n * B, "ev": float(ev)}))
''')


def _find_cache(layer: int) -> Path:
    from factfind.model.checkpoints import cache_root

    hits = []
    for m in (cache_root() / "activations").glob("*/manifest.json"):
        meta = json.loads(m.read_text())
        if f"mlp_in.{layer}" in meta["sites"] and meta["model"] == "smollm2-135m":
            hits.append((m.stat().st_mtime, m.parent))
    if not hits:
        raise SystemExit("no SmolLM2 activation cache: run `factfind train-dictionaries "
                         "--threads 2` first")
    return max(hits)[1]


def bench_throughput(layer: int = 15, tokens: int = 24576, width: int = 2304, k: int = 32,
                     batch_size: int = 512, lr: float = 2e-3) -> dict:
    from safetensors.torch import save_file

    from factfind.features.activations import ActivationCache
    from factfind.features.trainer import FitConfig, Trainer
    from factfind.types import Component

    torch.set_num_threads(1)
    folder = _find_cache(layer)
    meta = json.loads((folder / "manifest.json").read_text())
    cache = ActivationCache(folder, [(Component.MLP_IN, layer), (Component.MLP_OUT, layer)],
                            [folder / s for s in meta["shards"]], meta["tokens"], 576, meta)
    X = cache.tensor((Component.MLP_IN, layer))
    Y = cache.tensor((Component.MLP_OUT, layer))
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    X, Y = X[perm], Y[perm]
    n_test = 4096
    Xt, Yt, X, Y = X[:n_test], Y[:n_test], X[n_test:n_test + tokens], Y[n_test:n_test + tokens]
    cfg = {"width": width, "k": k, "batch_size": batch_size, "lr": lr, "aux_alpha": 1 / 32,
           "dead_after": 20_000, "seed": 0}
    # factfind
    tr = Trainer(FitConfig(kind="skip_transcoder", width=width, k=k, batch_size=batch_size,
                           lr=lr, decay=0.0, dead_after=cfg["dead_after"]), 576, 576,
                 total_steps=X.shape[0] // batch_size, layer=layer)
    n = X.shape[0] // batch_size
    t0 = time.perf_counter()
    tr.initialize(X[:16384], Y[:16384])  # as train_dictionaries does (timed)
    for i in range(n):
        tr.step(X[i * batch_size:(i + 1) * batch_size], Y[i * batch_size:(i + 1) * batch_size])
    ours_s = time.perf_counter() - t0
    d = tr.dictionary()
    with torch.no_grad():
        yh = d.reconstruct(Xt)
        ours_ev = float(1 - ((Yt - yh) ** 2).sum() / ((Yt - Yt.mean(0)) ** 2).sum())
    result = {"layer": layer, "tokens": n * batch_size, **cfg, "factfind_s": ours_s,
              "factfind_tok_s": n * batch_size / ours_s, "factfind_ev": ours_ev}
    if not SPARSIFY_PY.exists():
        result["sparsify"] = f"not installed at {SPARSIFY_PY}"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.safetensors"
        save_file({"x": X.contiguous(), "y": Y.contiguous(), "xt": Xt.contiguous(),
                   "yt": Yt.contiguous()}, str(path))
        out = subprocess.run([str(SPARSIFY_PY), "-c", _SPARSIFY_SCRIPT, str(path),
                              json.dumps(cfg)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        result["sparsify"] = out.stderr.strip().splitlines()[-1]
        return result
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    result.update({"sparsify_s": theirs["seconds"],
                   "sparsify_tok_s": theirs["tokens"] / theirs["seconds"],
                   "sparsify_ev": theirs["ev"]})
    result["throughput_ratio"] = result["factfind_tok_s"] / result["sparsify_tok_s"]
    result["ev_diff"] = result["factfind_ev"] - result["sparsify_ev"]
    return result


def bench_default_cost() -> dict:
    import factfind as ff
    from factfind.features.training import dictionaries_dir

    provs = sorted(dictionaries_dir().glob("*/provenance.json"), key=lambda p: p.stat().st_mtime)
    provs = [p for p in provs if json.loads(p.read_text())["model"] == "smollm2-135m" and
             len(json.loads(p.read_text())["config"]["layers"]) == 30]
    if not provs:
        return {"default_run": "not found: run `factfind train-dictionaries --threads 2`"}
    prov = json.loads(provs[-1].read_text())
    torch.set_num_threads(2)
    model = ff.load_model("smollm2-135m")
    corpus = ff.load_corpus(model=model, progress=False).split(0.05)[0]
    t0 = time.perf_counter()
    dicts = ff.train_dictionaries(model, corpus, progress=False)
    load_s = time.perf_counter() - t0
    return {"collect_s": prov["seconds"]["collect"], "train_s": prov["seconds"]["train"],
            "total_s": prov["seconds"]["total"], "threads": prov["threads"],
            "activation_tokens": prov["activation_tokens"], "cached_load_s": load_s,
            "from_cache": bool(dicts.meta.get("loaded_from_cache")), "n": len(dicts)}


_MEMORY_SCRIPT = textwrap.dedent('''
    import json, resource, sys, torch
    torch.set_num_threads(1)
    import factfind as ff
    from factfind.features.corpus import load_corpus
    model = ff.load_model("organism")
    corpus = load_corpus(model=model, samples=0, progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = ff.train_dictionaries(model, corpus, tokens=int(sys.argv[1]), width=512, k=16,
                              epochs=1, cache_dir=sys.argv[2], progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens": d.meta["activation_tokens"], "base_kb": base, "peak_kb": peak}))
''')


def bench_memory(small: int = 20_000) -> dict:
    out = {}
    for mult in (1, 10):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(small * mult), tmp],
                               capture_output=True, text=True, check=True, cwd=ROOT)
            got = json.loads(r.stdout.strip().splitlines()[-1])
            got["seconds"] = time.perf_counter() - t0
            out[f"{mult}x"] = got
    a, b = out["1x"], out["10x"]
    out["peak_ratio"] = b["peak_kb"] / a["peak_kb"]
    out["above_base_ratio"] = (b["peak_kb"] - b["base_kb"]) / max(a["peak_kb"] - a["base_kb"], 1)
    return out


def main(argv: list[str]) -> None:
    parts = set(argv) or {"a", "b", "c"}
    print(f"torch {torch.__version__}, load average {os.getloadavg()}")
    if "a" in parts:
        r = bench_throughput()
        print("(a) throughput, skip transcoder at layer", r["layer"], json.dumps(r, indent=1))
        if "throughput_ratio" in r:
            print(f"(a) factfind {r['factfind_tok_s']:.0f} tok/s vs sparsify "
                  f"{r['sparsify_tok_s']:.0f} tok/s = {r['throughput_ratio']:.2f}x; held-out EV "
                  f"{r['factfind_ev']:.4f} vs {r['sparsify_ev']:.4f} (diff {r['ev_diff']:+.4f})")
    if "b" in parts:
        r = bench_default_cost()
        print("(b) default run", json.dumps(r, indent=1))
    if "c" in parts:
        r = bench_memory()
        print("(c) memory", json.dumps(r, indent=1))
        print(f"(c) peak RSS 10x / 1x tokens = {r['peak_ratio']:.3f} (above the loaded model: "
              f"{r['above_base_ratio']:.3f})")
    print("ru_maxrss of this process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "KB")


if __name__ == "__main__":
    main(sys.argv[1:])
