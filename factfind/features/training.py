"""Training sparse dictionaries on a CPU: TopK / BatchTopK with AuxK revival.

The recipe is Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") as EleutherAI's
``sparsify`` implements it, for SAEs, transcoders (Dunefsky et al. 2024) and skip transcoders
(Paulo et al. 2025):

* **TopK**: each token keeps its ``k`` largest ReLU'd pre-activations; **BatchTopK**
  (Bussmann et al. 2024) keeps the ``k * batch`` largest over the batch, so busy tokens get more
  features and quiet ones fewer. At inference BatchTopK uses one threshold, estimated (as
  SAELens does) as a running mean of the smallest positive kept activation per batch.
* **Loss**: the fraction of variance unexplained, ``sum((y - y_hat)^2) / sum((y - mean y)^2)``,
  plus ``aux_alpha`` (1/32) times the **AuxK** loss: the ``aux_k`` (``d_out / 2``) largest
  pre-activations of the *dead* features (none fired in the last ``dead_after`` tokens) must
  predict the residual ``y - y_hat``; its weight is scaled by ``min(n_dead / aux_k, 1)``. This
  pulls dead features back towards the data instead of letting them rot.
* **Initialisation**: unit-norm random decoder rows, the encoder their transpose, ``b_dec`` the
  target's mean (over the first batch, as sparsify does), ``W_skip`` zero.
* **Geometry**: after each step the decoder rows are put back to unit norm, and before it the
  gradient component parallel to each row is removed (it would only change the norm).
* **Optimiser**: Adam with ``lr = 2e-4 / sqrt(width / 2**14)`` (sparsify's width scaling),
  times ``lr_scale``, decayed linearly to 0 over the last ``decay`` fraction of steps.
* **Scale**: inputs and targets are scaled to mean norm ``sqrt(d)`` while training (SAELens'
  ``expected_average_only_in``) and the scales are folded into the returned weights, so the
  returned dictionary reads and writes the model's own activations.

Cost: one dense ``[batch d_in] @ [d_in width]`` matmul per step; everything after the top-k is
sparse. The decoder is an ``embedding_bag`` over the kept indices (its backward is an indexed
add), and the encoder's gradient is written by hand as a sparse ``[width batch] @ [batch d_in]``
product over the kept entries only, so a step costs about one forward of the encoder, where
autograd through a dense encoder costs three.

Determinism: the same seed, inputs and thread count give the same dictionary bit for bit
(tested at one thread).

Example::

    d = fit_dictionary(x, y, kind="transcoder", width=2048, k=32, seed=0)   # x, y: [n d_model]
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Dictionaries, Dictionary, DictKind
from factfind.features.trainer import FitConfig, Trainer
from factfind.types import Component

log = logging.getLogger(__name__)

#: a batch of (input, target) rows; the target is None for an SAE
Batch = tuple[Tensor, Tensor | None]


# ---------------------------------------------------------------------- data


def _check_rows(x: Tensor, y: Tensor | None, where: str) -> None:
    if x.dim() != 2 or (y is not None and (y.dim() != 2 or y.shape[0] != x.shape[0])):
        raise ArgumentError(f"{where}: x must be [n d_in] and y [n d_out] with the same n, got "
                            f"{tuple(x.shape)} and {None if y is None else tuple(y.shape)}")
    if not torch.isfinite(x).all() or (y is not None and not torch.isfinite(y).all()):
        raise ArgumentError(f"{where}: the activations hold NaN or infinite values")


def tensor_batches(x: Tensor, y: Tensor | None, *, batch_size: int, epochs: int,
                   seed: int) -> Callable[[], Iterator[Batch]]:
    """A re-playable stream of shuffled batches over in-memory rows (a new permutation per
    epoch, drawn from ``seed``; a short last batch is dropped unless it is the only one)."""
    n = x.shape[0]

    def gen() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed + 1)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g)
            stops = range(0, n - batch_size + 1, batch_size) if n >= batch_size else [0]
            for i in stops:
                idx = perm[i:i + batch_size]
                yield x[idx], (None if y is None else y[idx])
    return gen


def fit_dictionary(x: Tensor | Iterable[Batch | Tensor], y: Tensor | None = None, *,
                   kind: str = "transcoder", activation: str = "topk", width: int,
                   k: int, batch_size: int = 4096, epochs: int = 1, lr: float | None = None,
                   lr_scale: float = 1.0, decay: float = 0.2, aux_k: int | None = None,
                   aux_alpha: float = 1 / 32, dead_after: int = 100_000, seed: int = 0,
                   layer: int = 0, site: Component | str | None = None,
                   total_steps: int | None = None, init: Batch | None = None,
                   checkpoint: str | Path | None = None,
                   checkpoint_every: float = 30.0, progress: bool = True,
                   model: str | None = None) -> Dictionary:
    """Fit one sparse dictionary on activations held in memory or streamed in batches.

    Args:
        x: inputs ``[n d_in]``, or an iterable of batches (``x`` tensors for an SAE, or
            ``(x, y)`` pairs); an iterable is consumed once (``epochs`` applies to tensors).
        y: targets ``[n d_out]`` for a (skip) transcoder; ``None`` for an SAE (target = input).
        kind, activation, width, k, batch_size, epochs, lr, lr_scale, decay, aux_k, aux_alpha,
            dead_after, seed: see :class:`FitConfig`.
        layer, site: recorded on the returned :class:`Dictionary`.
        total_steps: the number of steps of an iterable (for the lr decay and the progress bar).
        init: sample ``(x, y)`` rows that fix the scales, ``b_dec`` and a skip transcoder's
            initial ``W_skip`` (default: up to 16,384 rows of in-memory data, or the first
            batch of an iterable).
        checkpoint: a path stem; the trainer's state is saved there atomically every
            ``checkpoint_every`` seconds and a rerun resumes from it (same result as an
            uninterrupted run: the skipped batches are replayed from the same stream).
        progress: a tqdm bar with the FVU and an ETA.

    Returns:
        The :class:`Dictionary`; ``meta["training"]`` holds the config, tokens, steps, final FVU
        and dead fraction.

    Example::

        d = fit_dictionary(x_in, y_out, kind="transcoder", width=4 * 576, k=32)
        d.reconstruct(x_in)      # ~ y_out
    """
    from tqdm.auto import tqdm

    cfg = FitConfig(kind=kind, activation=activation, width=width, k=k,
                    batch_size=batch_size, epochs=epochs, lr=lr, lr_scale=lr_scale, decay=decay,
                    aux_k=aux_k, aux_alpha=aux_alpha, dead_after=dead_after, seed=seed)
    is_sae = DictKind(kind) is DictKind.SAE
    if isinstance(x, Tensor):
        _check_rows(x, y, "fit_dictionary")
        if x.shape[0] == 0:
            raise EmptyInputError("fit_dictionary: no rows to train on (x is empty)")
        if is_sae and y is not None:
            raise ArgumentError("fit_dictionary: an SAE reconstructs its input; pass y=None")
        if not is_sae and y is None:
            raise ArgumentError(f"fit_dictionary: a {kind} maps x to y; pass the targets y")
        n = x.shape[0]
        steps = max(n // batch_size, 1) * epochs
        stream: Iterable[Any] = tensor_batches(x, y, batch_size=batch_size, epochs=epochs,
                                               seed=seed)()
        d_in, d_out = x.shape[1], (x.shape[1] if y is None else y.shape[1])
        first = None
    else:
        it = iter(x)
        first = next(it, None)
        if first is None:
            raise EmptyInputError("fit_dictionary: the batch iterable is empty")
        fx, fy = _as_pair(first)
        d_in, d_out = fx.shape[1], (fx.shape[1] if fy is None else fy.shape[1])
        steps = total_steps or 1
        stream = _chain(first, it)
    trainer = Trainer(cfg, d_in, d_out, total_steps=steps, layer=layer, site=site)
    if init is None and isinstance(x, Tensor):
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:16384]
        init = (x[pick], None if y is None else y[pick])
    if init is not None:
        trainer.initialize(*init)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and trainer.load(ckpt):
        log.info("resuming %s from step %d", ckpt, trainer.s.step)
    done = trainer.s.step
    last_save = time.monotonic()
    bar = tqdm(total=steps, initial=done, disable=not progress, unit="step",
               desc=f"fit {kind} L{layer}", leave=False)
    try:
        for i, batch in enumerate(stream):
            if i < done:
                continue
            bx, by = _as_pair(batch)
            _check_rows(bx, by, f"fit_dictionary batch {i}")
            fvu = trainer.step(bx, by)
            bar.update(1)
            bar.set_postfix(fvu=f"{fvu:.3f}", refresh=False)
            if ckpt is not None and time.monotonic() - last_save > checkpoint_every:
                trainer.save(ckpt)
                last_save = time.monotonic()
    finally:
        bar.close()
    if trainer.s.step == 0:
        raise EmptyInputError("fit_dictionary: no batch was trained on")
    return trainer.dictionary(model=model)


def _as_pair(batch: Batch | Tensor) -> Batch:
    if isinstance(batch, Tensor):
        return batch, None
    bx, by = batch
    return bx, by


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# ---------------------------------------------------------------------- every layer of a model

#: the defaults of :func:`train_dictionaries` (chosen by measurement on SmolLM2-135M; see
#: benchmarks/README.md, "Dictionaries on SmolLM2")
DEFAULTS: dict[str, Any] = {"kind": "skip_transcoder", "activation": "topk", "expansion": 4,
                            "k": 32, "tokens": 40_000, "epochs": 2, "batch_size": 512,
                            "lr_scale": 4.0, "dead_after": 20_000}


def _sites_for(model: Any, kind: DictKind, layers: Iterable[int] | None,
               sae_site: Component) -> list[tuple[int, Component, Component | None]]:
    """``(layer, input site, target site or None)`` per dictionary."""
    from factfind.features.activations import site_name

    all_layers = list(range(model.n_layers))
    chosen = all_layers if layers is None else [int(layer) for layer in layers]
    for layer in chosen:
        if layer not in all_layers:
            raise ArgumentError(f"unknown site: layer {layer} of {model.name}, which has layers "
                                f"0..{model.n_layers - 1}")
    if not chosen:
        raise ArgumentError("no layers: pass at least one layer (or None for every layer)")
    if kind is DictKind.SAE:
        if sae_site not in (Component.RESID_POST, Component.RESID_PRE, Component.MLP_OUT,
                            Component.ATTN_OUT):
            raise ArgumentError(f"unknown site {site_name((sae_site, 0))}: an SAE reads "
                                "resid_post, resid_pre, mlp_out or attn_out")
        return [(layer, sae_site, None) for layer in sorted(set(chosen))]
    return [(layer, Component.MLP_IN, Component.MLP_OUT) for layer in sorted(set(chosen))]


def _select_tokens(corpus: Any, tokenizer: Any, tokens: int | None, seed: int) -> Any:
    """The corpus, or its texts in a seeded order until ``tokens`` tokens."""
    from factfind.features.corpus import Corpus

    if tokens is None:
        return corpus
    if tokens <= 0:
        raise ArgumentError(f"tokens must be > 0, got {tokens}")
    lengths = [len(i) for i in tokenizer(corpus.texts, add_special_tokens=True)["input_ids"]]
    if sum(lengths) <= tokens:
        return corpus
    g = torch.Generator().manual_seed(seed)
    picked, acc = [], 0
    for i in torch.randperm(len(lengths), generator=g).tolist():
        if acc >= tokens:
            break
        picked.append(i)
        acc += lengths[i]
    prov = {**corpus.provenance, "tokens": acc, "subset": f"{len(picked)} texts, seed {seed}"}
    return Corpus([corpus.texts[i] for i in sorted(picked)], prov)


def _init_sample(cache: Any, x_site: Any, y_site: Any, rows: int = 16384) -> Batch:
    """The first ``rows`` rows of the cache (its shards are already in a shuffled order): what
    fixes the scales, ``b_dec`` and a skip transcoder's least-squares ``W_skip``. One batch of
    512 rows is too few for a 576 x 576 least-squares fit."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for shard in cache.shards:
        xs.append(cache.read(shard, x_site))
        if y_site is not None:
            ys.append(cache.read(shard, y_site))
        if sum(len(t) for t in xs) >= rows:
            break
    return torch.cat(xs)[:rows], (torch.cat(ys)[:rows] if ys else None)


def dictionaries_dir(cache_dir: str | Path | None = None) -> Path:
    """``$FACTFIND_CACHE/dictionaries`` (or ``~/.cache/factfind/dictionaries``)."""
    from factfind.model.checkpoints import cache_root

    return cache_root(cache_dir) / "dictionaries"


def train_dictionaries(model: Any, corpus: Any = None, *, layers: Iterable[int] | None = None,
                       kind: str = DEFAULTS["kind"], activation: str = DEFAULTS["activation"],
                       width: int | None = None, k: int = DEFAULTS["k"],
                       tokens: int | None = DEFAULTS["tokens"], epochs: int = DEFAULTS["epochs"],
                       batch_size: int = DEFAULTS["batch_size"], lr: float | None = None,
                       lr_scale: float = DEFAULTS["lr_scale"],
                       dead_after: int = DEFAULTS["dead_after"], aux_alpha: float = 1 / 32,
                       sae_site: str = "resid_post", seed: int = 0,
                       cache_dir: str | Path | None = None, force: bool = False,
                       progress: bool = True) -> Dictionaries:
    """Train one dictionary per layer on a corpus's activations, or load them from the cache.

    The pipeline: the corpus (default :func:`~factfind.features.corpus.load_corpus` with the
    model's samples), cut to ``tokens`` tokens; its activations at every asked site collected
    in one forward per batch and cached on disk
    (:func:`~factfind.features.activations.collect_activations`); then one
    :func:`fit_dictionary` per layer over shuffled batches streamed from the cache. Each
    finished layer is saved at once and the layer in flight checkpoints every 30 s, so a killed
    run resumes where it stopped. The finished set is saved in sparsify's format (which holds
    TopK transcoders; :func:`~factfind.features.formats.load_dictionaries` reads it) under
    ``$FACTFIND_CACHE/dictionaries/<key>``, keyed by the model's fingerprint, the corpus's and
    the configuration, so a second call loads it in seconds.

    Args:
        model: a :class:`~factfind.model.Model`.
        corpus: a :class:`~factfind.features.corpus.Corpus` (``None``: the default corpus).
        layers: which layers (``None``: all).
        kind: ``skip_transcoder`` (default), ``transcoder`` (both read ``mlp_in`` and write
            ``mlp_out``) or ``sae`` (reads and writes ``sae_site``).
        activation, k, epochs, batch_size, lr, lr_scale, dead_after, aux_alpha, seed: see
            :class:`~factfind.features.trainer.FitConfig`.
        width: features per dictionary (``None``: ``expansion`` (4) x ``d_model``).
        tokens: training tokens per layer and epoch (``None``: the whole corpus).
        force: retrain even if the cache holds the result.

    Returns:
        :class:`~factfind.features.dictionary.Dictionaries`; ``.meta`` holds the provenance
        (corpus recipe and tokens, config, seconds per stage).

    Cost: one forward per corpus token (minus the unembedding) plus, per layer and epoch, about
    one ``[tokens d_model] @ [d_model width]`` matmul; the default run on SmolLM2-135M is
    recorded in benchmarks/README.md.

    Example::

        dicts = ff.train_dictionaries(model, layers=[3, 20], k=32)
        dicts.at(3).reconstruct(x)
    """

    from factfind.cache import atomic_write_bytes
    from factfind.features.activations import cache_key, collect_activations
    from factfind.features.corpus import load_corpus

    t0 = time.perf_counter()
    dk = DictKind(kind) if kind in {k_.value for k_ in DictKind} else None
    if dk is None:
        raise ArgumentError(f"kind must be one of {[k_.value for k_ in DictKind]}, got {kind!r}")
    width = int(width) if width is not None else int(DEFAULTS["expansion"] * model.d_model)
    assert width is not None
    FitConfig(kind=kind, activation=activation, width=width, k=k, batch_size=batch_size,
              epochs=epochs, lr=lr, lr_scale=lr_scale)  # validates before any forward
    plan = _sites_for(model, dk, layers, Component(sae_site))
    if corpus is None:
        corpus = load_corpus(model=model, progress=progress)
    corpus = _select_tokens(corpus, model.tokenizer, tokens, seed)
    config = {"kind": kind, "activation": activation, "width": width, "k": k,
              "tokens": tokens, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "lr_scale": lr_scale, "dead_after": dead_after, "aux_alpha": aux_alpha,
              "sae_site": sae_site, "seed": seed, "layers": [p[0] for p in plan],
              "version": 1}
    sites = [(c, layer) for layer, x_site, y_site in plan
             for c in ((x_site,) if y_site is None else (x_site, y_site))]
    key = cache_key(model, corpus, sites, config)
    root = dictionaries_dir(cache_dir) / key
    final = root / "dictionaries"
    prov_path = root / "provenance.json"
    quarantine_root = dictionaries_dir(cache_dir)
    if final.exists() and prov_path.exists() and not force:
        cached = _load_verified(final, quarantine_root)
        if cached is not None:
            cached.meta.update(json.loads(prov_path.read_text()))
            cached.meta["loaded_from_cache"] = str(root)
            log.info("loaded %d cached dictionaries from %s", len(cached), root)
            return cached
    t_collect = time.perf_counter()
    cache = collect_activations(model, corpus, sites=sites, progress=progress,
                                cache_dir=cache_dir, seed=seed)
    seconds = {"collect": time.perf_counter() - t_collect}
    done: list[Dictionary] = []
    steps = cache.steps(batch_size, epochs)
    model_id = f"{model.name}@{model.fingerprint()}"
    for layer, x_site, y_site in plan:
        one = root / "layers" / f"L{layer}"
        if one.exists() and not force:
            cached = _load_verified(one, quarantine_root)
            if cached is not None:
                done.append(next(iter(cached.values())))
                continue
        t_layer = time.perf_counter()
        stream = cache.batches((x_site, layer), None if y_site is None else (y_site, layer),
                               batch_size=batch_size, epochs=epochs, seed=seed + layer)
        d = fit_dictionary(stream, kind=kind, activation=activation, width=width, k=k,
                           init=_init_sample(cache, (x_site, layer),
                                             None if y_site is None else (y_site, layer)),
                           batch_size=batch_size, lr=lr, lr_scale=lr_scale,
                           dead_after=dead_after, aux_alpha=aux_alpha, seed=seed + layer,
                           layer=layer, site=x_site, total_steps=steps,
                           checkpoint=root / "checkpoints" / f"L{layer}", progress=progress,
                           model=model_id)
        d.meta["training"]["seconds"] = time.perf_counter() - t_layer
        _save_verified(d, one)
        done.append(d)
        log.info("trained %s: fvu %.3f, dead %.1f%%, %.1f s", d.name,
                 d.meta["training"]["final_fvu"], 100 * d.meta["training"]["dead_fraction"],
                 d.meta["training"]["seconds"])
    seconds["train"] = sum(float(d.meta["training"].get("seconds", 0.0)) for d in done)
    seconds["total"] = time.perf_counter() - t0
    provenance = {"model": model.name, "model_fingerprint": model.fingerprint(),
                  "corpus": {**corpus.provenance, "fingerprint": corpus.fingerprint()},
                  "activation_tokens": cache.tokens, "activations": str(cache.folder),
                  "config": config, "seconds": seconds, "key": key,
                  "threads": torch.get_num_threads()}
    dicts = Dictionaries(done, model=model_id, meta=provenance)
    _save_verified(dicts, final)
    atomic_write_bytes(prov_path, json.dumps(provenance, indent=1, default=str).encode())
    return dicts


def _manifest_of(folder: Path) -> Path:
    return folder.with_name(folder.name + ".manifest.json")


def _save_verified(dicts: Dictionaries | Dictionary, folder: Path) -> None:
    """Save in sparsify's format, then record every file's size and sha256 beside the folder
    (``<folder>.manifest.json``), which :func:`_load_verified` checks before reading."""
    from factfind.cache import atomic_write_bytes
    from factfind.features.formats import save_dictionaries
    from factfind.integrity import manifest

    save_dictionaries(dicts, folder, format="sparsify", overwrite=True)
    atomic_write_bytes(_manifest_of(folder), json.dumps(manifest(folder), indent=1).encode())


def _load_verified(folder: Path, root: Path) -> Dictionaries | None:
    """A cached dictionary folder if its files match the manifest written with it (or, for a
    folder cached before manifests, if it reads); else it is moved into ``<root>/quarantine``
    (one log line, nothing deleted) and ``None`` says to rebuild it."""
    from factfind.errors import DictionaryFileError
    from factfind.features.formats import load_dictionaries
    from factfind.integrity import check_folder, quarantine

    record = _manifest_of(folder)
    reason = None
    if record.exists():
        try:
            reason = check_folder(folder, json.loads(record.read_text()))
        except (OSError, ValueError) as e:
            reason = f"unreadable manifest ({type(e).__name__})"
    if reason is None:
        try:
            return load_dictionaries(folder)
        except DictionaryFileError as e:
            reason = str(e)
    quarantine(folder, reason=reason, sidecar=record, root=root)
    return None


def cli_main(argv: list[str] | None = None) -> None:
    """``factfind train-dictionaries [--model M] [--layers 0,3] [--kind K] [--width W] [--k K]
    [--tokens N] [--epochs E] [--threads T] [--out DIR]``: train (or load from the cache) one
    dictionary per layer on the default corpus and print a per-layer summary."""
    import argparse

    from factfind.console import configure_logging
    from factfind.model import load_model

    p = argparse.ArgumentParser(prog="factfind train-dictionaries",
                                description="train sparse dictionaries at every layer")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default=None, help="a .txt/.jsonl file or folder (default: the "
                   "offline default corpus)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--kind", default=DEFAULTS["kind"], choices=[k.value for k in DictKind])
    p.add_argument("--activation", default=DEFAULTS["activation"], choices=["topk", "batchtopk"])
    p.add_argument("--width", type=int, default=None, help="default: 4 x d_model")
    p.add_argument("--k", type=int, default=DEFAULTS["k"])
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=float, default=0.05, help="fraction of the corpus's texts "
                   "kept out of training (Corpus.split; 0 trains on all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="cache folder (default $FACTFIND_CACHE or "
                   "~/.cache/factfind)")
    p.add_argument("--out", default=None, help="also save the set here (sparsify format)")
    p.add_argument("--force", action="store_true", help="retrain even if cached")
    a = p.parse_args(argv)
    configure_logging()
    torch.set_num_threads(a.threads)
    model = load_model(a.model)
    from factfind.features.corpus import load_corpus

    corpus = load_corpus(a.corpus, model=model, seed=a.seed)
    if a.held_out > 0:
        corpus = corpus.split(a.held_out, seed=a.seed)[0]
    t = time.perf_counter()
    dicts = train_dictionaries(model, corpus, kind=a.kind, activation=a.activation,
                               layers=None if a.layers is None else
                               [int(x) for x in a.layers.split(",")],
                               width=a.width, k=a.k, tokens=a.tokens, epochs=a.epochs,
                               seed=a.seed, cache_dir=a.cache, force=a.force)
    wall = time.perf_counter() - t
    log.info("%s: %d dictionaries in %.1f s wall (%s)", model.name, len(dicts), wall,
             (dicts.meta.get("loaded_from_cache") and "loaded from the cache") or "trained")
    for name, d in dicts.items():
        tr = d.meta.get("training", {})
        log.info("%s  train fvu %.3f  dead %.1f%%  %.1f s", name, tr.get("final_fvu", float("nan")),
                 100 * tr.get("dead_fraction", float("nan")), tr.get("seconds", float("nan")))
    if a.out:
        dicts.save(a.out, format="sparsify")
