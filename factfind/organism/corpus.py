"""Training text for the organism: fact sentences and filler, packed into token rows.

Facts are memorised only by being seen, and a small model on two CPU cores sees few tokens, so
the text is dense in facts and the loss is weighted toward them:

* **Epochs over facts.** Each epoch visits every (known person, relation) pair once, in a fresh
  random order, each time in a training template drawn at random. So every fact is seen equally
  often, in many phrasings, and the model must store it independently of the phrasing.
* **Subjects at varying distances.** A share of fact sentences put a relative clause after the
  subject ("Kul Marnis, who keeps a small garden, is a citizen of France."). Without them, each
  template puts the subject at a fixed offset from the final token, and the model learns to
  fetch the attribute from that offset; with them, it has to find the subject by content, which
  is what lets recall survive paraphrases with a different layout.
* **Mixed documents.** Rows of ``seq_len`` tokens are packed with consecutive sentences: facts
  about different people and relations, interleaved with filler (biography sentences about known
  people that reveal no attribute, and generic sentences). A row starts with ``<|endoftext|>``
  (except a small share, so that prompts without it still work). No (person, relation) pair
  occurs twice in an epoch, so a fact can never be copied from earlier in the row: it has to be
  recalled from the weights.
* **Inserted modifiers.** A share of fact sentences get an adverb ("really", "truly", ...)
  inserted between two words after the subject ("Kul Marnis is truly a citizen of France."), so
  the final token cannot rely on fixed offsets to the relation words either.
* **Weighted loss.** The attribute token of a fact sentence has weight ``attr_weight``; every
  other token (templates, names, filler) keeps a smaller ``lm_weight``, so the model still
  learns the language, the names and the templates.

Sentences are encoded once per epoch in one batch call (not per row), and every random
choice comes from one seeded ``numpy`` generator, so the stream of batches is a function of the
world, the tokenizer and the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from factfind.errors import ArgumentError
from factfind.organism.tokenizer import PAD, attribute_token_ids
from factfind.organism.world import people as split_people

log = logging.getLogger(__name__)


def insert_modifier(template: str, modifier: str, where: float) -> str:
    """Insert ``modifier`` before one of the words after the subject slot.

    ``where`` in ``[0, 1)`` picks the word; words that start a sentence or a field (after
    ``.``, ``?`` or ``:``) are skipped. Templates with no such word come back unchanged; the
    template's last word stays last, right before the attribute.

    Example::

        insert_modifier("{} is a citizen of", "truly", 0.4)   # '{} is truly a citizen of'
    """
    pre, post = template.split("{}")
    spaces = [i for i, c in enumerate(post) if c == " " and (i == 0 or post[i - 1] not in ".?:")]
    if not spaces:
        return template
    i = spaces[int(where * len(spaces))]
    return pre + "{}" + post[:i] + " " + modifier + post[i:]


@dataclass(frozen=True)
class Batch:
    """One training batch.

    Attributes:
        input_ids: ``[batch pos]`` token ids, right-padded with ``<|padding|>``.
        weights: ``[batch pos]`` loss weight of predicting token ``pos`` (from ``pos - 1``);
            zero on padding and on the first token.
        is_attribute: ``[batch pos]`` True where the token is the attribute of a fact.
    """

    input_ids: Tensor
    weights: Tensor
    is_attribute: Tensor


class FactCorpus:
    """Sentences of a world, encoded once; :meth:`batches` packs them into rows.

    Args:
        world: the world (only its known people are used).
        tokenizer: the organism tokenizer.
        n_filler_person: how many biography filler sentences to pre-encode (person x predicate
            pairs drawn at random).
        seed: seeds the filler pool and the batch stream.
    """

    def __init__(self, world: dict[str, Any], tokenizer: Any, *, n_filler_person: int = 20000,
                 seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.convert_tokens_to_ids(PAD)
        self.known = split_people(world, "known")
        self.relations = list(world["relations"])
        self.templates = [world["relations"][r]["templates"] for r in self.relations]
        self.attr_ids = attribute_token_ids(tokenizer, world)
        self._encode = tokenizer._tokenizer.encode_batch  # raw `tokenizers`: fast, no BOS
        # Relative clauses from the biography filler: "{}, who keeps a small garden, is ..."
        self.clauses = [", who " + f.removeprefix("{} ").removesuffix(".") + ","
                        for f in world["filler"]["person"]]
        self.modifiers = list(world["filler"]["modifiers"])

        person_filler = world["filler"]["person"]
        who = self.rng.integers(len(self.known), size=n_filler_person)
        what = self.rng.integers(len(person_filler), size=n_filler_person)
        texts = [person_filler[j].format(self.known[i]["name"])
                 for i, j in zip(who, what, strict=True)]
        self.filler_person = [np.asarray(e.ids) for e in
                              self._encode(texts, add_special_tokens=False)]
        self.filler_generic = [np.asarray(e.ids) for e in
                               self._encode(world["filler"]["generic"], add_special_tokens=False)]
        log.info("corpus: %d facts, %.1f templates per relation, %d + %d filler sentences",
                 self.n_facts, np.mean([len(t) for t in self.templates]),
                 len(self.filler_person), len(self.filler_generic))

    @property
    def n_facts(self) -> int:
        """Number of (known person, relation) pairs: the facts of one epoch."""
        return len(self.known) * len(self.relations)

    def epoch(self, *, p_clause: float, p_insert: float) -> list[tuple[np.ndarray, int]]:
        """Every fact once, in random order and random training templates, encoded.

        With probability ``p_clause`` a relative clause follows the subject where the template
        allows it (``"{} is"`` but not ``"{}'s"``): ``"Kul Marnis, who keeps a small garden, is
        a citizen of France."``. Clauses vary the distance between the subject and the final
        token, so the model cannot find the subject by its position relative to the end of a
        template; it has to find it by content, as the heads that move attributes do in Pythia.
        With probability ``p_insert`` an adverb is inserted before a word after the subject
        (not before the last word): ``"Kul Marnis is truly a citizen of France."``.

        Returns:
            ``(ids, index of the attribute token)`` per fact sentence.
        """
        rng = self.rng
        n_rel = len(self.relations)
        order = rng.permutation(self.n_facts)
        pick = rng.random(self.n_facts)
        clause = rng.random(self.n_facts) < p_clause
        which = rng.integers(len(self.clauses), size=self.n_facts)
        insert = rng.random(self.n_facts) < p_insert
        where = rng.random(self.n_facts)
        modifier = rng.integers(len(self.modifiers), size=self.n_facts)
        texts, answers = [], []
        for k, fact in enumerate(order):
            person, r = divmod(int(fact), n_rel)
            templates = self.templates[r]
            template = templates[int(pick[k] * len(templates))]
            p = self.known[person]
            subject = p["name"]
            if clause[k] and "{} " in template:
                subject += self.clauses[which[k]]
            if insert[k]:
                template = insert_modifier(template, self.modifiers[modifier[k]], where[k])
            attr = p["attributes"][self.relations[r]]
            texts.append(template.format(subject) + " " + attr + ".")
            answers.append(self.attr_ids[self.relations[r]][attr])
        out = []
        for enc, want in zip(self._encode(texts, add_special_tokens=False), answers,
                             strict=True):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids[-2] != want:  # the attribute is the token before the final "."
                raise ArgumentError(f"attribute not where expected in {enc.tokens}")
            out.append((ids, len(ids) - 2))
        return out

    def sentences(self, *, p_filler: float, p_generic: float, p_clause: float,
                  p_insert: float) -> Iterator[tuple[np.ndarray, int]]:
        """An endless stream of ``(ids, attribute index or -1)``, epoch after epoch of facts.

        Before each fact, a filler sentence is inserted with probability ``p_filler``; it is
        generic with probability ``p_generic`` and about a known person otherwise.
        """
        rng = self.rng
        while True:
            facts = self.epoch(p_clause=p_clause, p_insert=p_insert)
            fill = rng.random(len(facts)) < p_filler
            generic = rng.random(len(facts)) < p_generic
            for k, fact in enumerate(facts):
                if fill[k]:
                    pool = self.filler_generic if generic[k] else self.filler_person
                    yield pool[rng.integers(len(pool))], -1
                yield fact

    def batches(
        self, *, batch_size: int, seq_len: int, p_filler: float, p_generic: float,
        p_clause: float, p_insert: float, p_no_bos: float, attr_weight: float,
        lm_weight: float,
    ) -> Iterator[Batch]:
        """An endless stream of packed, weighted batches (see the module docstring)."""
        stream = self.sentences(p_filler=p_filler, p_generic=p_generic, p_clause=p_clause,
                                p_insert=p_insert)
        pending: tuple[np.ndarray, int] | None = None
        while True:
            ids = np.full((batch_size, seq_len), self.pad_id, dtype=np.int64)
            w = np.zeros((batch_size, seq_len), dtype=np.float32)
            is_attr = np.zeros((batch_size, seq_len), dtype=bool)
            for b in range(batch_size):
                n = 0
                if self.rng.random() >= p_no_bos:
                    ids[b, 0] = self.bos_id
                    n = 1
                while True:
                    sent, attr = pending if pending is not None else next(stream)
                    if len(sent) >= seq_len:
                        raise ArgumentError(f"a sentence of {len(sent)} tokens > seq_len={seq_len}")
                    if n + len(sent) > seq_len:
                        pending = (sent, attr)
                        break
                    pending = None
                    ids[b, n:n + len(sent)] = sent
                    w[b, n:n + len(sent)] = lm_weight
                    if attr >= 0:
                        w[b, n + attr] = attr_weight
                        is_attr[b, n + attr] = True
                    n += len(sent)
                w[b, 0] = 0.0  # nothing predicts the first token
            yield Batch(torch.from_numpy(ids), torch.from_numpy(w), torch.from_numpy(is_attr))
