"""Test fixtures shipped with the package: tiny deterministic models and planted circuits.

:mod:`~factfind.testing.models`: tiny models of every family and tokenizers, built locally (no
download); :mod:`~factfind.testing.planted`: hand-built models whose fact recall runs through
components named in advance, so a method's answer is known before it runs.
"""

from factfind.testing.models import (
    linearised_model,
    same_length_pairs,
    tiny_config,
    tiny_hf_model,
    tiny_model,
    tiny_tokenizer,
)
from factfind.testing.planted import PlantedCircuit, planted_circuit, planted_facts, planted_model

__all__ = [
    "PlantedCircuit", "linearised_model", "planted_circuit", "planted_facts", "planted_model",
    "same_length_pairs", "tiny_config", "tiny_hf_model", "tiny_model", "tiny_tokenizer",
]
