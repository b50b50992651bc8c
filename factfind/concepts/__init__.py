"""Concepts as numbers: linear representations, polysemanticity, superposition, universality.
"""

from factfind.concepts.feature_polysemanticity import (
    feature_selectivity,
    polysemanticity_comparison,
)
from factfind.concepts.feature_splitting import (
    feature_splitting,
    features_per_dimension,
    splitting_summary,
)
from factfind.concepts.polysemanticity import basis_comparison, neuron_selectivity
from factfind.concepts.representation import attribute_directions, direction_patching
from factfind.concepts.superposition import lookup_effective_rank, storage_counts
from factfind.concepts.universality import compare_graphs

__all__ = [
    "attribute_directions", "basis_comparison", "compare_graphs", "direction_patching",
    "feature_selectivity", "feature_splitting", "features_per_dimension",
    "lookup_effective_rank", "neuron_selectivity", "polysemanticity_comparison",
    "splitting_summary", "storage_counts",
]
