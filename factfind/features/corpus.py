"""The text a dictionary is trained on: a :class:`Corpus`, and the offline default.

A sparse dictionary learns the directions that the model's activations *on its training text*
use, so the corpus decides what features exist. The field trains on pretraining-scale web text
(hundreds of millions of tokens). factfind runs offline on a CPU, so its default corpus is small
and on-topic; it is built, reproducibly, from what ships in the repository's ``datasets/``:

* every shipped fact as a sentence: prompt + answer (CounterFact's prompts, their rephrasings
  and locality prompts with their true answers; ROME's known facts with the model-written
  continuation stored in the file; Fact Finding's athletes; the LRE relations' samples in each
  of their templates);
* continuations sampled from the model itself (``samples`` prompts, ``sample_tokens`` new tokens
  each, temperature 1, a fixed seed), so that some of the text is in the model's own
  distribution rather than templated. Sampling runs ``sample_tokens`` forwards per batch and is
  the slow part on a CPU; the samples are cached under ``$FACTFIND_CACHE/corpus``.

What it is **not**: a pretraining corpus. It is ~10^5 tokens of short factual sentences, so the
dictionaries trained on it cover the fact-recall distribution factfind studies and will miss
features of code, dialogue, long contexts and most of the web. :attr:`Corpus.provenance` says
which sources went in, how many texts and tokens, and the seed.

Other corpora: :func:`load_corpus` also reads text files (one text per non-empty line, or a
whole file per text with ``per_line=False``), JSONL files with a ``"text"`` field, and a Hugging
Face dataset by name where a hub is reachable.

Example::

    corpus = load_corpus(model=model)            # the default, with model samples
    train, held_out = corpus.split(0.05)
    corpus.provenance["tokens"]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factfind.errors import ArgumentError, EmptyInputError, NotFoundError

log = logging.getLogger(__name__)

#: the repository's shipped datasets (the default corpus's facts)
DATASETS = Path(__file__).resolve().parents[2] / "datasets"


@dataclass
class Corpus:
    """A list of texts with where they came from.

    Attributes:
        texts: the documents, in a fixed order.
        provenance: the recipe (sources and counts, seed, sampling settings), ``n_texts`` and,
            once counted with a tokenizer, ``tokens``.
    """

    texts: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = [t for t in self.texts if t.strip()]
        if not self.texts:
            raise EmptyInputError(f"an empty corpus (source {self.provenance.get('source')!r}):"
                                  " give at least one non-empty text")
        self.provenance.setdefault("n_texts", len(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """A hash of the texts (what caches of activations and dictionaries are keyed by)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def count_tokens(self, tokenizer: Any) -> int:
        """Count the corpus's tokens with ``tokenizer`` (recorded in ``provenance["tokens"]``)."""
        ids = tokenizer(self.texts, add_special_tokens=True)["input_ids"]
        n = int(sum(len(i) for i in ids))
        self.provenance["tokens"] = n
        return n

    def split(self, held_out: float = 0.05, *, seed: int = 0) -> tuple[Corpus, Corpus]:
        """(train, held out): each text goes to the held-out part when a hash of it and
        ``seed`` falls below ``held_out``, so the split is stable as texts are added."""
        if not 0 < held_out < 1:
            raise ArgumentError(f"held_out is a fraction in (0, 1), got {held_out}")
        train, test = [], []
        for t in self.texts:
            u = int(hashlib.sha256(f"{seed}|{t}".encode()).hexdigest()[:8], 16) / 16 ** 8
            (test if u < held_out else train).append(t)
        if not train or not test:
            raise EmptyInputError(f"split({held_out}) of {len(self)} texts leaves an empty part:"
                                  " use a larger corpus or another fraction")
        base = {k: v for k, v in self.provenance.items() if k not in ("n_texts", "tokens")}
        return (Corpus(train, {**base, "part": f"train ({1 - held_out:g})"}),
                Corpus(test, {**base, "part": f"held out ({held_out:g})"}))


# ---------------------------------------------------------------------- the default


def fact_sentences(root: Path = DATASETS) -> dict[str, list[str]]:
    """The shipped facts as sentences, by source (see the module docstring)."""
    out: dict[str, list[str]] = {}
    cf = root / "counterfact" / "counterfact-val.json"
    if cf.exists():
        rows = json.loads(cf.read_text())
        out["counterfact"] = [s for r in rows for s in (
            f"{r['prompt']} {r['ground_truth']}.",
            f"{r['rephrase_prompt']} {r['ground_truth']}.",
            f"{r['locality_prompt']} {r['locality_ground_truth']}.")]
    rk = root / "rome_known" / "known_1000.json"
    if rk.exists():
        out["rome_known"] = [f"{r['prompt']}{r['prediction']}"
                             if r['prediction'].lstrip().startswith(r['attribute'].split()[0])
                             else f"{r['prompt']} {r['attribute']}.{r['prediction']}"
                             for r in json.loads(rk.read_text())]
    ath = root / "fact_finding" / "athletes.json"
    if ath.exists():
        out["athletes"] = [r["template"].format(r["subject"]) + f" {r['attribute']}."
                           for r in json.loads(ath.read_text())]
    lre = root / "lre" / "factual"
    if lre.exists():
        sents = []
        for f in sorted(lre.glob("*.json")):
            rel = json.loads(f.read_text())
            for i, s in enumerate(rel["samples"]):
                templates = rel["prompt_templates"] + rel.get("prompt_templates_zs", [])
                t = templates[i % len(templates)]
                sents.append(t.format(s["subject"]) + f" {s['object']}.")
        out["lre"] = sents
    return out


def _sample_prompts(facts: dict[str, list[str]], n: int) -> list[str]:
    """The first few words of every ``len // n``-th fact sentence: prompts for the model's own
    continuations."""
    pool = [s for src in sorted(facts) for s in facts[src]]
    step = max(len(pool) // max(n, 1), 1)
    return [" ".join(s.split()[:4]) for s in pool[::step][:n]]


def model_samples(model: Any, prompts: Sequence[str], *, tokens: int = 32, seed: int = 0,
                  batch_size: int = 32, cache_dir: str | os.PathLike[str] | None = None,
                  progress: bool = True) -> list[str]:
    """Continuations of ``prompts`` sampled from ``model`` (temperature 1, ``tokens`` new tokens,
    ``seed``), cached under ``$FACTFIND_CACHE/corpus/<model, prompts, settings>.json``.

    Cost: ``tokens`` forwards with a key/value cache per batch of ``batch_size`` prompts."""
    import torch
    from tqdm.auto import tqdm

    from factfind.model.checkpoints import cache_root

    key = hashlib.sha256(json.dumps([model.fingerprint(), list(prompts), tokens, seed],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "corpus" / f"samples-{key}.json"
    if path.exists():
        try:
            return list(json.loads(path.read_text()))
        except (OSError, ValueError):
            log.warning("re-sampling: unreadable %s", path)
    tok = model.tokenizer
    out: list[str] = []
    g = torch.Generator().manual_seed(seed)
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress,
                  desc="sampling corpus", unit="batch", leave=False):
        chunk = list(prompts[i:i + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        past = None
        new: list[Any] = []
        cur, cur_mask = ids, mask
        with torch.no_grad():
            for _ in range(tokens):
                pos = (cur_mask.cumsum(-1) - 1).clamp(min=0)[:, -cur.shape[1]:]
                o = model.hf(input_ids=cur, attention_mask=cur_mask, position_ids=pos,
                             past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(o.logits[:, -1].float(), -1)
                nxt = torch.multinomial(probs, 1, generator=g)
                new.append(nxt)
                cur = nxt
                cur_mask = torch.cat([cur_mask, torch.ones_like(nxt)], 1)
        gen = torch.cat(new, 1)
        out += [p + tok.decode(t, skip_special_tokens=True) for p, t in zip(chunk, gen,
                                                                            strict=True)]
    from factfind.cache import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(out).encode())
    return out


def default_corpus(model: Any = None, *, samples: int = 64, sample_tokens: int = 32,
                   seed: int = 0, root: Path = DATASETS, progress: bool = True) -> Corpus:
    """The offline default: the shipped facts as sentences plus ``samples`` continuations
    sampled from ``model`` (none without a model). See the module docstring."""
    facts = fact_sentences(root)
    texts = [s for src in sorted(facts) for s in facts[src]]
    recipe: dict[str, Any] = {"source": "default",
                              "facts": {src: len(v) for src, v in sorted(facts.items())},
                              "seed": seed}
    if model is not None and samples > 0:
        prompts = _sample_prompts(facts, samples)
        gen = model_samples(model, prompts, tokens=sample_tokens, seed=seed, progress=progress)
        texts += gen
        recipe["model_samples"] = {"model": getattr(model, "name", None), "n": len(gen),
                                   "new_tokens": sample_tokens, "temperature": 1.0,
                                   "seed": seed}
    recipe["what"] = ("short factual sentences from the shipped datasets plus model samples; "
                      "not a pretraining corpus")
    corpus = Corpus(texts, recipe)
    if model is not None:
        corpus.count_tokens(model.tokenizer)
    return corpus


# ---------------------------------------------------------------------- loading


def load_corpus(source: str | os.PathLike[str] | Sequence[str] | None = None, *,
                model: Any = None, per_line: bool = True, text_field: str = "text",
                split: str = "train", limit: int | None = None, samples: int = 64,
                sample_tokens: int = 32, seed: int = 0, progress: bool = True) -> Corpus:
    """A corpus from a file, folder, list of texts or dataset name, or the offline default.

    Args:
        source: ``None`` for the default corpus (shipped facts + ``samples`` model samples);
            a ``.txt`` file (one text per non-empty line, or the whole file with
            ``per_line=False``), a ``.jsonl`` file (``text_field`` of each record), a folder of
            such files, a list of strings, or a Hugging Face dataset name (``split``, first
            ``limit`` rows; only where a hub is reachable).
        model: counts tokens with its tokenizer, and samples continuations for the default.
        seed: the sampling seed of the default corpus.

    Returns:
        A :class:`Corpus` whose ``provenance`` records the recipe and token count.

    Raises:
        EmptyInputError: no non-empty text. NotFoundError: a missing file or an unreachable
        dataset.

    Example::

        corpus = load_corpus("notes.jsonl", model=model)
    """
    if source is None:
        corpus = default_corpus(model, samples=samples, sample_tokens=sample_tokens, seed=seed,
                                progress=progress)
    elif isinstance(source, (str, os.PathLike)):
        corpus = _from_path_or_hub(source, per_line=per_line, text_field=text_field,
                                   split=split, limit=limit)
    else:
        corpus = Corpus([str(t) for t in source], {"source": "texts"})
    if limit is not None:
        corpus = Corpus(corpus.texts[:limit], {**corpus.provenance, "limit": limit})
    if model is not None and "tokens" not in corpus.provenance:
        corpus.count_tokens(model.tokenizer)
    return corpus


def _read_file(path: Path, per_line: bool, text_field: str) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ArgumentError(f"{path}:{i + 1} is not JSON (a .jsonl corpus holds one "
                                    "JSON object per line)") from None
            if not isinstance(rec, dict) or text_field not in rec:
                raise ArgumentError(f"{path}:{i + 1} has no {text_field!r} field (pass "
                                    "text_field=...)")
            texts.append(str(rec[text_field]))
        return texts
    text = path.read_text()
    return text.splitlines() if per_line else [text]


def _from_path_or_hub(source: str | os.PathLike[str], *, per_line: bool, text_field: str,
                      split: str, limit: int | None) -> Corpus:
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        texts = [t for f in files for t in _read_file(f, per_line, text_field)]
        return Corpus(texts, {"source": str(path), "files": len(files)})
    if path.exists():
        return Corpus(_read_file(path, per_line, text_field), {"source": str(path)})
    if path.suffix in (".txt", ".jsonl", ".json") or str(source).startswith(("/", ".", "~")):
        raise NotFoundError(f"no corpus file {str(source)!r}")
    try:
        import datasets  # type: ignore[import-untyped]

        ds = datasets.load_dataset(str(source), split=split if limit is None
                                   else f"{split}[:{limit}]")
        texts = [str(r[text_field]) for r in ds]  # type: ignore[index]
    except Exception as e:  # hub unreachable, unknown name, no such field
        raise NotFoundError(f"corpus {str(source)!r}: not a file here and not loadable from "
                            f"the Hugging Face hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); pass a "
                            ".txt/.jsonl file or None for the offline default") from None
    return Corpus(texts, {"source": f"hf:{source}", "split": split, "limit": limit})
