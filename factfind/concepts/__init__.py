"""Concepts as numbers: linear representations, polysemanticity, superposition, universality.
"""

from factfind.concepts.polysemanticity import basis_comparison, neuron_selectivity
from factfind.concepts.representation import attribute_directions, direction_patching
from factfind.concepts.superposition import lookup_effective_rank, storage_counts
from factfind.concepts.universality import compare_graphs

__all__ = [
    "attribute_directions", "basis_comparison", "compare_graphs", "direction_patching",
    "lookup_effective_rank", "neuron_selectivity", "storage_counts",
]
