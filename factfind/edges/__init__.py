"""Edges: which paths between components carry the fact.

:mod:`~factfind.edges.placement` makes circuit nodes concrete on a batch;
:mod:`~factfind.edges.engine` runs the two-run path-patching recipe for many sender sets at
once; :mod:`~factfind.edges.path_patching` and :mod:`~factfind.edges.edge_patching` measure
paths and edges exactly; :mod:`~factfind.edges.eap` estimates every edge at once (EAP, EAP-IG; the
function ``eap`` is not re-exported here, so ``factfind.edges.eap`` stays the module).
"""

from factfind.edges.eap import eap_ig, edge_attribution
from factfind.edges.edge_patching import edge_patching, path_patching_circuit
from factfind.edges.path_patching import path_patching, path_patching_sweep

__all__ = [
    "eap_ig", "edge_attribution", "edge_patching", "path_patching",
    "path_patching_circuit", "path_patching_sweep",
]
