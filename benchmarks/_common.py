"""Shared set-up for the benchmarks: models and prompts, and a timer that takes the best of n."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import torch


def best_of(fn: Callable[[], Any], n: int = 3) -> float:
    """Best wall time of ``n`` runs (the machine is noisy; the minimum is the least disturbed)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def organism_or_tiny(family: str = "gpt_neox"):
    """The shipped organism with its known sport facts, or a tiny random model and fixture facts."""
    import factfind as ff

    try:
        model = ff.load_model("organism")
        facts = ff.load_facts("organism:sport").known_by(model)
        return model, facts, "organism"
    except (FileNotFoundError, OSError, ImportError, ff.FactDataError):
        from factfind.testing.models import tiny_model

        model = tiny_model(family, n_layers=4, d_model=128)
        facts = ff.from_records([{"subject": f"{a} {b}", "relation": "sport",
                                  "template": "Fact: {} plays the sport of", "attribute": s}
                                 for a in ("Michael", "Tiger", "Serena", "Lionel")
                                 for b, s in (("Jordan", "basketball"), ("Woods", "golf"),
                                              ("Williams", "tennis"), ("Messi", "football"))])
        return model, facts, f"tiny random {family}"


def load_checkpoint(model_path: str, relation: str):
    """A model and its facts: the shipped organism, or a checkpoint with its ``world.json``."""
    from pathlib import Path

    import factfind as ff

    model = ff.load_model(model_path)
    if model_path == "organism":
        return model, ff.load_facts(f"organism:{relation}")
    from factfind.data.loaders import load_organism

    return model, load_organism(relation, world_path=Path(model_path) / "world.json")


def known_pairs(model: Any, facts: Any, n: int, *, oversample: int = 8):
    """Up to ``n`` (clean, corrupt) pairs of facts the model knows: sample ``oversample * n``
    facts (seed 0), keep the known ones, pair each with a same-shape corrupt partner."""
    known = facts.sample(min(len(facts), oversample * n), seed=0).known_by(model)
    return known.corrupt(model, seed=0, on_missing="skip")[:n]


def cached_default_dictionaries(model: Any) -> Any:
    """The default dictionary set ``train_dictionaries`` cached for ``model`` (its fingerprint,
    the default kind, k and width, a transcoder per layer), loaded; ``None`` if there is none
    (training one on a real model takes ~30 min: a benchmark never does)."""
    import json

    from factfind.features.formats import load_dictionaries
    from factfind.features.training import DEFAULTS, dictionaries_dir

    fp = model.fingerprint()
    for prov_path in sorted(dictionaries_dir().glob("*/provenance.json")):
        prov = json.loads(prov_path.read_text())
        cfg = prov.get("config", {})
        if (prov.get("model_fingerprint") == fp and cfg.get("kind") == DEFAULTS["kind"]
                and cfg.get("k") == DEFAULTS["k"]
                and cfg.get("width") == DEFAULTS["expansion"] * model.d_model
                and len(cfg.get("layers", [])) == model.n_layers
                and (prov_path.parent / "dictionaries").exists()):
            return load_dictionaries(prov_path.parent / "dictionaries")
    return None
