"""Universality across models: does fact recall run through the same circuit, at the same depth?

The seed's hypothesis (Olah et al. 2020; Chughtai, Chan & Nanda 2023; Gurnee et al. 2024) is
that different models learn the same circuits. For fact recall the literature says where:
ROME's early site (MLPs at the last subject token) and late site (attention at the final token),
Geva's attribute extraction (the final token reads the subject in middle-upper layers), and
Fact Finding's effective model and probe (the subject needs attention only early; the attribute
is linearly readable there soon after). This script measures all of it on several models, on
ONE dataset, and sets the models side by side on relative depth, ``layer / (n_layers - 1)``
(the findings table's own convention: 0 is the first layer, 1 the last):

 1. every model named in ``--models`` (default SmolLM2-135M and Gemma-3-270M) scores the
    dataset's facts (cached chunks shared with ``factfind fact-finding`` on the same model
    and dataset); the facts **every** model knows (Fact Finding's rule, p > 0.5) and every
    model can pair with a same-length corrupt subject are the shared facts, and
    ``--n-pairs`` of them are analysed on every model, so the models answer the same facts;
 2. the **reference**: the shipped organism on its own world's relation (``--reference``),
    since it knows no real facts;
 3. per model, the fact-finding steps on those pairs: causal tracing, attention knockout,
    the effective model, linear probes (on up to 256 facts the model knows: the fact-finding
    run's own step, so a cache hit after it), and the circuit of head and neuron x role nodes
    pruned to faithfulness 0.9; the literature's findings judged on each
    (:func:`factfind.literature_findings`);
 4. tables, a figure per measure and a paragraph computed from the numbers (where the models
    agree within 0.15 of the depth and where they differ), in
    ``reports/universality-<dataset>.html``.

Every step is cached under ``runs/``: the fact scoring and the probes in each model's
fact-finding run folder (the very entries ``factfind fact-finding`` computes with its defaults),
the steps on the shared pairs in a universality folder per model, keyed by the model, the
dataset, the seed and the known rule only (so a new fact-finding option does not discard
them), each entry named by the pairs' fingerprint and its own settings. A second run, or one
after the fact-finding runs, computes little:

    python analyses/universality.py                                   # SmolLM2 vs Gemma-3-270M
    python analyses/universality.py --models smollm2-135m,gemma-3-270m,/models/pythia-160m
    python analyses/universality.py --models organism --facts organism:country   # CPU-light
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import runpy
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

import factfind as ff
from factfind.concepts import universality as uv
from factfind.report import universality as ru

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("universality")
# the fact-finding script: its Config (the cache key of each model's run folder), its cached
# fact scoring and its run plumbing (threads, load, timings) are reused as they are
FF: dict[str, Any] = runpy.run_path(str(ROOT / "analyses" / "fact_finding.py"),
                                    run_name="fact_finding_steps")


_opt = FF["_opt"]  # a Config field with its command-line help (``--field-name``)


def _as_in_fact_finding(name: str) -> Any:
    """A :class:`Config` field that means what the fact-finding script's field ``name`` means
    (its default and its help)."""
    f = next(f for f in fields(FF["Config"]) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class Config:
    """Everything that determines the results (saved in the report). Every field is a flag."""

    models: str = _opt("smollm2-135m,gemma-3-270m", "comma-separated models compared on the "
                       "facts they all know: short names, .gguf files, HF directories or hub "
                       "names (add any model to the default two by naming all three)")
    facts: str = _opt("rome_known", "the dataset every model answers (rome_known: SmolLM2-135M "
                      "knows 59 of its 1,209 facts by p > 0.5, Gemma-3-270M more; the shared "
                      "facts are at most SmolLM2's)")
    reference: str = _opt("organism:sport", "the organism's relation, run on the shipped "
                          "organism as a reference row ('none': leave it out)")
    n_pairs: int = _opt(16, "shared facts analysed per model. 16: the fact-finding run's "
                        "patching and circuit size, whose intervals 16 pairs resolve; the "
                        "pruned circuit costs a few forwards per pair and round, and two real "
                        "models plus the organism then stay within ~15 min at 2 threads")
    known_target: int = _opt(1024, "score each model's facts (a seeded shuffle, in cached "
                             "chunks) until it knows this many or they run out; 1,024 scores "
                             "all of rome_known for both default models")
    seed: int = _as_in_fact_finding("seed")
    device: str = _as_in_fact_finding("device")
    dtype: str | None = _as_in_fact_finding("dtype")
    batch_size: int = _as_in_fact_finding("batch_size")
    known_rule: str = _as_in_fact_finding("known_rule")
    known_top_k: int = _as_in_fact_finding("known_top_k")
    known_min_prob: float = _as_in_fact_finding("known_min_prob")
    min_pairs: int = _opt(4, "stop with an error below this many shared, paired facts")
    tracing_prompts: int = _opt(8, "pairs for causal tracing (the fact-finding default: the "
                                "sites' peaks are means over prompts and noise samples)")
    tracing_samples: int = _as_in_fact_finding("tracing_samples")
    tracing_window: int = _as_in_fact_finding("tracing_window")
    knockout_window: int = _as_in_fact_finding("knockout_window")
    prune_rounds: int = _opt(24, "most trial circuits of the pruning search. 24: at the "
                             "fact-finding default 12, Gemma-3-270M's circuit was still "
                             "shrinking (22% of its nodes at round 12), so its size would "
                             "be the limit's, not the search's; a round costs a forward and "
                             "an attribution pass over the pairs")
    prune_exact_max: int = _opt(0, "score heads exactly while pruning only up to this many "
                                "head x role nodes (else by attribution, as neurons always "
                                "are; every accepted circuit is measured exactly either way). "
                                "0: attribution on every model, so the circuits are found the "
                                "same way; exact scoring costs a forward per head x role per "
                                "round: 432 on Gemma-3-270M, ~25 min a round at 1 thread on "
                                "a busy 2-core machine")
    agree_within: float = _opt(uv.AGREE_WITHIN, "depths that differ by at most this agree")
    threads: int = _as_in_fact_finding("threads")
    version: str = ff.__version__


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The :class:`Config` from the command line plus the run's paths."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for f in fields(Config):
        if f.name == "version":
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                       help=f"{f.metadata.get('help', '')} (default: {f.default})"
                       .replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--out", default=str(ROOT / "reports"), help="report directory")
    p.add_argument("--cache", default=str(ROOT / "runs"), help="result cache directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config) if f.name != "version"})
    names = [m.strip() for m in cfg.models.split(",") if m.strip()]
    if not names:
        raise ff.ArgumentError("--models is empty; name at least one model, e.g. "
                               "--models smollm2-135m,gemma-3-270m")
    if len(set(names)) < len(names):
        twice = sorted({m for m in names if names.count(m) > 1})
        raise ff.ArgumentError(f"--models names {', '.join(twice)} more than once; name each "
                               "model once")
    return cfg, a


@dataclass
class Run:
    """One model on one dataset: its cache folders (``ff_cache``: the fact-finding run's, for
    the scoring and the probes; ``cache``: this analysis' steps), the facts it knows, its pairs
    and, once measured, its tables."""

    label: str
    role: str  # "compared" or "reference"
    model: ff.Model
    facts: ff.FactDataset
    cache: ff.RunCache
    ff_cache: ff.RunCache
    ff_config: Any
    known: ff.FactDataset  # among the scored facts
    probe_known: ff.FactDataset  # the fact-finding run's own known pool (probes)
    scored: int
    pairs: ff.FactPairs | None = None
    seconds: float = 0.0
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What a run produced: the report and, per model, its caches (which steps were hits):
    this analysis' steps and the fact-finding run's folder (scoring, probes)."""

    report: Path
    caches: dict[str, ff.RunCache]
    ff_caches: dict[str, ff.RunCache]
    measures: pd.DataFrame


def main(argv: list[str] | None = None) -> Outcome:
    cfg, args = parse_args(argv)
    ff.configure_logging()
    t0 = time.time()
    load0 = FF["_load"]()
    FF["_set_threads"](cfg.threads, load0)

    # 1. every model scores the dataset; the shared facts are those all of them know --------
    names = [m.strip() for m in cfg.models.split(",") if m.strip()]
    runs = [_open(name, cfg.facts, "compared", cfg, args) for name in names]
    if cfg.reference.lower() not in ("", "none"):
        runs.append(_open("organism", cfg.reference, "reference", cfg, args))
    log.info("models loaded and facts scored (%.0fs)", time.time() - t0)
    compared = [r for r in runs if r.role == "compared"]
    shared = _shared(compared, cfg)
    for run in runs:
        if run.role == "reference":
            sample = run.known.sample(min(cfg.n_pairs, len(run.known)), seed=cfg.seed)
            run.pairs = _pairs(run, sample, cfg)
            if len(run.pairs) < cfg.min_pairs:
                raise ff.NotEnoughFactsError(
                    f"the reference {run.label} pairs {len(run.pairs)} of its known facts of "
                    f"{run.facts.name}, fewer than --min-pairs {cfg.min_pairs}. Fix: another "
                    "--reference relation, or --reference none.")
    _pair_shared(compared, shared, cfg)
    log.info("shared facts: %d known by all of %s; %d pairs analysed per model", len(shared),
             ", ".join(r.label for r in compared), len(compared[0].pairs or ()))

    # 2. the fact-finding steps on each model's pairs ----------------------------------------
    for run in runs:
        start = time.time()
        _measure(run, cfg)
        run.seconds = time.time() - start
        log.info("%s measured (%.0fs)", run.label, run.seconds)

    # 3. side by side ------------------------------------------------------------------------
    measures = pd.concat([r.tables["measures"] for r in runs], ignore_index=True)
    findings = pd.concat([r.tables["findings"].assign(model=r.label, n_layers=r.model.n_layers)
                          for r in runs], ignore_index=True)
    # a search that shrank nothing found no circuit (the whole model is none): left out
    found = set(measures.loc[((measures["measure"] == "circuit size")
                              & measures["value"].notna()).to_numpy(), "model"])
    circuits = {r.label: (uv.circuit_nodes_of(r.tables["circuit"], r.model.n_layers),
                          r.model.n_layers) for r in runs if r.label in found}
    composition = pd.concat([uv.circuit_composition(m, nodes, n)
                             for m, (nodes, n) in circuits.items()], ignore_index=True)
    similarity = uv.node_signature_similarity(circuits)
    # the compared models make the comparison; the organism is cited beside them (with one
    # compared model it is all there is to compare with)
    apart = _reference(runs) if len(compared) > 1 else []
    agree = uv.agreement(measures, within=cfg.agree_within,
                         among=[r.label for r in compared] if apart else None)
    for line in ru.agreement_paragraphs(measures, agree, findings, composition,
                                        within=cfg.agree_within, reference=apart):
        log.info("%s", line)
    curves = ru.depth_curves({r.label: r.tables for r in runs},
                             {r.label: r.model.n_layers for r in runs})

    # 4. the report --------------------------------------------------------------------------
    wall = time.time() - t0
    every = [c for r in runs for c in (r.ff_cache, r.cache)]
    timings = pd.DataFrame(pd.concat([FF["_timing_table"](c, 0.0).iloc[:-2].assign(model=r.label)
                                      for r in runs for c in (r.ff_cache, r.cache)],
                                     ignore_index=True))
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]
    sections = [
        ru.summary_section(measures, agree, findings, composition, within=cfg.agree_within,
                           reference=apart),
        ru.models_section(_models_table(runs, shared)),
        ru.findings_section(findings),
        *ru.measure_sections(measures, curves),
        ru.circuits_section(composition, similarity, measures),
        ff.report.dataset_section(
            {"dataset": cfg.facts, "shared facts (known by every compared model)": len(shared),
             "analysed pairs per model": len(compared[0].pairs or ()),
             "reference": cfg.reference},
            sample=_pairs_frame(runs).head(40), max_rows=40),
        ff.report.config_section(asdict(cfg), {
            "run key": key,
            "caches": "; ".join(f"{r.label}: {r.cache.root} (fact-finding run: "
                                f"{r.ff_cache.root})" for r in runs),
            "wall time of this run (s)": round(wall, 1),
            # each step's stored cost (computed now or when cached) plus this run's other work
            "wall time if every step were computed (s)": round(
                float(timings["seconds"].to_numpy(dtype=float).sum())
                + max(0.0, wall - float(timings["this_run_seconds"].to_numpy(dtype=float).sum())),
                1),
            "steps computed / from cache": f"{sum(len(c.computed) for c in every)} / "
                                           f"{sum(len(c.hits) for c in every)}",
            "load average (1 min) at start / end": f"{load0:.2f} / {FF['_load']():.2f}",
            "machine": FF["_machine"](cfg.device)},
            timings=pd.DataFrame(timings[["model", "step", "seconds", "cpu_seconds", "status",
                                          "this_run_seconds"]])),
    ]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(cfg.facts).stem)
    out = Path(args.out) / f"universality-{slug}.html"
    data = ff.report.ReportData(
        title=f"Universality: {cfg.facts} across {', '.join(r.label for r in runs)}",
        subtitle=f"{len(compared[0].pairs or ())} shared pairs per model · seed {cfg.seed}",
        sections=sections)
    if out.exists() and not args.overwrite and key not in out.read_text(encoding="utf-8"):
        raise ff.FactfindError(f"{out} exists from another configuration; pass --overwrite "
                               "to replace it, or --out DIR to write elsewhere")
    ff.report.write_report(data, out, overwrite=True)  # same run key (provenance), or asked
    log.info("report: %s (%.0fs; %d steps from cache, %d computed)", out, time.time() - t0,
             sum(len(c.hits) for c in every), sum(len(c.computed) for c in every))
    print(out)
    return Outcome(out, {r.label: r.cache for r in runs}, {r.label: r.ff_cache for r in runs},
                   measures)


def _open(name: str, facts_spec: str, role: str, cfg: Config, args: argparse.Namespace) -> Run:
    """Load a model and its dataset, open its fact-finding run folder (the key that
    ``factfind fact-finding --model NAME --facts FACTS`` with this run's seed, device, dtype,
    batch size and known rule opens) and score its facts there."""
    model = ff.load_model(name, device=cfg.device, dtype=cfg.dtype)
    facts = ff.load_facts(facts_spec)
    ff_cfg = FF["Config"](model=name, facts=facts_spec, seed=cfg.seed, device=cfg.device,
                          dtype=cfg.dtype, batch_size=cfg.batch_size, known_rule=cfg.known_rule,
                          known_top_k=cfg.known_top_k, known_min_prob=cfg.known_min_prob)
    # threads left at its default: results do not depend on it, so the folder is the one a
    # fact-finding run opens whatever --threads either was given
    key = {"model": [model.name, model.revision, model.fingerprint()],
           "dataset": facts.fingerprint()}
    ff_cache = ff.RunCache.open(args.cache, **key, config=asdict(ff_cfg))
    cache = ff.RunCache.open(args.cache, **key, config={
        "analysis": "universality", **{k: getattr(cfg, k) for k in (
            "seed", "device", "dtype", "known_rule", "known_top_k", "known_min_prob")},
        "version": cfg.version})
    log.info("%s: %r on %s (%d facts); caches %s, %s (fact-finding run)", role, model,
             facts.name, len(facts), cache.root, ff_cache.root)
    if role == "compared":  # on to --known-target, at least as far as fact-finding scores
        wide = dataclasses.replace(
            ff_cfg, n_prompts=max(ff_cfg.n_prompts, math.ceil(cfg.known_target / 4)))
        pool, scores = FF["_score_until_known"](ff_cache, model, facts, wide)
        # the fact-finding run's own pool (the probes are its step): a prefix of the same
        # chunks, read through a second handle so that each chunk's cost is counted once
        again = ff.RunCache.open(args.cache, **key, config=asdict(ff_cfg))
        ff_pool, ff_scores = FF["_score_until_known"](again, model, facts, ff_cfg)
    else:
        pool, scores = FF["_score_until_known"](ff_cache, model, facts, ff_cfg)
        ff_pool, ff_scores = pool, scores
    label = model.name if role == "compared" else f"{model.name} ({facts_spec})"
    return Run(label, role, model, facts, cache, ff_cache, ff_cfg,
               _known_of(pool, scores, ff_cfg, facts),
               _known_of(ff_pool, ff_scores, ff_cfg, facts), len(pool))


def _known_of(pool: ff.FactDataset, scores: pd.DataFrame, ff_cfg: Any, facts: ff.FactDataset
              ) -> ff.FactDataset:
    known = FF["_known"](scores, ff_cfg)
    return ff.FactDataset([f for f, k in zip(pool, known, strict=True) if k],
                          name=f"{facts.name}|known")


def _shared(compared: list[Run], cfg: Config) -> ff.FactDataset:
    """The facts every compared model knows, in the dataset's order; a typed error naming each
    model's count when there are too few."""
    sets = [set(r.known) for r in compared]
    common = set.intersection(*sets)
    shared = ff.FactDataset([f for f in compared[0].facts if f in common],
                            name=f"{cfg.facts}|shared")
    if len(shared) < cfg.min_pairs:
        counts = "; ".join(f"{r.label} knows {len(r.known)} of {r.scored} scored"
                           for r in compared)
        others = [set().union(*sets[:i], *sets[i + 1:]) for i in range(len(sets))]
        none = [r.label for r, s, o in zip(compared, sets, others, strict=True)
                if len(sets) > 1 and not s & o]
        who = f" ({', '.join(none)} knows none of the facts the others know)" if none else ""
        raise ff.NotEnoughFactsError(
            f"the models share {len(shared)} known facts of {cfg.facts}{who}, fewer than "
            f"--min-pairs {cfg.min_pairs} ({counts}; rule {cfg.known_rule}). Fix: leave the "
            "model out of --models, --known-rule rank, or a dataset every model knows "
            "(--facts).")
    return shared


def _pairs(run: Run, facts: ff.FactDataset, cfg: Config) -> ff.FactPairs:
    return facts.corrupt(run.model, seed=cfg.seed, on_missing="skip", pool=run.facts,
                         fallback=ff.FALLBACKS)


def _pair_shared(compared: list[Run], shared: ff.FactDataset, cfg: Config) -> None:
    """Pair the shared facts on every model (partners have the model's own token length), keep
    the facts every model paired and analyse the same ``n_pairs`` of them on each."""
    partners = []
    for run in compared:
        p = _pairs(run, shared, cfg)
        partners.append({c: (k, s) for (c, k), s in zip(p, p.partner_from or ("",) * len(p),
                                                        strict=True)})
    both = [f for f in shared if all(f in p for p in partners)]
    chosen = ff.FactDataset(both, name=shared.name).sample(min(cfg.n_pairs, len(both)),
                                                           seed=cfg.seed)
    if len(chosen) < cfg.min_pairs:
        raise ff.NotEnoughFactsError(
            f"only {len(both)} of the {len(shared)} shared facts of {cfg.facts} found a corrupt "
            f"partner on every model, fewer than --min-pairs {cfg.min_pairs}. Fix: a dataset "
            "with more subjects per relation, or lower --min-pairs.")
    for run, p in zip(compared, partners, strict=True):
        run.pairs = ff.FactPairs(chosen, ff.FactDataset([p[f][0] for f in chosen],
                                                        name=f"{chosen.name}|corrupt"),
                                 seed=cfg.seed, partner_from=tuple(p[f][1] for f in chosen))


def _measure(run: Run, cfg: Config) -> None:
    """The fact-finding steps on ``run.pairs``, cached in the model's universality folder under
    names tagged with the pairs' fingerprint (the probes: the fact-finding run's entry); then
    its findings and measures."""
    model, pairs, cache = run.model, run.pairs, run.cache
    assert pairs is not None
    # every knob of a step is in its entry's name (the seed and the known rule are in the
    # folder's): the pairs' fingerprint, then the step's own settings
    tag = {"pairs": pairs.fingerprint(), "universality": 1}
    bs = cfg.batch_size

    def trace(start: int, stop: int) -> pd.DataFrame:
        return ff.causal_tracing(model, pairs.clean[start:stop], samples=cfg.tracing_samples,
                                 window=cfg.tracing_window, severed=True, seed=cfg.seed,
                                 roles=["subject_last", "final"], batch_size=bs,
                                 progress=False)

    n_trace = min(len(pairs), cfg.tracing_prompts)
    with tqdm(total=n_trace, desc=f"causal tracing ({run.label})", unit="prompt") as bar:
        def tick(n: int) -> None:
            bar.update(n)

        tracing = cache.chunked("causal_tracing", n_trace, _shifted(trace),
                                chunk=min(bs, 4), progress=tick,
                                params={**tag, "samples": cfg.tracing_samples,
                                        "window": cfg.tracing_window})
    knockout = cache.table("attention_knockout", lambda: ff.attention_knockout(
        model, pairs.clean, window=cfg.knockout_window, batch_size=bs),
        params={**tag, "window": cfg.knockout_window})
    pool = run.known.sample(min(256, len(run.known)), seed=cfg.seed + 1)
    eff = cache.table("effective_model", lambda: ff.effective_model(
        model, pairs.clean, pool=pool, progress=True),
        params={**tag, "pool": pool.fingerprint()})
    # the fact-finding run's step as it is (its cache entry, if that run came first)
    probes = run.ff_cache.table("linear_probes", lambda: ff.linear_probes(
        model, run.probe_known.sample(min(256, len(run.probe_known)), seed=cfg.seed + 2),
        seed=cfg.seed))
    everything = ff.all_nodes(model, model.tokenize(list(pairs.clean)), neurons=True)
    n_units = sum(1 for v in everything if v.kind in ("head", "mlp"))
    exact = ("head", "mlp") if n_units <= cfg.prune_exact_max else ()
    circuit = cache.table("neuron_circuit", lambda: ff.prune_circuit(
        model, pairs, everything, target=0.9, step=0.5, how="mean",
        max_rounds=cfg.prune_rounds, batch_size=bs, exact=exact, progress=True),
        params={**tag, "rounds": cfg.prune_rounds, "exact": list(exact)})
    tracing, knockout = ff.aggregate(tracing), ff.aggregate(knockout)
    findings = ff.literature_findings(n_layers=model.n_layers, tracing=tracing,
                                      knockout=knockout, effective=eff, probes=probes)
    run.tables = {"tracing": tracing, "knockout": knockout, "effective": eff, "probes": probes,
                  "circuit": circuit, "findings": findings,
                  "measures": uv.model_measures(run.label, model.n_layers, findings,
                                                knockout=knockout, circuit=circuit,
                                                max_rounds=cfg.prune_rounds)}


def _shifted(compute: Any) -> Any:
    """``compute(start, stop)`` with its prompts numbered from ``start`` (as the cache wants)."""
    def part(start: int, stop: int) -> pd.DataFrame:
        df = compute(start, stop)
        if "prompt" in df.columns:
            df["prompt"] = df["prompt"] + start
        return df
    return part


def _reference(runs: list[Run]) -> list[str]:
    return [r.label for r in runs if r.role == "reference"]


def _models_table(runs: list[Run], shared: ff.FactDataset) -> pd.DataFrame:
    rows = []
    for r in runs:
        m = r.model
        rows.append({"model": r.label, "role": r.role, "dataset": r.facts.name,
                     "layers": m.n_layers, "heads": m.n_heads, "d_model": m.d_model,
                     "d_mlp": m.d_mlp, "architecture": m.spec.name,
                     "scored facts": r.scored, "known": len(r.known),
                     "shared": len(shared) if r.role == "compared" else None,
                     "pairs": len(r.pairs or ()), "seconds on the pairs": round(r.seconds, 1),
                     "weights": ", ".join(f"{k}: {v}" for k, v in m.provenance.items())})
    return pd.DataFrame(rows)


def _pairs_frame(runs: list[Run]) -> pd.DataFrame:
    cols = ["model", "relation", "clean_subject", "corrupt_subject", "clean_attribute",
            "corrupt_attribute", "clean_prompt"]
    return pd.DataFrame(pd.concat([r.pairs.to_frame().assign(model=r.label)[cols]
                                   for r in runs if r.pairs is not None], ignore_index=True))


if __name__ == "__main__":
    sys.exit(ff.run_cli(main, prog="universality"))
