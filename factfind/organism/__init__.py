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

from factfind.errors import CacheCorruptError
from factfind.integrity import (
    atomic_write,
    check_folder,
    digest,
    read_record,
    safetensors_incomplete,
)
from factfind.organism.world import WORLD_FORMAT, WorldConfig, generate_world, read_world

CHECKPOINT_DIR: Path = Path(__file__).resolve().parent / "checkpoint"
"""The shipped checkpoint: ``config.json``, ``model.safetensors``, tokenizer files,
``world.json``, ``train_config.json``, ``metrics.json``, ``MODEL_CARD.md`` and
``MANIFEST.json`` (the size and sha256 of each file a load reads)."""

MANIFEST = "MANIFEST.json"
"""The checkpoint's record of what it holds: ``{file: {"size", "sha256"}}`` for
:data:`CHECKED_FILES`, written by :func:`factfind.organism.train.train`."""

CHECKED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "world.json")
"""The files of a checkpoint that loading the organism reads (checked on every load)."""

_REINSTALL = ("reinstall factfind (in a checkout: git checkout -- factfind/organism/checkpoint; "
              "else pip install --force-reinstall factfind), or retrain it: factfind "
              "train-organism --seed 0 --out DIR")


def check_checkpoint(folder: str | Path | None = None, *,
                     files: tuple[str, ...] = CHECKED_FILES) -> None:
    """Verify an organism checkpoint against its ``MANIFEST.json`` (each file's size and
    sha256) before it is read; without a manifest, by reading: each JSON file parses and
    ``model.safetensors`` is as long as its header says. Costs one sha256 pass over ~5 MB.

    The shipped checkpoint is package data, not a cache: a damaged file is left where it is
    (it cannot be rebuilt here) and the error names it and how to get it back.

    Args:
        folder: the checkpoint (default :data:`CHECKPOINT_DIR`).
        files: which of :data:`CHECKED_FILES` to check (``load_world`` checks ``world.json``).

    Raises:
        CacheCorruptError: a file is missing or differs from the manifest (one line naming it
            and the fix: reinstall, or retrain the organism).
    """
    root = CHECKPOINT_DIR if folder is None else Path(folder)
    recorded = read_record(root / MANIFEST)
    if recorded is not None:
        reason = check_folder(root, {f: recorded[f] for f in files if f in recorded})
    else:
        reason = _read_check(root, files)
    if reason is not None:
        name = reason.split(":", 1)[0]
        raise CacheCorruptError(f"the organism's checkpoint file {root / name} is damaged "
                                f"({reason.split(': ', 1)[-1]}). Fix: {_REINSTALL}.",
                                path=str(root / name), reason=reason)


def write_manifest(folder: str | Path) -> Path:
    """Record the size and sha256 of a checkpoint's :data:`CHECKED_FILES` in its
    ``MANIFEST.json`` (after training; :func:`check_checkpoint` verifies against it)."""
    import json

    root = Path(folder)
    record = {name: {"size": size, "sha256": sha}
              for name in CHECKED_FILES if (root / name).is_file()
              for size, sha in [digest(root / name)]}
    return atomic_write(root / MANIFEST, (json.dumps(record, indent=1, sort_keys=True)
                                          + "\n").encode())


def _read_check(root: Path, files: tuple[str, ...]) -> str | None:
    """The check of a checkpoint without a manifest: every file reads."""
    import json

    for name in files:
        path = root / name
        if not path.is_file():
            return f"{name}: missing"
        if name.endswith(".safetensors"):
            bad = safetensors_incomplete(path)
            if bad is not None:
                return f"{name}: {bad}"
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"{name}: unreadable ({type(e).__name__})"
    return None


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
    if p.parent == CHECKPOINT_DIR or (p.parent / MANIFEST).is_file():
        check_checkpoint(p.parent, files=("world.json",))
    return read_world(p)


__all__ = ["CHECKED_FILES", "CHECKPOINT_DIR", "MANIFEST", "WORLD_FORMAT", "WorldConfig",
           "check_checkpoint", "generate_world", "load_world", "write_manifest"]
