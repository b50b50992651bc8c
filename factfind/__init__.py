"""factfind: discover how transformer language models recall facts.

The public API in one place; each name lives in a module that teaches its method, in the
subpackage of its stage (data -> model -> localize | attribute | edges -> graph -> evaluate ->
report)::

    import factfind as ff
    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").known_by(model)
    pairs = facts.corrupt(model, seed=0)
    ff.aggregate(ff.activation_patching(model, pairs))
"""

from factfind import graph, integrity, report
from factfind.attribute.atp import Estimates, atp, atp_star, estimate
from factfind.attribute.exact import exact_patching
from factfind.attribute.neurons import (
    cross_relation_correlation,
    mlp_output_norms,
    neuron_dla,
    neuron_nonlinearity,
    resample_neurons,
    swap_variants,
)
from factfind.attribute.verification import Verification, missed_effect_bound, verify
from factfind.cache import RunCache
from factfind.console import configure_logging, run_cli
from factfind.data import (
    FactDataError,
    FactDataset,
    FactPairs,
    FactPrompt,
    PairBatch,
    TokenBatch,
    encode_pairs,
    from_records,
    load_facts,
    relation_label,
    relation_name,
)
from factfind.data.dataset import known_mask
from factfind.data.pairs import FALLBACKS
from factfind.edges import eap
from factfind.edges.eap import eap_ig, edge_attribution
from factfind.edges.edge_patching import edge_patching, path_patching_circuit
from factfind.edges.path_patching import path_patching, path_patching_sweep
from factfind.edges.placement import all_nodes
from factfind.errors import (
    ArgumentError,
    CacheCorruptError,
    CacheError,
    CacheWriteError,
    CheckpointError,
    DegenerateResultError,
    DictionaryFileError,
    EmptyInputError,
    FactfindError,
    FormatCapabilityError,
    HubUnavailableError,
    IncompleteInstallError,
    ModelNotInstalledError,
    NotEnoughFactsError,
    UnknownHookError,
)
from factfind.evaluate import (
    completeness,
    evaluate_circuits,
    faithfulness,
    faithfulness_curve,
    greedy_circuit,
    minimality,
    minimize_circuit,
    prune_circuit,
)
from factfind.features.attribution import feature_atp
from factfind.features.corpus import load_corpus
from factfind.features.dashboard import FeatureDashboard, feature_dashboard
from factfind.features.evaluation import evaluate_dictionaries
from factfind.features.feature_edge_heads import split_edge_heads
from factfind.features.feature_edges import feature_edges
from factfind.features.formats import load_dictionaries
from factfind.features.labels import attribute_features
from factfind.features.training import fit_dictionary, train_dictionaries
from factfind.features.verification import (
    FeatureVerification,
    feature_missed_bound,
    patch_features,
    verify_features,
)
from factfind.graph import CircuitGraph, prune, prune_nodes, to_graph
from factfind.localize.ablation import ablation, effective_model, mean_activations
from factfind.localize.dla import direct_logit_attribution
from factfind.localize.knockout import attention_knockout
from factfind.localize.patching import DEFAULT_ROLES, activation_patching
from factfind.localize.probing import linear_probes, mechanistic_probes
from factfind.localize.subspace import SubspacePatch, subspace_patching
from factfind.localize.tracing import causal_tracing
from factfind.model import ArchSpec, Model, load_model, register_spec
from factfind.report.findings import literature_findings
from factfind.report.show import show
from factfind.results import aggregate, tidy
from factfind.streaming import stream
from factfind.types import (
    ABLATIONS,
    DIRECTIONS,
    Ablation,
    Component,
    Direction,
    Metric,
    Role,
    Site,
)

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS",
    "DEFAULT_ROLES",
    "DIRECTIONS",
    "FALLBACKS",
    "Ablation",
    "ArchSpec",
    "ArgumentError",
    "CacheCorruptError",
    "CacheError",
    "CacheWriteError",
    "CheckpointError",
    "CircuitGraph",
    "Component",
    "DegenerateResultError",
    "DictionaryFileError",
    "Direction",
    "EmptyInputError",
    "Estimates",
    "FactDataError",
    "FactDataset",
    "FactPairs",
    "FactPrompt",
    "FactfindError",
    "FeatureDashboard",
    "FeatureVerification",
    "FormatCapabilityError",
    "HubUnavailableError",
    "IncompleteInstallError",
    "Metric",
    "Model",
    "ModelNotInstalledError",
    "NotEnoughFactsError",
    "PairBatch",
    "Role",
    "RunCache",
    "Site",
    "SubspacePatch",
    "TokenBatch",
    "UnknownHookError",
    "Verification",
    "ablation",
    "activation_patching",
    "aggregate",
    "all_nodes",
    "atp",
    "atp_star",
    "attention_knockout",
    "attribute_features",
    "causal_tracing",
    "completeness",
    "configure_logging",
    "cross_relation_correlation",
    "direct_logit_attribution",
    "eap",
    "eap_ig",
    "edge_attribution",
    "edge_patching",
    "effective_model",
    "encode_pairs",
    "estimate",
    "evaluate_circuits",
    "evaluate_dictionaries",
    "exact_patching",
    "faithfulness",
    "faithfulness_curve",
    "feature_atp",
    "feature_dashboard",
    "feature_edges",
    "feature_missed_bound",
    "fit_dictionary",
    "from_records",
    "graph",
    "greedy_circuit",
    "integrity",
    "known_mask",
    "linear_probes",
    "literature_findings",
    "load_corpus",
    "load_dictionaries",
    "load_facts",
    "load_model",
    "mean_activations",
    "mechanistic_probes",
    "minimality",
    "minimize_circuit",
    "missed_effect_bound",
    "mlp_output_norms",
    "neuron_dla",
    "neuron_nonlinearity",
    "patch_features",
    "path_patching",
    "path_patching_circuit",
    "path_patching_sweep",
    "prune",
    "prune_circuit",
    "prune_nodes",
    "register_spec",
    "relation_label",
    "relation_name",
    "report",
    "resample_neurons",
    "run_cli",
    "show",
    "split_edge_heads",
    "stream",
    "subspace_patching",
    "swap_variants",
    "tidy",
    "to_graph",
    "train_dictionaries",
    "verify",
    "verify_features",
]
