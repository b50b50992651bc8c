"""The organism's tokenizer: byte-level BPE trained on the world's name-free text.

A tokenizer decides what a "multi-token subject" is. Pythia splits ``Michael Jordan`` into two
tokens because the pair is rarer than its parts in its training text; a tokenizer trained on our
synthetic training text would instead see every name hundreds of times and give each one a
token of its own, and the organism would have no subject tokens to combine. So the BPE merges
are learned from the world *without its names* (templates, filler, attributes) plus the
syllables names are made of (see :func:`tokenizer_corpus`): every
template word and every attribute becomes one token, and a name part is split roughly at its
syllables (``" Kavel" -> " Ka" + "vel"``). The world generator then keeps only name parts of 1–2
tokens, so full names have 2–4.

The tokenizer follows GPT-NeoX conventions: byte-level pre-tokenisation with GPT-2's regex,
``<|endoftext|>`` (id 0) as BOS/EOS and ``<|padding|>`` (id 1) as padding. Two deliberate
differences from Pythia's: a space is prefixed to every text, so a subject at the start of a
prompt is tokenised like one in running text, and ``<|endoftext|>`` is *prepended* to every
encoded text (as Llama's tokenizer prepends ``<s>``), because every training document of the
organism starts with it; the model has seen almost no text without it.

Example::

    tok = train_tokenizer(world)
    tok(" Fact: Kavel Brotam plays the sport of").input_ids   # [0, ...]
    tok.save_pretrained("checkpoint")       # tokenizer.json + tokenizer_config.json
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from factfind.errors import ArgumentError

log = logging.getLogger(__name__)

BOS = "<|endoftext|>"
PAD = "<|padding|>"
SPECIAL_TOKENS = (BOS, PAD)


def tokenizer_corpus(world: dict[str, Any], *, attribute_repeats: int = 200) -> list[str]:
    """The text the organism's tokenizer is trained on: the world without its names.

    Every template, filler sentence and attribute appears, so all of their words become single
    tokens (attributes are repeated so they are merged early: one token each, by construction).
    Names do *not* appear; only the syllables they are built from do, as lines of their own, an
    initial syllable after a space (" Ka") and a final one bare ("vel"). A name part is then
    split roughly at its syllables, and a full name is 2–4 tokens rather than one.
    """
    lines: list[str] = []
    for rel in world["relations"].values():
        for t in rel["templates"] + rel["heldout_templates"]:
            lines.append(" " + t.replace("{}", "Someone"))
        lines.extend(" " + " ".join(rel["attributes"]) for _ in range(attribute_repeats))
    lines.extend(" " + s.replace("{}", "Someone") for s in world["filler"]["person"])
    lines.extend(" " + s for s in world["filler"]["generic"])
    lines.append(" " + " ".join(world["filler"]["modifiers"]))
    for _ in range(20):
        lines.extend(f" {s}" for s in world["syllables"]["initial"])
        lines.extend(world["syllables"]["final"])
    return lines


def train_tokenizer(world: dict[str, Any], *, vocab_size: int = 4096) -> Any:
    """Train the organism's BPE tokenizer on a world (its names excluded).

    Args:
        world: a world dict (only its relations, filler and syllables are read, so the result is
            the same for a world and its people-less skeleton).
        vocab_size: upper bound on the vocabulary; training stops earlier once every word of
            the corpus is a single token.

    Returns:
        A ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``) whose
        ``save_pretrained`` writes a ``tokenizer.json`` that ``AutoTokenizer`` loads offline.

    Raises:
        ValueError: if some attribute is not exactly one token after a space.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Train without the prefix space: final syllables ("vel") must be learnt bare. The corpus
    # puts the space explicitly in front of everything else.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore[reportAttributeAccessIssue]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(world), trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # pyright: ignore[reportAttributeAccessIssue]
    tok.decoder = decoders.ByteLevel()  # pyright: ignore[reportAttributeAccessIssue]
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([  # pyright: ignore[reportAttributeAccessIssue]
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        ),
    ])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, unk_token=BOS, pad_token=PAD,
        model_max_length=2048,
    )
    check_attributes(hf, world)
    log.info("trained tokenizer: %d tokens", len(hf))
    return hf


def attribute_token_ids(tokenizer: Any, world: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{relation: {attribute: token id of " " + attribute}}``.

    Raises:
        ValueError: if an attribute is not exactly one token after a space.
    """
    out: dict[str, dict[str, int]] = {}
    for rel, spec in world["relations"].items():
        out[rel] = {}
        for a in spec["attributes"]:
            ids = tokenizer.encode(" " + a, add_special_tokens=False)
            if len(ids) != 1:
                raise ArgumentError(f"attribute {a!r} of {rel} is {len(ids)} tokens, not one")
            out[rel][a] = ids[0]
    return out


def check_attributes(tokenizer: Any, world: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless every attribute is one token after a space."""
    attribute_token_ids(tokenizer, world)
