"""Localisation: which activations, at which token positions, carry the fact?

Each method runs the model with some activations changed and measures the answer: activation
patching (:mod:`~factfind.localize.patching`), ROME's causal tracing
(:mod:`~factfind.localize.tracing`), Geva et al.'s attention knockout
(:mod:`~factfind.localize.knockout`), ablation (:mod:`~factfind.localize.ablation`), direct
logit attribution (:mod:`~factfind.localize.dla`), probes (:mod:`~factfind.localize.probing`)
and subspace patching (:mod:`~factfind.localize.subspace`). Each returns a tidy DataFrame.
"""

from factfind.localize.ablation import effective_model, mean_activations
from factfind.localize.dla import direct_logit_attribution
from factfind.localize.knockout import attention_knockout
from factfind.localize.patching import activation_patching
from factfind.localize.probing import linear_probes, mechanistic_probes
from factfind.localize.subspace import subspace_patching
from factfind.localize.tracing import causal_tracing

__all__ = [
    "activation_patching", "attention_knockout", "causal_tracing",
    "direct_logit_attribution", "effective_model", "linear_probes", "mean_activations",
    "mechanistic_probes", "subspace_patching",
]
