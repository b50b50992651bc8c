"""Real tokenizers for the fact-data tests, trained locally in about a second (no hub access).

* ``gpt2_like()``: byte-level BPE exactly as GPT-2 is built (GPT-2's pre-tokenization regex,
  leading-space tokens such as ``" Jordan"``, punctuation split off, no BOS);
* ``gpt2_like(trim_offsets=True)``: the same with RoBERTa-style trimmed offsets (spaces dropped
  from a token's character span);
* ``llama_like()``: SentencePiece-style BPE (``"▁"`` word-boundary marker, no punctuation
  split, so ``"▁Jordan,"`` can be one token) with byte fallback and a BOS token, like Llama.

Import the builders from test modules (``from conftest_data import gpt2_like``); they are cached,
so every test shares one instance of each.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SENTENCES = [
    "Fact: Michael Jordan plays the sport of basketball",
    "Fact: Tiger Woods plays the sport of golf",
    "Fact: Serena Williams plays the sport of tennis",
    "Fact: Lionel Messi plays the sport of football",
    "Michael Jordan, also called Jordan, plays the sport of basketball",
    "O'Neil's team, Jordan, played the sport of basketball",
    "Zoë Ångström lives in Stockholm, Sweden",
    "北京是中国的首都。",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "New York is in the United States. New Delhi is in India.",
    "Beats Music is owned by Apple. Vinson Massif is located in Antarctica.",
]


def _train(model: models.Model, pre: pre_tokenizers.PreTokenizer, vocab: int,
           specials: list[str], alphabet: list[str]) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(SENTENCES * 20, trainer)
    return tok


@functools.cache
def gpt2_like(trim_offsets: bool = False) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (``<|endoftext|>`` is BOS, EOS and pad, none added)."""
    tok = _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False), 600,
                 ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@functools.cache
def llama_like() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE with byte fallback; prepends ``<s>``; no pad token."""
    tok = _train(models.BPE(unk_token="<unk>", byte_fallback=True),
                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), 500,
                 ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]], [])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                     decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tokens(tok: PreTrainedTokenizerFast, text: str) -> list[str]:
    """``text`` as a list of decoded token strings (special tokens included)."""
    return [tok.decode([i]) for i in tok(text)["input_ids"]]


# A small sports fact set (real subjects and nonce ones) shared by conftest and test modules:
# import it from here (``from conftest_data import fact_records``), not from ``conftest``,
# which names a different module when tests/organism/conftest.py was imported first.
SUBJECTS = {
    "Michael Jordan": "basketball", "Tiger Woods": "golf", "Serena Williams": "tennis",
    "Lionel Messi": "football", "Vinson Massif": "golf", "Beats Music": "tennis",
    "Eiffel Tower": "basketball", "Zoë Ångström": "football", "Tiger Jordan": "tennis",
    "Michael Woods": "football", "Serena Messi": "basketball", "Lionel Williams": "golf",
}


def fact_records():
    return [{"subject": s, "relation": "sport", "template": "Fact: {} plays the sport of",
             "attribute": a} for s, a in SUBJECTS.items()]
