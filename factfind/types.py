"""Shared vocabulary of factfind: sites, components, position roles and dimension names.

Every other module speaks in these terms and this module imports nothing else of the package
(the habit of auto-circuit's ``types.py``). A *site* is a place in the forward pass where an
activation can be read or written:

* ``embed`` ``[batch pos d_model]``: token embeddings (for GPT-2 the position embedding is added
  before layer 0, so ``resid_pre[0]`` differs from it);
* ``resid_pre`` / ``resid_post`` ``[batch pos d_model]``: the residual stream entering / leaving
  layer ``l``;
* ``attn_out`` ``[batch pos d_model]``: the attention block's output (projection + bias);
* ``head_out`` ``[batch pos head d_model]``: one head's share of ``attn_out``, its slice ``z`` of
  the output projection's input times its slice of ``W_O``;
* ``z`` ``[batch pos head d_head]``: the per-head input to the output projection;
* ``mlp_in`` ``[batch pos d_model]``: what the MLP reads (the output of its pre-norm, where the
  family has one): the input of a transcoder;
* ``mlp_out`` ``[batch pos d_model]``: the MLP block's output;
* ``neurons`` ``[batch pos neuron]``: MLP hidden units after the non-linearity (input of
  ``W_out``);
* ``pattern`` ``[batch head q_pos k_pos]``: attention probabilities (read only; eager attention);
* ``q``, ``k``, ``v`` ``[batch pos head d_head]``: queries and keys (rotary applied) and values,
  key-value heads repeated for grouped-query attention (read only).

Position *roles* name token positions by what they hold in a fact prompt, so results from
prompts of different lengths can be aggregated: ``subject_first`` and ``subject_last`` (the
first and last subject token), ``subject`` (all subject tokens), ``relation`` (template tokens
other than the subject and the final token), ``final`` (the last token, where the answer is
predicted) and ``prefix`` (a few-shot prefix before the template).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, TypeAlias

from torch import Tensor

from factfind.errors import ArgumentError

# Fixed dimension names for shape annotations in docstrings and comments:
# batch, pos, layer, head, d_head, neuron (= d_mlp), d_model, d_vocab.
DIMS = ("batch", "pos", "layer", "head", "d_head", "neuron", "d_model", "d_vocab")


class Component(StrEnum):
    """A kind of site in the forward pass (see the module docstring)."""

    EMBED = "embed"
    RESID_PRE = "resid_pre"
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"
    HEAD_OUT = "head_out"
    Z = "z"
    MLP_IN = "mlp_in"
    MLP_OUT = "mlp_out"
    NEURONS = "neurons"
    PATTERN = "pattern"
    Q = "q"
    K = "k"
    V = "v"


class Role(StrEnum):
    """What a token position holds in a fact prompt."""

    PREFIX = "prefix"
    SUBJECT_FIRST = "subject_first"
    SUBJECT = "subject"
    SUBJECT_LAST = "subject_last"
    RELATION = "relation"
    FINAL = "final"


#: every role as a string, in canonical order; a role's index here is its label in role masks
#: (``[batch pos]`` tensors with -1 for padding) and its row in per-role means
ROLE_NAMES: tuple[str, ...] = tuple(r.value for r in Role)
#: roles that name exactly one position per prompt
POINT_ROLES: tuple[Role, ...] = (Role.SUBJECT_FIRST, Role.SUBJECT_LAST, Role.FINAL)
#: roles that name a group of positions per prompt (possibly empty, e.g. no prefix)
GROUP_ROLES: tuple[Role, ...] = (Role.PREFIX, Role.SUBJECT, Role.RELATION, Role.FINAL)


@dataclass(frozen=True, order=True)
class Site:
    """One addressable place: a component at a layer, optionally one head or neuron, at a position.

    ``position`` is either an absolute token index (``int``, counted in the padded batch) or a
    :class:`Role`; ``None`` means every position.
    """

    component: Component
    layer: int
    head: int | None = None
    neuron: int | None = None
    position: int | Role | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "component", Component(self.component))
        if isinstance(self.position, str):
            object.__setattr__(self, "position", Role(self.position))
        if self.layer < 0:
            raise ArgumentError(f"Site layer must be >= 0, got {self.layer}")
        if self.head is not None and self.component not in (Component.HEAD_OUT, Component.Z):
            raise ArgumentError("a head index only applies to head_out/z sites, "
                                f"not {self.component}")
        if self.neuron is not None and self.component is not Component.NEURONS:
            raise ArgumentError("a neuron index only applies to neurons sites, "
                                f"not {self.component}")

    @property
    def name(self) -> str:
        """Compact id such as ``L3.h2@final``, ``L4.n311@subject_last`` or ``L5.mlp_out``."""
        unit = str(self.component)
        if self.head is not None:
            unit = f"h{self.head}"
        elif self.neuron is not None:
            unit = f"n{self.neuron}"
        pos = "" if self.position is None else f"@{self.position}"
        return f"L{self.layer}.{unit}{pos}"


#: Short names of sparse dictionaries in node ids (``L5.tc.f1234@final``): ``tc`` a transcoder
#: (reads ``mlp_in``, writes ``mlp_out``), ``stc`` a skip transcoder, and SAEs by the site they
#: read and write (Gemma Scope's names): ``res`` ``resid_post``, ``rpre`` ``resid_pre``, ``mlp``
#: ``mlp_out``, ``att`` ``attn_out``. A *feature* node is one latent of one dictionary at one
#: role; an *error* node (``L5.tc.err@final``) is that dictionary's error term, ``target -
#: reconstruction``, which keeps a spliced model exact (see :mod:`factfind.features`).
DICTIONARY_NAMES: tuple[str, ...] = ("tc", "stc", "res", "rpre", "mlp", "att")

SiteKey: TypeAlias = tuple[Component, int]
"""(component, layer): the granularity at which the adapter reads and writes activations."""

ActivationDict: TypeAlias = dict[SiteKey, Tensor]


#: Columns of the tidy results every analysis returns (one row per site and prompt, or per site
#: when aggregated). Analyses may add columns; they never rename these.
#:
#: * ``method``     e.g. "activation_patching/denoise", "causal_tracing/mlp", "atp", "dla"
#: * ``component``  a :class:`Component` value (or "mlp"/"attn" windows for causal tracing)
#: * ``layer``      int;  ``head`` / ``neuron``: int or <NA>
#: * ``position``   absolute token index or <NA> when the row is per role; ``role``: a Role value
#:                  or <NA>
#: * ``prompt``     index into the dataset, or <NA> for an aggregate over prompts
#: * ``effect``     the number the method measures (documented per method)
#: * ``ci_low`` / ``ci_high`` / ``n``: a 95% confidence interval and the number of prompts, for
#:   aggregates
RESULT_COLUMNS: tuple[str, ...] = (
    "method", "component", "layer", "head", "neuron", "position", "role", "prompt",
    "effect", "ci_low", "ci_high", "n",
)

#: The columns of every *edge* result (EAP, EAP-IG, edge patching), one row per edge:
#: ``method``; ``sender`` and ``receiver``, circuit-graph node ids (``L3.h2@final``; the
#: words path patching uses for its sites); ``effect``, the number the method measures for the
#: edge, signed, in metric units; ``n``, the prompts it is a mean over. A sender's or receiver's
#: component, layer, head and role are :meth:`factfind.graph.Node.parse` of its id.
EDGE_RESULT_COLUMNS: tuple[str, ...] = ("method", "sender", "receiver", "effect", "n")


# ----------------------------------------------------------------------------- option vocabularies

Direction: TypeAlias = Literal["noise", "denoise"]
"""Which run is patched. ``"denoise"``: the corrupt run is patched with clean activations (does
the site suffice to restore the answer?); ``"noise"``: the clean run is patched with corrupt
activations (is the site necessary?). Defaults: ``"denoise"`` for localisation (activation
patching, subspace patching: Meng et al.'s restoration), ``"noise"`` for attribution and edges
(AtP, EAP, path patching: Kramár et al. and Syed et al. estimate the effect of corrupting a
node)."""
DIRECTIONS: tuple[Direction, ...] = ("noise", "denoise")

Ablation: TypeAlias = Literal["mean", "resample", "zero"]
"""How an ablated activation is replaced: by its mean over a pool of facts at the same role
(``"mean"``), by its value on another prompt with a different answer (``"resample"``), or by 0
(``"zero"``: off-distribution, kept for comparison with older work). Circuit evaluation
(:mod:`factfind.evaluate`) accepts the first two, :data:`CIRCUIT_ABLATIONS`."""
ABLATIONS: tuple[Ablation, ...] = ("mean", "resample", "zero")
CIRCUIT_ABLATIONS: tuple[Ablation, ...] = ("mean", "resample")

OnError: TypeAlias = Literal["raise", "skip"]
"""What a data step does with a bad record: raise a typed error naming it, or skip it (logged)."""

Remote: TypeAlias = bool | str | None
"""Where a sweep's traces run: ``None``/``False`` here, ``"local"`` through nnsight's serialised
request path without a server, ``True`` on NDIF (or a host URL). See ``Model.session``."""

Metric: TypeAlias = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``metric(logits [rows d_vocab], correct [rows], wrong [rows]) -> [rows]``; the default
everywhere is :func:`factfind.metrics.logit_diff`."""
