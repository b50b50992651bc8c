"""The shipped organism: small, loads offline like any Hugging Face model, knows its world.

The default tests evaluate every relation and template on a fixed subset of people (the first
400 known and all 400 unknown) so that they run in CI time; ``-m slow`` evaluates everyone.
"""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import binomtest
from transformers import AutoModelForCausalLM, AutoTokenizer

from factfind.organism import CHECKPOINT_DIR, load_world
from factfind.organism.evaluate import evaluate, predict
from factfind.organism.train import TrainConfig
from factfind.organism.world import generate_world

N_KNOWN = 400  # people per (relation, template) in the fast tests


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR, local_files_only=True)
    return model, tok, load_world()


def per_relation(df):
    g = df.groupby("relation")
    return g.n_correct.sum() / g.n.sum()


def test_checkpoint_files_and_size():
    names = {p.name for p in CHECKPOINT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "world.json", "MODEL_CARD.md", "train_config.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    total = sum(p.stat().st_size for p in CHECKPOINT_DIR.iterdir() if p.is_file())
    assert total <= 10 * 1024 * 1024, f"{total / 1e6:.1f} MB"


def test_is_a_pythia_architecture_model(organism):
    model, tok, _ = organism
    cfg = model.config
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert 4 <= cfg.num_hidden_layers <= 6 and 128 <= cfg.hidden_size <= 256
    assert cfg.vocab_size == len(tok)
    assert next(model.parameters()).dtype == torch.float32


def test_world_file_is_the_generated_world():
    """The shipped world.json is exactly what the recorded config generates."""
    config = TrainConfig.from_dict(json.loads((CHECKPOINT_DIR / "train_config.json").read_text()))
    assert generate_world(config.world) == load_world()


def test_knows_known_people_with_training_templates(organism):
    model, tok, world = organism
    df = evaluate(model, tok, world, split="known", templates="train", max_people=N_KNOWN)
    acc = per_relation(df)
    assert set(acc.index) == set(world["relations"])
    assert (acc >= 0.99).all(), acc.to_dict()


def test_generalises_to_heldout_templates(organism):
    model, tok, world = organism
    df = evaluate(model, tok, world, split="known", templates="heldout", max_people=N_KNOWN)
    acc = per_relation(df)
    assert (acc >= 0.95).all(), acc.to_dict()


def test_is_at_chance_on_unknown_people(organism):
    """Hits on unknown people are Binomial(n, 1/k) if the model knows nothing about them: a
    two-sided binomial test per relation, Bonferroni-corrected at a family-wise 1%."""
    model, tok, world = organism
    df = evaluate(model, tok, world, split="unknown", templates="train")
    alpha = 0.01 / df.relation.nunique()
    for rel, sub in df.groupby("relation"):
        # one template per person keeps the trials independent: the first training template
        row = sub.iloc[0]
        p = binomtest(int(row.n_correct), int(row.n), float(row.chance)).pvalue
        assert p > alpha, (rel, row.to_dict())
        # ... and averaged over templates the accuracy is near chance too
        mean = float(sub.n_correct.sum() / sub.n.sum())
        assert abs(mean - row.chance) < 3 * (row.chance * (1 - row.chance) / row.n) ** 0.5, rel
    # It still answers with an attribute of the right relation: it knows what is asked.
    assert (df.in_domain > 0.9).all()


def test_eager_attention_gives_the_same_predictions(organism):
    """factfind's adapter runs models with eager attention; the organism was trained with SDPA."""
    model, tok, world = organism
    eager = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR, attn_implementation="eager")
    a = predict(model, tok, world, templates="heldout", max_people=50)
    b = predict(eager, tok, world, templates="heldout", max_people=50)
    assert (a.predicted == b.predicted).all()


def test_left_padding_with_position_ids_matches_unpadded(organism):
    """Batched, left-padded prompts with position_ids = cumsum(mask) - 1 give the same final
    logits as one prompt at a time (the way factfind's adapter batches)."""
    model, tok, world = organism
    prompts = [t.format(p["name"]) for p in world["people"][:3]
               for t in world["relations"]["sport"]["templates"][:3]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(**enc, position_ids=pos).logits[:, -1]
        single = torch.stack([model(**tok(p, return_tensors="pt")).logits[0, -1]
                              for p in prompts])
    assert torch.allclose(batched, single, atol=1e-4)


@pytest.mark.slow
def test_everyone_every_template(organism):
    model, tok, world = organism
    assert (per_relation(evaluate(model, tok, world, templates="train")) >= 0.99).all()
    assert (per_relation(evaluate(model, tok, world, templates="heldout")) >= 0.95).all()


def test_loads_through_the_generic_adapter_path(organism):
    """``load_model("organism")`` is only a name for CHECKPOINT_DIR: the adapter loads it with
    ``from_pretrained`` like any Hugging Face model, and its predictions and token roles on
    ``load_facts("organism:sport")`` are those of the plain model."""
    from factfind.data import load_facts
    from factfind.model import load_model
    from factfind.types import Role

    hf, tok, _ = organism
    model = load_model("organism")
    facts = list(load_facts("organism:sport"))[:: 9][:40]
    batch = model.tokenize(facts)
    logits = model.run(batch).logits  # [batch d_vocab] at the final position
    assert (logits.argmax(-1) == batch.attribute_ids).float().mean() >= 0.95
    for i, fact in enumerate(facts):
        last = tok.decode(batch.input_ids[i, batch.positions[Role.SUBJECT_LAST][i]])
        assert fact.subject.endswith(last.strip()), (fact.subject, last)
    with torch.no_grad():
        plain = torch.stack([hf(**tok(f.prompt, return_tensors="pt")).logits[0, -1]
                             for f in facts])
    assert torch.allclose(logits.float(), plain, atol=1e-4)
