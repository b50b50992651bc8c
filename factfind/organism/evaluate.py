"""Does the organism know its world? Top-1 recall per relation and template, and chance tests.

A fact is *known* when the model's most likely next token after the prompt (a template filled
with the person's name, ending right before the attribute) is the attribute's token. Three
readings of that number tell the story of a fact-recalling model:

* **known people, training templates**: memorisation; should be (nearly) perfect.
* **known people, held-out templates**: is the recalled fact tied to the subject, or to the
  template? Paraphrases never seen with this relation should work almost as well.
* **unknown people** (never in training text, names recombining known name parts): a model that
  looks facts up by the full name has nothing to find and is at *chance*. Because an unknown
  person's attributes are drawn uniformly and independently of everything the model sees, any
  prediction is right with probability exactly ``1 / n_attributes``, so the number of hits is
  ``Binomial(n, 1/k)`` under "no knowledge", and :func:`evaluate` reports that test's one-sided
  p-value. ``in_domain`` (the share of top-1 predictions that are some attribute of the
  relation) shows the model still knows what *kind* of answer is asked.

Prompts are run without padding, batched by equal token length, so every prompt is computed
exactly as it would be alone.

Example::

    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)
    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    evaluate(model, tok, load_world(), split="known", templates="heldout")
    #   relation  template                     n  accuracy  n_correct  in_domain  chance  p_value
    #   sport     {} plays the sport of     1600     0.999  ...
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from factfind.errors import ArgumentError
from factfind.organism.tokenizer import attribute_token_ids
from factfind.organism.world import people as split_people

Split = Literal["known", "unknown"]
TemplateSet = Literal["train", "heldout"]


def prompts(
    world: dict[str, Any], *, split: Split = "known", templates: TemplateSet = "train",
    max_people: int | None = None,
) -> pd.DataFrame:
    """One row per (relation, template, person): the prompt text and its answer.

    Columns: relation, template, template_index, person, prompt, attribute.
    """
    if templates not in ("train", "heldout"):
        raise ArgumentError(f"templates must be 'train' or 'heldout', not {templates!r}")
    key = "templates" if templates == "train" else "heldout_templates"
    who = split_people(world, split)[:max_people]
    rows = []
    for rel, spec in world["relations"].items():
        for ti, template in enumerate(spec[key]):
            for p in who:
                rows.append((rel, template, ti, p["name"], template.format(p["name"]),
                             p["attributes"][rel]))
    return pd.DataFrame(rows, columns=["relation", "template", "template_index", "person",
                                       "prompt", "attribute"])


@torch.inference_mode()
def predict(
    model: Any, tokenizer: Any, world: dict[str, Any], *, split: Split = "known",
    templates: TemplateSet = "train", max_people: int | None = None, batch_size: int = 512,
    bos: bool = True,
) -> pd.DataFrame:
    """Top-1 predictions per prompt: :func:`prompts` plus ``predicted`` (token string),
    ``correct`` and ``in_domain`` (the prediction is one of the relation's attributes).
    ``bos=False`` removes the ``<|endoftext|>`` that the organism's tokenizer prepends."""
    df = prompts(world, split=split, templates=templates, max_people=max_people)
    ids = tokenizer(df["prompt"].tolist()).input_ids  # with the tokenizer's BOS
    if not bos:
        ids = [x[1:] if x and x[0] == tokenizer.bos_token_id else x for x in ids]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(ids):
        by_len[len(x)].append(i)
    device = next(model.parameters()).device
    top = np.zeros(len(df), dtype=np.int64)
    was_training = model.training
    model.eval()
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            x = torch.tensor([ids[i] for i in chunk], device=device)  # [batch pos]
            logits = model(input_ids=x, logits_to_keep=1).logits[:, -1]  # [batch d_vocab]
            top[chunk] = logits.argmax(-1).cpu().numpy()
    model.train(was_training)
    attr_ids = attribute_token_ids(tokenizer, world)
    answer = np.array([attr_ids[r][a] for r, a in zip(df["relation"], df["attribute"],
                                                       strict=True)])
    domain = {r: set(v.values()) for r, v in attr_ids.items()}
    df["predicted"] = tokenizer.convert_ids_to_tokens(top.tolist())
    df["correct"] = top == answer
    df["in_domain"] = [int(t) in domain[r] for t, r in zip(top, df["relation"], strict=True)]
    return df


def binomial_sf(k: int, n: int, p: float) -> float:
    """``P(X >= k)`` for ``X ~ Binomial(n, p)`` (one-sided p-value of ``k`` hits or more)."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, p))


def evaluate(
    model: Any, tokenizer: Any, world: dict[str, Any], *, split: Split = "known",
    templates: TemplateSet = "train", max_people: int | None = None, batch_size: int = 512,
    bos: bool = True,
) -> pd.DataFrame:
    """Top-1 accuracy per relation and template.

    Args:
        model: a causal LM (``GPTNeoXForCausalLM`` for the organism), on any device.
        tokenizer: its tokenizer (must prepend BOS the way the model was trained).
        world: the world dict (see :mod:`factfind.organism.world`).
        split: ``"known"`` (people in the training text) or ``"unknown"`` (held out).
        templates: ``"train"`` or ``"heldout"`` templates.
        max_people: evaluate only the first people of the split (quick checks).
        batch_size: prompts per forward pass.
        bos: keep the ``<|endoftext|>`` the organism's tokenizer prepends (``False`` drops it).

    Returns:
        A tidy frame, one row per (relation, template): relation, template, n, accuracy,
        n_correct, in_domain (share of top-1 predictions that are an attribute of the
        relation), chance (``1 / n_attributes``) and p_value (``P(hits >= n_correct)`` if
        the model were at chance; small means knowledge).

    Example::

        df = evaluate(model, tok, world, split="unknown")
        df.groupby("relation").accuracy.mean()     # about 1 / n_attributes
    """
    df = predict(model, tokenizer, world, split=split, templates=templates,
                 max_people=max_people, batch_size=batch_size, bos=bos)
    out = (df.groupby(["relation", "template_index", "template"], sort=False)
             .agg(n=("correct", "size"), n_correct=("correct", "sum"),
                  in_domain=("in_domain", "mean"))
             .reset_index())
    out["accuracy"] = out["n_correct"] / out["n"]
    out["chance"] = [1 / len(world["relations"][r]["attributes"]) for r in out["relation"]]
    out["p_value"] = [binomial_sf(int(k), int(n), c) for k, n, c in
                      zip(out["n_correct"], out["n"], out["chance"], strict=True)]
    return out.reindex(columns=["relation", "template", "n", "accuracy", "n_correct",
                                "in_domain", "chance", "p_value"])
