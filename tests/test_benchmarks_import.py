"""Every benchmark script imports and has a ``main``.

Benchmarks are not part of the suite's pass/fail (their numbers are measured, not asserted), but
a script that no longer imports is a broken benchmark: a refactor that moves a helper out of
one script must not break the scripts that imported it.
"""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("bench_*.py"))


def test_there_are_benchmarks():
    assert len(SCRIPTS) >= 8, SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for mod in [m for m in sys.modules if m == "_common" or m.startswith("bench_")]:
        monkeypatch.delitem(sys.modules, mod)
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None)), f"{name}.py has no main()"
