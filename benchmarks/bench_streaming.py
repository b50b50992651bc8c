"""Peak memory of a streamed sweep is flat in the number of prompts (goal: 1,000 and 10,000
prompts within 20%).

Each size runs in a fresh Python process (so one size's high-water mark cannot hide the
other's): load the organism, take the first N prompts of ``organism:sport``, pair them with
corrupt partners, and stream activation patching (resid_pre at the last subject token, every
layer) in chunks of 500 prompts to parquet in a temporary folder. The child reports its peak
resident set size (``getrusage`` high-water mark) after set-up and at the end; the parent
prints both sizes and their ratio.

    python benchmarks/bench_streaming.py            # 1,000 and 10,000 prompts (~3 min on CPU)
    python benchmarks/bench_streaming.py --sizes 200 2000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(n: int, chunk: int, out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import factfind as ff
    from factfind.streaming import stream

    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport")
    if len(facts) < n:
        raise SystemExit(f"organism:sport has {len(facts)} prompts, fewer than {n}")
    pairs = facts[:n].corrupt(model, seed=0, on_missing="skip")
    setup = _peak_mb()
    t = time.perf_counter()
    res = stream(ff.activation_patching, model, pairs, out=out, chunk=chunk,
                 components=["resid_pre"], positions=["subject_last"], batch_size=64,
                 progress=False)
    seconds = time.perf_counter() - t
    rows = sum(len(df) for df in res.chunks(columns=["effect"]))
    return {"n": n, "pairs": len(pairs), "chunks": len(res.files()), "rows": rows,
            "setup_mb": setup, "peak_mb": _peak_mb(), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.chunk, args.out)))
        return
    import torch
    from _common import machine

    torch.set_num_threads(1)  # as in the children (machine() reports it)

    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--chunk",
                                   str(args.chunk), "--out", out], capture_output=True,
                                  text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"streamed activation patching on the organism, chunks of {args.chunk}; {date.today()}"
          f", {machine()}")
    print(f"{'prompts':>8} {'pairs':>6} {'chunks':>6} {'rows':>7} {'time s':>7} "
          f"{'setup MB':>9} {'peak MB':>8} {'peak - setup':>12}")
    for r in results:
        print(f"{r['n']:>8} {r['pairs']:>6} {r['chunks']:>6} {r['rows']:>7} {r['seconds']:>7.1f} "
              f"{r['setup_mb']:>9.1f} {r['peak_mb']:>8.1f} {r['peak_mb'] - r['setup_mb']:>12.1f}")
    if len(results) >= 2:
        lo, hi = results[0], results[-1]
        ratio = hi["peak_mb"] / lo["peak_mb"]
        print(f"peak RSS ratio {hi['n']} / {lo['n']} prompts: {ratio:.3f} "
              f"(goal: within 20%, i.e. <= 1.20) -> {'met' if ratio <= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
