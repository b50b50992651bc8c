"""Causal tracing of a full (token x layer x 3 kinds) map: factfind's stacked restorations vs a
ROME-style loop (one restoration per forward, `causal_tracing_reference`); one run, one ratio.

    python benchmarks/bench_tracing.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import best_of, machine, organism_or_tiny

import factfind as ff
from factfind.localize.tracing import causal_tracing_reference


def main() -> None:
    torch.set_num_threads(1)  # the machine is shared; ratios are single-threaded
    model, facts, what = organism_or_tiny()
    data = facts.sample(min(4, len(facts)), seed=0)
    kw = dict(kinds=("hidden", "mlp", "attn"), samples=3, window=3, seed=0)
    fast = ff.causal_tracing(model, data, progress=False, **kw)
    slow = causal_tracing_reference(model, data, **kw)
    key = ["method", "layer", "position", "prompt"]
    a = fast.set_index(key)["effect"].sort_index().to_numpy()
    b = slow.set_index(key)["effect"].sort_index().to_numpy()
    assert np.allclose(a, b, atol=1e-6), "batched and loop tracing disagree"
    t_fast = best_of(lambda: ff.causal_tracing(model, data, progress=False, **kw), n=2)
    t_loop = best_of(lambda: causal_tracing_reference(model, data, **kw), n=1)
    print(f"machine: {machine()}; model: {what} ({model.n_layers} layers)")
    print(f"map: {len(fast)} (kind, layer, token, prompt) cells, {len(data)} prompts, "
          f"{kw['samples']} noise samples; results agree (1e-6)")
    print(f"ROME-style loop: {t_loop:.2f}s   factfind: {t_fast:.2f}s   "
          f"ratio loop/factfind = {t_loop / t_fast:.1f}x")


if __name__ == "__main__":
    main()
