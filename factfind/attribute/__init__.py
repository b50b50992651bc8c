"""Attribution: every node's effect estimated at once, then verified exactly.

Attribution patching (AtP) and AtP* (:mod:`~factfind.attribute.atp`) estimate the patching
effect of every head, MLP and neuron at every position from one forward and backward pass;
exact patching (:mod:`~factfind.attribute.exact`) measures chosen nodes;
:mod:`~factfind.attribute.verification` verifies the top estimates and bounds what was missed;
:mod:`~factfind.attribute.neurons` holds Fact Finding's neuron analyses.
"""

from factfind.attribute.atp import Estimates, atp, atp_star
from factfind.attribute.exact import exact_patching
from factfind.attribute.verification import Verification, verify

__all__ = [
    "Estimates", "Verification", "atp", "atp_star", "exact_patching", "verify",
]
