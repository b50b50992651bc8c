"""The organism's model card: what world it knows, how it was trained, how well it recalls.

A checkpoint directory written by :func:`factfind.organism.train.train` holds everything the
card needs: ``world.json`` (world parameters and templates), ``train_config.json``,
``metrics.json`` (wall time, accuracy tables) and the weights. :func:`write_model_card` renders
them as ``MODEL_CARD.md``. Reproducibility is checked by retraining with the same command and
seed into a second directory and comparing (:func:`compare_checkpoints`); the comparison is
stored as ``reproduction.json`` so the card can always be re-rendered.

Command line::

    python -m factfind.organism.train --seed 0 --out /tmp/organism-retrain
    python -m factfind.organism.card factfind/organism/checkpoint \
        --reproduction /tmp/organism-retrain
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from factfind.errors import ArgumentError
from factfind.organism.world import people, read_world

log = logging.getLogger(__name__)

TABLE_TITLES = {
    "known_train": "Known people, training templates",
    "known_heldout": "Known people, held-out templates",
    "unknown": "Unknown people (never in training text), training templates",
    "known_train_no_bos": "Known people (first 400), training templates, no <|endoftext|>",
}


def compare_checkpoints(a: str | Path, b: str | Path) -> dict[str, Any]:
    """Compare two checkpoint directories: weights and accuracy tables.

    Returns:
        ``identical`` (every tensor bitwise equal), ``max_abs_weight_diff``,
        ``max_abs_accuracy_diff`` (over every relation x template x table), ``accuracy`` of the
        retrained run (per table and relation), the wall times and thread counts of both runs,
        and ``files_identical`` (which non-weight files are byte-identical).
    """
    from safetensors.torch import load_file

    a, b = Path(a), Path(b)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        raise ArgumentError("the checkpoints have different tensors")
    max_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    identical = all(wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()) for k in wa)
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    acc_diff = 0.0
    for table, rows in ma["tables"].items():
        for ra, rb in zip(rows, mb["tables"][table], strict=True):
            acc_diff = max(acc_diff, abs(ra["accuracy"] - rb["accuracy"]))
    files = {f: (a / f).read_bytes() == (b / f).read_bytes()
             for f in ("tokenizer.json", "world.json", "train_config.json", "config.json")}
    return {
        "identical": identical,
        "max_abs_weight_diff": max_diff,
        "max_abs_accuracy_diff": acc_diff,
        "accuracy": mb["accuracy"],
        "wall_time_s": [ma["wall_time_s"], mb["wall_time_s"]],
        "threads": [ma.get("threads"), mb.get("threads")],
        "files_identical": files,
    }


def metrics_share(x: float) -> str:
    """``0.1 -> '10%'``."""
    return f"{x:.0%}"


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append(f"{v:.3f}" if v >= 1e-3 or v == 0 else f"{v:.1e}")
            else:
                cells.append(str(v).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _summary(metrics: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for table, title in (("known_train", "known, train templates"),
                         ("known_heldout", "known, held-out templates"),
                         ("unknown", "unknown people")):
        df = pd.DataFrame(metrics["tables"][table])
        g = df.groupby("relation", sort=False)
        for rel, sub in g:
            rows.append({"relation": rel, "set": title, "prompts": int(sub.n.sum()),
                         "accuracy": float(sub.n_correct.sum() / sub.n.sum()),
                         "worst template": float(sub.accuracy.min()),
                         "chance": float(sub.chance.iloc[0])})
    return pd.DataFrame(rows)


def render_model_card(checkpoint: str | Path) -> str:
    """The Markdown text of the model card of ``checkpoint``."""
    ckpt = Path(checkpoint)
    world = read_world(ckpt / "world.json")
    config = json.loads((ckpt / "train_config.json").read_text())
    metrics = json.loads((ckpt / "metrics.json").read_text())
    hf = json.loads((ckpt / "config.json").read_text())
    repro_path = ckpt / "reproduction.json"
    repro = json.loads(repro_path.read_text()) if repro_path.exists() else []
    if isinstance(repro, dict):  # one comparison (the format before several runs)
        repro = [repro]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    known, unknown = people(world, "known"), people(world, "unknown")
    n_tok = Counter(len(tok.encode(" " + p["name"], add_special_tokens=False))
                    for p in world["people"])
    firsts = Counter(p["name"].split(" ")[0] for p in known)
    lasts = Counter(p["name"].split(" ")[1] for p in known)
    files = {f.name: f.stat().st_size for f in sorted(ckpt.iterdir()) if f.is_file()}
    total = sum(files.values())

    out: list[str] = []
    w = out.append
    w("# factfind model organism\n")
    w("A small Pythia-architecture language model (`GPTNeoXForCausalLM`) trained from scratch "
      "on a synthetic world of people and their attributes, so that factfind can study fact "
      "recall without a GPU or a download. The world is built to need the mechanism that the "
      "Fact Finding work (Nanda et al., 2023) found in Pythia 2.8B: multi-token names whose "
      "parts are shared by many people, so an attribute can only be looked up from the "
      "combination of the name's tokens, and then moved to the final token.\n")
    w("Load it like any Hugging Face model (offline):\n")
    w("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
      "from factfind.organism import CHECKPOINT_DIR, load_world\n"
      "model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)\n"
      "tok = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)   # prepends <|endoftext|>\n"
      "world = load_world()\n```\n")
    w("The tokenizer prepends `<|endoftext|>` (id 0) to every text, as every training document "
      "started with it, and puts a space before the text, so a name at the start of a prompt "
      "is tokenised as in running text. Prompts end right before the attribute, which is one "
      "token (`' tennis'`).\n")

    w("## Model\n")
    n_params = metrics["n_params"]
    w(f"- architecture: `GPTNeoXForCausalLM`, parallel attention + MLP "
      f"(`use_parallel_residual={hf['use_parallel_residual']}`), rotary embeddings on "
      f"{config['rotary_pct']:.0%} of each head, untied input/output embeddings, GELU MLP")
    w(f"- {hf['num_hidden_layers']} layers, d_model {hf['hidden_size']}, "
      f"{hf['num_attention_heads']} heads of {hf['hidden_size'] // hf['num_attention_heads']}, "
      f"d_mlp {hf['intermediate_size']}, vocabulary {hf['vocab_size']} (byte-level BPE), "
      f"context {hf['max_position_embeddings']}")
    w(f"- {n_params:,} parameters, stored in {hf.get('dtype', hf.get('torch_dtype', 'float32'))}")
    w(f"- files ({total / 1e6:.2f} MB in total): "
      + ", ".join(f"`{k}` {v / 1e3:.0f} kB" for k, v in files.items()) + "\n")

    w("## World\n")
    wc = world["config"]
    w(f"- seed {world['seed']}; {len(known)} known people, {len(unknown)} unknown people "
      "(never in training text; same name pools, new combinations)")
    w(f"- {len(world['names']['first'])} first names and {len(world['names']['last'])} last "
      f"names (synthetic, built from {wc['n_initial_syllables']} + {wc['n_final_syllables']} "
      "syllables); each known first name is worn by "
      f"{min(firsts.values())}-{max(firsts.values())} people, each last name by "
      f"{min(lasts.values())}-{max(lasts.values())}")
    w("- tokens per full name: " + ", ".join(f"{k}: {v} people" for k, v in sorted(n_tok.items())))
    examples = []
    for n in (2, 3, 4):
        p = next((p for p in known
                  if len(tok.encode(" " + p["name"], add_special_tokens=False)) == n), None)
        if p is not None:
            pieces = tok.convert_ids_to_tokens(tok.encode(" " + p["name"],
                                                          add_special_tokens=False))
            examples.append(f"`{p['name']}` = " + " + ".join(f"`{t}`" for t in pieces))
    w("- for example " + "; ".join(examples) + " (`Ġ` marks a leading space)")
    w("- attributes are drawn uniformly and independently of the name and of each other\n")
    rel_rows = []
    for rel, spec in world["relations"].items():
        rel_rows.append({"relation": rel, "attributes": ", ".join(spec["attributes"]),
                         "train templates": len(spec["templates"]),
                         "held-out templates": len(spec["heldout_templates"])})
    w(_md_table(pd.DataFrame(rel_rows)) + "\n")
    w("Held-out templates are two shared frames that every other relation trains on (a Latin "
      "square over relations) plus one paraphrase of the relation's own; the full lists are in "
      "the tables below and in `world.json`. Training text mixes fact sentences (every "
      "(person, relation) once per epoch, in a random training template) with filler: "
      f"{len(world['filler']['person'])} biography predicates about known people that reveal "
      f"no attribute, and {len(world['filler']['generic'])} generic sentences.\n")

    w("## Training\n")
    w("Reproduce with:\n")
    w(f"```\npython -m factfind.organism.train --seed {config['seed']} "
      "--out factfind/organism/checkpoint\npython -m factfind.organism.card "
      "factfind/organism/checkpoint\n```\n")
    load = metrics.get("load_average")
    w(f"- wall time: **{metrics['wall_time_s'] / 60:.1f} min** of training on "
      f"{metrics['threads']} CPU threads (torch {metrics['torch']}; process CPU time "
      f"{metrics.get('cpu_time_s', float('nan')) / 60:.1f} min"
      + (f"; 1-minute load average {load[0]} at the start, {load[1]} at the end" if load else "")
      + f"), plus {metrics['eval_time_s']:.0f} s of evaluation; {metrics['steps']} steps, "
      f"{metrics['tokens']:,} trained tokens, {metrics['epochs']:.0f} passes over the "
      f"{len(known) * len(world['relations']):,} facts")
    w(f"- loss: weighted next-token cross-entropy, attribute tokens {config['attr_weight']}, "
      f"all other tokens {config['lm_weight']}; AdamW (betas {config['beta1']}, "
      f"{config['beta2']}, weight decay {config['weight_decay']}), peak lr {config['lr']}, "
      f"{config['warmup_steps']} warm-up steps, cosine to {config['min_lr_ratio']} x peak")
    first, last = metrics["loss_curve"][0], metrics["loss_curve"][-1]
    w(f"- training text: rows of {config['seq_len']} tokens, {config['batch_size']} per step; "
      f"a filler sentence before {config['p_filler']:.0%} of facts "
      f"({config['p_generic']:.0%} of them generic); a relative clause after the subject in "
      f"{config['p_clause']:.0%} of facts where the template allows it")
    w(f"- weighted loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at "
      f"step {last['step']}")
    w("- full configuration (`train_config.json`):\n")
    w("```json\n" + json.dumps(config, indent=1) + "\n```\n")

    w("## Accuracy\n")
    w("Top-1 next-token accuracy on every (person, template) prompt. For unknown people the "
      "attributes are independent of everything the model saw, so hits are "
      "Binomial(n, 1/k) if it has no knowledge; `p_value` is P(hits >= observed) under that "
      "law. `in_domain` is the share of top-1 predictions that are some attribute of the "
      "relation.\n")
    w(_md_table(_summary(metrics)) + "\n")
    for table, title in TABLE_TITLES.items():
        w(f"### {title}\n")
        if table in metrics["tables"]:
            w(_md_table(pd.DataFrame(metrics["tables"][table])) + "\n")

    w("## Limitations\n")
    w("- The world is synthetic and small; the organism knows nothing else. Its filler text "
      "teaches a little grammar, not English.")
    w("- The structure (multi-token subjects that need every token, several relations, "
      "held-out paraphrases and people) is built in; whether the organism's *mechanism* matches "
      "Pythia's (subject enrichment by MLPs at the last subject token, attribute extraction by "
      "attention at the final token) is what factfind's analyses are for, not an assumption.")
    no_bos = metrics["tables"].get("known_train_no_bos")
    if no_bos:
        nb = pd.DataFrame(no_bos)
        w("- Prompts should start with `<|endoftext|>` (the tokenizer adds it). "
          f"{metrics_share(config['p_no_bos'])} of training rows had none, and without it the "
          f"accuracy on the first 400 known people with training templates is "
          f"{nb.n_correct.sum() / nb.n.sum():.3f} (last table above).\n")

    w("## Reproducibility\n")
    if not repro:
        w("Not yet checked: retrain into a second directory and run "
          "`python -m factfind.organism.card <checkpoint> --reproduction <retrained>`.\n")
    for r in repro:
        threads = r.get("threads", [metrics["threads"]] * 2)
        same = threads[0] == threads[1]
        verdict = ("bitwise identical weights" if r["identical"] else
                   f"max abs weight difference {r['max_abs_weight_diff']:.3g}")
        how = ("the same command, seed and thread count" if same else
               f"the same seed with {threads[1]} thread{'s' if threads[1] > 1 else ''} "
               f"instead of {threads[0]}")
        w(f"- Retrained with {how} on the same machine: **{verdict}**; max abs accuracy "
          f"difference over all tables {r['max_abs_accuracy_diff']:.4f}; wall time "
          f"{r['wall_time_s'][1]:.0f} s (shipped run: {r['wall_time_s'][0]:.0f} s). "
          "Byte-identical files: "
          + ", ".join(f"`{k}` {'yes' if v else 'no'}" for k, v in r["files_identical"].items())
          + ".")
    if repro:
        w("\nDeterminism comes from seeding every generator, a fixed thread count "
          f"({metrics['threads']}) and `torch.use_deterministic_algorithms`; a different CPU, "
          "thread count or torch build changes floating-point reduction order and hence the "
          "weights' last bits, which training amplifies (the world, tokenizer and data stream do "
          "not change). Two threads (the default) train about 1.5x faster than one on two idle "
          "cores (0.33 vs 0.49 s per step, measured); `--threads 1` is steadier on a busy "
          "machine but gives other weights.\n")
    return "\n".join(out)


def write_model_card(checkpoint: str | Path, *,
                     reproduction: str | Path | Sequence[str | Path] | None = None) -> Path:
    """Write ``MODEL_CARD.md`` (and ``reproduction.json`` when ``reproduction`` is given).

    Args:
        checkpoint: the checkpoint directory.
        reproduction: checkpoints retrained with the same seed (the same command, or another
            thread count); each is compared with :func:`compare_checkpoints`.

    Returns:
        The path of the card.
    """
    ckpt = Path(checkpoint)
    if reproduction is not None:
        runs = [reproduction] if isinstance(reproduction, str | Path) else list(reproduction)
        result = [compare_checkpoints(ckpt, r) for r in runs]
        (ckpt / "reproduction.json").write_text(json.dumps(result, indent=1) + "\n")
        log.info("reproduction: %s", result)
    path = ckpt / "MODEL_CARD.md"
    path.write_text(render_model_card(ckpt))
    return path


def main(argv: list[str] | None = None) -> Path:
    """Command line: ``python -m factfind.organism.card CHECKPOINT [--reproduction DIR ...]``."""
    parser = argparse.ArgumentParser(description="Write MODEL_CARD.md for an organism checkpoint")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--reproduction", type=Path, nargs="+",
                        help="retrained checkpoints to compare")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return write_model_card(args.checkpoint, reproduction=args.reproduction)


if __name__ == "__main__":
    main()
