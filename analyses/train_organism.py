"""Train the factfind model organism and write its model card (top to bottom, no options).

Research question: can a small Pythia-architecture model, trained in minutes on two CPU cores,
know a synthetic world of facts the way Pythia 2.8B knows real ones (see
``factfind/organism/__init__.py``)? This script is the documented way to rebuild the shipped
checkpoint; it calls exactly what ``python -m factfind.organism.train --seed 0 --out
factfind/organism/checkpoint`` calls, then renders ``MODEL_CARD.md``.

Run from the repository root::

    python analyses/train_organism.py                # about 13 minutes on 2 idle CPU cores
    python analyses/train_organism.py --check-reproduction   # train twice, compare weights
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

# Passive OpenMP waiting: much faster on a shared machine, same numbers (see train.py). It must be
# set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from factfind.organism import CHECKPOINT_DIR
from factfind.organism.card import write_model_card
from factfind.organism.train import TrainConfig, train

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

SEED = 0
config = TrainConfig(seed=SEED)  # the defaults are the shipped recipe; world seed is 0 too
assert config.world.seed == SEED

# 1. Train the organism into the package's checkpoint directory.
metrics = train(config, CHECKPOINT_DIR)

# 2. Optionally retrain with the same config and seed and compare the weights.
reproduction: Path | None = None
if "--check-reproduction" in sys.argv:
    reproduction = Path(tempfile.mkdtemp(prefix="organism-retrain-"))
    train(config, reproduction)

# 3. The model card: world, training, accuracy tables, reproducibility.
card = write_model_card(CHECKPOINT_DIR, reproduction=reproduction)
logging.info("accuracy per relation: %s", metrics["accuracy"])
logging.info("wrote %s", card)
