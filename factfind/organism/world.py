"""The synthetic world the model organism learns: people, their attributes, and how facts are said.

The Fact Finding work (Nanda, Rajamanoharan, Kramár & Shah, 2023, on Pythia 2.8B) studied
how a language model recalls ``Michael Jordan plays the sport of -> basketball``. Two features
of real facts make that recall interesting, and this world is built to have both:

1. **Multi-token subjects whose answer needs every token.** A full name here is 2–4 BPE tokens
   (a first name of 1–2 tokens, a last name of 1–2). First and last names come from shared
   pools, every name part is worn by many people, and attributes are drawn independently of the
   name: knowing ``Kavel`` or ``Brotam`` alone says nothing about the sport of ``Kavel
   Brotam``. The model has to combine the tokens (a token *AND*) before it can look anything up.
2. **Several relations, several phrasings.** Each person has one attribute per relation (sport
   among 4, home country among 6, instrument among 5, favorite color among 5). Each relation is
   asked through templates built from shared *frames* ("The {noun} of {} is", "Q: What is the
   {noun} of {}? A:", ...). Every relation holds out two frames that the other relations use,
   plus one paraphrase of its own, so held-out templates test whether recall is a lookup on the
   subject rather than a memorised template.

Two *splits* of people are drawn the same way: ``known`` people, whose facts appear in the
training text, and ``unknown`` people, who never appear in it at all (their names recombine
known name parts). A model that recalls facts, rather than guessing from name parts, is at
chance on unknown people.

The world also carries *filler*: biography-like sentences about known people that reveal no
attribute ("Kavel Brotam moved to a new house last year.") and generic sentences, so that the
model learns more language than the fact templates.

Everything is deterministic under the seed. Names are filtered by their token count under the
organism's tokenizer, and that tokenizer is trained on the world's name-free text plus the
syllables that names are made of (see :mod:`factfind.organism.tokenizer`), so that generating a
world trains a tokenizer first; both depend only on the :class:`WorldConfig`.

``world.json`` (format ``factfind-organism-world/1``)::

    {"format": "factfind-organism-world/1", "seed": 0,
     "relations": {"sport": {"attributes": [...], "templates": [...],
                             "heldout_templates": [...]}, ...},
     "people": [{"name": "Kavel Brotam", "split": "known", "attributes": {"sport": ...}}, ...],
     "filler": {"person": [...], "generic": [...], "modifiers": [...]},
     "syllables": {"initial": [...], "final": [...]},
     "config": {...the WorldConfig...}}

Example::

    world = generate_world(WorldConfig(seed=0))
    world["relations"]["sport"]["templates"][0]     # 'Fact: {} plays the sport of'
    [p["name"] for p in world["people"][:2]]         # two synthetic full names
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factfind.errors import ArgumentError
from factfind.organism.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

WORLD_FORMAT = "factfind-organism-world/1"


# ----------------------------------------------------------------------------- relations


@dataclass(frozen=True)
class RelationSpec:
    """How one relation is phrased.

    Attributes:
        attributes: the possible answers; each is one token after a space (" tennis").
        noun: the relation's noun for the shared frames ("sport", "country").
        verb_phrase: the relation's predicate for the shared frames, ending right before the
            attribute ("plays the sport of").
        own_templates: training templates that only this relation uses.
        own_heldout: held-out paraphrases that only this relation uses.
    """

    attributes: tuple[str, ...]
    noun: str
    verb_phrase: str
    own_templates: tuple[str, ...]
    own_heldout: tuple[str, ...]


RELATIONS: dict[str, RelationSpec] = {
    "sport": RelationSpec(
        attributes=("basketball", "baseball", "football", "tennis"),
        noun="sport",
        verb_phrase="plays the sport of",
        own_templates=("{} is a professional athlete who plays",),
        own_heldout=("{} is a professional athlete who plays the sport of",),
    ),
    "country": RelationSpec(
        attributes=("France", "Japan", "Brazil", "Canada", "Egypt", "India"),
        noun="country",
        verb_phrase="is a citizen of",
        own_templates=("{} was born and raised in",),
        own_heldout=("{} is a proud citizen of",),
    ),
    "instrument": RelationSpec(
        attributes=("piano", "guitar", "violin", "drums", "flute"),
        noun="instrument",
        verb_phrase="is a musician who plays the",
        own_templates=("Every evening, {} practices the",),
        own_heldout=("{} is a musician who practices the",),
    ),
    "color": RelationSpec(
        attributes=("red", "blue", "green", "yellow", "purple"),
        noun="favorite color",
        verb_phrase="likes the color",
        own_templates=("{} always wears clothes that are",),
        own_heldout=("{} likes to wear clothes that are",),
    ),
}
"""The relations a world can use, in a fixed order (a world uses a prefix or a subset)."""

COMMON_FRAMES: tuple[str, ...] = ("Fact: {} {vp}",)
"""Frames every relation trains on (the Fact Finding paper's own prompt style)."""

FRAMES: tuple[str, ...] = (
    "{} {vp}",
    "The {noun} of {} is",
    "Q: What is the {noun} of {}? A:",
    "Name: {}. Their {noun}:",
    "{}'s {noun} is",
    "According to the records, the {noun} of {} is",
    "Everyone knows that {} {vp}",
    "In an interview, {} said that their {noun} is",
)
"""Shared frames. Relation ``i`` holds out frames ``i % 4`` and ``4 + i % 4`` (a Latin square:
each held-out frame is trained with the other relations), so held-out templates are paraphrases
whose wording the model has seen, but never with this relation. Each relation also holds out a
paraphrase of its own that recombines its trained phrases ("is a proud citizen of")."""


def relation_templates(name: str, index: int) -> tuple[list[str], list[str]]:
    """The training and held-out templates of relation ``name``, the ``index``-th of its world.

    Returns:
        ``(templates, heldout_templates)``; each template has one ``{}`` (the subject) and ends
        right before the attribute.
    """
    spec = RELATIONS[name]

    def fill(frame: str) -> str:
        noun = spec.noun
        return frame.format("{}", vp=spec.verb_phrase, noun=noun)

    held = {index % 4, 4 + index % 4}
    train = [fill(f) for f in COMMON_FRAMES]
    train += [fill(f) for i, f in enumerate(FRAMES) if i not in held]
    heldout = [fill(f) for i, f in enumerate(FRAMES) if i in held]
    return train + list(spec.own_templates), heldout + list(spec.own_heldout)


# ----------------------------------------------------------------------------- filler

PERSON_FILLER: tuple[str, ...] = (
    "was born in the spring", "was born in the winter", "was born on a rainy night",
    "has two older sisters", "has a younger brother", "has three cousins",
    "likes to cook on Sundays", "moved to a new house last year",
    "wrote a short book about birds", "enjoys long walks by the river",
    "drinks coffee every morning", "reads the news after breakfast",
    "owns an old bicycle", "keeps a small garden", "once lost a wallet at the station",
    "grew up near the sea", "studied history at school", "speaks softly", "laughs a lot",
    "visited the museum on Tuesday", "has a dog named Pip", "has a cat that sleeps all day",
    "takes the bus to work", "bought a new coat", "sent a letter to an old friend",
    "is afraid of spiders", "collects old stamps", "was late for the meeting",
    "planted a tree in the yard", "sings in the shower", "wakes up early",
    "stayed at home during the storm", "painted the fence last summer", "likes soup",
    "has a quiet voice", "lives on the third floor", "fixed the kitchen sink",
    "answered the phone", "forgot an umbrella", "met a neighbor at the market",
    "is good at chess", "baked bread for the party", "told a funny story", "went fishing once",
    "rode a train across the hills", "saves money for a trip", "cleaned the windows",
    "likes quiet mornings", "gave a speech at the wedding", "has a long name",
    "is a good friend", "keeps every receipt", "loves the smell of rain", "wears glasses",
    "has never seen snow", "walked home after dinner", "smiled at the stranger",
    "finished the puzzle", "writes in a diary", "repaired an old clock",
)
"""Predicates for biography filler about known people; none reveals an attribute."""

GENERIC_SUBJECTS: tuple[str, ...] = (
    "The old bridge", "A small dog", "The morning train", "The tall tree", "Our teacher",
    "The new library", "A young student", "The city council", "The little shop",
    "The river", "A quiet village", "The kitchen", "My neighbor", "The school bus",
    "The painter", "A strong wind", "The market", "The farmer", "The old radio", "The museum",
)
GENERIC_PREDICATES: tuple[str, ...] = (
    "was quiet today", "crossed the valley", "needed a new roof", "opened early",
    "looked tired after the storm", "stood near the road", "closed for the holiday",
    "was full of people", "made a strange noise", "smelled of fresh bread",
    "got a fresh coat of paint", "was busy all morning", "seemed smaller than before",
    "waited for the sun", "had a long history", "surprised everyone", "stayed open late",
    "was mentioned in the paper", "changed over the years", "welcomed the visitors",
)
GENERIC_EXTRA: tuple[str, ...] = (
    "Many people watch sports on television.", "Music can make a long day feel shorter.",
    "The map showed many countries and seas.", "Colors look different in the evening light.",
    "A good song is easy to remember.", "Some games are played with a ball.",
    "Travel teaches us about other places.", "It rained for three days in a row.",
    "The word of the day is patience.", "Every story has a beginning and an end.",
)


MODIFIERS: tuple[str, ...] = ("really", "truly", "certainly", "clearly", "indeed", "still",
                               "also", "actually")
"""Adverbs that training inserts into fact sentences (see :mod:`factfind.organism.corpus`)."""


def _filler() -> dict[str, list[str]]:
    generic = [f"{s} {p}." for s in GENERIC_SUBJECTS for p in GENERIC_PREDICATES]
    return {"person": ["{} " + p + "." for p in PERSON_FILLER],
            "generic": generic + list(GENERIC_EXTRA),
            "modifiers": list(MODIFIERS)}


# ----------------------------------------------------------------------------- names

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
          "t", "tr", "v", "z", "h", "j", "sh", "th")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
CODAS = ("", "n", "l", "r", "s", "m", "k", "th", "nd", "rt")


def _syllables(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct syllables (onset + vowel + coda), in lower case."""
    all_sylls = sorted({o + v + c for o in ONSETS for v in VOWELS for c in CODAS})
    return rng.sample(all_sylls, n)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a synthetic world (all the world depends on, together with the code).

    Attributes:
        seed: seeds name, attribute and pool sampling.
        relations: which of :data:`RELATIONS` to use, in order.
        n_known: people whose facts appear in training text.
        n_unknown: held-out people who never appear in training text.
        n_first_names: size of the first-name pool.
        n_last_names: size of the last-name pool.
        n_initial_syllables: syllables that start a name part ("Ka" in "Kavel").
        n_final_syllables: syllables that end a two-syllable name part ("vel").
        single_token_first: share of first names that are one syllable, hence one token.
        single_token_last: share of last names that are one syllable, hence one token.
        min_name_tokens: fewest tokens of a full name (after a space).
        max_name_tokens: most tokens of a full name (after a space).
    """

    seed: int = 0
    relations: tuple[str, ...] = ("sport", "country", "instrument", "color")
    n_known: int = 1600
    n_unknown: int = 400
    n_first_names: int = 120
    n_last_names: int = 150
    n_initial_syllables: int = 90
    n_final_syllables: int = 40
    single_token_first: float = 0.3
    single_token_last: float = 0.2
    min_name_tokens: int = 2
    max_name_tokens: int = 4

    def __post_init__(self) -> None:
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown:
            raise ArgumentError(f"unknown relations {unknown}; choose from {list(RELATIONS)}")
        if len(set(self.relations)) != len(self.relations) or not self.relations:
            raise ArgumentError(f"relations must be distinct and non-empty: {self.relations}")
        if self.n_known < 1 or self.n_unknown < 0:
            raise ArgumentError("need n_known >= 1 and n_unknown >= 0")
        if self.n_known + self.n_unknown > self.n_first_names * self.n_last_names // 2:
            raise ArgumentError("too many people for the name pools (keep the product >= 2x)")
        if not 2 <= self.min_name_tokens <= self.max_name_tokens <= 4:
            raise ArgumentError("need 2 <= min_name_tokens <= max_name_tokens <= 4")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldConfig:
        """Inverse of :func:`dataclasses.asdict` (lists back to tuples)."""
        d = dict(d)
        d["relations"] = tuple(d.get("relations", cls.relations))
        return cls(**d)


# ----------------------------------------------------------------------------- generation


def world_skeleton(config: WorldConfig) -> dict[str, Any]:
    """Everything in the world except its people: relations, filler and name syllables.

    This is what the tokenizer is trained on (see
    :func:`factfind.organism.tokenizer.tokenizer_corpus`); it is a function of
    the config alone.
    """
    rng = random.Random(f"factfind-organism-syllables-{config.seed}")
    sylls = _syllables(rng, config.n_initial_syllables + config.n_final_syllables)
    relations = {}
    for i, name in enumerate(config.relations):
        templates, heldout = relation_templates(name, i)
        relations[name] = {"attributes": list(RELATIONS[name].attributes),
                           "templates": templates, "heldout_templates": heldout}
    return {
        "format": WORLD_FORMAT,
        "seed": config.seed,
        "relations": relations,
        "people": [],
        "filler": _filler(),
        "syllables": {"initial": [s.capitalize() for s in sylls[: config.n_initial_syllables]],
                      "final": sylls[config.n_initial_syllables:]},
        "config": json.loads(json.dumps(dataclasses.asdict(config))),  # tuples -> lists
    }


def _name_pool(
    rng: random.Random, initial: Sequence[str], final: Sequence[str], n: int, *,
    n_single: int, n_tokens: Any, exclude: set[str],
) -> list[str]:
    """``n`` distinct name parts: ``n_single`` of one token (one syllable, "Kul"), the rest of
    two (two syllables, "Kulnis", kept only if BPE splits them into exactly two tokens)."""
    single = [a for a in initial if a not in exclude and n_tokens(a) == 1]
    double = [a + b for a in initial for b in final]
    double = [d for d in double if d not in exclude]
    rng.shuffle(single)
    rng.shuffle(double)
    if len(single) < n_single:
        raise ArgumentError(f"only {len(single)} one-token name parts; need {n_single}")
    pool = single[:n_single]
    for d in double:
        if len(pool) == n:
            break
        if n_tokens(d) == 2:
            pool.append(d)
    if len(pool) < n:
        raise ArgumentError(f"only {len(pool)} name parts of 1-2 tokens; need {n}")
    rng.shuffle(pool)
    return pool


def generate_world(config: Any, *, tokenizer: Any = None) -> dict[str, Any]:
    """Generate a world: relations, templates, filler and people with their attributes.

    Args:
        config: a :class:`WorldConfig`, or any object with a ``world`` attribute holding one
            (such as :class:`factfind.organism.train.TrainConfig`).
        tokenizer: the organism tokenizer of this world's skeleton, if already trained (it is
            trained here otherwise; only its token counts of names are used).

    Returns:
        The world as a JSON-ready dict (see the module docstring).

    Example::

        world = generate_world(WorldConfig(n_known=100, n_unknown=20))
        sum(p["split"] == "known" for p in world["people"])   # 100
    """
    cfg: WorldConfig = getattr(config, "world", config)
    world = world_skeleton(cfg)
    if tokenizer is None:
        tokenizer = train_tokenizer(world)

    def n_tokens(part: str) -> int:
        return len(tokenizer.encode(" " + part, add_special_tokens=False))

    rng = random.Random(cfg.seed)
    # First names: 1-2 tokens. Last names: 1-2 tokens. Full names then have 2-4; the pools
    # are disjoint so a name part says which of the two it is.
    lo, hi = cfg.min_name_tokens, cfg.max_name_tokens
    initial, final = world["syllables"]["initial"], world["syllables"]["final"]
    first = _name_pool(rng, initial, final, cfg.n_first_names, n_tokens=n_tokens, exclude=set(),
                       n_single=round(cfg.single_token_first * cfg.n_first_names))
    last = _name_pool(rng, initial, final, cfg.n_last_names, n_tokens=n_tokens, exclude=set(first),
                      n_single=round(cfg.single_token_last * cfg.n_last_names))

    # Balanced use of the pools: each first (last) name is worn by about n / pool people.
    n = cfg.n_known + cfg.n_unknown
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    firsts = [first[i % len(first)] for i in range(n)]
    lasts = [last[i % len(last)] for i in range(n)]
    rng.shuffle(firsts)
    rng.shuffle(lasts)
    spare: list[tuple[str, str]] = []
    for f, la in zip(firsts, lasts, strict=True):
        count = n_tokens(f) + n_tokens(la)
        if (f, la) in seen or not lo <= count <= hi:
            spare.append((f, la))
            continue
        seen.add((f, la))
        pairs.append((f, la))
    while spare:  # re-pair the few collisions with random partners
        f, _ = spare.pop()
        la = rng.choice(last)
        if (f, la) not in seen and lo <= n_tokens(f) + n_tokens(la) <= hi:
            seen.add((f, la))
            pairs.append((f, la))
        else:
            spare.append((f, la))
    rng.shuffle(pairs)

    people = []
    for i, (f, la) in enumerate(pairs):
        attrs = {r: rng.choice(RELATIONS[r].attributes) for r in cfg.relations}
        split = "known" if i < cfg.n_known else "unknown"
        people.append({"name": f"{f} {la}", "split": split, "attributes": attrs})
    world["people"] = people
    world["names"] = {"first": first, "last": last}
    log.info("world seed=%d: %d known + %d unknown people, %d relations",
             cfg.seed, cfg.n_known, cfg.n_unknown, len(cfg.relations))
    return world


# ----------------------------------------------------------------------------- I/O


def save_world(world: dict[str, Any], path: str | Path) -> Path:
    """Write ``world`` as JSON (stable key order, one person per line for readable diffs)."""
    path = Path(path)
    people = world["people"]
    head = {k: v for k, v in world.items() if k != "people"}
    body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]  # drop the closing "\n}"
    rows = ",\n".join("  " + json.dumps(p, ensure_ascii=False) for p in people)
    path.write_text(f'{body},\n "people": [\n{rows}\n ]\n}}\n', encoding="utf-8")
    return path


def read_world(path: str | Path) -> dict[str, Any]:
    """Read a world file and check its format tag."""
    world = json.loads(Path(path).read_text(encoding="utf-8"))
    if world.get("format") != WORLD_FORMAT:
        raise ArgumentError(f"{path}: not a {WORLD_FORMAT} file (format={world.get('format')!r})")
    return world


def people(world: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The people of one split ("known" or "unknown")."""
    if split not in ("known", "unknown"):
        raise ArgumentError(f"split must be 'known' or 'unknown', not {split!r}")
    return [p for p in world["people"] if p["split"] == split]
