"""Sparse dictionaries on one model: train, measure, read.

The research question: in what basis should a fact-recall circuit be read? A transcoder at
every layer replaces the model's MLPs with sparse, wide maps whose features may each mean one
thing (Dunefsky et al. 2024; skip transcoders, Paulo et al. 2025). This script

 1. builds the corpus (the organism: its own world's facts as sentences; a real model: the
    offline default corpus of :func:`factfind.load_corpus`, shipped facts plus the model's own
    samples) and holds 5% of its texts out;
 2. trains (or loads from ``$FACTFIND_CACHE/dictionaries``) one dictionary per layer with
    :func:`factfind.train_dictionaries` (default: TopK skip transcoders, 4x width, k 32);
 3. measures each on the held-out texts with SAELens' definitions
    (:func:`factfind.evaluate_dictionaries`): explained variance, L0, dead and dense
    fractions, CE- and KL-loss recovered with the dictionary spliced in and its error dropped;
 4. scores every feature at the subject's last token and at the final token against the
    facts' attribute values (:func:`factfind.attribute_features`: precision and recall of
    "fires" for "the subject has this value") and shows dashboards of the best ones
    (:func:`factfind.feature_dashboards`: top contexts, logit lens, density, label);
 5. writes ``reports/dictionaries-<model>.html`` (and the quality table as CSV beside it).

Usage::

    python analyses/dictionaries.py                                 # the organism (~2 min)
    python analyses/dictionaries.py --model smollm2-135m --facts rome_known --threads 2

The second is the documented real-model run; ``factfind train-dictionaries --model
smollm2-135m`` trains the same dictionaries (same corpus split, same cache key) without the
report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import factfind as ff
from factfind import report as rp
from factfind.features import best_attribute_features, feature_dashboards
from factfind.features.corpus import Corpus
from factfind.features.training import DEFAULTS
from factfind.report import features as rf

log = logging.getLogger("factfind.analyses.dictionaries")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    """Everything that determines the results (saved in the report)."""

    model: str = "organism"
    facts: str | None = None          # the facts whose features are scored (default per model)
    relation: str | None = None       # attribute relation (default: the best-known one)
    layers: str | None = None         # comma-separated; default every layer
    kind: str = DEFAULTS["kind"]
    width: int | None = None
    k: int = DEFAULTS["k"]
    tokens: int | None = DEFAULTS["tokens"]
    epochs: int = DEFAULTS["epochs"]
    held_out: float = 0.05
    eval_tokens: int = 20_000
    n_facts: int = 400
    dashboards: int = 6
    seed: int = 0
    threads: int = 2


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in Config.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = type(default) if default is not None else str
        if f.name in ("width", "tokens"):
            kind = int
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--out", default=str(ROOT / "reports"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    args = p.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in Config.__dataclass_fields__})
    return cfg, args


def is_organism(cfg: Config) -> bool:
    return cfg.model == "organism"


def corpus_for(model: ff.Model, cfg: Config) -> Corpus:
    """The organism's own world as sentences (its tokenizer knows no other text), else the
    offline default corpus with the model's samples."""
    if is_organism(cfg):
        facts = ff.load_facts("organism")
        texts = sorted({f"{p.prompt} {p.attribute}".strip() for p in facts})
        corpus = Corpus(texts, {"source": "organism world", "what": "every fact of the "
                                "organism's world as a sentence; not a pretraining corpus"})
        corpus.count_tokens(model.tokenizer)
        return corpus
    return ff.load_corpus(model=model, seed=cfg.seed)


def facts_for(model: ff.Model, cfg: Config) -> tuple[Any, str]:
    """Facts the model knows, and the relation whose values label the features."""
    name = cfg.facts or ("organism:sport" if is_organism(cfg) else "rome_known")
    facts = ff.load_facts(name)
    known = facts if is_organism(cfg) else facts.known_by(model, rule="rank")
    relation = cfg.relation
    if relation is None:  # the relation with most known facts and at least two values
        counts = pd.Series([p.relation for p in known]).value_counts()
        for rel in counts.index:
            if len({p.attribute for p in known.by_relation(str(rel))}) >= 2:
                relation = str(rel)
                break
    if relation is None:
        raise ff.NotEnoughFactsError(f"{model.name} knows no relation of {name} with two "
                                     "values: pass --facts/--relation")
    sample = known.sample(min(cfg.n_facts, len(known)), seed=cfg.seed) \
        if len(known) > cfg.n_facts else known
    return sample, relation


def main(argv: list[str] | None = None) -> Path:
    cfg, args = parse_args(argv)
    ff.configure_logging()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    seconds: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        seconds[name] = round(time.time() - t, 1)
        log.info("%s: %.1f s", name, seconds[name])

    out_dir = Path(args.out)
    model = ff.load_model(cfg.model)
    path = out_dir / f"dictionaries-{model.name}.html"
    if path.exists() and not args.overwrite:
        raise ff.ArgumentError(f"{path} exists: pass --overwrite to replace it, or --out "
                               "elsewhere")
    t = time.time()
    corpus = corpus_for(model, cfg)
    train, held = corpus.split(cfg.held_out, seed=cfg.seed)
    step("corpus", t)
    t = time.time()
    layers = None if cfg.layers is None else [int(x) for x in cfg.layers.split(",")]
    dicts = ff.train_dictionaries(model, train, layers=layers, kind=cfg.kind, width=cfg.width,
                                  k=cfg.k, tokens=cfg.tokens, epochs=cfg.epochs, seed=cfg.seed)
    step("training" + (" (cached)" if dicts.meta.get("loaded_from_cache") else ""), t)
    t = time.time()
    quality = ff.evaluate_dictionaries(model, dicts, held, max_tokens=cfg.eval_tokens)
    step("evaluation", t)
    t = time.time()
    facts, relation = facts_for(model, cfg)
    scores = pd.concat([ff.attribute_features(model, dicts, facts, attribute=relation,
                                              role=role) for role in ("subject_last", "final")],
                       ignore_index=True)
    step("attribute features", t)
    t = time.time()
    best = best_attribute_features(scores).sort_values("f1", ascending=False)
    picked = list(dict.fromkeys(best["feature_id"]))[:cfg.dashboards]
    boards = feature_dashboards(model, dicts, picked, facts=facts, corpus=held) \
        if picked else []
    step("dashboards", t)

    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / f"dictionaries-{model.name}.csv"
    quality.to_csv(csv, index=False)
    training = {k: v for k, v in (dicts.meta or {}).items() if isinstance(v, (int, float, str))}
    sections = [
        rp.model_section({"name": model.name, "revision": model.revision,
                          **{k: v for k, v in model.provenance.items()
                             if isinstance(v, (str, int, float))}}),
        rf.corpus_section({**train.provenance, "held-out texts": len(held)}),
        rf.dictionary_quality_section(quality, training=training),
        rf.attribute_features_section(scores.rename(columns={}), top=3),
        *([rf.dashboards_section(boards)] if boards else []),
        rp.config_section(asdict(cfg), {"seconds": seconds,
                                        "wall seconds": round(time.time() - t0, 1),
                                        "relation": relation}),
    ]
    report = rp.write_report(rp.ReportData(title=f"Sparse dictionaries: {model.name}",
                                           subtitle=f"{len(dicts)} {cfg.kind}s, "
                                                    f"{dicts.at(dicts.layers[0]).d_sae} "
                                                    "features each", sections=sections),
                             path, overwrite=args.overwrite)
    summary = quality[[c for c in ("dictionary", "layer", "explained_variance", "l0",
                                   "dead_fraction", "ce_recovered", "kl_recovered")
                       if c in quality.columns]]
    log.info("quality per layer:\n%s", summary.to_string(index=False))
    log.info("report: %s (%.0f s); seconds per step: %s", report, time.time() - t0,
             json.dumps(seconds))
    return Path(report)


if __name__ == "__main__":
    sys.exit(ff.run_cli(main, sys.argv[1:]))
