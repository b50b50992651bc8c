"""The seed's concepts, measured: linear representations, polysemanticity, superposition and
universality of fact recall, on one model and across models.

For the first model given (default: the shipped organism), on facts it knows:

 1. linear representation of attributes: directions by probe, class mean and unembedding per
    layer and role; held-out decodability; cosine agreement; rank-1 / rank-k / full patching
    (:mod:`factfind.concepts.representation`);
 2. neuron basis vs feature basis: polysemanticity of the top AtP neurons at the last subject
    token for attribute, subject and relation; top-k neurons vs top-k PCA directions of the
    lookup MLP (:mod:`factfind.concepts.polysemanticity`);
 3. superposition: facts vs neurons and dimensions at the lookup layers, interference between
    attribute directions, effective rank of the lookup MLP outputs; the same for every model in
    ``--world-sizes`` (organisms of different world size) (:mod:`factfind.concepts.superposition`);
 4. universality: the EAP-IG circuits of the first two models compared by role signature and
    graph edit distance (:mod:`factfind.concepts.universality`).

The tables are printed and written to ``reports/concepts-<model>.html`` with a ``.json``
summary beside it:

    python analyses/concepts.py                                   # organism vs itself
    python analyses/concepts.py --models organism checkpoints/organism-seed1 \
        --world-sizes checkpoints/organism-800 organism

The extra organisms are trained with the organism's own command into ``checkpoints/`` (ignored
by git; about 13 min on two CPU cores each; the recorded ones were trained with
``--threads 1``, the default before the shipped run moved to two threads):

    python -m factfind.organism.train --seed 1 --out checkpoints/organism-seed1
    python -m factfind.organism.train --seed 0 --config world800.json --out checkpoints/organism-800

where ``world800.json`` is the default ``train_config.json`` with ``n_known`` 800,
``n_unknown`` 200 and ``steps`` 1200. The seed-1 organism is the default second model when it
exists.

A checkpoint is a Hugging Face directory with the organism's ``world.json`` inside (facts are
read from it); ``organism`` is the shipped one.
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

import numpy as np
import pandas as pd
import torch

import factfind as ff
from factfind import graph as cg
from factfind import report as rp
from factfind.attribute.atp import atp
from factfind.concepts.polysemanticity import (
    basis_comparison,
    monosemantic_fraction,
    neuron_selectivity,
)
from factfind.concepts.representation import (
    attribute_directions,
    direction_agreement,
    direction_patching,
)
from factfind.concepts.superposition import interference, lookup_effective_rank, storage_counts
from factfind.concepts.universality import compare_graphs, signature_counts
from factfind.data import FactDataset, FactPairs, load_organism
from factfind.edges.eap import eap_ig, to_graph
from factfind.localize.subspace import FULL, SubspacePatch, subspace_patching
from factfind.report import concepts as rc
from factfind.types import Role

ROOT = Path(__file__).resolve().parents[1]
SEED1 = ROOT / "checkpoints" / "organism-seed1"
log = logging.getLogger("concepts")


@dataclass(frozen=True)
class Config:
    """Everything that determines the results (saved in the report)."""

    models: tuple[str, ...] = ("organism",)
    world_sizes: tuple[str, ...] = ()
    relation: str = "sport"
    n_prompts: int = 400
    n_pairs: int = 24
    top_neurons: int = 50
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    circuit_pairs: int = 24
    circuit_edges: int = 40
    eap_ig_steps: int = 5
    rank_subjects: int = 1000
    seed: int = 0
    batch_size: int = 32
    version: str = ff.__version__


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--models", nargs="+", default=None,
                   help="checkpoints: the first is analysed, the first two are compared "
                        f"(default: organism, and {SEED1} if it exists)")
    p.add_argument("--world-sizes", nargs="*", default=None,
                   help="checkpoints for the superposition-vs-world-size table "
                        "(default: the models)")
    p.add_argument("--relation", default=Config.relation)
    p.add_argument("--n-prompts", type=int, default=Config.n_prompts)
    p.add_argument("--n-pairs", type=int, default=Config.n_pairs)
    p.add_argument("--top-neurons", type=int, default=Config.top_neurons)
    p.add_argument("--circuit-pairs", type=int, default=Config.circuit_pairs)
    p.add_argument("--circuit-edges", type=int, default=Config.circuit_edges)
    p.add_argument("--eap-ig-steps", type=int, default=Config.eap_ig_steps)
    p.add_argument("--rank-subjects", type=int, default=Config.rank_subjects)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--out", default=str(ROOT / "reports"))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    models = tuple(a.models) if a.models else (
        ("organism", str(SEED1)) if (SEED1 / "config.json").is_file() else ("organism",))
    sizes = tuple(a.world_sizes) if a.world_sizes is not None else models
    return Config(models=models, world_sizes=sizes, relation=a.relation,
                  n_prompts=a.n_prompts, n_pairs=a.n_pairs, top_neurons=a.top_neurons,
                  circuit_pairs=a.circuit_pairs, circuit_edges=a.circuit_edges,
                  eap_ig_steps=a.eap_ig_steps,
                  rank_subjects=a.rank_subjects, seed=a.seed), a


def load_world_facts(checkpoint: str, relation: str | None = None) -> FactDataset:
    """The known people's facts from a checkpoint's ``world.json`` (train templates)."""
    world = None if checkpoint == "organism" else Path(checkpoint) / "world.json"
    return load_organism(relation, world_path=world)


def lookup_layers(model: ff.Model, pairs: FactPairs, *, batch_size: int = 32) -> list[int]:
    """MLP layers whose output at the last subject token, patched alone (clean into corrupt),
    restores at least half as much as the strongest one: the lookup layers."""
    patches = [SubspacePatch(FULL, "mlp_out", layer, Role.SUBJECT_LAST)
               for layer in range(model.n_layers)]
    df = subspace_patching(model, pairs, patches, batch_size=batch_size)
    layer_of = np.asarray(df["layer"], dtype=int)
    effect = np.asarray(df["effect"], dtype=float)
    eff = {int(lay): float(np.nanmean(effect[layer_of == lay])) for lay in np.unique(layer_of)}
    return sorted(lay for lay, e in eff.items() if e >= 0.5 * max(eff.values()))


def _known(model: ff.Model, facts: FactDataset, n: int, seed: int) -> FactDataset:
    return facts.sample(min(n, len(facts)), seed=seed).known_by(model)


def superposition_row(checkpoint: str, cfg: Config) -> dict[str, Any]:
    """One line of the world-size table for a checkpoint."""
    model = ff.load_model(checkpoint)
    everything = load_world_facts(checkpoint)
    rel = _known(model, load_world_facts(checkpoint, cfg.relation), cfg.n_prompts, cfg.seed)
    pairs = rel[:cfg.n_pairs].corrupt(model, seed=cfg.seed, on_missing="skip")
    layers = lookup_layers(model, pairs, batch_size=cfg.batch_size)
    cap = storage_counts(model, everything, layers=layers).iloc[0].to_dict()
    one = _one_per_subject(everything, cfg.relation, cfg.rank_subjects, cfg.seed)
    er = lookup_effective_rank(model, one, layers=layers, components=["mlp_out"])
    dirs = attribute_directions(model, _known(model, everything, cfg.n_prompts * 2, cfg.seed),
                                layers=layers, roles=[Role.SUBJECT_LAST], methods=["mean"])
    inter = _interference(dirs)
    across = inter[inter["pairs"] == "across"]
    return {"checkpoint": checkpoint, "people": len({f.subject for f in everything}),
            "facts": int(cap["facts"]), "lookup_layers": cap["lookup_layers"],
            "neurons": int(cap["neurons"]), "d_model": int(cap["d_model"]),
            "facts_per_neuron": float(cap["effect"]), "facts_per_dim": float(cap["facts_per_dim"]),
            "bits_per_neuron": float(cap["bits_per_neuron"]),
            "mlp_out_participation_ratio": _mean(er["effect"]),
            "mlp_out_entropy_rank": _mean(er["entropy_rank"]),
            "attr_dir_abs_cos_across": _mean(across["effect"]) if len(across) else None}


def _mean(column: Any) -> float:
    return float(np.nanmean(np.asarray(column, dtype=float)))


def _one_per_subject(facts: FactDataset, relation: str, n: int, seed: int) -> FactDataset:
    """One prompt (the first train template) per subject of ``relation``, at most ``n``."""
    seen: dict[str, Any] = {}
    for f in facts.by_relation(relation):
        seen.setdefault(f.subject, f)
    out = FactDataset(list(seen.values()), name=f"{facts.name}|one-per-subject")
    return out.sample(min(n, len(out)), seed=seed)


def _interference(dirs: Any, method: str = "mean") -> pd.DataFrame:
    frames = []
    sites = sorted({(layer, role) for _, layer, role, m in dirs.vectors if m == method})
    for layer, role in sites:
        rels = sorted(r for r in dirs.classes if (r, layer, role, method) in dirs.vectors)
        vecs = torch.cat([dirs.get(r, layer, role, method) for r in rels])
        labels = [f"{r}:{c}" for r in rels for c in dirs.classes[r]]
        groups = [r for r in rels for _ in dirs.classes[r]]
        frames.append(interference(vecs, labels=labels, groups=groups).assign(
            component=dirs.component, layer=layer, role=role))
    return pd.concat(frames, ignore_index=True)


def circuit(model: ff.Model, pairs: FactPairs, cfg: Config) -> cg.CircuitGraph:
    """The EAP-IG circuit (strongest ``circuit_edges`` edges, pruned to input-output paths)."""
    edges = eap_ig(model, pairs, steps=cfg.eap_ig_steps, batch_size=cfg.batch_size)
    return cg.prune(to_graph(edges, model, pairs), top_n=cfg.circuit_edges)


def main(argv: list[str] | None = None) -> Path:
    cfg, args = parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    t0 = time.time()
    first = cfg.models[0]
    model = ff.load_model(first)
    everything = load_world_facts(first)
    known = _known(model, load_world_facts(first, cfg.relation), cfg.n_prompts, cfg.seed)
    pairs = known[:cfg.n_pairs].corrupt(model, seed=cfg.seed, on_missing="skip")
    layers = lookup_layers(model, pairs, batch_size=cfg.batch_size)
    log.info("%s: %d known %s facts, %d pairs, lookup layers %s (%.0fs)", model.name, len(known),
             cfg.relation, len(pairs), layers, time.time() - t0)

    # 1. linear representation -----------------------------------------------------------------
    all_known = _known(model, everything, cfg.n_prompts * 2, cfg.seed)
    dirs = attribute_directions(model, all_known, seed=cfg.seed)
    agreement = direction_agreement(dirs)
    ratios = direction_patching(model, pairs, dirs, batch_size=cfg.batch_size)
    log.info("representation done (%.0fs)", time.time() - t0)

    # 2. polysemanticity and the basis comparison ---------------------------------------------
    scores = atp(model, pairs, components=["neurons"], positions=[Role.SUBJECT_LAST],
                 direction="denoise", batch_size=cfg.batch_size)
    top = scores.nlargest(cfg.top_neurons, "score")
    subjects = {f.subject for f in known}
    about = FactDataset([f for f in everything if f.subject in subjects],
                        name=f"{everything.name}|subjects-of-{cfg.relation}")
    about = about.sample(min(len(about), 4 * cfg.n_prompts), seed=cfg.seed)
    sel = neuron_selectivity(model, about, top, batch_size=cfg.batch_size)
    fractions = monosemantic_fraction(sel)
    basis = pd.concat([basis_comparison(model, pairs, layer=layer, ks=cfg.ks,
                                        neuron_scores=scores, batch_size=cfg.batch_size)
                       for layer in layers], ignore_index=True)
    log.info("polysemanticity done (%.0fs)", time.time() - t0)

    # 3. superposition -------------------------------------------------------------------------
    capacity = storage_counts(model, everything, layers=layers)
    inter = _interference(dirs)
    one = _one_per_subject(everything, cfg.relation, cfg.rank_subjects, cfg.seed)
    erank = lookup_effective_rank(model, one, layers=layers)
    by_world = pd.DataFrame([superposition_row(c, cfg) for c in cfg.world_sizes],
                            columns=None if cfg.world_sizes else ["checkpoint"])
    log.info("superposition done (%.0fs)", time.time() - t0)

    # 4. universality --------------------------------------------------------------------------
    second = cfg.models[1] if len(cfg.models) > 1 else first
    other = model if second == first else ff.load_model(second)
    other_known = _known(other, load_world_facts(second, cfg.relation), cfg.n_prompts,
                         cfg.seed)
    pairs_a = known[:cfg.circuit_pairs].corrupt(model, seed=cfg.seed, on_missing="skip")
    pairs_b = other_known[:cfg.circuit_pairs].corrupt(other, seed=cfg.seed, on_missing="skip")
    ga = circuit(model, pairs_a, cfg)
    same = other is model and pairs_b.fingerprint() == pairs_a.fingerprint()
    gb = ga if same else circuit(other, pairs_b, cfg)  # EAP-IG is deterministic
    names = (Path(first).name, Path(second).name + (" (again)" if second == first else ""))
    comparison = compare_graphs(ga, gb, names=names)
    counts = signature_counts([(names[0], ga), (names[1], gb)])
    log.info("universality done (%.0fs)", time.time() - t0)

    # tables, report, summary ------------------------------------------------------------------
    show = {
        "decodability (held-out accuracy)": dirs.decodability[
            ["relation", "layer", "role", "direction", "effect", "chance"]],
        "agreement across methods (mean cos)": agreement[agreement["kind"] == "methods"][
            ["relation", "layer", "role", "method_a", "method_b", "effect"]],
        "subspace / full patch": ratios[["layer", "role", "subspace", "effect", "full_effect",
                                         "ratio"]],
        "monosemantic fraction": fractions[["key", "neurons", "selective", "effect",
                                            "mean_polysemanticity"]],
        "top-k neurons vs PCA": basis[["group", "basis", "k", "ratio"]],
        "capacity": capacity[["facts", "neurons", "d_model", "effect", "facts_per_dim",
                              "bits_per_neuron"]],
        "interference": inter[["layer", "role", "pairs", "effect", "max", "n_features",
                               "welch_bound", "random_mean"]],
        "effective rank": erank[["component", "layer", "effect", "entropy_rank", "dims_90",
                                 "dims"]],
        "superposition vs world size": by_world,
        "universality": comparison[["graph_a", "graph_b", "measure", "effect"]],
    }
    with pd.option_context("display.width", 200, "display.max_rows", 400,
                           "display.max_columns", 20, "display.precision", 3):
        for title, df in show.items():
            print(f"\n## {title}\n{df.to_string(index=False)}")
    sections = [
        rp.model_section({"name": model.name, "revision": model.revision,
                          "compared with": second, "layers": model.n_layers,
                          "d_model": model.d_model, "d_mlp": model.d_mlp,
                          "lookup layers": ", ".join(map(str, layers))}),
        rc.representation_section(dirs.decodability, agreement, ratios),
        rc.polysemanticity_section(sel, fractions, basis),
        rc.superposition_section(capacity, inter, erank, by_world=by_world),
        rc.universality_section(comparison, counts, [(names[0], ga), (names[1], gb)]),
        rp.config_section(asdict(cfg), {"seconds": round(time.time() - t0, 1)}),
    ]
    slug = "-".join(Path(m).name for m in cfg.models[:2])
    out = Path(args.out) / f"concepts-{slug}.html"
    rp.write_report(rp.ReportData(title=f"Concepts measured: {model.name}",
                                  subtitle=f"{len(pairs)} pairs · {cfg.relation} · seed "
                                           f"{cfg.seed}", sections=sections),
                    out, overwrite=args.overwrite)
    summary = {title: json.loads(df.to_json(orient="records")) for title, df in show.items()}
    out.with_suffix(".json").write_text(json.dumps({"config": asdict(cfg), **summary},
                                                   indent=1, default=str))
    log.info("report: %s (%.0fs)", out, time.time() - t0)
    print(out)
    return out


if __name__ == "__main__":
    main()
