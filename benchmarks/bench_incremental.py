"""Incremental patched runs on a real model (SmolLM2-135M, 30 layers): each claim a ratio
measured in one run.

(a) activation patching, resid_pre at every layer x position: TransformerLens 4.3's
    ``get_act_patch_resid_pre`` time / factfind time (results agree to 1e-4);
(b) patching cost per site in forward-pass equivalents (FE: time / one plain transformers
    forward of the same clean prompts, ``logits_to_keep=1``, no grad);
(c) causal tracing (1 noise sample, hidden states at every layer x token; the mlp and attn
    kinds at window 1 cost the same per restoration): FE per restoration, and the ROME-style
    loop (``causal_tracing_reference``: one full forward per restoration) / factfind;
(d) peak memory of the patching sweep (resident set above the loaded model, sampled every
    millisecond) with and without the incremental engine at the same batch size.

    python -u benchmarks/bench_incremental.py                   # 1 thread
    python benchmarks/bench_incremental.py --threads 0          # torch's default threads
    python benchmarks/bench_incremental.py --device cuda --skip-tl
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import machine

import factfind as ff
from factfind.data.batch import encode_pairs
from factfind.localize.tracing import causal_tracing_reference

DEFAULT_MODEL = "/work/models/smollm2-135m"
SUBJECTS = {"Michael Jordan": "basketball", "Tiger Woods": "golf", "Serena Williams": "tennis",
            "Lionel Messi": "soccer", "Wayne Gretzky": "hockey", "Babe Ruth": "baseball",
            "Roger Federer": "tennis", "Tom Brady": "football", "Kobe Bryant": "basketball",
            "Rory McIlroy": "golf", "Cristiano Ronaldo": "soccer", "Sidney Crosby": "hockey"}
MEMORY_CHUNK = 64
TEMPLATE = "Fact: the famous athlete {} is best known for playing the professional sport of"


def same_length_pairs(model: Any, n: int) -> Any:
    """``n`` (clean, corrupt) pairs of one token length (TransformerLens runs them unpadded)."""
    facts = ff.from_records([{"subject": s, "relation": "sport", "attribute": a,
                              "template": TEMPLATE} for s, a in SUBJECTS.items()])
    pairs = facts.corrupt(model, seed=0, on_missing="skip")
    lengths = encode_pairs(model, pairs).clean.attention_mask.sum(-1)
    keep = (lengths == lengths.mode().values).nonzero()[:, 0].tolist()[:n]
    return type(pairs)(ff.FactDataset([pairs.clean[i] for i in keep]),
                       ff.FactDataset([pairs.corrupt[i] for i in keep]))


def timed(fn: Any, n: int = 1) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def forward_time(model: Any, batch: Any, n: int = 11) -> float:
    """Median time of one plain transformers forward (no grad, final-position logits)."""
    enc = {"input_ids": batch.input_ids.to(model.device),
           "attention_mask": batch.attention_mask.to(model.device),
           "position_ids": batch.position_ids.to(model.device)}
    times = []
    with torch.no_grad():
        for _ in range(n):
            sync(model)
            t = time.perf_counter()
            model.hf(**enc, use_cache=False, logits_to_keep=1)
            sync(model)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def sync(model: Any) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss(fn: Any) -> tuple[float, float]:
    """(peak resident MB above the start, seconds) of ``fn()``, sampled every millisecond."""
    import psutil

    proc = psutil.Process(os.getpid())
    start = proc.memory_info().rss
    peak = [start]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=watch)
    thread.start()
    t = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t
    done.set()
    thread.join()
    return (peak[0] - start) / 2**20, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL if Path(DEFAULT_MODEL).exists()
                        else "smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--skip-tl", action="store_true", help="skip TransformerLens (a)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the ROME loop (c)")
    parser.add_argument("--memory", choices=["incremental", "stacked"],
                        help="(internal) only measure one side's peak memory")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        return memory_only(args)
    model = ff.load_model(args.model, device=args.device)
    pairs = same_length_pairs(model, args.pairs)
    pb = encode_pairs(model, pairs)
    n_pos = pb.clean.input_ids.shape[1]
    n_sites = model.n_layers * n_pos
    print(f"machine: {machine()}; device {args.device}; model {args.model} "
          f"({model.n_layers} layers); {len(pairs)} pairs x {n_pos} tokens")
    fe = forward_time(model, pb.clean, n=11)
    print(f"one plain forward (transformers, {len(pairs)} prompts): {fe * 1e3:.1f} ms "
          "(median of 11)")

    def sweep(incremental: bool, chunk: int | None = None) -> Any:
        out = ff.activation_patching(model, pairs, components=["resid_pre"],
                                     positions=list(range(n_pos)), batch_size=len(pairs),
                                     chunk=chunk, progress=False, incremental=incremental)
        sync(model)
        return out

    ours = sweep(True)
    plain = sweep(False)
    assert np.allclose(ours["metric"], plain["metric"], atol=1e-4)
    t_inc = timed(lambda: sweep(True), n=2)
    t_plain = timed(lambda: sweep(False), n=1)
    print(f"(b) patching resid_pre, {n_sites} sites: incremental {t_inc:.2f} s = "
          f"{t_inc / fe / n_sites:.3f} FE/site; stacked full forwards (before) {t_plain:.2f} s "
          f"= {t_plain / fe / n_sites:.3f} FE/site (goal <= 0.35; physical ~0.25)")
    if not args.skip_tl:
        from transformer_lens import patching
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        # the bridge rewires the module it is given: hand it a copy, not factfind's model
        bridge = TransformerBridge.boot_transformers(
            args.model, tokenizer=AutoTokenizer.from_pretrained(args.model),
            hf_model=copy.deepcopy(model.hf))
        correct, wrong = pb.correct.to(model.device), pb.wrong.to(model.device)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            last = logits[:, -1]
            return (last.gather(-1, correct[:, None]) - last.gather(-1, wrong[:, None])).mean()

        _, cache = bridge.run_with_cache(pb.clean.input_ids.to(model.device))
        corrupt = pb.corrupt.input_ids.to(model.device)
        t0 = time.perf_counter()
        theirs = patching.get_act_patch_resid_pre(bridge, corrupt, cache, metric)
        t_tl = time.perf_counter() - t0
        mine = ours.groupby(["layer", "position"])["metric"].mean().to_numpy()
        agree = np.abs(mine - theirs.detach().cpu().numpy().reshape(-1)).max()
        assert agree <= 1e-4, f"factfind and TransformerLens disagree by {agree:.2e}"
        print(f"(a) TransformerLens get_act_patch_resid_pre {t_tl:.2f} s "
              f"({t_tl / fe / n_sites:.3f} FE/site) / factfind {t_inc:.2f} s = "
              f"{t_tl / t_inc:.1f}x (goal >= 5x); max |difference| {agree:.1e}")
    kw = dict(kinds=("hidden",), samples=1, window=1, seed=0)
    data = pairs.clean
    cells = model.n_layers * n_pos * len(data)
    fast = ff.causal_tracing(model, data, progress=False, **kw)
    t_tr = timed(lambda: ff.causal_tracing(model, data, progress=False, **kw), n=2)
    restorations = model.n_layers * n_pos
    line = (f"(c) causal tracing, {restorations} restorations (hidden x layers x tokens, 1 "
            f"sample): {t_tr:.2f} s = {t_tr / fe / restorations:.3f} FE/restoration "
            "(goal <= 0.35)")
    if not args.skip_loop:
        t0 = time.perf_counter()
        slow = causal_tracing_reference(model, data, **kw)
        t_loop = time.perf_counter() - t0
        key = ["method", "layer", "position", "prompt"]
        a = fast.set_index(key)["effect"].sort_index().to_numpy()
        b = slow.set_index(key)["effect"].sort_index().to_numpy()
        assert np.allclose(a, b, atol=1e-5), "tracing disagrees with the ROME-style loop"
        line += (f"; ROME-style loop {t_loop:.2f} s ({t_loop / fe / restorations:.2f} FE) = "
                 f"{t_loop / t_tr:.1f}x (goal >= 5x); {cells} cells agree (1e-5)")
    print(line)
    fe_end = forward_time(model, pb.clean, n=11)
    print(f"one plain forward measured again at the end: {fe_end * 1e3:.1f} ms (the FE above "
          "use the first; the drift is the machine's load)")
    if args.device == "cpu":  # each side in a fresh process (the allocator keeps freed pages)
        import subprocess
        import sys

        got = {}
        for side in ("incremental", "stacked"):
            cmd = [sys.executable, __file__, "--model", args.model, "--threads",
                   str(args.threads), "--pairs", str(args.pairs), "--memory", side]
            got[side] = float(subprocess.run(cmd, capture_output=True, text=True,
                                             check=True).stdout.split()[-1])
        print(f"(d) peak RSS above the loaded model, patching sweep, batch {len(pairs)} pairs, "
              f"{MEMORY_CHUNK} sites per forward at most: incremental {got['incremental']:.1f} "
              f"MB, stacked full forwards {got['stacked']:.1f} MB (ratio "
              f"{got['incremental'] / got['stacked']:.2f}; goal <= 1.2)")
    else:
        torch.cuda.reset_peak_memory_stats()
        sweep(True, chunk=MEMORY_CHUNK)
        m_inc = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        sweep(False, chunk=MEMORY_CHUNK)
        m_plain = torch.cuda.max_memory_allocated() / 2**20
        print(f"(d) peak CUDA memory: incremental {m_inc:.1f} MB, stacked {m_plain:.1f} MB "
              f"(ratio {m_inc / m_plain:.2f})")


def memory_only(args: Any) -> None:
    """Print the peak RSS (MB above the loaded, warmed-up model) of one patching sweep."""
    model = ff.load_model(args.model)
    pairs = same_length_pairs(model, args.pairs)
    n_pos = encode_pairs(model, pairs).clean.input_ids.shape[1]
    model.run(encode_pairs(model, pairs).clean)  # warm up
    mb, _ = peak_rss(lambda: ff.activation_patching(
        model, pairs, components=["resid_pre"], positions=list(range(n_pos)),
        batch_size=len(pairs), chunk=MEMORY_CHUNK, progress=False,
        incremental=args.memory == "incremental"))
    print(f"{mb:.2f}")

if __name__ == "__main__":
    main()
