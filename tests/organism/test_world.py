"""The synthetic world: determinism, multi-token names, shared name parts, one-token attributes,
held-out people absent from the training text, well-formed templates."""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

import pytest

from factfind.organism.corpus import FactCorpus
from factfind.organism.tokenizer import attribute_token_ids, train_tokenizer
from factfind.organism.world import (
    WORLD_FORMAT,
    WorldConfig,
    generate_world,
    people,
    read_world,
    save_world,
    world_skeleton,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(world_skeleton(WorldConfig()))


@pytest.fixture(scope="module")
def world(tokenizer):
    return generate_world(WorldConfig(), tokenizer=tokenizer)


def name_ids(tokenizer, name: str) -> list[int]:
    return tokenizer.encode(" " + name, add_special_tokens=False)


def test_deterministic_under_seed(world, tokenizer):
    again = generate_world(WorldConfig(), tokenizer=tokenizer)
    assert again == world
    other = generate_world(WorldConfig(seed=1))
    assert [p["name"] for p in other["people"]] != [p["name"] for p in world["people"]]


def test_tokenizer_training_is_deterministic(tokenizer):
    again = train_tokenizer(world_skeleton(WorldConfig()))
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_sizes_and_format(world):
    assert world["format"] == WORLD_FORMAT
    assert len(people(world, "known")) == 1600 >= 1500
    assert len(people(world, "unknown")) == 400
    assert len(world["relations"]) >= 3
    names = [p["name"] for p in world["people"]]
    assert len(set(names)) == len(names), "two people share a full name"
    for p in world["people"]:
        assert set(p["attributes"]) == set(world["relations"])
        for rel, a in p["attributes"].items():
            assert a in world["relations"][rel]["attributes"]


def test_names_are_two_to_four_tokens(world, tokenizer):
    counts = {len(name_ids(tokenizer, p["name"])) for p in world["people"]}
    assert counts == {2, 3, 4}


def test_name_tokens_are_the_same_inside_every_prompt(world, tokenizer):
    """A name is tokenised the same way alone and inside any template (token spans align)."""
    for p in world["people"][:50]:
        ids = name_ids(tokenizer, p["name"])
        for spec in world["relations"].values():
            for t in spec["templates"] + spec["heldout_templates"]:
                prompt = tokenizer(t.format(p["name"])).input_ids
                assert any(prompt[i:i + len(ids)] == ids for i in range(len(prompt))), (t, p)


def test_no_single_name_token_determines_an_answer(world, tokenizer):
    """Every name part, and every token of a name, is shared by known people who differ in
    every relation's attribute."""
    known = people(world, "known")
    groups: dict[object, list[dict]] = defaultdict(list)
    for p in known:
        first, last = p["name"].split(" ")
        groups["first", first].append(p)
        groups["last", last].append(p)
        for tok in set(name_ids(tokenizer, p["name"])):
            groups["token", tok].append(p)
    assert min(len(g) for g in groups.values()) >= 5
    for key, group in groups.items():
        for rel in world["relations"]:
            assert len({p["attributes"][rel] for p in group}) >= 2, (key, rel)


def test_attributes_are_single_tokens(world, tokenizer):
    ids = attribute_token_ids(tokenizer, world)  # raises if not
    for rel, m in ids.items():
        assert len(set(m.values())) == len(m), rel


def test_templates_have_one_slot_and_end_before_the_attribute(world):
    for spec in world["relations"].values():
        assert len(spec["templates"]) >= 5 and len(spec["heldout_templates"]) >= 2
        assert not set(spec["templates"]) & set(spec["heldout_templates"])
        for t in spec["templates"] + spec["heldout_templates"]:
            assert t.count("{}") == 1 and t.count("{") == 1, t
            assert t == t.strip(), t
    assert world["relations"]["sport"]["templates"][0] == "Fact: {} plays the sport of"


def test_unknown_people_never_appear_in_training_text(tokenizer):
    world = generate_world(WorldConfig(n_known=300, n_unknown=100, n_first_names=30,
                                       n_last_names=40), tokenizer=tokenizer)
    corpus = FactCorpus(world, tokenizer, n_filler_person=2000)
    sentences = [ids for _ in range(3) for ids, _ in corpus.epoch(p_clause=0.5, p_insert=0.5)]
    texts = tokenizer.batch_decode([s.tolist() for s in sentences + corpus.filler_person])
    assert any(", who " in t for t in texts)
    names = "|".join(p["name"] for p in people(world, "unknown"))
    unknown = re.compile(rf"\b(?:{names})\b")
    known = {p["name"] for p in people(world, "known")}
    assert not [t for t in texts if unknown.search(t)]
    # and the sentences do name known people
    assert sum(any(n in t for n in list(known)[:50]) for t in texts) > 0


def test_world_file_round_trip(world, tmp_path):
    path = save_world(world, tmp_path / "world.json")
    assert read_world(path) == world
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a"):
        read_world(tmp_path / "bad.json")


def test_config_validation():
    with pytest.raises(ValueError, match="unknown relations"):
        WorldConfig(relations=("sport", "shoe size"))
    with pytest.raises(ValueError, match="too many people"):
        WorldConfig(n_known=10_000)
    with pytest.raises(ValueError, match="min_name_tokens"):
        WorldConfig(min_name_tokens=1)
    cfg = WorldConfig(relations=("sport", "color"))
    assert WorldConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_insert_modifier_keeps_the_last_word_last():
    from factfind.organism.corpus import insert_modifier

    assert insert_modifier("{} is a citizen of", "truly", 0.0) == "{} truly is a citizen of"
    assert insert_modifier("{} is a citizen of", "truly", 0.99) == "{} is a citizen truly of"
    assert insert_modifier("The sport of {} is", "truly", 0.5) == "The sport of {} truly is"
    # no word to insert before (only after "?"): unchanged
    assert insert_modifier("Q: What is the sport of {}? A:", "truly", 0.5) == (
        "Q: What is the sport of {}? A:")
    assert insert_modifier("Name: {}. Their sport:", "truly", 0.0) == "Name: {}. Their truly sport:"
