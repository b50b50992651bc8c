"""The adapter's overhead: factfind's ``Model.run`` (an nnsight trace) vs the raw Hugging Face
module's forward on the same batch, measured side by side in one run.

Four variants of one forward pass (final-position logits only, as ``Model.run`` computes them):

* ``hf``: ``hf(input_ids, attention_mask, position_ids, logits_to_keep=1)`` under
  ``torch.no_grad()`` - the floor;
* ``hf+hidden``: the same with ``output_hidden_states=True`` (HF's own way to keep every
  layer's residual stream);
* ``run``: ``model.run(batch)`` - an nnsight trace with nothing saved;
* ``run+resid``: ``model.run(batch, save=[(resid_post, l) for every layer l])``.

Repeats are *interleaved* (one of each variant per round, in a rotating order) so that load on
the shared machine hits all variants alike, and each variant's time is the median over rounds.
The ratios ``run / hf`` and ``run+resid / hf`` are the adapter's overhead; they shrink as the
batch grows (nnsight's cost per trace is roughly fixed), so two batch sizes are reported.
The logits of all four variants are checked to agree first.

    python benchmarks/bench_overhead.py                # the shipped organism (or a tiny model)
    python benchmarks/bench_overhead.py --batch 1 16 64 --rounds 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _common import machine, organism_or_tiny

from factfind.types import Component


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time per function over ``rounds`` rounds, one call of each per round in a
    rotating order (after one warm-up round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = time.perf_counter()
            fns[name]()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, facts, what = organism_or_tiny()
    hf = model.hf
    resid = [(Component.RESID_POST, layer) for layer in range(model.n_layers)]
    print(f"machine: {machine()}")
    print(f"model: {what} ({model.n_layers} layers, d_model {model.d_model}); "
          f"{args.rounds} interleaved rounds, median")
    for size in args.batch:
        data = facts.sample(min(size, len(facts)), seed=0)
        if len(data) < size:  # repeat prompts to reach the batch size
            data = type(data)(list(data) * (size // len(data) + 1))[:size]
        batch = model.tokenize(list(data))
        enc = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
               "position_ids": batch.position_ids, "use_cache": False, "logits_to_keep": 1}

        def raw(hidden: bool = False, enc=enc):
            with torch.no_grad():
                return hf(**enc, output_hidden_states=hidden)

        fns: dict[str, Callable[[], object]] = {
            "hf": raw,
            "hf+hidden": lambda raw=raw: raw(True),
            "run": lambda batch=batch: model.run(batch),
            "run+resid": lambda batch=batch: model.run(batch, save=resid),
        }
        ref = raw(True)
        for run in (model.run(batch), model.run(batch, save=resid)):
            torch.testing.assert_close(run.logits, ref.logits[:, -1], atol=1e-5, rtol=1e-5)
        saved = model.run(batch, save=resid).acts  # HF's hidden_states[l + 1] = resid_post l
        torch.testing.assert_close(saved[resid[-2]], ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
        t = interleaved(fns, args.rounds)
        print(f"batch {size} x {batch.input_ids.shape[1]} tokens: "
              + "   ".join(f"{n} {1e3 * s:.2f} ms" for n, s in t.items()))
        print(f"  ratio run/hf = {t['run'] / t['hf']:.2f}x   run+resid/hf = "
              f"{t['run+resid'] / t['hf']:.2f}x   run+resid/hf+hidden = "
              f"{t['run+resid'] / t['hf+hidden']:.2f}x")


if __name__ == "__main__":
    main()
