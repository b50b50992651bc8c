"""The training code path, end to end, on a tiny world in a few seconds."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factfind.organism import CHECKED_FILES, MANIFEST, check_checkpoint, load_world
from factfind.organism.evaluate import evaluate
from factfind.organism.train import TrainConfig, lr_at, train
from factfind.organism.world import WorldConfig

TINY = TrainConfig(
    world=WorldConfig(relations=("sport", "color"), n_known=60, n_unknown=20, n_first_names=12,
                      n_last_names=15),
    n_layers=2, d_model=32, n_heads=2, d_mlp=64, max_positions=64, seq_len=64, batch_size=4,
    steps=12, warmup_steps=2, eval_every=0, lr=3e-3,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    return out, train(TINY, out)


def test_train_writes_a_loadable_checkpoint(trained):
    out, metrics = trained
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "world.json", "train_config.json", "metrics.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickles"
    check_checkpoint(out)  # its MANIFEST.json records what a load verifies
    assert sorted(json.loads((out / MANIFEST).read_text())) == sorted(CHECKED_FILES)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert model.config.use_parallel_residual and not model.config.tie_word_embeddings
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    ids = tok("Fact: someone plays the sport of", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    world = load_world(out)
    df = evaluate(model, tok, world, split="known", templates="heldout")
    assert set(df.relation) == {"sport", "color"} and (df.n == 60).all()
    assert metrics["steps"] == 12 and metrics["wall_time_s"] > 0
    assert set(metrics["accuracy"]["known_train"]) == {"sport", "color"}


def test_loss_goes_down(trained):
    _, metrics = trained
    curve = metrics["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_config_round_trips_through_json(trained):
    out, _ = trained
    assert TrainConfig.from_dict(json.loads((out / "train_config.json").read_text())) == TINY


def test_training_is_deterministic(trained, tmp_path):
    out, _ = trained
    train(TINY, tmp_path)
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert max(lr_at(s, cfg) for s in range(100)) == pytest.approx(1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TrainConfig(d_model=130, n_heads=4)
    with pytest.raises(ValueError, match="seq_len"):
        TrainConfig(seq_len=512, max_positions=256)
    with pytest.raises(ValueError, match="p_filler"):
        TrainConfig(p_filler=1.5)
