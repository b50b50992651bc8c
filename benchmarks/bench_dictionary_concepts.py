"""Dictionaries on the organism, measured: SAELens' evaluations on held-out text, feature
splitting across widths, features per dimension, features vs neurons, sport features.

Transcoders (TopK, k=16) at one organism layer, widths 32 / 128 / 512 / 2,048 / 8,192 (up
to 16x the MLP's 512 neurons), trained by
:func:`factfind.features.training.train_dictionaries` on 95% of a corpus of the organism's
own fact sentences (one per known person and relation, in a seeded training template, with the
answer), evaluated on the other 5%
(:func:`factfind.evaluate_dictionaries`). Then :func:`factfind.concepts.feature_splitting`
between consecutive widths, :func:`factfind.concepts.features_per_dimension` at explained
variance 0.99, :func:`factfind.concepts.polysemanticity_comparison` of the 2,048-wide features
against the layer's 512 neurons at the subject's last token, and
:func:`factfind.attribute_features` for the people's sport. Printed as tables with the seconds
of each step.

    python -u benchmarks/bench_dictionary_concepts.py             # 1 thread, layer 1
    python benchmarks/bench_dictionary_concepts.py --layer 2 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time

import pandas as pd
import torch
from _common import machine

import factfind as ff
from factfind.concepts import (
    feature_selectivity,
    feature_splitting,
    features_per_dimension,
    polysemanticity_comparison,
    splitting_summary,
)
from factfind.features.corpus import Corpus
from factfind.features.dashboard import feature_dashboards
from factfind.features.evaluation import site_activations
from factfind.features.labels import best_attribute_features
from factfind.features.training import train_dictionaries
from factfind.types import Component

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 30)


def organism_corpus(facts: ff.FactDataset, seed: int = 0) -> Corpus:
    """One sentence per (known person, relation): a seeded template, filled, with the answer."""
    rng = random.Random(seed)
    by: dict[tuple[str, str], list[ff.FactPrompt]] = {}
    for p in facts:
        by.setdefault((p.subject, p.relation), []).append(p)
    texts = []
    for key in sorted(by):
        p = rng.choice(by[key])
        texts.append(p.template.format(p.subject) + " " + p.attribute + ".")
    return Corpus(texts, {"source": "organism fact sentences", "seed": seed})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512, 2048, 8192])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.99)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine(), f"threads {torch.get_num_threads()}")
    model = ff.load_model("organism")
    facts = ff.load_facts("organism")
    corpus = organism_corpus(facts)
    train, held_out = corpus.split(0.05)
    print(f"corpus {len(corpus)} texts: train {len(train)}, held out {len(held_out)}")
    dicts = []
    with tempfile.TemporaryDirectory() as cache:
        for w in args.widths:
            t = time.time()
            ds = train_dictionaries(model, train, layers=[args.layer], kind="transcoder",
                                    width=w, k=args.k, tokens=args.tokens, cache_dir=cache,
                                    progress=False)
            dicts.append(next(iter(ds.values())))
            print(f"train width {w}: {time.time() - t:.1f} s")
    t = time.time()
    ev = pd.concat([ff.evaluate_dictionaries(model, [d], held_out, progress=False)
                    for d in dicts], ignore_index=True)
    print(f"\nevaluate_dictionaries ({time.time() - t:.1f} s, held-out tokens)")
    print(ev[["dictionary", "width", "k", "tokens", "explained_variance", "l0",
              "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced", "ce_zero",
              "ce_recovered", "kl_recovered"]].to_string(index=False))
    t = time.time()
    key_in, key_out = (Component.MLP_IN, args.layer), (Component.MLP_OUT, args.layer)
    acts = site_activations(model, held_out, [key_in, key_out])
    x, y = acts[key_in], acts[key_out]
    split = [splitting_summary(feature_splitting(a, b, x))
             for a, b in itertools.pairwise(dicts)]
    print(f"\nfeature splitting ({time.time() - t:.1f} s)")
    print(pd.concat(split)[["narrow_width", "wide_width", "wide_live", "children", "parents",
                            "split", "effect", "max_children", "mean_decoder_cos"]]
          .to_string(index=False))
    fpd = features_per_dimension(dicts, x, y, target=args.target)
    print(f"\nfeatures per dimension (target explained variance {args.target})")
    print(fpd[["dictionary", "width", "live", "explained_variance", "live_per_dim",
               "live_at_target", "features_per_dim", "pca_dims"]].to_string(index=False))
    t = time.time()
    rng = random.Random(1)
    sample = ff.FactDataset(rng.sample(list(facts.by_relation("sport")), 1600))
    mid = next((d for d in dicts if d.d_sae == 2048), dicts[len(dicts) // 2])
    cmp = polysemanticity_comparison(model, mid, sample, keys=("attribute", "subject"))
    print(f"\nfeatures vs neurons, subject_last ({time.time() - t:.1f} s, 1,600 sport prompts)")
    print(cmp[["dictionary", "basis", "key", "units", "selective", "selective_fraction",
               "effect", "mean_polysemanticity", "n_values"]].to_string(index=False))
    t = time.time()
    sel = feature_selectivity(model, mid, sample, keys=("subject",))
    mono = sel[sel["monosemantic"]].sort_values("max_z", ascending=False).head(3)
    dashes = feature_dashboards(model, mid, [int(f) for f in mono["feature"]], facts=sample,
                                corpus=held_out, n_top=3, progress=False)
    print(f"\ndashboards of the 3 most selective monosemantic features ({time.time() - t:.1f} s)")
    for dash, top in zip(dashes, mono["top_value"], strict=True):
        print(f"{dash.feature_id}  subject {top!r}  density {dash.density:.4f}  {dash.label}")
        print(dash.contexts[["source", "kind", "activation", "context"]].head(4)
              .to_string(index=False))
    for role in ("subject_last", "final"):
        df = ff.attribute_features(model, mid, sample, attribute="sport", role=role)
        print(f"\nbest feature per sport at {role} ({mid.name}, width {mid.d_sae})")
        print(best_attribute_features(df)[["feature_id", "value", "precision", "recall", "f1",
                                           "base_rate", "n"]].to_string(index=False))


if __name__ == "__main__":
    main()
