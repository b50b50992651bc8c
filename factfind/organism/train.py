"""Train the model organism: a small Pythia-architecture model that has memorised a world.

The organism is a ``GPTNeoXForCausalLM`` (the Pythia architecture: parallel attention and MLP,
rotary embeddings on a quarter of each head, untied embeddings) trained from scratch, on two
CPU cores in minutes, on the text of :mod:`factfind.organism.corpus`. The recipe:

1. generate the world (:func:`factfind.organism.world.generate_world`) and train its tokenizer
   (:func:`factfind.organism.tokenizer.train_tokenizer`);
2. stream packed rows of facts and filler, with the loss weighted toward attribute tokens;
3. AdamW, linear warm-up then cosine decay;
4. save a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer files)
   with ``world.json``, ``train_config.json`` (this :class:`TrainConfig`) and ``metrics.json``
   (loss curve, wall time, accuracy tables).

Everything random is seeded from :attr:`TrainConfig.seed`, the thread count is fixed and torch's
deterministic algorithms are on, so on one machine the same command gives the same weights.

Command line (the shipped checkpoint)::

    python -m factfind.organism.train --seed 0 --out factfind/organism/checkpoint

Example::

    metrics = train(TrainConfig(steps=20), "/tmp/organism")
    metrics["wall_time_s"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from factfind.errors import ArgumentError
from factfind.integrity import atomic_write, write_error
from factfind.organism import write_manifest
from factfind.organism.corpus import FactCorpus
from factfind.organism.tokenizer import PAD, train_tokenizer
from factfind.organism.world import WorldConfig, generate_world, save_world

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved as ``train_config.json``).

    Attributes:
        world: the world to learn.
        seed: seeds model initialisation and the data stream (the world has its own seed).
        n_layers, d_model, n_heads, d_mlp: model shape.
        rotary_pct: share of each head's dimensions that get rotary embeddings (Pythia: 0.25).
        max_positions: context length the model supports.
        tokenizer_vocab_size: upper bound on the BPE vocabulary.
        steps: optimizer steps.
        batch_size: rows per step.
        seq_len: tokens per row.
        lr: peak learning rate; min_lr_ratio: final learning rate as a share of it.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay on matrices (not on biases and norms).
        beta1, beta2: AdamW betas.
        grad_clip: max global gradient norm.
        p_filler: probability of a filler sentence before each fact.
        p_generic: share of filler that is generic text (the rest is about known people).
        p_clause: share of fact sentences with a relative clause after the subject (where the
            template allows one), so that the subject is at varying distances from the end.
        p_insert: share of fact sentences with an adverb inserted after the subject.
        p_no_bos: share of rows that do not start with ``<|endoftext|>``.
        attr_weight: loss weight of attribute tokens of facts.
        lm_weight: loss weight of every other token.
        threads: torch CPU threads. Fixed, because the thread count changes the order of
            floating-point reductions: the same seed and thread count give the same weights
            bit for bit. Two threads is the default (the shipped run: 0.33 s per step on two
            idle cores, 13 minutes; one thread takes 0.49 s per step, 20 minutes). On a
            machine busy with other work, ``--threads 1`` is steadier but gives other weights.
        eval_every: steps between quick accuracy checks in the log (0: never).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    seed: int = 0
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    rotary_pct: float = 0.25
    max_positions: int = 256
    tokenizer_vocab_size: int = 4096
    steps: int = 2400
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    p_filler: float = 0.2
    p_generic: float = 0.3
    p_clause: float = 0.3
    p_insert: float = 0.25
    p_no_bos: float = 0.1
    attr_weight: float = 1.0
    lm_weight: float = 0.1
    threads: int = 2
    eval_every: int = 500

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ArgumentError(f"d_model={self.d_model} is not divisible by "
                                f"n_heads={self.n_heads}")
        if self.seq_len > self.max_positions:
            raise ArgumentError("seq_len must be <= max_positions")
        if self.steps < 1 or self.batch_size < 1:
            raise ArgumentError("steps and batch_size must be positive")
        for name in ("p_filler", "p_generic", "p_clause", "p_insert", "p_no_bos", "rotary_pct",
                     "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ArgumentError(f"{name} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (:func:`dataclasses.asdict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        world = WorldConfig.from_dict(d.pop("world"))
        return cls(world=world, **d)


def seed_everything(seed: int, *, threads: int) -> None:
    """Seed python, numpy and torch, fix the thread count and ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def build_model(config: TrainConfig, tokenizer: Any) -> Any:
    """A freshly initialised ``GPTNeoXForCausalLM`` for ``config`` (seed torch first)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_mlp,
        hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": config.rotary_pct},
        max_position_embeddings=config.max_positions,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    return GPTNeoXForCausalLM(hf_config)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio
                        + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target weighted, normalised by the total weight.

    Shapes: logits ``[batch pos d_vocab]``, input_ids and weights ``[batch pos]``; the weight
    at ``pos`` belongs to predicting token ``pos`` from position ``pos - 1``.
    """
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                         reduction="none")  # [batch*(pos-1)]
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum()


def train(config: TrainConfig, out_dir: str | Path) -> dict[str, Any]:
    """Train an organism and save it, with its world and config, to ``out_dir``.

    Args:
        config: the run's configuration.
        out_dir: directory to write the checkpoint to (created if needed).

    Returns:
        Metrics: ``wall_time_s`` (training only), ``eval_time_s``, ``steps``, ``tokens``,
        ``epochs`` (passes over all facts), ``n_params``, ``loss_curve`` (step, loss, lr) and
        ``accuracy``: per relation, mean top-1 accuracy over templates for known people with
        training templates (``known_train``), held-out templates (``known_heldout``), for
        unknown people (``unknown``), and for 400 known people prompted without the
        ``<|endoftext|>`` the tokenizer prepends (``known_train_no_bos``); ``tables``: the
        per-template frames of :func:`factfind.organism.evaluate.evaluate`.
    """
    from factfind.organism.evaluate import evaluate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed, threads=config.threads)

    world = generate_world(config.world)
    tokenizer = train_tokenizer(world, vocab_size=config.tokenizer_vocab_size)
    corpus = FactCorpus(world, tokenizer, seed=config.seed)
    model = build_model(config, tokenizer)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d layers, d_model %d, %d parameters; %d facts",
             config.n_layers, config.d_model, n_params, corpus.n_facts)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2),
    )
    batches = corpus.batches(
        batch_size=config.batch_size, seq_len=config.seq_len, p_filler=config.p_filler,
        p_generic=config.p_generic, p_clause=config.p_clause, p_insert=config.p_insert,
        p_no_bos=config.p_no_bos, attr_weight=config.attr_weight,
        lm_weight=config.lm_weight,
    )
    curve: list[dict[str, float]] = []
    n_tokens = n_attr = 0
    load_start = os.getloadavg()[0]  # other processes slow training on a shared machine
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(config.steps):
        lr = lr_at(step, config)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(batches)
        logits = model(input_ids=batch.input_ids).logits  # [batch pos d_vocab]
        loss = weighted_lm_loss(logits, batch.input_ids, batch.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        n_tokens += int((batch.weights > 0).sum())
        n_attr += int(batch.is_attribute.sum())
        if step % 25 == 0 or step == config.steps - 1:
            curve.append({"step": step, "loss": float(loss.detach()), "lr": lr})
        if config.eval_every and (step + 1) % config.eval_every == 0:
            quick = {t: evaluate(model, tokenizer, world, templates=t, max_people=100)
                     .groupby("relation", sort=False).accuracy.mean().round(3).to_dict()
                     for t in ("train", "heldout")}
            log.info("step %d  loss %.4f  lr %.2e  %.0fs  quick top-1 %s", step + 1,
                     float(loss.detach()), lr, time.perf_counter() - start, quick)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    log.info("trained %d steps in %.1fs (%d tokens)", config.steps, wall, n_tokens)

    model.eval()
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_world(world, out / "world.json")
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    except OSError as e:  # a full disk or a read-only folder: one line, not a traceback
        raise write_error(out / "model.safetensors", e, needed=n_params * 4,
                          elsewhere="pass --out DIR on another file system") from e

    t0 = time.perf_counter()
    tables = {
        "known_train": evaluate(model, tokenizer, world, split="known", templates="train"),
        "known_heldout": evaluate(model, tokenizer, world, split="known", templates="heldout"),
        "unknown": evaluate(model, tokenizer, world, split="unknown", templates="train"),
        "known_train_no_bos": evaluate(model, tokenizer, world, split="known",
                                       templates="train", max_people=400, bos=False),
    }
    eval_time = time.perf_counter() - t0
    metrics = {
        "wall_time_s": round(wall, 1),
        "cpu_time_s": round(cpu, 1),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "eval_time_s": round(eval_time, 1),
        "threads": config.threads,
        "steps": config.steps,
        "tokens": n_tokens,
        "attribute_tokens": n_attr,
        "epochs": n_attr / corpus.n_facts,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "torch": torch.__version__,
        "accuracy": {k: t.groupby("relation", sort=False).accuracy.mean().to_dict()
                     for k, t in tables.items()},
        "tables": {k: t.to_dict(orient="records") for k, t in tables.items()},
        "loss_curve": curve,
    }
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode(),
                 elsewhere="pass --out DIR on another file system")
    write_manifest(out)
    log.info("accuracy: %s", metrics["accuracy"])
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: ``python -m factfind.organism.train --seed 0 --out DIR [--steps N]
    [--threads N]``."""
    parser = argparse.ArgumentParser(description="Train the factfind model organism.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and the run")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--config", type=Path, help="a train_config.json to start from")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--threads", type=int,
                        help="override the CPU thread count (changes the weights' last bits)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = (TrainConfig.from_dict(json.loads(args.config.read_text())) if args.config
              else TrainConfig())
    config = dataclasses.replace(config, seed=args.seed,
                                 world=dataclasses.replace(config.world, seed=args.seed))
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    if args.threads is not None:
        config = dataclasses.replace(config, threads=args.threads)
    return train(config, args.out)


if __name__ == "__main__":
    # Idle OpenMP threads spin-wait by default. On a machine shared with other processes the
    # spinning thread and the others fight for the cores and a step takes 2-5x longer (measured
    # here: 2.0 s vs 0.8 s per step at a load average of 3). libgomp reads OMP_WAIT_POLICY when
    # torch is imported, which `python -m` has already done, so re-execute once with it set.
    # The numbers are unaffected: the thread count and the work split stay the same.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "factfind.organism.train", *sys.argv[1:]])
    main()
