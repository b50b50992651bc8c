"""The activation cache: a corpus's activations at the asked sites, streamed to disk in shards.

Training a dictionary reads each token's activation many times (epochs, several dictionaries,
several configurations), while producing it costs a forward of the model. So the activations
of every asked site are collected once, in **one forward per batch** for all sites, and kept on
disk:

* texts are tokenized, sorted by length and cut into batches of about ``batch_tokens`` tokens
  of near-equal length (bucketing: almost no padding, which would cost forwards for nothing);
  the batches are then shuffled with ``seed`` so that each shard mixes lengths and sources;
* each forward saves the sites (``model.run(..., save=sites, logits=<[batch 1] ids>)``: the
  unembedding, a fifth of SmolLM2's forward, never runs) and keeps only real tokens: padding
  and a tokenizer-added BOS are dropped (the BOS's activations are huge outliers; SAELens and
  sparsify exclude it too);
* rows are stored as **float16** (half the bytes of float32; 10 mantissa bits, a relative
  rounding error of ~5e-4, far below what a dictionary's explained variance resolves; bfloat16
  keeps only 7 bits). A value beyond float16's range raises rather than overflow;
* every ``shard_tokens`` tokens (default: as many as fill ``shard_bytes``, 32 MiB, over all
  sites: 485 tokens for SmolLM2's 60 transcoder sites) go to one safetensors shard written with
  :func:`factfind.integrity.write_verified` (temporary file, size + sha256 sidecar,
  ``os.replace``), so memory stays flat in the corpus size and a killed collection resumes at
  the first missing shard (the shard plan is a pure function of the corpus and settings).

Reading: :meth:`ActivationCache.batches` streams shuffled ``(x, y)`` training batches of one
site pair from a shuffle buffer of about ``buffer_rows`` rows (each shard's rows are read
lazily, per site), so reading is flat in the corpus size too.

Cost: one forward per text, minus the unembedding, plus writing ``2 * d_model * n_sites`` bytes
per token.

Example::

    cache = collect_activations(model, corpus, sites=[("mlp_in", 3), ("mlp_out", 3)])
    for x, y in cache.batches(("mlp_in", 3), ("mlp_out", 3), batch_size=4096):
        ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, DegenerateResultError, EmptyInputError
from factfind.types import Component

log = logging.getLogger(__name__)

SiteKey = tuple[Component, int]
FP16_MAX = 65504.0


def site_name(site: SiteKey) -> str:
    """The tensor name of a site in a shard: ``mlp_in.3``."""
    return f"{Component(site[0]).value}.{int(site[1])}"


def _norm_sites(model: Any, sites: Sequence[tuple[Any, int]]) -> list[SiteKey]:
    out: list[SiteKey] = []
    for s in sites:
        try:
            comp, layer = Component(s[0]), int(s[1])
        except (ValueError, TypeError, IndexError):
            raise ArgumentError(f"unknown site {s!r}: a site is (component, layer), e.g. "
                                "('mlp_in', 3)") from None
        if not 0 <= layer < model.n_layers:
            raise ArgumentError(f"unknown site {site_name((comp, layer))}: {model.name} has "
                                f"layers 0..{model.n_layers - 1}")
        if comp not in (Component.MLP_IN, Component.MLP_OUT, Component.RESID_PRE,
                        Component.RESID_POST, Component.ATTN_OUT):
            raise ArgumentError(f"unknown site {site_name((comp, layer))}: dictionaries read "
                                "mlp_in, mlp_out, resid_pre, resid_post or attn_out")
        if (comp, layer) not in out:
            out.append((comp, layer))
    if not out:
        raise ArgumentError("no sites: pass at least one (component, layer)")
    return out


def plan_batches(lengths: Sequence[int], *, batch_tokens: int, seed: int) -> list[list[int]]:
    """Text indices grouped into batches of near-equal length (sorted by length, each batch's
    ``rows * longest <= batch_tokens``), in an order shuffled by ``seed``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    g = torch.Generator().manual_seed(seed)
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


@dataclass
class ActivationCache:
    """A folder of activation shards (see the module docstring)."""

    folder: Path
    sites: list[SiteKey]
    shards: list[Path]
    tokens: int
    d_model: int
    meta: dict[str, Any]

    def shard_tokens(self) -> list[int]:
        return list(self.meta["shard_tokens"])

    def read(self, shard: Path, site: SiteKey) -> Tensor:
        """One site's rows of one shard, ``[n d_model]`` float32."""
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            return f.get_tensor(site_name(site)).float()

    def tensor(self, site: SiteKey) -> Tensor:
        """All rows of one site, in shard order (for small caches, tests and benchmarks)."""
        return torch.cat([self.read(s, site) for s in self.shards])

    def batches(self, x_site: SiteKey, y_site: SiteKey | None = None, *, batch_size: int,
                epochs: int = 1, seed: int = 0, buffer_rows: int = 16384
                ) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Shuffled ``(x, y)`` batches of ``batch_size`` rows: per epoch, the shards in a
        seeded order, read into a buffer of at least ``buffer_rows`` rows (plus the rows left
        over from the previous buffer) that is shuffled and cut into batches. A short final
        remainder is dropped."""
        g = torch.Generator().manual_seed(seed + 7)
        for _ in range(epochs):
            xs: Tensor | None = None
            ys: Tensor | None = None
            order = torch.randperm(len(self.shards), generator=g).tolist()
            for pos, j in enumerate(order):
                xp = [] if xs is None else [xs]
                yp = [] if ys is None else [ys]
                xp.append(self.read(self.shards[j], x_site))
                if y_site is not None:
                    yp.append(self.read(self.shards[j], y_site))
                if sum(len(t) for t in xp) < max(buffer_rows, batch_size) and \
                        pos < len(order) - 1:
                    xs = torch.cat(xp)
                    ys = torch.cat(yp) if y_site is not None else None
                    continue
                x = torch.cat(xp)
                y = torch.cat(yp) if y_site is not None else None
                perm = torch.randperm(x.shape[0], generator=g)
                x = x[perm]
                y = y[perm] if y is not None else None
                n = x.shape[0] // batch_size * batch_size
                for i in range(0, n, batch_size):
                    yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])
                xs, ys = x[n:], (None if y is None else y[n:])

    def steps(self, batch_size: int, epochs: int = 1) -> int:
        """How many batches :meth:`batches` yields (about: remainders carry over)."""
        return self.tokens // batch_size * epochs


def cache_key(model: Any, corpus: Any, sites: Sequence[SiteKey], settings: dict[str, Any]
              ) -> str:
    blob = json.dumps([model.fingerprint(), corpus.fingerprint(),
                       [site_name(s) for s in sites], settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def collect_activations(model: Any, corpus: Any, *, sites: Sequence[tuple[Any, int]],
                        folder: str | os.PathLike[str] | None = None,
                        batch_tokens: int = 4096, shard_tokens: int | None = None,
                        shard_bytes: int = 32 << 20,
                        max_len: int = 128, seed: int = 0, progress: bool = True,
                        cache_dir: str | os.PathLike[str] | None = None) -> ActivationCache:
    """Collect (or resume, or load) the activations of ``corpus`` at ``sites``.

    Args:
        model: a :class:`~factfind.model.Model`.
        corpus: a :class:`~factfind.features.corpus.Corpus`.
        sites: ``(component, layer)`` pairs, e.g. ``[("mlp_in", 3), ("mlp_out", 3)]``.
        folder: where the shards go (default ``$FACTFIND_CACHE/activations/<key>``, keyed by
            the model, corpus, sites and these settings).
        batch_tokens: tokens per forward (rows x longest text); shard_tokens: tokens per shard
            (default: ``shard_bytes`` of float16 rows over all sites, at least 256 tokens).
        max_len: texts are cut to this many tokens.
        seed: the order of the batches (and so of the shards).
        cache_dir: the cache root when ``folder`` is None (default ``$FACTFIND_CACHE``).

    Returns:
        An :class:`ActivationCache`.

    Raises:
        EmptyInputError: the corpus has no token to keep. DegenerateResultError: NaN, infinite
        or float16-overflowing activations (the message names the site).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from factfind import integrity
    from factfind.model.checkpoints import cache_root

    keys = _norm_sites(model, sites)
    if shard_tokens is None:
        shard_tokens = max(256, shard_bytes // (2 * model.d_model * len(keys)))
    settings = {"batch_tokens": batch_tokens, "shard_tokens": shard_tokens,
                "max_len": max_len, "seed": seed, "dtype": "float16", "version": 1}
    # the key leaves out how the rows are cut into shards (any cut reads back the same rows)
    key = cache_key(model, corpus, keys, {k: v for k, v in settings.items()
                                          if k != "shard_tokens"})
    root = Path(folder) if folder is not None else cache_root(cache_dir) / "activations" / key
    import time

    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.json"
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        shards = [root / s for s in meta["shards"]]
        if meta.get("key") == key and all(_shard_damage(s) is None for s in shards):
            log.info("activations: %d tokens at %d sites from the cache %s", int(meta["tokens"]),
                     len(keys), root)
            return ActivationCache(root, keys, shards, int(meta["tokens"]), model.d_model, meta)
    tok = model.tokenizer
    ids = tok(list(corpus.texts), add_special_tokens=True, truncation=True,
              max_length=max_len)["input_ids"]
    bos = tok.bos_token_id
    adds_bos = bos is not None and bool(ids) and all(len(i) > 0 and i[0] == bos
                                                     for i in ids[:50])
    batches = plan_batches([len(i) for i in ids], batch_tokens=batch_tokens, seed=seed)
    keep_counts = [sum(len(ids[i]) - int(adds_bos) for i in b) for b in batches]
    if sum(keep_counts) == 0:
        raise EmptyInputError("collect_activations: the corpus has no token to keep "
                              "(every text is empty after tokenization)")
    # shard plan: consecutive batches until shard_tokens kept tokens
    plan: list[list[int]] = []
    cur: list[int] = []
    acc = 0
    for j, n in enumerate(keep_counts):
        cur.append(j)
        acc += n
        if acc >= shard_tokens:
            plan.append(cur)
            cur, acc = [], 0
    if cur:
        plan.append(cur)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    shards: list[Path] = []
    shard_sizes: list[int] = []
    bar = tqdm(total=sum(keep_counts), disable=not progress, unit="tok",
               desc="activations", leave=False)
    kept = computed = 0
    try:
        for s_i, group in enumerate(plan):
            path = root / f"shard-{s_i:05d}.safetensors"
            n_keep = sum(keep_counts[j] for j in group)
            shards.append(path)
            shard_sizes.append(n_keep)
            reason = _shard_damage(path)
            if reason is None:
                bar.update(n_keep)
                kept += 1
                continue
            if path.exists():  # damaged: set aside (never deleted), then collected again
                integrity.quarantine(path, reason=reason, sidecar=integrity.sidecar_of(path),
                                     root=root.parent)
            if kept and not computed:  # the first shard computed after cached ones
                log.info("activations: resuming %s, %d of %d shards already cached", root, kept,
                         len(plan))
            computed += 1
            parts: dict[SiteKey, list[Tensor]] = {k: [] for k in keys}
            for j in group:
                rows = [ids[i] for i in batches[j]]
                L = max(len(r) for r in rows)
                input_ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
                mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                run = model.run({"input_ids": input_ids, "attention_mask": mask,
                                 "position_ids": pos}, save=keys,
                                logits=torch.zeros(len(rows), 1, dtype=torch.long))
                keep = mask.bool()
                if adds_bos:
                    keep &= input_ids != bos
                for k in keys:
                    a = run.acts[k][keep].float()                    # [n_keep d_model]
                    _check_finite(a, k)
                    parts[k].append(a.to(torch.float16))
                bar.update(int(keep.sum()))
            tensors = {site_name(k): torch.cat(v) for k, v in parts.items()}
            parts.clear()
            integrity.write_verified(path, lambda p, t=tensors: save_file(t, str(p)))
            del tensors
    finally:
        bar.close()
    meta = {"key": key, "model": model.name, "model_fingerprint": model.fingerprint(),
            "corpus": corpus.fingerprint(), "sites": [site_name(k) for k in keys],
            "shards": [p.name for p in shards], "shard_tokens": shard_sizes,
            "tokens": sum(shard_sizes), "excluded": "padding" + (", BOS" if adds_bos else ""),
            "seconds_this_process": time.perf_counter() - t0,
            "threads": torch.get_num_threads(), **settings}
    from factfind.cache import atomic_write_bytes

    atomic_write_bytes(manifest, json.dumps(meta, indent=1).encode())
    return ActivationCache(root, keys, shards, sum(shard_sizes), model.d_model, meta)


def _shard_damage(path: Path) -> str | None:
    """Why a shard cannot be used (missing, or not what was written: its size and sha256
    against its sidecar, or, without a sidecar, a safetensors file shorter or longer than its
    own header), or ``None``."""
    from factfind import integrity

    reason = integrity.check(path)
    if reason is None and not integrity.verified_by_record(path):
        reason = integrity.safetensors_incomplete(path)
    return reason


def _check_finite(a: Tensor, site: SiteKey) -> None:
    if not torch.isfinite(a).all():
        raise DegenerateResultError(f"NaN or infinite activations at {site_name(site)} (layer "
                                    f"{site[1]}): check the model's weights and dtype")
    big = float(a.abs().max()) if a.numel() else 0.0
    if big > FP16_MAX:
        raise DegenerateResultError(f"activations at {site_name(site)} (layer {site[1]}) reach "
                                    f"{big:.3g}, beyond float16's range: the cache cannot "
                                    "store them")
