"""Planted features: dictionaries whose features are the planted circuit's own variables.

The planted circuit (:mod:`factfind.testing.planted`) writes every variable it computes along
a known residual direction ``e_k - e_sink``: the first and last name's identity, the first
name the previous-token head copies, the *sport* the lookup neurons write at the last name
(``ATTR``) and the *answer* the extraction head moves to the final token (``ANSWER``). A
dictionary whose decoder rows are exactly those directions reads the circuit in its true
basis, so the truth of a feature-level analysis is known before it runs:

* :func:`planted_dictionaries` gives a ReLU SAE on ``resid_post`` of the lookup layer (L1) and
  of the extraction layer (L2), one feature per planted variable, in the order of
  :data:`FEATURES`. At the last subject token the L1 SAE's *sport* features carry the
  attribute; at the final token the L2 SAE's *answer* features do. Every other feature (names,
  flags, the distractors' junk) is active and changes between clean and corrupt prompts but
  is read by nothing on the answer path;
* :func:`planted_feature_truth` names the carriers as feature node ids.

The encoders read one direction each (``x . e_k``; the sink coordinate is ``-sum`` of the
others, so it is left out) and the decoders write ``e_k - e_sink``: on the planted model's
activations a feature's activation is the variable's size and the error term holds only what
no feature names (the sink's share of the other writes, and the LayerNorm's 1e-7).

Example::

    model, facts, truth = planted_model("gpt2")
    dicts = planted_dictionaries(model)
    planted_feature_truth(dicts)["subject_last"]   # ['L1.res.f16', ...]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from factfind.features.dictionary import Activation, Dictionaries, Dictionary, DictKind
from factfind.testing import planted as P
from factfind.types import Component

if TYPE_CHECKING:
    from factfind.model import Model

#: ``(name, residual dimension)`` of each planted feature, in feature-index order
FEATURES: tuple[tuple[str, int], ...] = (
    ("is_bos", P.IS_BOS), ("is_first", P.IS_FIRST), ("is_last", P.IS_LAST),
    ("is_query", P.IS_QUERY),
    *((f"first={n}", k) for n, k in zip(P.FIRST, P.FIRST_ID, strict=True)),
    *((f"last={n}", k) for n, k in zip(P.LAST, P.LAST_ID, strict=True)),
    *((f"prev_first={n}", k) for n, k in zip(P.FIRST, P.PREV_FIRST, strict=True)),
    *((f"sport={s}", k) for s, k in zip(P.SPORTS, P.ATTR, strict=True)),
    *((f"answer={s}", k) for s, k in zip(P.SPORTS, P.ANSWER, strict=True)),
    *((f"junk_head{i}", k) for i, k in enumerate(P.JUNK_HEAD)),
    *((f"junk_mlp{i}", k) for i, k in enumerate(P.JUNK_MLP)),
)
#: the feature indices of the sport (at the last name) and answer (at the final token) features
SPORT_FEATURES = tuple(i for i, (n, _) in enumerate(FEATURES) if n.startswith("sport="))
ANSWER_FEATURES = tuple(i for i, (n, _) in enumerate(FEATURES) if n.startswith("answer="))


def planted_dictionary(layer: int, d_model: int = P.D_MODEL) -> Dictionary:
    """A ReLU SAE on ``resid_post[layer]`` with one feature per planted variable
    (:data:`FEATURES`): encoder column ``e_k``, decoder row ``e_k - e_sink``, no biases."""
    n = len(FEATURES)
    W_enc = torch.zeros(d_model, n)
    W_dec = torch.zeros(n, d_model)
    for f, (_, k) in enumerate(FEATURES):
        W_enc[k, f] = 1.0
        W_dec[f, k] = 1.0
        W_dec[f, P.SINK] = -1.0
    return Dictionary(kind=DictKind.SAE, activation=Activation.RELU, layer=layer,
                      site=Component.RESID_POST,
                      W_enc=W_enc, b_enc=torch.zeros(n), W_dec=W_dec, b_dec=torch.zeros(d_model),
                      subtract_b_dec=True, model="factfind-planted",
                      meta={"labels": [name for name, _ in FEATURES]})


def planted_dictionaries(model: Model | None = None) -> Dictionaries:
    """The planted SAEs at the lookup layer (L1) and the extraction layer (L2)."""
    d_model = P.D_MODEL if model is None else model.d_model
    return Dictionaries([planted_dictionary(P.LOOKUP, d_model),
                         planted_dictionary(P.EXTRACT, d_model)])


def planted_feature_truth(dicts: Dictionaries) -> dict[str, list[str]]:
    """The features that carry the attribute, by role: the L1 sport features at
    ``subject_last`` and the L2 answer features at ``final`` (node ids)."""
    look, ext = dicts.at(P.LOOKUP), dicts.at(P.EXTRACT)
    return {"subject_last": [look.feature_id(f, "subject_last") for f in SPORT_FEATURES],
            "final": [ext.feature_id(f, "final") for f in ANSWER_FEATURES]}


def planted_transcoders(model: Model) -> Dictionaries:
    """A ReLU transcoder per layer of a planted model whose features are the MLP's own neurons
    (encoder = the MLP's input weights and biases, decoder = its output weights, ``b_dec`` its
    output bias): the lookup neurons ``L1.n0 ... L1.n15`` become the features ``L1.tc.f0 ...
    L1.tc.f15``. The MLPs' GELU and the transcoders' ReLU agree to ~1e-22 at the planted
    pre-activations (+-10 and beyond), so the error nodes hold almost nothing."""
    from factfind.model.architectures import _get

    out = []
    for layer in range(model.n_layers):
        mlp = _get(model._block_hf(layer), model.spec.mlp)
        up = getattr(mlp, "c_fc", None) or mlp.dense_h_to_4h  # GPT-2 Conv1D [in out]; NeoX
        W_in = up.weight.detach() if getattr(mlp, "c_fc", None) is not None \
            else up.weight.detach().T
        out.append(Dictionary(kind=DictKind.TRANSCODER, activation=Activation.RELU, layer=layer,
                              site=Component.MLP_IN, W_enc=W_in.clone().float(),
                              b_enc=up.bias.detach().clone().float(),
                              W_dec=model.W_out(layer).detach().clone().float(),
                              b_dec=model.b_out(layer).detach().clone().float(),
                              model="factfind-planted"))
    return Dictionaries(out)


__all__ = ["ANSWER_FEATURES", "FEATURES", "SPORT_FEATURES", "planted_dictionaries",
           "planted_dictionary", "planted_feature_truth", "planted_transcoders"]
