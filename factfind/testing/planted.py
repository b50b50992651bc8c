"""A planted circuit: small models whose fact recall runs through components named in advance.

A discovery method can only be trusted on models where the answer is known. This module builds
real Hugging Face models (``GPT2LMHeadModel`` and ``GPTNeoXForCausalLM``, parallel blocks and
rotary embeddings included) whose weights are *set by hand* so that one mechanism - the one
Fact Finding (Nanda et al. 2023) describes in Pythia - computes every answer:

* **previous-token head** ``L0.h0``: at a last name it attends to the first name before it and
  copies the first name's identity to the last-name position (``L0.h0@subject_last``);
* **lookup neurons** ``L1.n0 … L1.n15``, one AND per subject: neuron ``4 i + j`` fires only when
  first name ``i`` (from the head) and last name ``j`` (from the token) are both present and
  writes the sport of subject ``(i, j)`` (``L1.mlp@subject_last``). Sports form a Latin square,
  so neither name alone determines the answer;
* **extraction head** ``L2.h0``: at the final token ("of") it attends to the last name and moves
  the sport to the final position, where the unembedding reads it (``L2.h0@final``).

Everything else is inert (zero weights) or a **distractor**: a head that copies first names into
an unread subspace (``L1.h1``), one that reads last names at the final token (``L2.h1``), and
MLP neurons in every layer that fire on names or on the answer and write into unread subspaces.
Distractors change between clean and corrupt prompts, so a method that ranks by activation
change alone would pick them; only the causal path matters.

Design, so that the hand-set weights survive the architecture:

* a word-level tokenizer (``tokenizers`` WordLevel + Whitespace) with a BOS token, so each name,
  template word and sport is one token;
* every feature is written as ``e_k - e_sink`` (one residual dimension is a sink no one reads),
  so the residual stream has zero mean and LayerNorm's centring leaves it alone; the norms have
  a huge epsilon (1e8) and gain ``sqrt(epsilon)``, so ``LN(x) = x (1 + O(|x|^2 / 1e8))``:
  identity on the stream, up to ~1e-7 relative;
* attention is by token identity, not position: queries and keys live in head dimensions past
  the rotary ones (GPT-NeoX rotates only the first quarter), and every head that should look at
  nothing attends to BOS (a sink key), whose value is zero.

The truth is recorded in :class:`PlantedCircuit` as circuit-graph node ids
(:mod:`factfind.graph`) at head/MLP and at neuron granularity.

Example::

    model, facts, truth = planted_model("gpt_neox")
    pairs = facts.corrupt(model, seed=0)
    truth.nodes   # frozenset({'L0.h0@subject_last', 'L1.mlp@subject_last', 'L2.h0@final'})
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from factfind.errors import ArgumentError

if TYPE_CHECKING:
    from factfind.data import FactDataset
    from factfind.model import Model

FIRST = ("Ada", "Boris", "Clara", "Dmitri")
LAST = ("Kim", "Lopez", "Moreau", "Novak")
SPORTS = ("tennis", "golf", "chess", "rugby")
TEMPLATE = "{} plays the sport of"
RELATION = "sport"
BOS = "<|endoftext|>"
WORDS = (BOS, "[UNK]", "is", "plays", "the", "sport", "of", *FIRST, *LAST, *SPORTS,
         "football", "Paris")
FAMILIES = ("gpt2", "gpt_neox")

D_MODEL, N_HEADS, D_HEAD, D_MLP, N_LAYERS = 64, 4, 16, 32, 3
EPS = 1e8
SINK = D_MODEL - 1
# residual features (each written as e_k - e_sink)
IS_BOS, IS_FIRST, IS_LAST, IS_QUERY = 0, 1, 2, 3
FIRST_ID = range(4, 8)
LAST_ID = range(8, 12)
PREV_FIRST = range(12, 16)  # written by the previous-token head at the last name
ATTR = range(16, 20)  # written by the lookup neurons at the last name
ANSWER = range(20, 24)  # written by the extraction head at the final token
JUNK_HEAD = range(24, 28)  # written by distractor heads, read by nothing
JUNK_MLP = range(28, 36)  # written by distractor neurons, read by nothing
QK_A, QK_B = 8, 9  # head dimensions for queries and keys (past NeoX's 4 rotary dimensions)
SHARP = 80.0  # query scale: scores of 20 after the 1/sqrt(d_head) scaling
AND_GAIN = 20.0  # lookup neuron pre-activation: 20 per present name, bias -30
STRENGTH = 5.0  # size of the attribute and answer features (logit of the answer)

PREV, LOOKUP, EXTRACT = 0, 1, 2  # layers of the planted components
_ROTARY: dict[str, Any] = {"rotary_pct": 0.25}  # rope_parameters' partial factor in transformers 5


def sport_of(i: int, j: int) -> str:
    """The sport of the subject (first name ``i``, last name ``j``): a Latin square."""
    return SPORTS[(i + j) % len(SPORTS)]


@dataclass(frozen=True)
class PlantedCircuit:
    """The planted truth, as circuit-graph node ids.

    Attributes:
        nodes: the planted heads and MLPs at their roles (head/MLP granularity).
        neurons: the planted lookup neurons (neuron granularity; they replace the MLP node).
        edges: the planted edges at head/MLP granularity, embeddings and logits included.
        distractors: active heads/MLPs off the answer path (they change between clean and
            corrupt prompts; ablating them changes nothing).
        distractor_neurons: active neurons off the path.
        names: the planted components by function.
    """

    nodes: frozenset[str]
    neurons: frozenset[str]
    edges: frozenset[tuple[str, str]]
    distractors: frozenset[str]
    distractor_neurons: frozenset[str]
    names: tuple[tuple[str, str], ...]

    def neuron_nodes(self) -> frozenset[str]:
        """The planted nodes at neuron granularity: the heads and the lookup neurons."""
        return frozenset(n for n in self.nodes if ".mlp@" not in n) | self.neurons

    def precision_recall(self, found: Iterable[str], *, neurons: bool = False
                         ) -> tuple[float, float]:
        """Precision and recall of the inner nodes (embeddings and logits ignored) of a found
        circuit against the planted ones, at head/MLP or (``neurons``) neuron granularity."""
        truth = self.neuron_nodes() if neurons else self.nodes
        got = {n for n in found if not n.startswith(("embed@", "logits@"))}
        hit = len(got & truth)
        return (hit / len(got) if got else 0.0), hit / len(truth)


def planted_circuit() -> PlantedCircuit:
    """The :class:`PlantedCircuit` of :func:`planted_model` (the same for both families)."""
    prev, look, ext = (f"L{PREV}.h0@subject_last", f"L{LOOKUP}.mlp@subject_last",
                       f"L{EXTRACT}.h0@final")
    edges = {("embed@subject_first", prev), (prev, look), ("embed@subject_last", look),
             (look, ext), (ext, "logits@final")}
    neurons = frozenset(f"L{LOOKUP}.n{n}@subject_last" for n in range(len(FIRST) * len(LAST)))
    distractors = {f"L{LOOKUP}.h1@{r}" for r in ("subject_first", "subject_last", "relation",
                                                 "final")}
    distractors |= {f"L{EXTRACT}.h1@final", "L0.mlp@subject_last", f"L{EXTRACT}.mlp@final"}
    dn = {f"L0.n{j}@subject_last" for j in range(len(LAST))}
    dn |= {f"L{LOOKUP}.n{16 + i}@subject_last" for i in range(len(FIRST))}
    dn |= {f"L{EXTRACT}.n{k}@final" for k in range(len(SPORTS))}
    return PlantedCircuit(
        nodes=frozenset({prev, look, ext}), neurons=neurons, edges=frozenset(edges),
        distractors=frozenset(distractors), distractor_neurons=frozenset(dn),
        names=(("previous_token", f"L{PREV}.h0"), ("lookup", f"L{LOOKUP}.mlp"),
               ("extraction", f"L{EXTRACT}.h0")))


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # type: ignore[assignment]
    tok.post_processor = processors.TemplateProcessing(  # type: ignore[assignment]
        single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok.to_str()


def planted_tokenizer() -> Any:
    """The word-level ``PreTrainedTokenizerFast`` (BOS prepended, one token per word)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   unk_token="[UNK]")


def planted_facts() -> FactDataset:
    """The 16 facts: every (first, last) name pair plays the sport of the Latin square."""
    from factfind.data import FactDataset, FactPrompt

    return FactDataset([FactPrompt(f"{f} {g}", RELATION, TEMPLATE, sport_of(i, j),
                                   source=f"planted#{4 * i + j}")
                        for i, f in enumerate(FIRST) for j, g in enumerate(LAST)],
                       name="planted:sport")


class _Weights:
    """Writes hand-set weights into a zeroed model, in the [in, out] convention."""

    def __init__(self, hf: Any, family: str) -> None:
        self.hf, self.family = hf, family
        self.tok = {w: i for i, w in enumerate(WORDS)}

    def block(self, layer: int) -> Any:
        return self.hf.transformer.h[layer] if self.family == "gpt2" else \
            self.hf.gpt_neox.layers[layer]

    def write(self, mat: torch.Tensor, row: int, feature: int, value: float) -> None:
        """Row ``row`` of an [in, d_model] matrix writes ``value * (e_feature - e_sink)``."""
        mat[row, feature] += value
        mat[row, SINK] -= value

    def embed(self, word: str, features: Iterable[int]) -> None:
        w = (self.hf.transformer.wte if self.family == "gpt2" else self.hf.gpt_neox.embed_in)
        for f in features:
            self.write(w.weight.data, self.tok[word], f, 1.0)

    def unembed(self, feature: int, word: str, value: float) -> None:
        self.hf.lm_head.weight.data[self.tok[word], feature] += value

    def qkv(self, layer: int, head: int, which: str, feature: int | None, dim: int,
            value: float) -> None:
        """Query/key/value dimension ``dim`` of a head reads residual ``feature`` (None: bias)."""
        part = "qkv".index(which)
        attn = self.block(layer).attn if self.family == "gpt2" else self.block(layer).attention
        if self.family == "gpt2":
            col = part * D_MODEL + head * D_HEAD + dim
            w, b = attn.c_attn.weight.data, attn.c_attn.bias.data  # Conv1D [in, out]
            if feature is None:
                b[col] += value
            else:
                w[feature, col] += value
        else:
            row = head * 3 * D_HEAD + part * D_HEAD + dim
            w, b = attn.query_key_value.weight.data, attn.query_key_value.bias.data  # [out, in]
            if feature is None:
                b[row] += value
            else:
                w[row, feature] += value

    def head_out(self, layer: int, head: int, dim: int, feature: int, value: float) -> None:
        if self.family == "gpt2":
            w = self.block(layer).attn.c_proj.weight.data  # [in, out]
            self.write(w, head * D_HEAD + dim, feature, value)
        else:
            w = self.block(layer).attention.dense.weight.data  # [out, in]
            w[feature, head * D_HEAD + dim] += value
            w[SINK, head * D_HEAD + dim] -= value

    def neuron(self, layer: int, n: int, reads: dict[int, float], bias: float,
               feature: int, value: float) -> None:
        mlp = self.block(layer).mlp
        if self.family == "gpt2":
            w_in, b_in, w_out = mlp.c_fc.weight.data, mlp.c_fc.bias.data, mlp.c_proj.weight.data
            for f, v in reads.items():
                w_in[f, n] += v
            b_in[n] += bias
            self.write(w_out, n, feature, value)
        else:
            w_in, b_in = mlp.dense_h_to_4h.weight.data, mlp.dense_h_to_4h.bias.data
            for f, v in reads.items():
                w_in[n, f] += v
            b_in[n] += bias
            w_out = mlp.dense_4h_to_h.weight.data  # [out, in]
            w_out[feature, n] += value
            w_out[SINK, n] -= value

    def mover(self, layer: int, head: int, query: int | None, key: int,
              moves: Iterable[tuple[int, int]]) -> None:
        """A head that, at tokens with feature ``query`` (every token if None), attends to
        tokens with feature ``key`` - else to BOS - and copies ``from -> to`` features."""
        if query is None:
            self.qkv(layer, head, "q", None, QK_A, SHARP)
        else:
            self.qkv(layer, head, "q", query, QK_A, 2 * SHARP)
            self.qkv(layer, head, "q", None, QK_B, SHARP)
            self.qkv(layer, head, "k", IS_BOS, QK_B, 1.0)
        self.qkv(layer, head, "k", key, QK_A, 1.0)
        for dim, (src, dst) in enumerate(moves):
            self.qkv(layer, head, "v", src, dim, 1.0)
            self.head_out(layer, head, dim, dst, 1.0)


def planted_hf_model(family: str = "gpt2") -> tuple[Any, Any]:
    """The hand-built Hugging Face model and its tokenizer (see the module docstring)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ArgumentError(f"family must be one of {FAMILIES}, got {family!r}")
    common: dict[str, Any] = dict(vocab_size=len(WORDS), tie_word_embeddings=False,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  attn_implementation="eager")
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_inner=D_MLP,
                            n_positions=32, activation_function="gelu_new",
                            layer_norm_epsilon=EPS, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **common)
    else:
        cfg = tf.GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=D_MODEL,
                               num_attention_heads=N_HEADS, intermediate_size=D_MLP,
                               hidden_act="gelu", layer_norm_eps=EPS,
                               max_position_embeddings=32, use_parallel_residual=True,
                               attention_bias=True, **common, **_ROTARY)
    hf = tf.AutoModelForCausalLM.from_config(cfg).eval()
    gain = math.sqrt(EPS)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = any(k in name for k in ("ln_", "layernorm", "layer_norm"))
            p.fill_(gain if is_norm and name.endswith("weight") else 0.0)
        w = _Weights(hf, family)
        w.embed(BOS, [IS_BOS])
        w.embed("of", [IS_QUERY])
        for i, name_ in enumerate(FIRST):
            w.embed(name_, [IS_FIRST, FIRST_ID[i]])
        for j, name_ in enumerate(LAST):
            w.embed(name_, [IS_LAST, LAST_ID[j]])
        # planted: previous-token head, lookup neurons, extraction head, unembedding
        w.mover(PREV, 0, IS_LAST, IS_FIRST, zip(FIRST_ID, PREV_FIRST, strict=True))
        for i in range(len(FIRST)):
            for j in range(len(LAST)):
                k = SPORTS.index(sport_of(i, j))
                fire = AND_GAIN * 2 - 1.5 * AND_GAIN
                w.neuron(LOOKUP, 4 * i + j, {PREV_FIRST[i]: AND_GAIN, LAST_ID[j]: AND_GAIN},
                         -1.5 * AND_GAIN, ATTR[k], STRENGTH / fire)
        w.mover(EXTRACT, 0, IS_QUERY, IS_LAST, zip(ATTR, ANSWER, strict=True))
        for k, sport in enumerate(SPORTS):
            w.unembed(ANSWER[k], sport, 1.0)
        # distractors: active, changed by the subject, read by nothing
        w.mover(LOOKUP, 1, None, IS_FIRST, zip(FIRST_ID, JUNK_HEAD, strict=True))
        w.mover(EXTRACT, 1, IS_QUERY, IS_LAST, zip(LAST_ID, JUNK_HEAD, strict=True))
        for j in range(len(LAST)):
            w.neuron(0, j, {LAST_ID[j]: AND_GAIN}, -0.5 * AND_GAIN, JUNK_MLP[j], 0.1)
        for i in range(len(FIRST)):
            w.neuron(LOOKUP, 16 + i, {PREV_FIRST[i]: AND_GAIN}, -0.5 * AND_GAIN,
                     JUNK_MLP[4 + i], 0.1)
        for k in range(len(SPORTS)):
            w.neuron(EXTRACT, k, {ANSWER[k]: 4.0}, -10.0, JUNK_MLP[k], 0.1)
    return hf, planted_tokenizer()


def planted_model(family: str = "gpt2") -> tuple[Model, FactDataset, PlantedCircuit]:
    """A :class:`~factfind.model.Model` with a planted circuit, its 16 facts and the truth.

    Args:
        family: ``"gpt2"`` (sequential blocks, learned positions unused) or ``"gpt_neox"``
            (parallel attention and MLP, rotary embeddings on a quarter of each head).

    Returns:
        ``(model, facts, truth)``.

    Example::

        model, facts, truth = planted_model("gpt2")
        facts.known_by(model) == facts            # it knows every fact
    """
    from factfind.model import load_model

    hf, tok = planted_hf_model(family)
    model = load_model((hf, tok))
    model.name = f"factfind-planted-{family}"
    model.revision = "v1"
    return model, planted_facts(), planted_circuit()


__all__ = ["FAMILIES", "PlantedCircuit", "planted_circuit", "planted_facts", "planted_hf_model",
           "planted_model", "planted_tokenizer", "sport_of"]
