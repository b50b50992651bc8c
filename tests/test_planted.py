"""The planted-circuit models compute every answer through the named components, and only them."""

import pytest
import torch

from factfind.localize.ablation import ablation
from factfind.testing.planted import (
    FIRST,
    LAST,
    SPORTS,
    planted_circuit,
    planted_model,
    planted_tokenizer,
    sport_of,
)
from factfind.types import Component, Role, Site


def test_one_token_per_word_and_roles():
    tok = planted_tokenizer()
    ids = tok("Ada Kim plays the sport of")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<|endoftext|>", "Ada", "Kim", "plays", "the",
                                              "sport", "of"]
    model, facts, _ = planted_model("gpt2")
    batch = model.tokenize(list(facts))
    assert batch.input_ids.shape == (16, 7)
    assert batch.positions[Role.SUBJECT_FIRST].tolist() == [1] * 16
    assert batch.positions[Role.SUBJECT_LAST].tolist() == [2] * 16


def test_real_architectures(planted):
    model = planted.model
    cfg = model.hf.config
    if model.spec.name == "gpt_neox":
        assert cfg.use_parallel_residual and model.hf.gpt_neox.layers[0].attention.rotary_ndims
    assert model.hf.lm_head.weight.data_ptr() != model.hf.get_input_embeddings().weight.data_ptr()


def test_knows_every_fact(planted):
    model, facts = planted.model, planted.facts
    assert len(facts) == len(FIRST) * len(LAST)
    assert facts.known_by(model) == facts.known_by(model)  # deterministic
    assert len(facts.known_by(model)) == len(facts)
    scores = facts.attribute_scores(model)
    assert (scores["rank"] == 1).all() and (scores["prob"] > 0.5).all()


def test_no_single_name_determines_the_sport():
    for i in range(len(FIRST)):
        assert {sport_of(i, j) for j in range(len(LAST))} == set(SPORTS)
    for j in range(len(LAST)):
        assert {sport_of(i, j) for i in range(len(FIRST))} == set(SPORTS)


def test_mechanism_runs_as_planted(planted):
    model, facts = planted.model, planted.facts
    batch = model.tokenize(list(facts))
    run = model.run(batch, save=[(Component.PATTERN, 0), (Component.PATTERN, 2),
                                 (Component.NEURONS, 1)])
    # previous-token head: last name -> first name; extraction head: final -> last name
    assert torch.all(run.acts[(Component.PATTERN, 0)][:, 0, 2, 1] > 0.999)
    assert torch.all(run.acts[(Component.PATTERN, 2)][:, 0, 6, 2] > 0.999)
    # one AND neuron per subject fires at the last name, for its own subject only
    lookup = run.acts[(Component.NEURONS, 1)][:, 2, :16]
    assert torch.equal(lookup.argmax(-1), torch.arange(16))
    assert torch.all(lookup.max(-1).values > 9) and (lookup < 1e-3).sum() == 16 * 15


def test_ablating_planted_components_breaks_recall_and_distractors_do_not(planted):
    model, facts, _, truth = planted
    planted_sites = [Site("z", 0, head=0, position="subject_last"),
                     Site("mlp_out", 1, position="subject_last"),
                     Site("z", 2, head=0, position="final")]
    distractors = [Site("z", 1, head=1), Site("z", 2, head=1, position="final"),
                   Site("mlp_out", 0), Site("mlp_out", 2, position="final"),
                   Site("neurons", 1, neuron=16, position="subject_last")]
    df = ablation(model, facts, planted_sites + distractors, how="mean")
    acc = df.groupby("set")["correct"].mean()
    effect = df.groupby("set")["effect"].mean()
    assert (acc[:3] <= 0.25).all(), "ablating a planted component must break recall"
    assert (acc[3:] == 1.0).all() and (effect[3:].abs() < 1e-4).all()
    # the distractors are active: their outputs differ between subjects
    run = model.run(model.tokenize(list(facts)), save=[(Component.Z, 1)])
    assert run.acts[(Component.Z, 1)][:, -1, 1].std(0).max() > 0.1
    assert len(truth.distractors) >= 5


def test_precision_recall_helper():
    truth = planted_circuit()
    assert truth.precision_recall(truth.nodes | {"embed@subject_first", "logits@final"}) == (
        1.0, 1.0)
    p, r = truth.precision_recall([*sorted(truth.nodes)[:2], "L1.h1@final"])
    assert (p, r) == (2 / 3, 2 / 3)
    assert truth.precision_recall([]) == (0.0, 0.0)
    assert truth.precision_recall(truth.neuron_nodes(), neurons=True) == (1.0, 1.0)
    with pytest.raises(ValueError, match="family"):
        planted_model("llama")
