"""The model: the one adapter over nnsight, the architecture specs and the checkpoints it loads.

* :mod:`~factfind.model.adapter`: :class:`Model` reads and writes activations at
  :class:`~factfind.types.Site` s through nnsight (the only module that imports it);
* :mod:`~factfind.model.architectures`: where each Hugging Face family keeps its modules;
* :mod:`~factfind.model.attention`: each attention layer recomputed from its per-head
  projections (EAP's receiver gradients);
* :mod:`~factfind.model.incremental`: resuming a patched run from a cached base run;
* :mod:`~factfind.model.checkpoints`: short names, GGUF files, provenance;
* :mod:`~factfind.model.loading`: :func:`load_model`, from any of those to a :class:`Model`.
"""

from factfind.model.adapter import Model
from factfind.model.architectures import ArchSpec, UnsupportedArchitectureError, register_spec
from factfind.model.checkpoints import CheckpointError
from factfind.model.loading import load_model

__all__ = [
    "ArchSpec", "CheckpointError", "Model", "UnsupportedArchitectureError", "load_model",
    "register_spec",
]
