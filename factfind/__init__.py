"""factfind: discover how transformer language models recall facts.

The public API in one place; each name lives in a module that teaches its method::

    import factfind as ff
    model = ff.load_model("organism")
    facts = ff.load_facts("organism:sport").known_by(model)
    pairs = facts.corrupt(model, seed=0)
    ff.aggregate(ff.activation_patching(model, pairs))
"""

from factfind import graph
from factfind.data import FactDataset, FactPairs, FactPrompt
from factfind.data.loaders import from_records, load_facts
from factfind.edges import eap
from factfind.errors import FactDataError
from factfind.localize.dla import direct_logit_attribution
from factfind.localize.knockout import attention_knockout
from factfind.localize.patching import activation_patching
from factfind.localize.tracing import causal_tracing
from factfind.model import Model, load_model
from factfind.model.architectures import ArchSpec, register_spec
from factfind.results import aggregate
from factfind.streaming import stream
from factfind.types import Component, Role, Site

__version__ = "0.1.0"

__all__ = [
    "ArchSpec", "Component", "FactDataError", "FactDataset", "FactPairs", "FactPrompt", "Model",
    "Role", "Site", "activation_patching", "aggregate", "attention_knockout", "causal_tracing",
    "direct_logit_attribution", "eap", "from_records", "graph", "load_facts", "load_model",
    "register_spec", "stream",
]
