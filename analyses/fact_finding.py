"""Fact Finding, end to end: where does a model look up a fact, and how does it reach the answer?

The workflow of Nanda, Rajamanoharan, Kramár & Shah (2023), on one relation:

 1. keep the facts the model knows, pair each with a same-length corrupt subject;
 2. causal tracing (Meng et al. 2022): which (layer, token) states carry the fact;
 3. activation patching by layer and token role: what is sufficient to restore it;
 4. attention knockout (Geva et al. 2023): from which positions the final token reads it;
 5. direct logit attribution of heads, MLPs and neurons: who writes the answer;
 6. the effective model and probes: how many attention layers the subject needs, where the
    attribute becomes linearly readable;
 7. path patching, the circuit graph and its faithfulness;
 8. neurons and heads: AtP* verified by exact patching, then Fact Finding's neuron analyses
    (resample ablation, the AND test, MLP norms of known vs unknown subjects, neuron DLA);
 9. a self-contained HTML report in reports/.

Every step is cached on disk (keyed by model, dataset and configuration): re-running skips
finished work and a killed run resumes. Runs on the shipped model organism by default:

    python analyses/fact_finding.py                       # organism, relation "sport"
    python analyses/fact_finding.py --model /models/pythia-2.8b --facts rome_known --device cuda
"""

from __future__ import annotations

import argparse
import logging
import runpy
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import factfind as ff

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fact_finding")
# the features step (issue 24): its flags, its cached steps and its report sections
FEATURES: dict[str, Any] = runpy.run_path(str(ROOT / "analyses" / "_features_step.py"),
                                          run_name="features_step")


def _opt(default: Any, help: str) -> Any:
    """A :class:`Config` field with its command-line help (``--field-name``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    """Everything that determines the run's results (saved beside them). Every field is a
    command-line flag: ``n_prompts`` is ``--n-prompts``."""

    model: str = _opt("organism", "'organism', 'smollm2-135m', a .gguf file, a HF directory "
                      "or hub name")
    facts: str = _opt("organism:sport", "dataset: organism:<relation>, athletes, rome_known, "
                      "counterfact:val, lre:factual/<relation>, a CSV/JSON file")
    n_prompts: int = _opt(64, "known facts to pair and analyse (SmolLM2-135M knows 59 of "
                          "rome_known's 1,209 facts by the paper rule, so it gets 59 pairs; "
                          "with --known-rule rank, 64)")
    seed: int = _opt(0, "seed of every sample")
    device: str = _opt("cpu", "cpu, cuda, ...")
    dtype: str | None = _opt(None, "float32, bfloat16, float16 (default: the checkpoint's)")
    batch_size: int = _opt(16, "prompts per forward pass (16 fills 2 CPU cores on "
                           "SmolLM2-135M and Gemma-3-270M without paging; raise it on a GPU)")
    known_rule: str = _opt("paper", "'paper': a fact is known when p(attribute) > 0.5 (Fact "
                           "Finding's rule); 'rank': when its attribute is the top-k token")
    known_top_k: int = _opt(1, "... and its attribute token is within the top k")
    known_min_prob: float = _opt(0.0, "... and p(attribute) is at least this")
    min_pairs: int = _opt(4, "stop with an error below this many known, paired facts")
    tracing_prompts: int = _opt(8, "pairs for causal tracing (8 resolve ROME's two sites on "
                                "Gemma-3-270M, peaks 0.41 and 0.66 with intervals clear of "
                                "0, in 18 s at 2 threads; the summary shows the intervals)")
    tracing_samples: int = _opt(2, "noise samples per traced prompt (the noise varies less "
                                "than the prompts do; more samples buy less than more prompts)")
    tracing_roles: str = _opt("subject_last,final", "comma-separated token roles to trace "
                              "('all': every token). Default the two sites of ROME's claims "
                              "(Meng et al. 2022: MLPs at the last subject token, attention at "
                              "the final token), which are all the findings read; the first "
                              "subject token restarts each run earliest and cost as much as "
                              "the other two together")
    tracing_window: int = _opt(3, "layers restored together around each layer")
    knockout_window: int = _opt(1, "layers blocked together from each layer")
    patching_prompts: int = _opt(16, "pairs for activation patching (the first ones: the same "
                                 "pairs as path patching, EAP-IG and AtP*, so the methods are "
                                 "compared on the same facts). Patching every layer x role "
                                 "costs ~100 forwards per pair on a 30-layer model, most of "
                                 "the run at 64 pairs, while its heatmaps are means whose "
                                 "intervals 16 pairs already resolve")
    patching_head_roles: str = _opt("final", "comma-separated token roles at which each head "
                                    "is patched ('all': every role of the layer x role "
                                    "patching). Default the final token, where heads move the "
                                    "attribute to the answer (Geva et al. 2023's attribute "
                                    "extraction; the heads of the path patching): a head at a "
                                    "subject token starts its patched run there, so the 4 "
                                    "roles cost ~5x the final one on a 30-layer model")
    circuit_prompts: int = _opt(16, "pairs for path patching, EAP-IG and the circuit (16: "
                                "the same pairs as patching and AtP*, so methods are compared "
                                "on the same facts; EAP-IG(5) on them takes 10 s on "
                                "Gemma-3-270M at 2 threads)")
    eap_ig_steps: int = _opt(5, "integration steps of EAP-IG (Hanna et al. 2024 use 5 "
                             "steps; each step costs about one "
                             "forward and backward pass)")
    circuit_edges: int = _opt(60, "strongest EAP-IG edges kept in the circuit graph")
    prune_exact_max: int = _opt(128, "score heads and MLPs by exact ablation while pruning "
                                "only up to this many head/MLP x role units (else by "
                                "attribution). Exact scoring costs one circuit evaluation per "
                                "unit per pruning round: the organism's 100 units take seconds, "
                                "Gemma-3-270M's 450 (18 layers x 5 x 5 roles) took over 6 min "
                                "per round at 1 thread, so real models are scored by attribution "
                                "(every accepted circuit is still measured exactly)")
    atp_prompts: int = _opt(16, "pairs for AtP* and the neuron analyses (every neuron x "
                            "role is scored, then the top ones patched exactly; 16 pairs keep "
                            "AtP* and its bound under a minute on Gemma-3-270M)")
    bound_nodes: int = _opt(256, "nodes sampled per AtP* search for the missed-effect bound")
    atp_top_k: int = _opt(20, "AtP* candidates verified by exact patching")
    top_neurons: int = _opt(10, "neurons given Fact Finding's neuron analyses")
    reference_prompts: int = _opt(64, "known facts for the AND test (x4 name swaps each) and "
                                  "the MLP norms (with twice as many unknown facts); at most "
                                  "the known pool. Sized apart from the pool: at 256 known "
                                  "facts the two took 166 s of a 12-minute run")
    resample_k: int = _opt(8, "subjects resampled per neuron")
    threads: int = _opt(0, "torch CPU threads; 0: the cores idle at start (cores minus the "
                        "1-minute load average, at least 1). On a shared 2-core machine with "
                        "other jobs, 2 threads ran a forward 3.5x slower than 1 (threads "
                        "spin-waiting for a busy core); results do not depend on it")
    version: str = ff.__version__


#: Config fields that change how fast a run goes, not what it computes: left out of the run
#: folder's key, so rerunning with another ``--threads`` is served from the same cache
UNKEYED = ("threads",)


def cache_key(cfg: Config) -> dict[str, Any]:
    """The settings that name the run's cache folder: every :class:`Config` field but
    :data:`UNKEYED` (the report's provenance still records them all)."""
    return {k: v for k, v in asdict(cfg).items() if k not in UNKEYED}


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The :class:`Config` from the command line (one flag per field, its default and help
    from the field) plus the run's paths."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    for f in fields(Config):
        if f.name == "version":
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                       help=f"{f.metadata.get('help', '')} (default: {f.default})")
    p.add_argument("--out", default=str(ROOT / "reports"), help="report directory")
    p.add_argument("--cache", default=str(ROOT / "runs"), help="result cache directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    FEATURES["add_arguments"](p)
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config) if f.name != "version"})
    return cfg, a


@dataclass(frozen=True)
class Outcome:
    """What a run produced: the report's path and the cache (which steps were hits)."""

    report: Path
    cache: ff.RunCache


def main(argv: list[str] | None = None) -> Outcome:
    cfg, args = parse_args(argv)
    ff.configure_logging()
    t0 = time.time()
    load0 = _load()
    moved0 = len(ff.integrity.QUARANTINED)  # entries this process set aside before this run
    _set_threads(cfg.threads, load0)

    # 1. model, facts, the facts the model knows, corrupt partners ---------------------------
    model = ff.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    facts = ff.load_facts(cfg.facts)
    cache = ff.RunCache.open(args.cache, model=[model.name, model.revision, model.fingerprint()],
                          dataset=facts.fingerprint(), config=cache_key(cfg))
    log.info("model %r, %d facts; results in %s", model, len(facts), cache.root)
    # score a seeded shuffle of the facts in chunks until 4x the facts to analyse are known
    # (at least 256 scored): a model that knows 5% of a dataset still gets enough pairs
    pool, scores = _score_until_known(cache, model, facts, cfg)
    is_known = _known(scores, cfg)
    known = ff.FactDataset([f for f, k in zip(pool, is_known, strict=True) if k],
                           name=f"{facts.name}|known")
    rule = (f"rule {cfg.known_rule}, top-{cfg.known_top_k}, p >= {cfg.known_min_prob:g}"
            + (", p > 0.5" if cfg.known_rule == "paper" else ""))
    if len(known) < cfg.min_pairs:
        top = _top_predictions(model, pool, scores)
        raise ff.NotEnoughFactsError(
            f"{model.name} knows {len(known)} of {len(pool)} scored facts of {facts.name} "
            f"({rule}; its most common top answers: {top}), fewer than --min-pairs "
            f"{cfg.min_pairs}. Fix: facts in a prompt format the model completes with the "
            "attribute (e.g. --facts rome_known; Fact Finding's --facts athletes needs a model "
            "that knows athletes' sports), --known-rule rank, or a larger model.")
    sample = known.sample(min(cfg.n_prompts, len(known)), seed=cfg.seed)
    pairs = sample.corrupt(model, seed=cfg.seed, on_missing="skip", pool=facts,
                           fallback=ff.FALLBACKS)
    if len(pairs) < cfg.min_pairs:
        raise ff.NotEnoughFactsError(
            f"only {len(pairs)} of {len(sample)} known facts of {facts.name} found a corrupt "
            f"partner (a subject of the same token length with another attribute), fewer "
            f"than --min-pairs {cfg.min_pairs}. Fix: a dataset with more subjects per "
            "relation, a larger --n-prompts, or lower --min-pairs.")
    log.info("knows %d of %d scored facts (%s); analysing %d prompt pairs", len(known),
             len(pool), rule, len(pairs))

    # 2. causal tracing ------------------------------------------------------------------------
    def trace(start: int, stop: int) -> pd.DataFrame:
        roles = None if cfg.tracing_roles == "all" else cfg.tracing_roles.split(",")
        df = ff.causal_tracing(model, pairs.clean[start:stop], samples=cfg.tracing_samples,
                               window=cfg.tracing_window, severed=True, seed=cfg.seed,
                               roles=roles,
                               batch_size=cfg.batch_size, progress=False)
        return df

    tracing = _chunked(cache, "causal_tracing", min(len(pairs), cfg.tracing_prompts), trace,
                       chunk=min(cfg.batch_size, 4), desc="causal tracing")
    log.info("causal tracing done (%.0fs)", time.time() - t0)

    # 3. activation patching by layer and role; heads at the final position ---------------------
    def patch(start: int, stop: int) -> pd.DataFrame:
        head_roles = None if cfg.patching_head_roles == "all" else \
            cfg.patching_head_roles.split(",")
        return pd.concat([
            ff.activation_patching(model, pairs[start:stop],
                                   components=["resid_pre", "attn_out", "mlp_out"],
                                   batch_size=cfg.batch_size, progress=False),
            ff.activation_patching(model, pairs[start:stop], components=["z"],
                                   positions=head_roles or ff.DEFAULT_ROLES,
                                   batch_size=cfg.batch_size, progress=False),
        ], ignore_index=True)

    patching = _chunked(cache, "activation_patching", min(len(pairs), cfg.patching_prompts),
                        patch, chunk=cfg.batch_size, desc="activation patching")
    log.info("activation patching done (%.0fs)", time.time() - t0)

    # 4. attention knockout ------------------------------------------------------------------
    knockout = cache.table("attention_knockout", lambda: ff.attention_knockout(
        model, pairs.clean, window=cfg.knockout_window, batch_size=cfg.batch_size))

    # 5. direct logit attribution -------------------------------------------------------------
    dla = ff.aggregate(_chunked(cache, "dla", len(pairs), lambda a, b: (
        ff.direct_logit_attribution(model, pairs[a:b], batch_size=cfg.batch_size)),
        chunk=cfg.batch_size, desc="direct logit attribution"))

    # 6. effective model and probes -------------------------------------------------------------
    eff = cache.table("effective_model", lambda: ff.effective_model(
        model, pairs.clean, pool=known.sample(min(256, len(known)), seed=cfg.seed + 1),
        progress=True))
    probes = cache.table("linear_probes", lambda: ff.linear_probes(
        model, known.sample(min(256, len(known)), seed=cfg.seed + 2), seed=cfg.seed))
    mech = cache.table("mechanistic_probes", lambda: ff.mechanistic_probes(model, pairs.clean))
    findings = ff.literature_findings(
        n_layers=model.n_layers, tracing=ff.aggregate(tracing), knockout=ff.aggregate(knockout),
        effective=eff, probes=probes)
    for row in findings.to_dict("records"):
        if row["holds"] is None or pd.isna(row["holds"]):  # "not measured/measurable: why"
            log.info("%s: %s", row["finding"], row["measured"])
        else:
            log.info("%s: %s (%s)", row["finding"], "holds" if row["holds"] else "differs",
                     row["measured"])
    log.info("localization done (%.0fs)", time.time() - t0)

    # 7. path patching: heads' direct effects, and MLPs at the subject -> heads at the final token
    circuit_pairs = pairs[:cfg.circuit_prompts]
    L, H = model.n_layers, model.n_heads
    final_heads = [ff.Site("z", layer, head=h, position="final") for layer in range(L)
                   for h in range(H)]
    subject_mlps = [ff.Site("mlp_out", layer, position=role) for layer in range(L)
                    for role in ("subject_first", "subject_last")]
    paths = cache.table("path_patching", lambda: pd.concat([
        ff.path_patching_sweep(model, circuit_pairs, final_heads, batch_size=cfg.batch_size,
                            progress=True).assign(path="head -> logits (direct)"),
        ff.path_patching_sweep(model, circuit_pairs, subject_mlps, final_heads,
                            batch_size=cfg.batch_size, progress=True
                            ).assign(path="subject MLP -> final heads"),
    ], ignore_index=True))
    log.info("path patching done (%.0fs)", time.time() - t0)

    # 8. edge attribution (EAP-IG), the circuit graph and its faithfulness ---------------------
    edges = cache.table("eap_ig", lambda: ff.eap_ig(model, circuit_pairs, steps=cfg.eap_ig_steps,
                                                  batch_size=cfg.batch_size, progress=True))
    full = ff.to_graph(edges, model, circuit_pairs, config=asdict(cfg))
    circuit = ff.graph.prune(full, top_n=cfg.circuit_edges)
    n_nodes = full.graph.number_of_nodes()
    sizes = sorted({s for s in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64) if s < n_nodes})
    curve = cache.table("faithfulness_curve", lambda: ff.faithfulness_curve(
        model, circuit_pairs, full, sizes=sizes, how="resample"))
    # the same at neuron granularity: every head and neuron x role, pruned to faithfulness 0.9
    everything = ff.all_nodes(model, model.tokenize(list(circuit_pairs.clean)), neurons=True)
    # heads and whole MLPs are scored by exact ablation while there are few of them (the
    # organism: 4 layers); on a 30-layer model that is thousands of forwards per round, so
    # they are scored by attribution like the neurons (every accepted circuit is still
    # measured exactly)
    n_units = sum(1 for v in everything if v.kind in ("head", "mlp"))
    exact = ("head", "mlp") if n_units <= cfg.prune_exact_max else ()
    log.info("pruning %d head/neuron x role nodes; heads and MLPs scored %s", len(everything),
             "exactly" if exact else f"by attribution ({n_units} > --prune-exact-max)")
    pruned = cache.table("neuron_circuit", lambda: ff.prune_circuit(
        model, circuit_pairs, everything, target=0.9, step=0.5, how="mean", max_rounds=12,
        batch_size=cfg.batch_size, exact=exact, progress=True))
    pruned = pd.DataFrame(pruned[pruned["accepted"].to_numpy()])
    log.info("circuit: %d of %d nodes, %d edges; %d of %d head/neuron nodes at F >= 0.9 (%.0fs)",
             circuit.graph.number_of_nodes(), n_nodes, circuit.graph.number_of_edges(),
             int(pruned["size"].to_numpy()[-1]), len(everything), time.time() - t0)

    # 9. neurons and heads: AtP* verified exactly; Fact Finding's neuron analyses ---------------
    neurons = _neuron_steps(cfg, cache, model, pairs[:cfg.atp_prompts], known, pool, is_known)
    log.info("neurons: AtP* and neuron analyses done (%.0fs)", time.time() - t0)
    # 9b. features: dictionaries, feature circuits, the single-prompt graph (--features) -----
    feats = FEATURES["features_step"](args, cfg=cfg, cache=cache, model=model, pairs=pairs,
                                      known=known)

    # 10. the report ---------------------------------------------------------------------------
    wall = time.time() - t0
    timings = _timing_table(cache, wall)
    for row in timings.to_dict("records"):
        log.info("time: %s %.1fs (%s)", row["step"], row["seconds"], row["status"])
    ff.cache.atomic_write_bytes(cache.root / "timings.json", timings.to_json(
        orient="records", indent=2).encode())
    accuracy = ff.report.accuracy_table(
        pool.to_frame().assign(correct=[bool(k) for k in is_known]), by="relation")
    sections = [
        ff.report.summary_section(ff.report.findings_summary(
            findings, n_layers=model.n_layers, accuracy=accuracy, pairs=len(pairs),
            tracing=tracing, heads=patching[patching["component"] == "head_out"],
            knockout=knockout, circuit=pruned, circuit_n=len(circuit_pairs))),
        ff.report.model_section({"name": model.name, "revision": model.revision,
                          "architecture": model.spec.name, "layers": model.n_layers,
                          "heads": model.n_heads, "d_model": model.d_model,
                          "d_mlp": model.d_mlp, "d_vocab": model.d_vocab,
                          **{f"weights: {k}": v for k, v in model.provenance.items()}}),
        ff.report.dataset_section({"name": facts.name, "fingerprint": facts.fingerprint()[:16],
                            "facts": len(facts), "relations": ", ".join(facts.relations),
                            "known": len(known), "analysed pairs": len(pairs)},
                           sample=pairs.clean.to_frame().head(20)),
        ff.report.accuracy_section(accuracy),
        ff.report.findings_section(findings),
        ff.report.tracing_section(ff.aggregate(tracing)),
        ff.report.patching_section(ff.aggregate(patching[patching["component"] != "head_out"])),
        _knockout_section(knockout),
        ff.report.units_section(pd.concat([
            ff.aggregate(patching[patching["component"] == "head_out"]),
            dla[dla["component"] == "neurons"]], ignore_index=True)),
        _effective_section(eff, probes, mech),
        _paths_section(paths),
        ff.report.circuit_section(circuit, caption=f"EAP-IG ({cfg.eap_ig_steps} steps) on "
                           f"{len(circuit_pairs)} pairs, the {cfg.circuit_edges} strongest edges "
                           "kept and pruned to paths from the embeddings to the logits.",
                           full=full, full_caption=f"The whole EAP-IG graph the circuit was "
                           f"cut from ({full.graph.number_of_edges():,} edges).",
                           evidence=patching),
        ff.report.faithfulness_section(pd.concat([
            curve.assign(method="EAP-IG top n, head/MLP x role nodes, resample ablation"),
            pruned.drop(columns=["nodes"]).assign(
                method="pruning, head/neuron x role nodes, mean ablation")],
            ignore_index=True), x="fraction"),
        *ff.report.neurons.neuron_sections(neurons),
        *feats.sections,
        ff.report.config_section({**asdict(cfg), **feats.settings()},
                                 {"model": model.name, "revision": model.revision,
                                        "model_fingerprint": model.fingerprint(),
                                        "dataset": facts.fingerprint(),
                                        "cache": str(cache.root),
                                        "wall time of this run (s)": round(wall, 1),
                                        "wall time if every step were computed (s)":
                                            _full_time(timings),
                                        "steps computed / from cache":
                                            f"{len(cache.computed)} / {len(cache.hits)}",
                                        "cache entries rebuilt (damaged; quarantined)":
                                            _rebuilt(cache, since=moved0),
                                        "load average (1 min) at start / end":
                                            f"{load0:.2f} / {_load():.2f}",
                                        "machine": _machine(cfg.device)},
                          timings=timings),
    ]
    slug = "".join(c if c.isalnum() or c in "-_." else "_"
                   for c in f"{Path(cfg.model).name}-{Path(cfg.facts).stem}")
    out = Path(args.out) / f"fact_finding-{slug}.html"
    data = ff.report.ReportData(title=f"Fact finding: {cfg.facts} in {model.name}",
                         subtitle=f"{len(pairs)} prompt pairs · seed {cfg.seed}",
                         sections=sections)
    if out.exists() and not args.overwrite:
        if cache.root.name not in out.read_text(encoding="utf-8"):  # the provenance names it
            raise ff.FactfindError(f"{out} exists from another configuration; pass --overwrite "
                                "to replace it, or --out DIR to write elsewhere")
        log.info("report %s exists (same configuration); pass --overwrite to replace it", out)
    else:
        _write_outputs(out, data, circuit, cache=cache, extra=feats.files(out))
    log.info("report: %s (%.0fs; %d steps from cache, %d computed)", out, time.time() - t0,
             len(cache.hits), len(cache.computed))
    print(out)
    return Outcome(out, cache)


def _rebuilt(cache: ff.RunCache, *, since: int) -> str:
    """How many cached entries this run found damaged, moved into quarantine and rebuilt (step
    results and chunks, and dequantized checkpoints), and which (``since``: the length of
    :data:`factfind.integrity.QUARANTINED` when the run began)."""
    steps = list(cache.rebuilt)
    other = [str(q.path) for q in ff.integrity.QUARANTINED[since:]
             if not str(q.path).startswith(str(cache.root))]
    names = steps + other
    return f"{len(names)}" + (f": {', '.join(names)}" if names else "")


def _write_outputs(out: Path, data: ff.report.ReportData, circuit: ff.graph.CircuitGraph, *,
                   cache: ff.RunCache, extra: dict[str, bytes] | None = None) -> None:
    """The report and its circuit (``.graphml``, ``.json``), written into a staging folder
    beside them and then renamed into place: a failed write (no space, no permission, a
    read-only folder) leaves no partial file and a report being replaced as it was, and ends
    in one line (:class:`~factfind.errors.CacheWriteError`) naming the bytes needed."""
    import os
    import shutil
    import tempfile

    html = ff.report.render_report(data).encode("utf-8")
    needed, staged = len(html), False
    kept = (f"every step stays cached in {cache.root}, so rerunning with --out elsewhere "
            "writes the report without computing anything")
    stage: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        ff.report.write_report(html.decode("utf-8"), stage / out.name)
        ff.graph.to_graphml(circuit, stage / out.with_suffix(".graphml").name)
        ff.graph.to_json(circuit, stage / out.with_suffix(".json").name)
        for name, blob in (extra or {}).items():  # the feature graph's exports
            (stage / name).write_bytes(blob)
        needed, staged = sum(f.stat().st_size for f in stage.iterdir()), True
        for f in sorted(stage.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, out.parent / f.name)
    except OSError as err:
        if stage is not None and stage.exists() and not staged:
            needed += sum(f.stat().st_size for f in stage.iterdir() if f.name != out.name)
        raise ff.integrity.write_error(out, err, needed=needed, kept=kept, at_least=not staged,
                                       elsewhere="pass --out DIR on another file system"
                                       ) from err
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _set_threads(threads: int, load: float) -> None:
    """torch's CPU threads: ``threads``, or with 0 the cores the load average leaves idle."""
    import math
    import os

    import torch

    if threads <= 0:
        cores = os.cpu_count() or 1
        threads = max(1, cores - (0 if math.isnan(load) else math.ceil(load - 0.5)))
        threads = min(threads, cores)
    torch.set_num_threads(threads)
    log.info("torch threads: %d (load average %.2f, %s cores)", threads, load, os.cpu_count())


def _load() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    import os

    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def _timing_table(cache: ff.RunCache, wall: float) -> pd.DataFrame:
    """The run's cost per step (:meth:`RunCache.timing_table`; the chunks of the fact scoring
    as one row), then 'other' (loading, pairing, findings, graphs: this run's wall time not
    spent in a step) and the total."""
    steps = cache.timing_table()
    steps["step"] = steps["step"].str.replace(r"-\d{6}-\d+$", "", regex=True)
    agg = steps.groupby("step", sort=False).agg(
        seconds=("seconds", lambda x: x.sum(min_count=len(x))),
        cpu_seconds=("cpu_seconds", lambda x: x.sum(min_count=len(x))),
        status=("status", lambda x: x.iloc[0] if x.nunique() == 1 else "resumed"),
        this_run_seconds=("this_run_seconds", "sum")).reset_index()
    other = max(0.0, wall - float(agg["this_run_seconds"].sum()))
    tail = pd.DataFrame([
        {"step": "other (loading, pairing, findings, graphs)", "seconds": other,
         "cpu_seconds": np.nan, "status": "computed", "this_run_seconds": other},
        {"step": "total (this run)", "seconds": wall, "cpu_seconds": np.nan,
         "status": f"{int((agg['status'] == 'computed').sum())} of {len(agg)} steps computed",
         "this_run_seconds": wall}])
    return pd.concat([agg, tail], ignore_index=True)


def _full_time(timings: pd.DataFrame) -> float | str:
    """What the run would take with nothing cached: every step's stored seconds plus this
    run's other work ('unknown' if some step's seconds predate stored times)."""
    body = timings.iloc[:-1]
    if body["seconds"].isna().any():
        return "unknown (steps cached before times were stored)"
    return round(float(body["seconds"].sum()), 1)


def _machine(device: str) -> str:
    """Where the run ran: CPU cores and torch threads, or the GPU's name."""
    import os
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} "
            f"torch threads, torch {torch.__version__}")


def _chunked(cache: ff.RunCache, name: str, n: int, compute: Any, *, chunk: int, desc: str
             ) -> pd.DataFrame:
    """A cached step over ``n`` prompts in chunks, with a progress bar (prompts, ETA).
    ``compute(start, stop)`` numbers its prompts from 0; they are shifted by ``start``."""
    def part(start: int, stop: int) -> pd.DataFrame:
        df = compute(start, stop)
        if "prompt" in df.columns:
            df["prompt"] = df["prompt"] + start
        return df

    with tqdm(total=n, desc=desc, unit="prompt", disable=n == 0) as bar:
        return cache.chunked(name, n, part, chunk=chunk, progress=bar.update)


def _known(scores: pd.DataFrame, cfg: Config) -> list[bool]:
    """Which scored facts count as known under the configured rule."""
    return ff.known_mask(scores, rule=cfg.known_rule, top_k=cfg.known_top_k,  # type: ignore[arg-type]
                      min_prob=cfg.known_min_prob)


def _score_until_known(cache: ff.RunCache, model: ff.Model, facts: ff.FactDataset, cfg: Config
                       ) -> tuple[ff.FactDataset, pd.DataFrame]:
    """Attribute scores of a seeded shuffle of ``facts``, chunk by chunk (each cached), until
    ``4 * n_prompts`` are known and at least 256 are scored, or the facts run out. Returns the
    scored facts and their scores (one progress bar over all facts, ETA to exhaustion)."""
    order = facts.sample(len(facts), seed=cfg.seed)
    chunk = max(64, cfg.batch_size * 4)
    parts: list[pd.DataFrame] = []
    n_known = 0
    with tqdm(total=len(order), desc="known facts", unit="prompt") as bar:
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            parts.append(cache.table(f"attribute_scores-{start:06d}-{chunk}", lambda p=part:
                                     p.attribute_scores(model, batch_size=cfg.batch_size)))
            bar.update(len(part))
            n_known += sum(_known(parts[-1], cfg))
            scored = start + len(part)
            if n_known >= 4 * cfg.n_prompts and scored >= min(256, len(order)):
                break
    scored = sum(len(p) for p in parts)
    return order[:scored], pd.concat(parts, ignore_index=True)


def _top_predictions(model: ff.Model, pool: ff.FactDataset, scores: pd.DataFrame,
                     n: int = 3) -> str:
    """The model's most frequent top-1 next tokens on (up to 64 of) the facts it got wrong."""
    wrong = [f for f, r in zip(pool, scores["rank"].tolist(), strict=True) if r != 1][:64]
    if not wrong:
        return "none wrong"
    top = model.final_logits(wrong).argmax(-1).tolist()
    counts = pd.Series([repr(model.tokenizer.decode([t])) for t in top]).value_counts()
    return ", ".join(f"{tok} x{c}" for tok, c in counts.head(n).items())


def _neuron_steps(cfg: Config, cache: ff.RunCache, model: ff.Model, pairs: ff.FactPairs,
                  known: ff.FactDataset, pool: ff.FactDataset, is_known: list[bool]
                  ) -> dict[str, pd.DataFrame]:
    """AtP* over every neuron at the subject tokens and every head's output, query, key and
    value at each role, each search verified by exact patching (top-k rule) and bounded by
    subsampling; then Fact Finding's analyses of the strongest neurons. Each table cached."""
    bs = cfg.batch_size
    searches = {"neurons": (["neurons"], [ff.Role.SUBJECT_FIRST, ff.Role.SUBJECT_LAST]),
                "heads": (["head_out", "q", "k", "v"], list(ff.DEFAULT_ROLES))}

    def search(name: str) -> pd.DataFrame:
        components, positions = searches[name]
        est = ff.estimate(model, pairs, components=components, positions=positions,
                       qk_fix=True, grad_drop=True, batch_size=bs, progress=True)
        ver = ff.verify(model, pairs, est, top_k=cfg.atp_top_k, patience=16, batch_size=bs,
                     progress=True)
        return ff.report.neurons.verified_candidates(ver, search=name)

    cands = cache.table("atp_star", lambda: pd.concat([search(n) for n in searches],
                                                      ignore_index=True))
    bound = cache.table("atp_star_bound", lambda: pd.concat([
        ff.missed_effect_bound(model, pairs, ff.report.neurons.verification_of(g),
                               max_nodes=cfg.bound_nodes, batch_size=bs,
                               progress=True).buckets.assign(search=name)
        for name, g in cands.groupby("search", sort=False)], ignore_index=True))
    neurons = pd.DataFrame(cands.loc[(cands["component"] == "neurons").to_numpy()])
    verified = pd.DataFrame(neurons.loc[neurons["verified"].to_numpy(dtype=bool)])
    top = verified.iloc[np.argsort(-np.abs(verified["exact"].to_numpy(dtype=float)),
                                   kind="stable")].head(cfg.top_neurons)
    # AND test: per layer, the neurons at the last subject token AtP* scores highest (> 0)
    at_last = pd.DataFrame(neurons.loc[((neurons["role"] == str(ff.Role.SUBJECT_LAST))
                                        & (neurons["score"] > 0)).to_numpy()])
    at_last = at_last.sort_values("score", ascending=False, kind="stable")
    per_layer = at_last.groupby("layer", sort=True).head(max(1, cfg.top_neurons // 2))
    per_layer = per_layer.sort_values(["layer", "score"], ascending=[True, False])
    reference = known.sample(min(len(known), cfg.reference_prompts), seed=cfg.seed + 3)

    def unknown() -> ff.FactDataset:
        """Subjects the model does not know: for the organism, people of its world it never
        saw (and does not guess right); otherwise the sampled facts it gets wrong."""
        if cfg.facts == "organism" or cfg.facts.startswith("organism:"):
            extra = ff.load_facts(cfg.facts, split="unknown")
            pool_u = extra.sample(min(len(extra), 2 * len(reference)), seed=cfg.seed)
            wrong = (pool_u.attribute_scores(model)["rank"] != 1).tolist()
        else:
            pool_u, wrong = pool, [not k for k in is_known]
        unknown = ff.FactDataset([f for f, w in zip(pool_u, wrong, strict=True) if w],
                                 name=f"{pool_u.name}|unknown")
        # as many as the organism's: twice the known group (a model that knows 5% of the
        # facts would otherwise run every other scored fact through the model again)
        return unknown.sample(min(len(unknown), 2 * len(reference)), seed=cfg.seed)

    def norms() -> pd.DataFrame:
        groups = {"known": reference, "unknown": unknown()}
        groups = {k: v for k, v in groups.items() if len(v)}
        return ff.mlp_output_norms(model, groups, positions=[ff.Role.SUBJECT_FIRST,
                                                          ff.Role.SUBJECT_LAST, ff.Role.FINAL])

    return {
        "atp": cands, "bound": bound,
        "resample": cache.table("neuron_resample", lambda: ff.resample_neurons(
            model, pairs.clean, top, k=cfg.resample_k, pool=pool, seed=cfg.seed,
            batch_size=bs)),
        "and": cache.table("neuron_and", lambda: ff.neuron_nonlinearity(
            model, reference, per_layer, samples=4, seed=cfg.seed)
            if len(per_layer) and ff.swap_variants(reference, samples=1) else pd.DataFrame()),
        "norms": cache.table("mlp_norms", norms),
        "dla": cache.table("neuron_dla", lambda: ff.neuron_dla(
            model, pairs, positions=[ff.Role.SUBJECT_LAST, ff.Role.FINAL], batch_size=bs)),
    }


def _knockout_section(knockout: pd.DataFrame) -> ff.report.Section:
    agg = ff.aggregate(knockout)
    return ff.report.Section(
        id="knockout", title="Attention knockout",
        explanation=("Geva et al. (2023): the edges from the final token to a source role are "
                     "blocked in a window of layers starting at each layer; the effect is the "
                     "relative change in the probability of the answer. A large drop when "
                     "blocking final→subject in middle layers marks attribute extraction."),
        figures=[ff.report.heatmap(agg, x="layer", y="role", title="Knockout: relative change in p",
                            caption="Relative change in the answer's probability when the "
                            "final position cannot attend to the role (window start layer).",
                            alt="knockout heatmap")],
        tables=[ff.report.Table(agg[["role", "layer", "effect", "ci_low", "ci_high", "n"]],
                         caption="Mean relative change with 95% CI")])


def _paths_section(paths: pd.DataFrame) -> ff.report.Section:
    agg = ff.aggregate(paths, by=("path", "component", "layer", "head", "role"))
    return ff.report.Section(
        id="path-patching", title="Path patching",
        explanation=("Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the sender's "
                     "corrupt activation reaches the answer only along the named paths, "
                     "everything else frozen at its clean value. 'head -> logits' is each "
                     "final-position head's direct effect; 'subject MLP -> final heads' is the "
                     "effect an MLP at a subject token has through the heads at the final "
                     "token. Effect = (clean - patched) / (clean - corrupt)."),
        figures=[ff.report.heatmap(agg[agg["path"] == p], x="layer", y=y, title=p,
                            caption=f"Path patching: {p}", alt=p)
                 for p, y in (("head -> logits (direct)", "head"),
                              ("subject MLP -> final heads", "role"))],
        tables=[ff.report.Table(agg.sort_values("effect", key=abs, ascending=False).head(15)[
            ["path", "component", "layer", "head", "role", "effect", "ci_low", "ci_high"]],
            caption="Strongest paths (mean over prompts, 95% CI)")])


def _effective_section(eff: pd.DataFrame, probes: pd.DataFrame, mech: pd.DataFrame
                       ) -> ff.report.Section:
    return ff.report.Section(
        id="effective-model", title="Effective model and probes",
        explanation=("Effective model (Fact Finding): attention at the subject tokens is "
                     "mean-ablated in every layer from k on; the accuracy per k shows how many "
                     "attention layers the subject's tokens need to be joined before the MLP "
                     "lookup. Linear probes: held-out accuracy of a logistic probe for the "
                     "attribute per layer and role (split by subject). Mechanistic probes: "
                     "accuracy of each head's OV circuit read at the last subject token."),
        figures=[ff.report.line_plot(eff.assign(size=eff["layer"]), x="layer", y="accuracy",
                              title="Effective model accuracy",
                              caption="Accuracy with subject attention ablated from layer k on",
                              alt="effective model accuracy", band=None),
                 ff.report.heatmap(probes, x="layer", y="role", value="effect",
                            title="Linear probe accuracy (held-out subjects)",
                            caption="Held-out accuracy per layer and role", alt="probes")],
        tables=[ff.report.Table(mech.sort_values("effect", ascending=False).head(10)[
            ["layer", "head", "role", "effect", "n"]],
            caption="Top mechanistic probes (head OV read at the last subject token)")])


if __name__ == "__main__":
    sys.exit(ff.run_cli(main, prog="fact_finding"))
