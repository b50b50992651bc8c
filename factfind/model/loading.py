"""Loading a causal LM into a :class:`~factfind.model.adapter.Model`: the shipped organism, a
local directory, a hub name, a ``.gguf`` file or a short name (via
:mod:`factfind.model.checkpoints`), or objects already built; dtype, device or a ``device_map``
over several GPUs; and a revision that names the weights (the hub commit, a local directory's
content id, a GGUF's content key) so results cached for one checkpoint are never read for
another."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from factfind.errors import ArgumentError
from factfind.model.adapter import Model
from factfind.model.architectures import spec_for

log = logging.getLogger(__name__)


def load_model(
    source: Any = "organism",
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    attn_implementation: str = "eager",
    device_map: str | dict[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Load a causal LM for analysis.

    Args:
        source: ``"organism"`` (the shipped model organism), a local Hugging Face model
            directory, a hub name (needs the hub to be reachable), a ``.gguf`` file
            (dequantized once and cached as safetensors), a short name such as
            ``"smollm2-135m"`` (:mod:`factfind.model.checkpoints`), a ``(model, tokenizer)``
            pair, or an already-built ``PreTrainedModel`` (then pass ``tokenizer``).
        tokenizer: a tokenizer to use instead of the one stored with the model.
        device: ``"cpu"``, ``"cuda"``, ...; default CPU.
        dtype: e.g. ``torch.float32`` or ``"bfloat16"``; default the checkpoint's.
        revision: hub revision (branch, tag or commit).
        attn_implementation: ``"eager"`` (default: exact, needed for parity with peers) or
            ``"sdpa"``.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard the layers over
            every visible GPU, spilling to CPU; needs ``accelerate``). Inputs then go to the
            embedding's device and activations stay where their layer runs; batch sizes follow
            the least free memory among the devices (:meth:`Model.rows_that_fit`).
        cache_dir: where dequantized GGUF checkpoints are cached (default ``$FACTFIND_CACHE``
            or ``~/.cache/factfind``).

    Returns:
        A :class:`Model`; ``model.provenance`` says where its weights came from (source,
        quantization, dtype).

    Raises:
        factfind.errors.CheckpointError: a missing or corrupt ``.gguf`` file.
        factfind.errors.ModelNotInstalledError: a short name whose package is not installed,
            with no cached copy and the hub out of reach (names the package to install).
        factfind.errors.IncompleteInstallError: a short name whose package ships its file in
            chunk packages, some of them not installed (names them and the pip command).
        factfind.errors.CacheCorruptError: the organism's checkpoint, or a dequantized cache
            whose GGUF is gone, fails its size and sha256 check (a damaged cache whose GGUF is
            there is converted again instead).
        factfind.errors.CacheWriteError: a dequantized cache cannot be written.

    Example::

        model = load_model("organism")
        model = load_model("/models/pythia-2.8b", device="cuda", dtype="bfloat16")
        model = load_model("/models/Llama-3.1-70B", device_map="auto", dtype="bfloat16")
        model = load_model("smollm2-135m")          # SmolLM2-135M-Instruct, GGUF Q4_1
        model = load_model("gemma-3-270m")          # Gemma-3-270M, GGUF Q4_K_M
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factfind.model.checkpoints import near_alias, prepare

    prepared = prepare(source, cache_dir=cache_dir) if isinstance(source, str | os.PathLike) \
        else None
    if prepared is not None:
        source = prepared.path

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device_map is not None:
        import importlib.util

        if not isinstance(source, (str, os.PathLike)):
            raise ArgumentError("device_map shards a checkpoint while it loads: pass a model "
                             "directory or hub name (or dispatch a built module yourself with "
                             "accelerate.dispatch_model and pass it without device_map)")
        if device is not None:
            raise ArgumentError("pass device or device_map, not both")
        if importlib.util.find_spec("accelerate") is None:
            raise ImportError("device_map needs the accelerate package: pip install accelerate")
    if isinstance(source, tuple):
        hf, tok = source
        name = getattr(hf.config, "name_or_path", "") or type(hf).__name__
        rev = revision
    elif isinstance(source, (str, os.PathLike)):
        path = str(source)
        if path == "organism":
            from factfind.organism import CHECKPOINT_DIR, check_checkpoint

            check_checkpoint()  # size and sha256 of each file, one line naming a bad one
            path = str(CHECKPOINT_DIR)
            name = "factfind-organism"
        else:
            name = prepared.name if prepared is not None else path
        kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if revision is not None:
            kwargs["revision"] = revision
        try:
            hf = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as err:  # a short name whose package is not installed, hub out of reach
            if prepared is not None and prepared.missing is not None:
                raise prepared.unavailable(err, cache_dir) from None
            misspelt = near_alias(path, err)  # "gemma3-270m": did you mean a short name?
            if misspelt is not None:
                raise misspelt from None
            raise
        tok = tokenizer or AutoTokenizer.from_pretrained(path, revision=revision)
        rev = revision or getattr(hf.config, "_commit_hash", None) or _dir_revision(Path(path))
    else:
        hf, tok = source, tokenizer
        if tok is None:
            raise ArgumentError("load_model(<PreTrainedModel>) needs tokenizer=...")
        name = getattr(hf.config, "name_or_path", "") or type(hf).__name__
        rev = revision
    spec_for(hf.config)  # fail early, before wrapping
    if hasattr(hf, "set_attn_implementation"):
        try:
            hf.set_attn_implementation(attn_implementation)
        except (ValueError, ImportError) as err:  # pragma: no cover - depends on the install
            log.warning("could not set attn_implementation=%s: %s", attn_implementation, err)
    if dtype is not None and device_map is None:
        hf = hf.to(dtype=dtype)  # pyright: ignore[reportCallIssue]
    if device is not None and device_map is None:
        hf = hf.to(device=torch.device(device))  # pyright: ignore[reportCallIssue]
    if tok is None:
        raise ArgumentError(f"no tokenizer for {name!r}: pass tokenizer=...")
    if prepared is not None and prepared.revision is not None and revision is None:
        rev = prepared.revision  # the GGUF's content key, not the cache directory's
    model = Model(hf, tok, name=name, revision=rev)
    if prepared is not None:
        model.provenance = dict(prepared.provenance)
    return model


def _dir_revision(path: Path) -> str | None:
    """A content id for a local model directory: sha256 over its weight files' names and sizes
    plus the config, cheap even for large checkpoints."""
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "MANIFEST.json":  # the organism's record of these files, not a weight
            continue
        if f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.name == "config.json" or f.stat().st_size < 50_000_000:
                h.update(f.read_bytes())
    return "local-" + h.hexdigest()[:12]


__all__ = ["load_model"]
