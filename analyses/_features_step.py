"""The features step of ``analyses/fact_finding.py``: the circuit read in dictionary features.

Fact finding's circuit names heads, MLPs and neurons ("L3.n812, L23.h4"). With a transcoder at
every MLP, the same run can name features (issue 24; Marks et al. 2024, Ameisen et al. 2025).
On the run's known pairs this step

 1. loads the model's **default dictionaries** - the set ``analyses/dictionaries.py`` and
    ``factfind train-dictionaries`` train (TopK skip transcoders at every layer, 4x width, k 32,
    on the default corpus minus its 5% held out), cached under ``$FACTFIND_CACHE/dictionaries``
    and trained with a progress bar when missing - or a saved set (``--dictionaries PATH``), and
    measures their quality on held-out text (:func:`factfind.evaluate_dictionaries`);
 2. attributes the logit difference to every feature and error node at each token role with
    AtP (:func:`factfind.feature_atp`; ``--feature-ig-steps m``: integrated gradients), per pair
    and averaged; patches the top nodes exactly (:func:`factfind.verify_features`);
 3. aggregates the per-pair attributions into the **dataset-level circuit** (per relation too)
    and its **stability**: the Jaccard of the top-k nodes of two disjoint halves of the pairs
    (:func:`~factfind.features.circuits.aggregate_circuit`, ``circuit_stability``);
 4. builds circuit-tracer's **single-prompt attribution graph** of the first pair's clean
    prompt (:func:`~factfind.features.linear_graph.linear_graph`), prunes it by influence, and
    scores it (replacement, completeness, the error share per layer, flagged above 30%);
 4b. builds the **counterfactual graph over the pairs** (Sparse Feature Circuits' view,
    :func:`factfind.feature_edges`): EAP-IG edges among the circuit's strongest feature and
    error nodes, an embedding node per role and the logits, scored on the first pairs against
    the logit difference with attention live; its strongest cross-position edges are split
    over the heads that carry them (:func:`factfind.split_edge_heads`);
 5. **swaps and steers** the top features at the subject's last token and at the final token in
    each pair's clean run (:func:`factfind.feature_interventions`), against random controls,
    with the clean prompts paired again with partners the model knows (:func:`known_partners`:
    a partner the model does not know gives no attribute to swap in);
 6. compares **the bases** - features, features without their error nodes, neurons,
    heads/MLPs - at equal node budgets (:func:`~factfind.evaluate.bases.basis_comparison`, mean
    and resample ablation);
 7. shows dashboards (top contexts, logit lens, label) of the circuit's top features.

Each result is a cache entry of the fact-finding run's folder, named by the step's knobs (the
pairs' and the dictionaries' fingerprints, budgets, counts; ``RunCache``'s ``params``), so the
folder's key - and every earlier step's cache - does not move when a feature knob does, and a
second run is served from the cache. The report gets the sections of
:mod:`factfind.report.feature_circuits` (and the dictionaries' quality and dashboards of
:mod:`factfind.report.features`); the pruned graph is exported beside it
(``<report>-features.graphml``, ``-features.json`` (node-link) and
``-features.circuit-tracer.json``, the file circuit-tracer's frontend opens; list its
``metadata`` in that folder's ``graph-metadata.json`` to serve it), and the counterfactual
graph as ``<report>-features-pairs.graphml`` and ``-features-pairs.json``.

Cost, measured on SmolLM2-135M with its cached default dictionaries (59 rome_known pairs, 1
thread, shared 2-core machine at load 3-6): 251 s = 90 forwards of the pairs. Interventions
80 s (8 sets x 59 pairs plus the reads), the bases 72 s (AtP* ranks the neurons: 30 backward
passes; then one ablated run per budget, basis and ablation), the single-prompt graph 25 s
(4,905 active features, 0.036 forwards per target), AtP 17 s, verification 17 s, dashboards
18 s, quality 11 s; the rest is loading the dictionaries and drawing the sections. The
missed-effect bound adds ~40 s at its default 32 nodes (64: ~50 s, 128: ~60 s). The
counterfactual graph (4b) costs about ``m (3 + c T)`` forwards per batch of its pairs (``m``
EAP-IG points, ``T`` receivers: its nodes and the logits, ``c`` the MLP-free backward's share
of a forward; ``factfind.features.feature_edges``), its head split one per-head pull-back per
layer for each split edge's receiver and one forward-mode pass for each sender, per position and
point. Measured: on Gemma-3-270M (2 threads) the graph took 42 s and the split of 10 edges 72 s
of a 248 s step; on SmolLM2-135M (1 thread) 60 s and 135 s of 388 s.
"""

from __future__ import annotations

import json
import logging
import runpy
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

import factfind as ff
from factfind.evaluate.bases import BASES, basis_comparison
from factfind.features import (
    Dictionaries,
    FeatureDashboard,
    feature_dashboards,
    feature_interventions,
)
from factfind.features.circuits import STABILITY_KS, aggregate_circuit, circuit_stability
from factfind.features.linear_graph import linear_graph
from factfind.features.linear_graph_export import circuit_tracer_graph, to_circuit_graph
from factfind.report import feature_circuits as rfc
from factfind.report import features as rf

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("fact_finding.features")
ORGANISM = "factfind-organism"  # the name ff.load_model("organism") gives
MODES = ("auto", "on", "off")
#: the fewest re-paired pairs (of the attribution's) the interventions use instead of the run's
MIN_KNOWN_PARTNERS = 32
T = TypeVar("T")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FeaturesConfig:
    """The features step's knobs (each a ``--flag``). They name the step's cache entries, not
    the run folder, so changing one recomputes only this step."""

    features: str = _opt("auto", "the features step: 'auto' runs it on real models and not on "
                         "the organism (its 4 layers need dictionaries trained for the run, "
                         "~1 min, and its findings are the planted circuit's, tested "
                         "elsewhere); 'on' or 'off' force it. On SmolLM2-135M with its cached "
                         "dictionaries and 59 pairs it took 251 s at 1 thread on a shared "
                         "2-core machine (load 3-6; 90 forwards of the pairs) plus ~40 s "
                         "for the missed-effect bound: interventions 80 s, bases 72 s, graph 25 "
                         "s, the rest <= 18 s each. Training the "
                         "dictionaries the first time adds ~6 min")
    dictionaries: str = _opt("", "a saved dictionary set (any format ff.load_dictionaries "
                             "reads: a transcoder at every layer for the graph); default the "
                             "model's default set, loaded from $FACTFIND_CACHE/dictionaries or "
                             "trained")
    feature_tokens: int = _opt(40_000, "training tokens per layer if the default set must be "
                               "trained (train_dictionaries' default, so the set is the one "
                               "analyses/dictionaries.py trains: ~6 min on SmolLM2 at 2 cores; "
                               "its held-out explained variance is 0.34-1.0 by layer, >= 0.8 "
                               "at 10 of 30)")
    feature_epochs: int = _opt(2, "training epochs if the default set must be trained")
    feature_pairs: int = _opt(64, "pairs (the run's first ones) for the feature attribution, "
                              "its dataset-level circuit and stability, the verification and "
                              "the interventions. 64: the issue asks for >= 50 intervention "
                              "pairs, and stability needs halves of >= 25 for a top-50 "
                              "Jaccard to mean much; AtP is ~3 forwards per pair")
    feature_ig_steps: int = _opt(0, "0: AtP; m > 0: integrated gradients with m midpoints "
                                 "(m passes per dictionary and batch: 30x AtP's cost at "
                                 "m = 1 on a 30-layer model, so off by default)")
    feature_verify: int = _opt(16, "top feature/error nodes patched exactly (one stacked "
                               "patched run per node and pair)")
    feature_bound_nodes: int = _opt(32, "unverified nodes (the next ranks) bounded by "
                                    "patching subsets of them (each node in 2; subsets are "
                                    "cut per rank bucket and dictionary, so the cost grows "
                                    "with the dictionaries they span: 32 nodes took ~40 s, "
                                    "64 ~50 s, 128 ~60 s on SmolLM2 at 1 thread); 0: no "
                                    "bound")
    verify_pairs: int = _opt(16, "pairs (the first ones) the top nodes are ranked on and "
                             "patched on: 16 nodes x 16 pairs is ~4 forwards of 64 pairs; on "
                             "all 64 pairs the verification took 150 s of SmolLM2's step")
    feature_top: int = _opt(10, "features per role swapped and steered in the interventions "
                            "(the top by attribution at subject_last and at final)")
    basis_pairs: int = _opt(16, "pairs for the three-bases comparison (the run's circuit "
                            "pairs: ranking by AtP, AtP* and feature AtP, then one ablated run "
                            "per budget, basis and ablation; 16 pairs resolve the means as in "
                            "the run's faithfulness curve)")
    feature_budgets: str = _opt("10,50,200", "node budgets of the bases comparison and the k "
                                "of the stability (the issue's 10 / 50 / 200)")
    feature_dashboards: int = _opt(6, "dashboards of the circuit's top features")
    dashboard_tokens: int = _opt(2_000, "held-out corpus tokens scanned for the dashboards' "
                                 "top contexts (plus the pairs' prompts; SmolLM2 reads ~80 "
                                 "tokens/s at 1 thread: 8,000 took 100 s)")
    quality_tokens: int = _opt(1_500, "held-out tokens for the dictionary quality (explained "
                               "variance, L0, dead and dense fractions: one forward per batch)")
    quality_downstream: int = _opt(0, "1: the quality also splices each dictionary in for CE- "
                                   "and KL-loss recovered, 2 forwards per dictionary and batch "
                                   "(60 per batch on SmolLM2: ~80 min for 4,000 tokens at 1 "
                                   "thread, so off; analyses/dictionaries.py reports them)")
    graph_pair: int = _opt(0, "the pair whose clean prompt gets the single-prompt graph")
    graph_edges: int = _opt(5_000, "edges of the influence-pruned graph kept in the explorer "
                            "and the GraphML / node-link exports: the strongest, on paths "
                            "from the embeddings to the logits (Gemma-3-270M's pruned graph "
                            "had 64,627 edges: 13 MB of GraphML); circuit-tracer's JSON keeps "
                            "its whole pruned graph; 0: keep all")
    edge_nodes: int = _opt(50, "feature and error nodes of the counterfactual graph over the "
                           "pairs (ff.feature_edges): the strongest of the dataset-level "
                           "circuit's 'all' group (50: the middle budget, the top 50 whose "
                           "stability the report measures). Its cost grows with the receivers "
                           "T (these nodes plus the logits): about m (3 + c T) forwards per "
                           "batch of pairs, c the MLP-free backward's share of a forward "
                           "(0.37 on Gemma-3-270M); 50 nodes gave 1,297 edges in 42 s on "
                           "Gemma-3-270M at 2 threads, 1,141 in 60 s on SmolLM2 at 1")
    edge_pairs: int = _opt(16, "pairs (the first of the feature pairs) the counterfactual graph "
                           "is averaged over: 16, the verification's and the bases' count, a "
                           "quarter of the attribution's pairs (the graph costs m (3 + c T) "
                           "forwards per batch of pairs, so its time grows with them)")
    edge_steps: int = _opt(5, "EAP-IG points m of the counterfactual graph and its head split "
                           "(feature_edges' default, as the run's EAP-IG; 0: EAP at the clean "
                           "input, about m times cheaper)")
    edge_split: int = _opt(10, "strongest cross-position edges (sender and receiver at different "
                           "roles) split over the heads that carry them (ff.split_edge_heads: "
                           "per point a per-head pull-back per layer for each receiver and a "
                           "forward-mode pass for each sender; 10 edges took 72 s on "
                           "Gemma-3-270M at 2 threads, 135 s on SmolLM2 at 1; 0: no split)")
    edge_graph_edges: int = _opt(300, "edges of the counterfactual graph kept in its explorer "
                                 "and its GraphML / node-link exports: the strongest, on paths "
                                 "from the embeddings to the logits (300: what the explorer "
                                 "draws; its table lists the strongest of all); 0: keep all")

    @property
    def budgets(self) -> list[int]:
        return [int(b) for b in self.feature_budgets.split(",") if b.strip()]


def add_arguments(parser: Any) -> None:
    """The :class:`FeaturesConfig` flags on the fact-finding parser."""
    group = parser.add_argument_group("features step (issue 24)")
    for f in fields(FeaturesConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        extra = {"choices": MODES} if f.name == "features" else {}
        group.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default})", **extra)


def config_from(args: Any) -> FeaturesConfig:
    """The step's config from the parsed arguments (typed one-line errors for bad values)."""
    given: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(FeaturesConfig)
                             if hasattr(args, f.name)}
    fc = FeaturesConfig(**given)
    if fc.features not in MODES:
        raise ff.ArgumentError(f"--features must be one of {MODES}, got {fc.features!r}")
    try:
        budgets = fc.budgets
    except ValueError:
        budgets = []
    if not budgets or any(b < 1 for b in budgets):
        raise ff.ArgumentError(f"--feature-budgets must be comma-separated node counts >= 1, "
                               f"got {fc.feature_budgets!r} (e.g. 10,50,200)")
    for name in ("feature_pairs", "basis_pairs", "feature_verify", "verify_pairs", "feature_top",
                 "quality_tokens", "dashboard_tokens", "edge_nodes", "edge_pairs"):
        if getattr(fc, name) < 1:
            raise ff.ArgumentError(f"--{name.replace('_', '-')} must be >= 1, got "
                                   f"{getattr(fc, name)}")
    for name in ("feature_ig_steps", "graph_pair", "feature_dashboards", "feature_bound_nodes",
                 "graph_edges", "edge_steps", "edge_split", "edge_graph_edges"):
        if getattr(fc, name) < 0:
            raise ff.ArgumentError(f"--{name.replace('_', '-')} must be >= 0, got "
                                   f"{getattr(fc, name)}")
    return fc


@dataclass
class FeaturesResult:
    """What the step gives the report: its sections, its settings, and the exported graphs
    (``graph`` the single-prompt CircuitGraph, ``tracer`` circuit-tracer's JSON of it,
    ``pairs_graph`` the counterfactual graph over the pairs) for :meth:`files`."""

    config: FeaturesConfig
    sections: list[Any] = field(default_factory=list)
    graph: Any = None
    tracer: dict[str, Any] | None = None
    pairs_graph: Any = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {f"features: {k}": v for k, v in asdict(self.config).items()}

    def files(self, report: Path) -> dict[str, bytes]:
        """``<report>-features.graphml``, ``.json`` (node-link) and ``.circuit-tracer.json``,
        and the counterfactual graph's ``<report>-features-pairs.graphml`` and ``.json``, as
        bytes, for the report's staged, atomic write (none when the step did not run)."""
        if self.graph is None or self.tracer is None:
            return {}
        stem = f"{report.stem}-features"
        out: dict[str, bytes] = {}
        graphs = [(stem, self.graph)]
        if self.pairs_graph is not None:
            graphs.append((f"{stem}-pairs", self.pairs_graph))
        with tempfile.TemporaryDirectory() as tmp:
            for name, graph in graphs:
                for suffix, write in ((".graphml", ff.graph.to_graphml),
                                      (".json", ff.graph.to_json)):
                    path = Path(tmp) / f"{name}{suffix}"
                    write(graph, path)
                    out[path.name] = path.read_bytes()
        tracer = dict(self.tracer, metadata=dict(self.tracer["metadata"],
                                                 slug=f"{stem}.circuit-tracer"))
        out[f"{stem}.circuit-tracer.json"] = json.dumps(tracer, separators=(",", ":")).encode()
        return out


def enabled(fc: FeaturesConfig, model: Any) -> bool:
    """``--features``: on, off, or (auto) on for every model but the organism."""
    return fc.features == "on" or (fc.features == "auto" and model.name != ORGANISM)


# ----------------------------------------------------------------------------- dictionaries


def load_dictionaries(model: Any, fc: FeaturesConfig, *, seed: int, organism: bool
                      ) -> tuple[Dictionaries, Any, str]:
    """``(dictionaries, held-out corpus, where they came from)``: ``--dictionaries PATH``, or
    the default set of ``analyses/dictionaries.py`` (its corpus, split and training call, so
    the cache key is the same), loaded from the cache or trained (progress bars)."""
    dscript = runpy.run_path(str(ROOT / "analyses" / "dictionaries.py"),
                             run_name="dictionaries_steps")
    dcfg = dscript["Config"](model="organism" if organism else model.name, seed=seed,
                             tokens=fc.feature_tokens, epochs=fc.feature_epochs)
    corpus = dscript["corpus_for"](model, dcfg)
    train, held = corpus.split(dcfg.held_out, seed=dcfg.seed)
    if fc.dictionaries:
        dicts = ff.load_dictionaries(fc.dictionaries)
        return dicts, held, f"loaded from {fc.dictionaries}"
    t = time.time()
    dicts = ff.train_dictionaries(model, train, kind=dcfg.kind, width=dcfg.width, k=dcfg.k,
                                  tokens=dcfg.tokens, epochs=dcfg.epochs, seed=dcfg.seed)
    where = dicts.meta.get("loaded_from_cache")
    source = f"the default set, cached in {where}" if where else \
        f"the default set, trained in {time.time() - t:.0f} s"
    return dicts, held, source


# ----------------------------------------------------------------------------- the step


def _split(df: pd.DataFrame) -> dict[str, Any]:
    return json.loads(str(df.to_json(orient="split", index=False, default_handler=str)))


def _frame(d: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(d["data"], columns=d["columns"])


def _dashboards_json(boards: list[FeatureDashboard]) -> list[dict[str, Any]]:
    return [{"feature_id": b.feature_id, "dictionary": b.dictionary, "layer": b.layer,
             "feature": b.feature, "label": b.label, "density": b.density,
             "tokens": b.tokens, **{k: _split(getattr(b, k)) for k in
                                    ("contexts", "logit_lens", "histogram", "stats")}}
            for b in boards]


def _dashboards_from(data: list[dict[str, Any]]) -> list[FeatureDashboard]:
    return [FeatureDashboard(**{**d, **{k: _frame(d[k]) for k in
                                        ("contexts", "logit_lens", "histogram", "stats")}})
            for d in data]


def _graph_json(graph: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = ff.graph.to_json(graph, Path(tmp) / "g.json")
        return json.loads(path.read_text())


def _graph_from(data: dict[str, Any]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.json"
        path.write_text(json.dumps(data))
        return ff.graph.read_json(path)


def _once(compute: Callable[[], T]) -> Callable[[], T]:
    """``compute`` run at most once (the per-pair attribution that several cached steps
    derive from: on a second run they are hits and it never runs)."""
    held: list[T] = []

    def get() -> T:
        if not held:
            held.append(compute())
        return held[0]
    return get


#: a relation with at least this many pairs gets its own dataset-level circuit
MIN_GROUP = 8


def relation_groups(pairs: Any) -> list[str]:
    """One circuit group label per pair: its relation where the relation has
    :data:`MIN_GROUP` pairs or more (a mean over fewer has no useful interval), else
    ``"other"``; the ``all`` group is always there."""
    from collections import Counter

    rel = [str(p.relation) for p in pairs.clean]
    counts = Counter(rel)
    return [r if counts[r] >= MIN_GROUP else "other" for r in rel]


def node_frame(per_pair: pd.DataFrame, *, prompts: int | None = None) -> pd.DataFrame:
    """:func:`~factfind.features.attribution.feature_atp`'s node frame (one row per node: the
    mean over the pairs where its role exists, a 95% interval, ``n`` and ``score``) from its
    per-pair frame, over the first ``prompts`` pairs (default all), so one AtP pass serves
    the circuit, the stability, the verification and the interventions."""
    rows = per_pair if prompts is None else \
        pd.DataFrame(per_pair[(per_pair["prompt"].to_numpy() < prompts)])
    agg = aggregate_circuit(rows)
    direction = str(per_pair["direction"].iloc[0]) if "direction" in per_pair.columns \
        else "noise"
    return agg.assign(prompt=pd.array([pd.NA] * len(agg), dtype="Int64"), direction=direction)


#: the columns of split_edge_heads' frame (an empty one when no cross-position edge is split)
HEAD_COLUMNS = {"sender": "object", "receiver": "object", "layer": "Int64", "head": "Int64",
                "share": "float64", "local": "float64", "edge": "float64", "n": "int64"}


def edge_nodes(circuit: pd.DataFrame, top: int) -> list[str]:
    """The ``top`` strongest feature and error nodes (by ``|effect|``, ties in the circuit's
    order) of the dataset-level circuit's ``all`` group: the counterfactual graph's nodes."""
    allc = pd.DataFrame(circuit[(circuit["group"].astype(str) == "all").to_numpy()])
    kinds = [ff.graph.Node.parse(str(n)).kind for n in allc["node"]]
    allc = pd.DataFrame(allc[[k in ("feature", "error") for k in kinds]])
    size = allc["effect"].abs().to_numpy(dtype=float)
    allc = allc.iloc[np.argsort(-size, kind="stable")]
    allc = allc[allc["effect"].abs().to_numpy(dtype=float) > 0]
    return allc["node"].astype(str).head(top).tolist()


def cross_edges(edges: pd.DataFrame, top: int) -> list[list[str]]:
    """The ``top`` strongest edges (``[sender, receiver]``) whose sender and receiver sit at
    different roles: only attention carries them, so they are the ones to split over heads."""
    role = [str(x).rsplit("@", 1)[-1] for x in edges["sender"]]
    other = [str(x).rsplit("@", 1)[-1] for x in edges["receiver"]]
    cross = pd.DataFrame(edges[np.array([a != b for a, b in zip(role, other, strict=True)],
                                        dtype=bool)])
    cross = cross.iloc[np.argsort(-cross["effect"].abs().to_numpy(dtype=float), kind="stable")]
    return [[str(a), str(b)] for a, b in zip(cross["sender"].head(top),
                                               cross["receiver"].head(top), strict=True)]


def pairs_graph(edges: pd.DataFrame, model: Any, pairs: Any, *, keep: int,
                config: dict[str, Any]) -> tuple[Any, str]:
    """The counterfactual graph of ``edges`` (``ff.to_graph``), cut to its ``keep`` strongest
    edges and to the nodes on paths from the embeddings to the logits (``0``: every edge, still
    on those paths; when the strongest ``keep`` leave no such path, every edge too), with a
    phrase saying what was kept."""
    full = ff.to_graph(edges, model, pairs, config=config)
    n_edges = full.graph.number_of_edges()
    cut = bool(keep) and n_edges > keep
    cg = ff.graph.prune(full, top_n=keep if cut else n_edges)
    note = ""
    if cut and cg.graph.number_of_nodes() == 0:
        log.warning("the strongest %d edges of the counterfactual graph leave no path from "
                    "the embeddings to the logits; keeping every edge on such a path", keep)
        cg, cut = ff.graph.prune(full, top_n=n_edges), False
        note = f" (its strongest {keep:,} leave no such path)"
    kept = cg.graph.number_of_edges()
    if kept == n_edges:
        return cg, f"all {n_edges:,} edges"
    return cg, (f"the {'strongest ' if cut else ''}{kept:,} of its {n_edges:,} edges (on paths "
                f"from the embeddings to the logits){note}")


def _label(cg: Any, labels: dict[str, str]) -> None:
    """Each feature node of ``cg`` whose unit (the id before ``@``) has a label gets it."""
    for nid, attrs in cg.graph.nodes(data=True):
        if str(nid).split("@")[0] in labels:
            attrs["label"] = labels[str(nid).split("@")[0]]


def known_partners(pairs: Any, known: Any, model: Any, *, seed: int) -> Any:
    """The clean prompts of ``pairs`` paired again with corrupt partners drawn from ``known``
    (facts the model knows; same relation, same subject length, another attribute): an
    intervention that moves the corrupt subject's features can only make the model say the
    corrupt attribute if the model knows it. With fewer than :data:`MIN_KNOWN_PARTNERS` such
    pairs (or no ``known``), ``pairs`` itself."""
    if known is None:
        return pairs
    clean = ff.FactDataset(pairs.clean, name=f"{getattr(known, 'name', 'known')}|clean")
    got = clean.corrupt(model, seed=seed, on_missing="skip", pool=known)
    if len(got) < min(MIN_KNOWN_PARTNERS, len(pairs)):
        log.warning("features: only %d of %d pairs found a partner the model knows; the "
                    "interventions use the run's pairs", len(got), len(pairs))
        return pairs
    return got


def features_step(args: Any, *, cfg: Any, cache: ff.RunCache, model: Any, pairs: Any,
                  known: Any = None) -> FeaturesResult:
    """Run the step (module docstring) if ``--features`` says so; every result cached in the
    run's folder under names that carry the step's knobs. ``cfg`` is the fact-finding run's
    Config (seed, batch size); ``known``: the facts the model knows, the interventions'
    partners (:func:`known_partners`)."""
    fc = config_from(args)
    result = FeaturesResult(fc)
    if not enabled(fc, model):
        log.info("features step off (--features %s on %s)", fc.features, model.name)
        return result
    t0 = time.time()
    bs = cfg.batch_size
    organism = model.name == ORGANISM
    dicts, held, source = load_dictionaries(model, fc, seed=cfg.seed, organism=organism)
    log.info("features: %d dictionaries (%s)", len(dicts), source)
    fpairs = pairs[:fc.feature_pairs]
    bpairs = pairs[:fc.basis_pairs]
    tag = {"dicts": dicts.fingerprint(), "pairs": fpairs.fingerprint()}
    atp_tag = {**tag, "ig": fc.feature_ig_steps}
    steps = fc.feature_ig_steps or None

    quality = cache.table("features_quality", lambda: ff.evaluate_dictionaries(
        model, dicts, held, max_tokens=fc.quality_tokens,
        downstream=bool(fc.quality_downstream)),
        params={"dicts": tag["dicts"], "tokens": fc.quality_tokens,
                "downstream": bool(fc.quality_downstream)})
    # 2. attribution per pair (one AtP pass per batch); its mean per node ranks the features
    # for the interventions, its first pairs' mean the nodes to verify exactly
    per_pair = _once(lambda: ff.feature_atp(model, fpairs, dicts, steps=steps, batch_size=bs,
                                            per_prompt=True))
    est = cache.table("features_atp", lambda: node_frame(per_pair()), params=atp_tag)
    ks = sorted({*fc.budgets, *STABILITY_KS})
    circuit = cache.table("features_circuit", lambda: aggregate_circuit(
        per_pair(), groups=relation_groups(fpairs)).groupby("group", sort=False).head(500)
        .reset_index(drop=True), params={**atp_tag, "min_group": MIN_GROUP})
    stability = cache.table("features_stability", lambda: circuit_stability(
        per_pair(), k=ks, splits=20, seed=cfg.seed), params={**atp_tag, "k": ks})
    vpairs = fpairs[:fc.verify_pairs]
    verification = _once(lambda: ff.verify_features(
        model, vpairs, dicts, node_frame(per_pair(), prompts=len(vpairs)),
        top=fc.feature_verify, batch_size=bs))
    vtag = {**atp_tag, "top": fc.feature_verify, "pairs": vpairs.fingerprint()}
    verified = cache.table("features_verification", lambda: verification().frame, params=vtag)
    # the unverified nodes' missed-effect bound: subsets of the next ranks patched together
    bound = cache.table("features_bound", lambda: ff.feature_missed_bound(
        model, vpairs, dicts, verification(), max_nodes=fc.feature_bound_nodes, batch_size=bs,
        seed=cfg.seed).buckets, params={**vtag, "nodes": fc.feature_bound_nodes}) \
        if fc.feature_bound_nodes else None
    log.info("features: attribution, circuit and verification done (%.0fs)", time.time() - t0)

    # 4. the single-prompt graph of one pair's clean prompt
    prompt = pairs.clean[min(fc.graph_pair, len(pairs) - 1)]

    def graph() -> dict[str, Any]:
        lg = linear_graph(model, prompt, dicts, progress=True)
        pruned = lg.prune()
        replacement, completeness = lg.scores()
        return {"scores": {"replacement": replacement, "completeness": completeness},
                "graph": _graph_json(to_circuit_graph(lg, pruned, revision=model.revision)),
                "tracer": circuit_tracer_graph(lg, pruned),
                "error_share": _split(lg.error_share()),
                "facts": {"prompt": lg.prompt, "features active": lg.n_features,
                          "nodes (all / kept)": f"{lg.n_nodes:,} / "
                                                f"{int(pruned.node_mask.sum()):,}",
                          "edges kept": int(pruned.edge_mask.sum()),
                          "logit nodes": ", ".join(repr(s) for s in lg.logit_strs),
                          "seconds (graph)": round(lg.meta["seconds_targets"]
                                                   + lg.meta["seconds_capture"], 1),
                          "FE per target": round(lg.meta["fe_per_target"], 3)}}

    g = cache.json("features_graph", graph, params={"dicts": tag["dicts"],
                                                    "prompt": str(prompt)})
    log.info("features: single-prompt graph done (%.0fs)", time.time() - t0)
    # 4b. the counterfactual graph over pairs: EAP-IG between the circuit's strongest nodes,
    # its strongest cross-position edges split over the heads that carry them
    epairs = fpairs[:fc.edge_pairs]
    enodes = edge_nodes(circuit, fc.edge_nodes)
    etag = {"dicts": tag["dicts"], "pairs": epairs.fingerprint(), "nodes": enodes,
            "steps": fc.edge_steps}
    edges = cache.table("features_edges", lambda: ff.feature_edges(
        model, epairs, dicts, enodes, steps=fc.edge_steps, batch_size=bs), params=etag) \
        if enodes else None
    split = cross_edges(edges, fc.edge_split) if edges is not None else []
    heads = cache.table("features_edge_heads", lambda: ff.split_edge_heads(
        model, epairs, dicts, [(a, b) for a, b in split], steps=fc.edge_steps, batch_size=bs),
        params={**etag, "edges": split}) if split else \
        pd.DataFrame({c: pd.Series(dtype=t) for c, t in HEAD_COLUMNS.items()})
    log.info("features: counterfactual graph done (%.0fs)", time.time() - t0)
    # 5. interventions at subject_last and final; 6. the bases
    ipairs = known_partners(fpairs, known, model, seed=cfg.seed)
    inter = cache.table("features_interventions", lambda: feature_interventions(
        model, ipairs, dicts, est, top=fc.feature_top, scales=(1.0, 2.0), batch_size=bs,
        seed=cfg.seed), params={**atp_tag, "top": fc.feature_top,
                                "partners": ipairs.fingerprint()})
    bases = cache.table("features_bases", lambda: basis_comparison(
        model, bpairs, dicts, budgets=fc.budgets, batch_size=bs),
        params={"dicts": tag["dicts"], "pairs": bpairs.fingerprint(), "budgets": fc.budgets,
                "bases": list(BASES)})
    log.info("features: interventions and bases done (%.0fs)", time.time() - t0)
    # 7. dashboards of the circuit's top features
    allc = pd.DataFrame(circuit[(circuit["group"].astype(str) == "all").to_numpy()])
    top = allc.loc[allc["feature"].notna().to_numpy(), "node"].astype(str).head(
        fc.feature_dashboards).tolist()
    boards = _dashboards_from(cache.json("features_dashboards", lambda: _dashboards_json(
        feature_dashboards(model, dicts, top, facts=fpairs.clean, corpus=held,
                           max_tokens=fc.dashboard_tokens, batch_size=bs)) if top else [],
        params={**atp_tag, "top": top, "tokens": fc.dashboard_tokens}))

    cg = _graph_from(g["graph"])
    n_edges = cg.graph.number_of_edges()
    if fc.graph_edges and n_edges > fc.graph_edges:  # the strongest edges, on embed->logit paths
        cg = ff.graph.prune(cg, top_n=fc.graph_edges)
    kept = (f"the strongest {cg.graph.number_of_edges():,} of its {n_edges:,} edges (on paths "
            "from the embeddings to the logits)" if cg.graph.number_of_edges() < n_edges
            else f"all {n_edges:,} edges")
    labels = {b.feature_id.split("@")[0]: b.label for b in boards}
    _label(cg, labels)
    error_share = _frame(g["error_share"])
    result.graph, result.tracer = cg, g["tracer"]
    pairs_section = []
    if edges is not None:
        pg, pkept = pairs_graph(edges, model, epairs, keep=fc.edge_graph_edges,
                                config={"steps": fc.edge_steps, "nodes": len(enodes)})
        _label(pg, labels)
        result.pairs_graph = pg
        pairs_section = [rfc.pairs_graph_section(pg, edges, heads, labels=labels, facts={
            "nodes (features and errors)": f"{len(enodes)} strongest of the circuit's 'all' "
                                           "group, plus an embedding node per role and the "
                                           "logits",
            "pairs": len(epairs), "EAP-IG points": fc.edge_steps or "0 (EAP)",
            "graph": pkept}, caption=(
                f"The counterfactual graph over {len(epairs)} pairs, {pkept}: feature, error, "
                "embedding and logit nodes by token role; edges are EAP-IG effects on the logit "
                "difference."))]
    result.tables = {"quality": quality, "atp": est, "circuit": circuit, "stability": stability,
                     "verification": verified, "bound": pd.DataFrame() if bound is None
                     else bound, "error_share": error_share,
                     "interventions": inter, "bases": bases,
                     **({"edges": edges, "edge_heads": heads} if edges is not None else {})}
    points = rfc.features_summary(scores=g["scores"], error_share=error_share,
                                  stability=stability, interventions=inter, bases=bases,
                                  verification=verified, pairs_edges=edges, pairs_heads=heads)
    kinds = sorted({d.kind.value for d in dicts.values()})
    facts = {"dictionaries": f"{len(dicts)} ({', '.join(kinds)}, "
                             f"{next(iter(dicts.values())).d_sae:,} features each): {source}",
             "pairs (attribution, circuit)": len(fpairs),
             "pairs (interventions)": (f"{len(ipairs)}: the same clean prompts, partners the "
                                       "model knows" if ipairs is not fpairs else
                                       f"{len(ipairs)}: the attribution's"),
             "pairs (bases)": len(bpairs),
             "pairs (counterfactual graph)": len(epairs),
             "attribution": f"integrated gradients, {steps} steps" if steps else "AtP",
             "dictionary quality": f"{fc.quality_tokens:,} held-out tokens"
                                   + ("" if fc.quality_downstream else
                                      "; CE/KL recovered not measured (--quality-downstream 1)"),
             "graph prompt": g["facts"]["prompt"]}
    training = {k: v for k, v in (dicts.meta or {}).items() if isinstance(v, (int, float, str))}
    result.sections = [
        rfc.features_section(points, facts),
        rf.dictionary_quality_section(quality, training=training),
        rfc.feature_graph_section(cg, scores=g["scores"], error_share=error_share,
                                  facts=g["facts"], caption=(
                                      f"The pruned attribution graph of {g['facts']['prompt']!r}"
                                      f", {kept}: feature, error, embedding and logit nodes by "
                                      "token role.")),
        *pairs_section,
        rfc.feature_circuit_section(circuit, stability, verification=verified, bound=bound),
        rfc.interventions_section(inter),
        rfc.bases_section(bases),
        *([rf.dashboards_section(boards)] if boards else []),
    ]
    log.info("features step done (%.0fs)", time.time() - t0)
    return result
