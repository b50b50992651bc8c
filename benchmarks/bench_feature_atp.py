"""Feature AtP over every feature of every layer, in FE (time ÷ one plain forward).

For one batch of clean/corrupt pairs, with a transcoder at every layer (TopK, width
``--width`` × d_model, ``k`` active per token) and optionally a residual SAE at every layer
too, this times, side by side in one run:

1. one plain forward of the batch's clean prompts (``Model.run``, the FE unit);
2. ``feature_atp`` (AtP: one base forward + backward and one source forward of the plain model,
   the encoders at the roles' positions, sparse scores over the active features, the tidy
   frame) - goal ≤ 5 FE per batch;
3. ``feature_atp(steps=10)`` (IG, 10 points per dictionary);
4. ``feature_atp(reference=True)`` (the literal recipe: every dictionary spliced in, autograd
   with respect to every feature activation and error term at every position, dense), and the
   largest difference between the two on the non-zero values.

Models: the shipped organism (known sport facts) and a tiny random Llama (fixture facts);
``--models smollm2`` adds SmolLM2-135M on bench_eap's athlete pairs (one token length).

    python benchmarks/bench_feature_atp.py               # 1 thread, both models
    python benchmarks/bench_feature_atp.py --sae         # a residual SAE at every layer too
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
from _common import best_of, known_pairs, machine

import factfind as ff
from factfind.features import Dictionaries, Dictionary
from factfind.features.attribution import DEFAULT_IG_STEPS


def dictionaries(model: Any, width: int, k: int, sae: bool) -> Dictionaries:
    D = model.d_model
    items = [Dictionary.random(kind="skip_transcoder", activation="topk", layer=layer, d_in=D,
                               d_sae=width * D, k=k, seed=layer) for layer in range(model.n_layers)]
    if sae:
        items += [Dictionary.random(kind="sae", activation="topk", layer=layer, d_in=D,
                                    d_sae=width * D, k=k, seed=100 + layer)
                  for layer in range(model.n_layers)]
    return Dictionaries(items)


def models(which: list[str]) -> list[tuple[str, Any, Any]]:
    out = []
    if "organism" in which:
        model = ff.load_model("organism")
        facts = ff.load_facts("organism:sport")
        out.append(("organism", model, facts))
    if "tiny" in which:
        from factfind.testing.models import tiny_model

        model = tiny_model("llama", n_layers=4, d_model=128)
        facts = ff.from_records([{"subject": f"{a} {b}", "relation": "sport",
                                  "template": "Fact: {} plays the sport of", "attribute": s}
                                 for a in ("Michael", "Tiger", "Serena", "Lionel")
                                 for b, s in (("Jordan", "basketball"), ("Woods", "golf"),
                                              ("Williams", "tennis"), ("Messi", "football"))])
        out.append(("tiny llama (4 layers, d_model 128)", model, facts))
    if "smollm2" in which:  # the real model (30 layers, d_model 576, GQA): athlete pairs
        out.append(("smollm2-135m", ff.load_model("smollm2-135m"), None))
    return out


def run_one(name: str, model: Any, pb: Any, dicts: Dictionaries, width: int, args: Any) -> None:
    n_feats = sum(d.d_sae for d in dicts.values())
    kw: dict[str, Any] = {"batch_size": len(pb), "progress": False}
    t_fwd = best_of(lambda: model.run(pb.clean), args.repeats)
    sites = sorted({k for d in dicts.values() for k in ((d.site, d.layer),
                                                         (d.out_site, d.layer))})

    def runs() -> None:  # the model's part: base forward + backward, source forward
        model.run(pb.clean, save=sites, metric=lambda lg: pb.measure(lg).sum())
        model.run(pb.corrupt, save=sites)

    t_runs = best_of(runs, args.repeats)
    t_atp = best_of(lambda: ff.feature_atp(model, pb, dicts, **kw), args.repeats)
    t_ig = math.nan if args.no_ig else best_of(
        lambda: ff.feature_atp(model, pb, dicts, steps=DEFAULT_IG_STEPS, **kw),
        max(1, args.repeats // 3))
    t0 = time.perf_counter()
    ref = ff.feature_atp(model, pb, dicts, reference=True, **kw)
    t_ref = time.perf_counter() - t0
    est = ff.feature_atp(model, pb, dicts, **kw)
    both = est.merge(ref, on="node", suffixes=("", "_ref"))
    diff = float(np.abs(both["effect"] - both["effect_ref"]).max())
    n_feat_rows = int(est["feature"].notna().sum())
    print(f"\n{name}: {len(pb)} pairs x {pb.clean.input_ids.shape[1]} tokens, "
          f"{len(dicts)} dictionaries ({n_feats:,} features: {model.n_layers} layers x "
          f"{width} x d_model {model.d_model}, skip transcoders, TopK k={args.k}), 4 roles")
    print(f"  one plain forward {t_fwd * 1e3:.1f} ms; the model's runs alone (base forward +"
          f" backward, source forward) {t_runs * 1e3:.1f} ms = {t_runs / t_fwd:.2f} FE")
    print(f"  feature AtP        {t_atp * 1e3:8.1f} ms = {t_atp / t_fwd:5.2f} FE "
          f"({n_feat_rows:,} feature nodes changed at some role, of "
          f"{n_feats * 4:,}; {len(est) - n_feat_rows} error nodes)")
    print(f"  feature IG({DEFAULT_IG_STEPS})    {t_ig * 1e3:8.1f} ms = {t_ig / t_fwd:5.2f} FE")
    print(f"  reference AtP      {t_ref * 1e3:8.1f} ms = {t_ref / t_fwd:5.2f} FE, "
          f"max |fast - reference| {diff:.2e} (largest |effect| "
          f"{float(est['effect'].abs().max()):.3f})")



def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="organism,tiny")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--widths", default="4,16",
                        help="features per d_model (4: fit_dictionary's default)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--sae", action="store_true", help="a residual SAE at every layer too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-ig", action="store_true", help="skip IG (slow on deep models)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    for name, model, facts in models(args.models.split(",")):
        if name == "organism":
            pairs = known_pairs(model, facts, args.pairs)
        elif facts is None:
            from bench_eap import pairs_for

            pairs = pairs_for(model, args.pairs)
        else:
            pairs = facts.corrupt(model, seed=0, on_missing="skip")[:args.pairs]
        pb = ff.encode_pairs(model, pairs)
        for width in [int(w) for w in args.widths.split(",")]:
            run_one(name, model, pb, dictionaries(model, width, args.k, args.sae), width, args)




if __name__ == "__main__":
    main()
