"""Incremental patched runs on a real model (SmolLM2-135M, 30 layers): each claim a ratio
measured in one run.

(a) activation patching, resid_pre at every layer x position: TransformerLens 4.3's
    ``get_act_patch_resid_pre`` time / factfind time (results agree to 1e-4);
(b) patching cost per site in forward-pass equivalents (FE: time / one plain transformers
    forward of the same clean prompts, ``logits_to_keep=1``, no grad);
(c) causal tracing (1 noise sample, hidden states at every layer x token; the mlp and attn
    kinds at window 1 cost the same per restoration): FE per restoration; equal to the literal
    loop ``causal_tracing_reference`` (one restoration per forward);
(e) causal tracing at ROME's own settings, against ROME's procedure: ``calculate_hidden_flow``
    (kmeng01/rome, experiments/causal_trace.py) traces one prompt at a time with
    ``samples=10``: the batch is ``[prompt] * (samples + 1)``, row 0 clean and rows 1..10 with
    Gaussian noise on the subject's embeddings, and ``trace_with_patch`` runs one plain
    forward of that batch per restoration (every kind x layer x token; the hidden state is the
    block's output, ``mlp``/``attn`` restore a window of 10 layers), copying row 0's state into
    rows 1.. with forward hooks (``h[1:, t] = h[0, t]``) and reading the softmax at the last
    position (the model computes logits at every position). The loop here does exactly that
    with hooks on the transformers model (3 sigma noise as in the paper, drawn by factfind's
    ``prompt_noise`` so both sides see the same numbers; the answer is the fact's attribute
    token). Its cost per restoration does not depend on the cell, so it is timed on
    ``--rome-cells`` cells spread over the map and scaled to the full map; factfind traces the
    full map (``causal_tracing(samples=10, window=10)``, hidden + mlp + attn) of the same
    prompt; the probabilities agree on the timed cells;
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
    parser.add_argument("--skip-loop", action="store_true",
                        help="skip the literal reference loop (c)")
    parser.add_argument("--skip-rome", action="store_true", help="skip ROME's procedure (e)")
    parser.add_argument("--rome-cells", type=int, default=60,
                        help="restorations ROME's loop is timed on (e)")
    parser.add_argument("--only-rome", action="store_true", help="only (e)")
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
    if args.only_rome:
        fe = forward_time(model, pb.clean, n=11)
        print(f"machine: {machine()}; one plain forward ({len(pairs)} prompts) {fe * 1e3:.1f} ms")
        return rome_vs_factfind(model, pairs.clean[:1], fe, args.rome_cells)
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
        assert np.allclose(a, b, atol=1e-5), "tracing disagrees with the literal loop"
        line += (f"; literal loop (causal_tracing_reference, one restoration per forward) "
                 f"{t_loop:.2f} s ({t_loop / fe / restorations:.2f} FE) = {t_loop / t_tr:.1f}x; "
                 f"{cells} cells agree (1e-5); ROME's own procedure: (e)")
    print(line)
    if not args.skip_rome:
        rome_vs_factfind(model, pairs.clean[:1], fe, args.rome_cells)
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


def rome_loop(model: Any, batch: Any, eps: torch.Tensor, answer: int,
              cells: list[tuple[str, int, int]], window: int = 10) -> list[float]:
    """ROME's ``trace_with_patch`` per cell ``(kind, layer, token)``: one forward of
    ``[prompt] * (samples + 1)``, noise ``eps [samples pos d_model]`` added to rows 1.. at the
    embedding, the clean row's state copied into the noised rows by forward hooks, the
    answer's softmax probability at the last position averaged over the noised rows."""
    from factfind.model.architectures import _get

    samples = eps.shape[0]
    ids = batch.input_ids[:1].repeat(samples + 1, 1).to(model.device)
    mask = batch.attention_mask[:1].repeat(samples + 1, 1).to(model.device)
    blocks = _get(model.hf, model.spec.blocks)
    modules = {"hidden": lambda lay: blocks[lay],
               "mlp": lambda lay: _get(blocks[lay], model.spec.mlp),
               "attn": lambda lay: _get(blocks[lay], model.spec.attn)}
    noise = eps.to(model.device)

    def embed_hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out[1:] += noise.to(out.dtype)
        return out

    def restore(t: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            h[1:, t] = h[0, t]
            return out
        return hook

    out = []
    n_layers = model.n_layers
    for kind, layer, t in cells:
        layers = [layer] if kind == "hidden" else list(range(
            max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))
        handles = [_get(model.hf, model.spec.embed).register_forward_hook(embed_hook)]
        handles += [modules[kind](lay).register_forward_hook(restore(t)) for lay in layers]
        try:
            with torch.no_grad():
                logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        out.append(float(torch.softmax(logits[1:, -1].float(), -1).mean(0)[answer]))
    return out


def rome_vs_factfind(model: Any, data: Any, fe: float, n_cells: int) -> None:
    """(e): ROME's causal-tracing procedure against ``ff.causal_tracing`` at ROME's settings
    (10 noise samples, window 10, hidden + mlp + attn) on one prompt."""
    from factfind.localize.tracing import prompt_noise, subject_embedding_std
    from factfind.types import Role

    kinds, samples, window, nu = ("hidden", "mlp", "attn"), 10, 10, 3.0
    batch = model.tokenize(list(data))
    n_pos = batch.input_ids.shape[1]
    assert bool(batch.attention_mask.all()), "one unpadded prompt"
    sigma = subject_embedding_std(model, batch)
    subj = batch.masks[Role.SUBJECT][0]
    eps = prompt_noise(0, 0, samples, n_pos, model.d_model) * nu * sigma * subj[None, :, None]
    answer = int(batch.attribute_ids[0])
    everything = [(k, lay, t) for k in kinds for lay in range(model.n_layers)
                  for t in range(n_pos)]
    step = max(1, len(everything) // n_cells)
    cells = everything[step // 2::step][:n_cells]
    rome_loop(model, batch, eps, answer, cells[:2], window)  # warm-up
    t0 = time.perf_counter()
    theirs = rome_loop(model, batch, eps, answer, cells, window)
    per_cell = (time.perf_counter() - t0) / len(cells)
    kw = dict(kinds=kinds, samples=samples, window=window, noise=nu, seed=0, progress=False)
    ff.causal_tracing(model, data, **{**kw, "kinds": ("hidden",), "roles": ["final"]})  # warm
    t0 = time.perf_counter()
    ours = ff.causal_tracing(model, data, **kw)
    t_ff = time.perf_counter() - t0
    got = ours.set_index(["method", "layer", "position"])["p_restored"]
    mine = [float(got[(f"causal_tracing/{k}", lay, t)]) for k, lay, t in cells]
    diff = float(np.abs(np.array(mine) - np.array(theirs)).max())
    assert diff <= 1e-5, f"factfind and ROME's procedure disagree by {diff:.2e}"
    spread = float(np.ptp(theirs))
    t_rome = per_cell * len(everything)
    print(f"(e) ROME's causal tracing, 1 prompt x {n_pos} tokens, samples={samples}, "
          f"window={window}, {len(everything)} restorations (hidden + mlp + attn): ROME's loop "
          f"{per_cell * 1e3:.0f} ms per restoration ({per_cell / fe:.2f} FE; timed on "
          f"{len(cells)} cells, {t_rome:.1f} s for the map) / factfind {t_ff:.2f} s "
          f"({t_ff / len(everything) / fe:.3f} FE per restoration of 10 noised rows) = "
          f"{t_rome / t_ff:.1f}x (goal >= 5x); p_restored agrees to {diff:.1e} on the "
          f"timed cells (range {spread:.3f})")


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
