"""What verifying the cache costs: the seconds spent hashing and checking cache entries, as a
share of the default organism run (goal: at most 2%).

Every cache write hashes the entry it writes (sha256, recorded in its sidecar) and every read
checks the entry's size and hash before parsing it (:mod:`factfind.integrity`); loading the
organism checks its checkpoint against ``MANIFEST.json``. This script runs the default
organism job (``factfind fact-finding``, every option at its default) twice in one process, on
a fresh cache folder: first with every step computed, then again with every step served from
the cache. Both runs time every verification function while they run (the outermost call only:
``check``, ``check_folder``, ``digest``, ``sha256_of``), side by side with the run's own wall
time, and print the share.

    python benchmarks/bench_verify.py                 # ~2-4 min on a 2-core CPU
    python benchmarks/bench_verify.py --n-prompts 16  # quicker, for a look
"""

from __future__ import annotations

import argparse
import functools
import json
import runpy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

TIMED = ("check", "check_folder", "digest", "sha256_of")


class VerifyClock:
    """Wraps the verification functions wherever factfind imported them, and sums the seconds
    of their outermost calls (a ``check_folder`` that calls ``check`` counts once)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            if self._depth:
                return fn(*a, **k)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self._depth -= 1
        return timed

    def __enter__(self) -> VerifyClock:
        import factfind  # noqa: F401  (every module that imports the functions is loaded)
        from factfind import integrity

        originals = {name: getattr(integrity, name) for name in TIMED}
        wrapped = {name: self._wrap(fn) for name, fn in originals.items()}
        for module in [m for n, m in sys.modules.items() if n.startswith("factfind")]:
            for name, fn in originals.items():
                if getattr(module, name, None) is fn:
                    self._undo.append((module, name, fn))
                    setattr(module, name, wrapped[name])
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, fn in self._undo:
            setattr(module, name, fn)


def run_once(main: Callable[[list[str]], Any], args: list[str]) -> dict[str, Any]:
    """One run of the job with its verification timed."""
    with VerifyClock() as clock:
        start = time.perf_counter()
        outcome = main(args)
        wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "verify_s": round(clock.seconds, 4),
            "verify_calls": clock.calls, "share": clock.seconds / wall,
            "computed": len(outcome.cache.computed), "hits": len(outcome.cache.hits),
            "rebuilt": len(outcome.cache.rebuilt)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n-prompts", type=int, default=None, help="default: the job's default")
    p.add_argument("--threads", type=int, default=None, help="default: the job's default")
    a = p.parse_args(argv)
    script = runpy.run_path(str(ROOT / "analyses" / "fact_finding.py"), run_name="bench_verify")
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        args = ["--cache", f"{tmp}/cache", "--out", f"{tmp}/out", "--overwrite"]
        if a.n_prompts is not None:
            args += ["--n-prompts", str(a.n_prompts)]
        if a.threads is not None:
            args += ["--threads", str(a.threads)]
        fresh = run_once(script["main"], args)
        cached = run_once(script["main"], args)
        size = sum(f.stat().st_size for f in Path(tmp, "cache").rglob("*") if f.is_file())
    result = {"fresh (every step computed)": fresh, "cached (every step from disk)": cached,
              "cache_bytes": size,
              "share of the default run": (fresh["verify_s"] + cached["verify_s"])
              / fresh["wall_s"]}
    print(json.dumps(result, indent=1))
    print(f"verification: {fresh['verify_s']:.3f} s of the {fresh['wall_s']:.1f} s fresh run "
          f"({100 * fresh['share']:.3f}%); {cached['verify_s']:.3f} s of the "
          f"{cached['wall_s']:.1f} s cached rerun ({100 * cached['share']:.2f}%); both "
          f"together {100 * result['share of the default run']:.3f}% of the default run "
          f"(goal <= 2%); cache {size / 1e6:.1f} MB")
    return result


if __name__ == "__main__":
    main()
