"""The model organism: factfind's own object of study, small enough for a laptop CPU.

The Fact Finding work (Nanda et al., 2023) found how Pythia 2.8B recalls facts about people:
early attention gathers the tokens of a multi-token name, MLPs at the name's *last* token look
up its attributes, and later attention moves the asked-for attribute to the final position.
Pythia 2.8B needs a GPU and a 6 GB download. The organism is a 4-layer Pythia-architecture
``GPTNeoXForCausalLM`` trained in minutes on two CPU cores on a synthetic world built to need
the same mechanism: 1,600 people with 2–4-token names made of shared name parts, 4 relations
with attributes drawn independently of the name, many templates, and 400 held-out people who
never appear in training text.

The shipped checkpoint in :data:`CHECKPOINT_DIR` is an ordinary Hugging Face directory, so
analyses load it like any other model (``load_model("organism")`` in :mod:`factfind.model`,
or ``AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)``); ``world.json`` beside it lists
every person, attribute and template, and ``MODEL_CARD.md`` reports how it was trained and how
well it knows its world.

Modules:

* :mod:`~factfind.organism.world`      the world generator and ``world.json`` format;
* :mod:`~factfind.organism.tokenizer`  the BPE tokenizer (names split into several tokens);
* :mod:`~factfind.organism.corpus`     training text: packed fact and filler sentences;
* :mod:`~factfind.organism.train`      ``TrainConfig``, ``train`` and the command line;
* :mod:`~factfind.organism.evaluate`   top-1 recall per relation and template, chance tests;
* :mod:`~factfind.organism.card`       the model card.

Example::

    from factfind.organism import CHECKPOINT_DIR, load_world
    world = load_world()
    len(world["people"]), list(world["relations"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from factfind.organism.world import WORLD_FORMAT, WorldConfig, generate_world, read_world

CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "checkpoint"
"""The shipped checkpoint: ``config.json``, ``model.safetensors``, tokenizer files,
``world.json``, ``train_config.json``, ``metrics.json`` and ``MODEL_CARD.md``."""


def load_world(path: str | Path | None = None) -> dict[str, Any]:
    """Read a world file (by default the shipped organism's ``world.json``).

    Args:
        path: a ``world.json`` file or a checkpoint directory holding one.

    Returns:
        The world dict (format ``factfind-organism-world/1``; see
        :mod:`factfind.organism.world`).

    Example::

        world = load_world()
        world["relations"]["sport"]["attributes"]
    """
    p = CHECKPOINT_DIR if path is None else Path(path)
    if p.is_dir():
        p = p / "world.json"
    return read_world(p)


__all__ = ["CHECKPOINT_DIR", "WORLD_FORMAT", "WorldConfig", "generate_world", "load_world"]
