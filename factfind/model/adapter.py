"""The model adapter: the one module that reaches inside a model, through nnsight.

Every analysis in factfind asks the same few things of a model: run a batch of prompts, read
activations at some sites, overwrite activations at other sites, block some attention edges,
and take gradients of a metric with respect to activations. This module answers exactly those
questions for any Hugging Face causal LM whose architecture has an
:class:`~factfind.model.architectures.ArchSpec` (where its modules live), and no other module
imports nnsight (a second backend would be a sibling module with parity tests).

Sites (see :mod:`factfind.types`) are defined *uniformly* across families, so that a head or a
neuron means the same thing in GPT-2, Pythia and Llama:

* ``resid_pre[l]`` is the first positional input of block ``l`` and ``resid_post[l]`` its output;
* ``z[l]`` is the input of the attention output projection, viewed ``[batch pos head d_head]``,
  and ``head_out[l][:, :, h] = z[l][:, :, h] @ W_O[l][h]`` (so ``sum_h head_out + b_O`` is the
  attention output: per-head outputs are exact, not approximations);
* ``neurons[l]`` is the input of the MLP output projection, i.e. the post-activation hidden units
  (for gated MLPs such as Llama's: ``act(gate) * up``), and ``neurons @ W_out + b_out`` is the
  MLP output;
* ``resid_post = resid_pre + attn_out + mlp_out`` holds for parallel (GPT-NeoX, GPT-J) and
  sequential (GPT-2, Llama) blocks alike.

Post norms (Gemma 2/3, OLMo 2). These families normalise each sublayer's output before adding it
to the residual stream: ``resid_mid = resid_pre + norm_a(o_proj(z))``. Here ``attn_out`` and
``mlp_out`` are what *enters the residual stream* (the post norm's output, and an edit of them
replaces that), so the residual identity above still holds. An RMSNorm is linear once its
denominator is fixed, so with the post norm's scale frozen at the run's own value
(:meth:`Model.attn_write_scale`, :meth:`Model.mlp_write_scale`: ``gain / rms(pre-norm output)``,
``[... d_model]``, all ones in families without post norms) the splits stay exact:
``head_out[l][:, :, h] = (z[l][:, :, h] @ W_O[l][h]) * attn_write_scale(l, z[l])`` and
``(neurons @ W_out + b_out) * mlp_write_scale(l, neurons) = mlp_out``. ``W_O``, ``W_out`` and the
biases stay the raw weights; every contribution computed from them must be multiplied by the
write scale of the run it comes from (``b_O`` and ``b_out`` are zero in these families: a
post-norm checkpoint with output biases is refused, since a bias's share would vary by
position). Editing ``z`` or ``neurons`` still works: the edit happens before the post norm and
the model recomputes everything downstream itself. Gradients through the post norm (its scale
is *not* frozen in the real model) are :meth:`Model.z_grad`'s job.

Softcapping (Gemma 2/3). ``Run.logits`` are the model's output, ``cap * tanh(raw / cap)``;
``Run.logits_raw`` keeps the pre-softcap logits, which are the ones linear in the residual
stream (direct logit attribution attributes those). Gemma 2's attention scores are softcapped
too: :meth:`Model.attn_logits` applies scale and cap to ``q . k``.

Left padding and positions: batches are left-padded (the final token is always at index -1) and
``position_ids`` are passed explicitly as ``cumsum(mask) - 1``, so a padded prompt sees the same
positions as an unpadded one, for absolute (GPT-2) and rotary (NeoX, Llama) embeddings alike.

Example::

    model = load_model("organism")
    batch = model.tokenize(facts)
    run = model.run(batch, save=[(Component.NEURONS, 2)])
    run.acts[(Component.NEURONS, 2)].shape        # [batch pos neuron]
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import hashlib
import json
import sys
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from factfind.errors import ArgumentError, OutOfRangeError
from factfind.model.architectures import UnsupportedArchitectureError, _get, spec_for
from factfind.model.incremental import Prefix, PrefixLayer, Resume, patch_edits
from factfind.model.weights import WeightViews
from factfind.types import Component, Remote, SiteKey

if TYPE_CHECKING:
    from factfind.data import FactPrompt
    from factfind.data.batch import TokenBatch


_VOLATILE_CONFIG = frozenset({"architectures", "_name_or_path", "transformers_version",
                               "_commit_hash", "torch_dtype"})
"""Config keys that :meth:`Model.fingerprint` ignores (bookkeeping, not the model)."""


Edit = Callable[[Tensor], Tensor]
"""A function from the activation at a site to its replacement (same shape)."""


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    """What one forward pass returned.

    Attributes:
        logits: ``[batch d_vocab]`` at the final position (or ``[batch pos d_vocab]`` when
            ``logits="all"`` was asked for).
        acts: saved activations by ``(component, layer)``; ``z`` is ``[batch pos head d_head]``.
        grads: gradients of the metric with respect to the saved activations.
        live: with ``keep_graph=True``, the saved activations still attached to the autograd
            graph (as the forward computed them: ``z`` and ``v`` unsplit), for further
            ``torch.autograd.grad`` calls between them (e.g. AtP*'s GradDrop); else ``None``.
    """

    logits: Tensor
    acts: dict[SiteKey, Tensor] = field(default_factory=dict)
    grads: dict[SiteKey, Tensor] = field(default_factory=dict)
    logits_raw: Tensor | None = None  # pre-softcap logits (families that softcap), else None
    live: dict[SiteKey, Tensor] | None = None


WRITABLE = (Component.EMBED, Component.RESID_PRE, Component.RESID_POST, Component.ATTN_OUT,
            Component.Z, Component.MLP_IN, Component.MLP_OUT, Component.NEURONS)


class Model(WeightViews):
    """A Hugging Face causal LM seen through nnsight, with uniform sites.

    The weight and norm views (``W_O``, ``W_U``, frozen norm scales, rotary...) are
    :class:`~factfind.model.weights.WeightViews`; this class adds the traced run.

    Build it with :func:`~factfind.model.loading.load_model`. Dimensions: ``n_layers, n_heads,
    n_kv_heads, d_model, d_head, d_mlp, d_vocab``.
    """

    def __init__(self, hf_model: Any, tokenizer: Any, *, name: str, revision: str | None = None):
        from nnsight import TransformersModel

        hf_model.eval()
        hf_model.requires_grad_(False)
        self.hf = hf_model
        self.spec = spec_for(hf_model.config, hf_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.provenance: dict[str, Any] = {"source": name}  # load_model adds quantization...
        self._nn = TransformersModel(hf_model, tokenizer=tokenizer)
        cfg = hf_model.config
        self.n_layers: int = len(_get(hf_model, self.spec.blocks))
        self.n_heads: int = getattr(cfg, self.spec.n_heads_attr)
        kv = getattr(cfg, self.spec.n_kv_heads_attr, None) if self.spec.n_kv_heads_attr else None
        self.n_kv_heads: int = kv or self.n_heads
        self.d_model: int = _get(hf_model, self.spec.embed).weight.shape[1]
        self.d_vocab: int = _get(hf_model, self.spec.unembed).weight.shape[0]
        w = self._weight(_get(self._block_hf(0), self.spec.attn_out_proj))
        self.d_head: int = w.shape[0] // self.n_heads
        self.d_mlp: int = self._weight(_get(self._block_hf(0), self.spec.mlp_out_proj)).shape[0]
        if self.spec.attn_post_norm or self.spec.mlp_post_norm:
            blk = self._block_hf(0)
            for path in (self.spec.attn_out_proj, self.spec.mlp_out_proj):
                if getattr(_get(blk, path), "bias", None) is not None:
                    raise UnsupportedArchitectureError(
                        f"{self.spec.name}: {path} has a bias and its output passes a post norm; "
                        "the bias's share of the normalised output would differ per position, "
                        "so head and neuron contributions could not sum exactly")
        if self.spec.derived:
            from factfind.model.architectures import check_spec

            self.spec = check_spec(self)

    # -- identity ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's device (the first GPU of a ``device_map``)."""
        return _get(self.hf, self.spec.embed).weight.device

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding a parameter (several when loaded with ``device_map``)."""
        return list(dict.fromkeys(p.device for p in self.hf.parameters()))

    def free_memory(self) -> int:
        """Bytes free for activations: on GPUs the least free memory among the devices the
        model spans (``torch.cuda.mem_get_info``), on the CPU the available RAM (psutil)."""
        cuda = [d for d in self.devices if d.type == "cuda"]
        if cuda:
            return min(int(torch.cuda.mem_get_info(d)[0]) for d in cuda)
        import psutil

        return int(psutil.virtual_memory().available)

    def activation_bytes(self, n_pos: int) -> int:
        """A generous estimate of the activation memory one prompt row of ``n_pos`` tokens holds
        during a forward: a few ``d_model`` tensors and the MLP hidden per layer, and the
        logits, in the model's dtype."""
        per_token = self.n_layers * (8 * self.d_model + 2 * self.d_mlp) + self.d_vocab
        return n_pos * per_token * (torch.finfo(self.dtype).bits // 8)

    def rows_that_fit(self, bytes_per_row: int, *, fraction: float = 0.25,
                      budget_bytes: int | None = None, cap: int | None = None) -> int:
        """How many rows of ``bytes_per_row`` fit in ``fraction`` of :meth:`free_memory` (or
        in ``budget_bytes``), at least 1 and at most ``cap``: automatic batch sizing.

        Example::

            rows = model.rows_that_fit(model.activation_bytes(n_pos))  # prompts per forward
        """
        if budget_bytes is None:
            budget_bytes = int(self.free_memory() * fraction)
        rows = max(1, budget_bytes // max(1, bytes_per_row))
        return rows if cap is None else max(1, min(cap, rows))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def fingerprint(self) -> str:
        """A short stable id of the weights' provenance: name, revision and config.

        Config keys that record bookkeeping rather than the model (``_VOLATILE_CONFIG``) are
        left out, and the dtype is the weights' own: ``save_pretrained`` writes
        ``architectures`` and ``dtype`` into the live config, and a cache keyed on them would
        miss after saving the same model.
        """
        config = {k: v for k, v in self.hf.config.to_dict().items()
                  if k not in _VOLATILE_CONFIG}
        config["dtype"] = str(self.dtype)  # the weights' dtype, whatever the config says
        payload = json.dumps(
            {"name": self.name, "revision": self.revision, "config": config},
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, arch={self.spec.name}, layers={self.n_layers}, "
                f"heads={self.n_heads}, d_model={self.d_model}, d_mlp={self.d_mlp})")

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[FactPrompt]) -> TokenBatch:
        """Left-padded token batch with the position of each role (see :mod:`factfind.data`)."""
        from factfind.data import encode

        return encode(self.tokenizer, prompts, padding_side="left")

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        batch: TokenBatch | Mapping[str, Tensor],
        *,
        save: Iterable[SiteKey] = (),
        edits: Mapping[SiteKey, Edit] | None = None,
        block_attention: Mapping[int, Tensor] | None = None,
        metric: Callable[[Tensor], Tensor] | None = None,
        logits: str | Tensor = "final",
        keep_graph: bool = False,
        _resume: Resume | None = None,
    ) -> Run:
        """One forward pass with reads, writes, attention blocks and optional gradients.

        Args:
            batch: a :class:`~factfind.data.TokenBatch` or a mapping with ``input_ids``,
                ``attention_mask`` and optionally ``position_ids`` (left-padded).
            save: ``(component, layer)`` sites whose activations to return (after any edit).
                ``head_out`` is derived from ``z`` and ``W_O``.
            edits: functions that replace the activation at a site.
            block_attention: per layer, a bool tensor ``[batch q_pos k_pos]``: True blocks the
                edge from query ``q`` to key ``k`` (attention knockout, Geva et al. 2023).
            metric: if given, a function from the returned logits to a scalar; gradients of it
                with respect to every saved activation are returned in ``Run.grads``.
            logits: ``"final"`` (``[batch d_vocab]``), ``"all"`` (``[batch pos d_vocab]``), or
                token ids ``[batch k]``: only those logits of each row's final position
                (``[batch k]``), each a dot product of the final norm's output with one
                unembedding row; the full unembedding (``d_model x d_vocab`` per row, a fifth
                of a forward of SmolLM2 at one position) is skipped. What a logit-difference
                metric needs.
            keep_graph: with ``metric``, keep the autograd graph after taking the gradients
                and return the attached activations in ``Run.live``.

        Returns:
            A :class:`Run`.
        """
        edits = dict(edits or {})
        block_attention = dict(block_attention or {})
        want = {(Component(c), int(layer)) for c, layer in save}
        for key in list(want) + list(edits):
            self._check_site(key, writing=key in edits)
        for layer in block_attention:
            self._check_site((Component.ATTN_OUT, layer), writing=True)
        read_z = {(Component.Z, layer) for (c, layer) in want if c is Component.HEAD_OUT}
        need = want | read_z
        enc = _encoding(batch, self.device)
        if _resume is not None:  # incremental runs (see run_from): the keys/values cache
            enc["cache"] = _resume.cache
        columns = logits.to(self.device).long() if isinstance(logits, Tensor) else None
        if columns is not None and (columns.dim() != 2 or
                                    columns.shape[0] != enc["input_ids"].shape[0]):
            raise ArgumentError(f"logits=<token ids> must be [batch k] with batch "
                                f"{enc['input_ids'].shape[0]}, got {tuple(columns.shape)}")
        if columns is not None or logits == "final":  # the last position, kept by index:
            # a gathered (contiguous) position is one matrix product with W_U, while the
            # strided slice ``logits_to_keep=1`` makes a batched product that reads the whole
            # unembedding once per row (0.55 s instead of ~0.05 s for 40 rows on SmolLM2)
            enc["logits_to_keep"] = torch.tensor([enc["input_ids"].shape[1] - 1],
                                                 device=self.device)
        acts: dict[SiteKey, Any] = {}
        attn_in: dict[int, Any] = {}
        nn = self._nn
        grad = metric is not None
        blocks = _get(nn, self.spec.blocks)
        with nn.trace(enc):
            emb = _get(nn, self.spec.embed)
            key = (Component.EMBED, 0)
            if grad or key in need or key in edits:
                e = emb.output
                if key in edits:
                    emb.output = edits[key](e)
                    e = emb.output
                if grad and not e.requires_grad:
                    e.requires_grad_(True)
                if key in need:
                    acts[key] = e
            for layer in range(self.n_layers):
                blk = blocks[layer]
                if _resume is not None and layer < _resume.layer:  # incremental (run_from):
                    blk.skip(_resume.resid)  # this block's output is the cached resid_pre[L]
                    continue
                self._trace_block(blk, layer, need, edits, acts, attn_in,
                                  block_attention.get(layer), enc)
            unembed = _get(nn, self.spec.unembed)
            lg: Any  # a traced value (nnsight adds .save)
            if columns is None:
                out = unembed.output
                lg = out if logits == "all" else out[:, -1]
            else:  # only the asked logits; the unembedding itself never runs
                h = unembed.input
                lg = self._unembed_columns(h[:, -1], columns)
                unembed.skip(h)
            lg = lg.save()
            for v in acts.values():
                v.save()
            for v in attn_in.values():
                v.save()
        raw = None
        if self.final_logit_softcap is not None:
            raw, lg = lg, self.softcap_logits(lg)
        grads: dict[SiteKey, Tensor] = {}
        if grad:
            assert metric is not None
            keys = [k for k in acts if acts[k].requires_grad]
            value = metric(lg)
            if keys:
                got = torch.autograd.grad(value, [acts[k] for k in keys], allow_unused=True,
                                          retain_graph=keep_graph)
                for k, g in zip(keys, got, strict=True):
                    grads[k] = torch.zeros_like(acts[k]) if g is None else g
            lg = lg.detach()
            raw = None if raw is None else raw.detach()
        result = {k: v.detach() if isinstance(v, Tensor) else v for k, v in acts.items()}
        for k in set(result) | set(grads):
            if k[0] is Component.Z:
                if k in result:
                    result[k] = result[k].reshape(*result[k].shape[:-1], self.n_heads, self.d_head)
                if k in grads:
                    g = grads[k]
                    grads[k] = g.reshape(*g.shape[:-1], self.n_heads, self.d_head)
        for k in list(result):
            if k[0] is Component.V:
                result[k] = self._split_values(result[k])
            if k[0] is Component.PATTERN and result[k] is None:
                raise ArgumentError("attention patterns need eager attention: "
                                 "load_model(..., attn_implementation='eager')")
        for layer, (args, kwargs) in attn_in.items():
            q, k = self._queries_keys(layer, args, kwargs)
            result[(Component.Q, layer)], result[(Component.K, layer)] = q, k
        for c, layer in want:
            if c is Component.HEAD_OUT:
                z = result[(Component.Z, layer)]
                result[(c, layer)] = self.head_out(layer, z)
        live = dict(acts) if keep_graph and grad else None
        return Run(logits=lg, acts={k: v for k, v in result.items() if k in want}, grads=grads,
                   logits_raw=raw, live=live)

    def _trace_block(self, blk: Any, layer: int, need: set[SiteKey], edits: Mapping[SiteKey, Edit],
                     acts: dict[SiteKey, Any], attn_in: dict[int, Any], block: Tensor | None,
                     enc: Mapping[str, Any]) -> None:
        """Inside :meth:`run`'s trace: one block's reads (into ``acts``), writes (``edits``)
        and attention knockout (``block``), touching its modules in the order the forward
        runs them, as nnsight requires. (A method of its own, not the body of ``run``'s layer
        loop: it keeps that loop small enough for a type checker's flow analysis.)"""
        spec = self.spec
        _access(blk, "input", (Component.RESID_PRE, layer), need, edits, acts)
        attn = _get(blk, spec.attn)
        if (Component.Q, layer) in need or (Component.K, layer) in need:
            attn_in[layer] = attn.inputs
        if block is not None:
            args, kwargs = attn.inputs
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _block_mask(kwargs.get("attention_mask"), block, enc)
            attn.inputs = (args, kwargs)
        if (Component.V, layer) in need:
            acts[(Component.V, layer)] = _get(blk, spec.values).output
        key: SiteKey = (Component.Z, layer)
        if key in need or key in edits:
            proj = _get(blk, spec.attn_out_proj)
            z = proj.input
            if key in edits:
                shape = z.shape
                new = edits[key](z.reshape(*shape[:-1], self.n_heads, self.d_head))
                proj.input = new.reshape(shape)
                z = proj.input
            if key in need:
                acts[key] = z
        if (Component.PATTERN, layer) in need:
            acts[(Component.PATTERN, layer)] = attn.output[1]
        key = (Component.ATTN_OUT, layer)
        if spec.attn_post_norm:  # what enters the residual is the post norm's output
            _access(_get(blk, spec.attn_post_norm), "output", key, need, edits, acts)
        elif key in need or key in edits:
            if key in edits:
                out = attn.output
                attn.output = (edits[key](out[0]), *out[1:])
            if key in need:
                acts[key] = attn.output[0]
        _access(_get(blk, spec.mlp), "input", (Component.MLP_IN, layer), need, edits, acts)
        _access(_get(blk, spec.mlp_out_proj), "input", (Component.NEURONS, layer), need, edits,
                acts)
        _access(_get(blk, spec.mlp_post_norm or spec.mlp), "output", (Component.MLP_OUT, layer),
                need, edits, acts)
        _access(blk, "output", (Component.RESID_POST, layer), need, edits, acts)

    # -- sessions: a whole sweep as one (possibly remote) nnsight job -------------------------

    def session(self, sweep: Callable[..., Any], /, *args: Any, remote: Remote = None,
                **kwargs: Any) -> Any:
        """Run ``sweep(*args, **kwargs)`` - a function that calls :meth:`run` many times - as
        one nnsight session, locally or on NDIF.

        With ``remote=None`` (or ``False``) the sweep is simply called here. Otherwise its
        traces run inside a single ``with nnsight_model.session(remote=remote):`` block, so
        the whole sweep is *one* request: ``remote=True`` ships it to NDIF (the model is named
        by its key, never uploaded), and ``remote="local"`` goes through the same path without
        a server - nnsight serialises the request, deserialises it with every non-installed
        module hidden (as a server would see it) and runs it here. factfind's own code is not
        installed on a server, so it is registered to travel *by value* (its functions'
        source); the Hugging Face module and tokenizer travel as persistent ids that the
        server resolves to its own copies. Only the sweep's return value comes back, moved
        to the CPU first, so a sweep should return just the numbers it needs (tensors, plain
        Python; not DataFrames: pandas need not exist server-side - tidy them here).

        Constraints of the remote path: the sweep and everything it calls may use torch,
        numpy, the standard library and factfind (by value), but no other third-party
        package; progress bars and callbacks cannot run server-side (``progress`` is dropped);
        values in ``args`` must pickle (tensors, numbers, dataclasses of them).

        Args:
            sweep: the function to run; it receives ``args`` and ``kwargs``.
            remote: ``None``/``False`` (here), ``"local"`` (serialised dry run), ``True``
                (NDIF) or a host URL.

        Returns:
            ``sweep``'s return value (tensors on the CPU when run remotely).

        Example::

            metrics = model.session(my_sweep, model, batches, remote="local")
        """
        if not remote:
            return sweep(*args, **kwargs)
        if "progress" in kwargs:
            kwargs["progress"] = None  # a progress callback cannot run on a server
        import cloudpickle
        import nnsight

        factfind = sys.modules["factfind"]  # the package, already imported (ships by value)
        registered = "factfind" in cloudpickle.list_registry_pickle_by_value()
        if not registered:
            cloudpickle.register_pickle_by_value(factfind)
        # classes shipped by value carry their cached_property descriptors, which hold a lock
        # on Python 3.11: rebuild them from their function instead
        had = copyreg.dispatch_table.get(functools.cached_property)
        copyreg.dispatch_table[functools.cached_property] = _reduce_cached_property
        # factfind's modules import pandas, scipy, tqdm for their local halves; references to
        # such modules travel as lazy imports, so a server needs them only if it runs them
        table = cloudpickle.CloudPickler._dispatch_table
        module_reduce = table[types.ModuleType]
        table[types.ModuleType] = functools.partial(_reduce_module, default=module_reduce)
        args, kwargs = _for_server(args), _for_server(kwargs)
        nn = self._nn
        try:
            with nn.session(remote=remote):
                out = sweep(*args, **kwargs)
                out = nnsight.save(to_cpu(out))
        finally:
            table[types.ModuleType] = module_reduce
            if not registered:
                cloudpickle.unregister_pickle_by_value(factfind)
            if had is None:
                copyreg.dispatch_table.pop(functools.cached_property, None)
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for a remote session), the model's weights and tokenizer travel as the
        persistent ids nnsight's server resolves to its own loaded copies."""
        self.hf.__dict__["_persistent_id"] = f"Module:{self._nn.path}"
        if getattr(self._nn, "tokenizer", None) is self.tokenizer:
            self.tokenizer.__dict__["_persistent_id"] = "Tokenizer"
        return dict(self.__dict__)

    def final_logits(
        self, prompts: Sequence[FactPrompt], *, batch_size: int = 64
    ) -> Tensor:
        """Next-token logits at the final position for each prompt: ``[batch d_vocab]``."""
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenize(prompts[start:start + batch_size])
            out.append(self.run(batch).logits.float())
        if not out:
            return torch.zeros(0, self.d_vocab)
        return torch.cat(out)

    # -- incremental patched runs (see factfind.model.incremental) ---------------------------------
    # A base run cached once (every block's input and every layer's keys/values), then patched
    # forwards that start at the first patched layer and position. Model.run carries the two
    # hooks these need (the ``_resume`` argument): the cache handed to the attention layers, and
    # blocks before the start layer skipped with the cached residual as their output.

    def base_run(self, batch: TokenBatch | Mapping[str, Tensor], *,
                 edits: Mapping[SiteKey, Edit] | None = None,
                 save: Iterable[SiteKey] = ()) -> Prefix:
        """One full forward (with the base run's own ``edits``) that keeps what
        :meth:`run_from` resumes from: every ``resid_pre[l]`` and every layer's keys and
        values. Costs one forward; holds ``n_layers * (d_model + 2 * n_kv_heads * d_head)``
        numbers per token.

        Example::

            prefix = model.base_run(corrupt_batch)
            run = model.run_from(prefix, start=(layer, pos), reps=4, edits=edits)
        """
        from transformers.cache_utils import DynamicCache

        edits = dict(edits or {})
        want = {(Component(c), int(layer)) for c, layer in save}
        resid_keys = [(Component.RESID_PRE, layer) for layer in range(self.n_layers)]
        cache = DynamicCache()
        run = self.run(batch, save=want | set(resid_keys), edits=edits,
                       _resume=Resume(cache=cache))
        enc = _encoding(batch, self.device)
        layers = list(cache.layers)
        if len(layers) != self.n_layers or any(getattr(x, "keys", None) is None
                                               for x in layers):
            raise RuntimeError(f"{self.spec.name}: the attention layers did not fill the "
                               "keys/values cache; incremental runs need them to")
        return Prefix(
            enc={k: enc[k] for k in ("input_ids", "attention_mask", "position_ids")},
            resid=[run.acts[k] for k in resid_keys],
            keys=[x.keys.detach() for x in layers], values=[x.values.detach() for x in layers],
            logits=run.logits, acts={k: v for k, v in run.acts.items() if k in want},
            edits=edits,
        )

    def run_from(self, prefix: Prefix, *, start: tuple[int, int], reps: int = 1,
                 edits: Mapping[SiteKey, Edit] | None = None,
                 block_attention: Mapping[int, Tensor] | None = None,
                 save: Iterable[SiteKey] = (), logits: str | Tensor = "final",
                 metric: Callable[[Tensor], Tensor] | None = None,
                 keep_graph: bool = False) -> Run:
        """A patched forward of ``reps`` stacked copies of the base rows (copy-major, like
        :func:`factfind.localize.patching.repeat`) that recomputes only layers ``>= start[0]`` at
        positions ``>= start[1]``; the final-position logits equal :meth:`run` on the stacked
        batch with the base run's edits plus ``edits``, to float rounding.

        Args:
            prefix: the cached base run (:meth:`base_run`).
            start: ``(layer, position)``: no edit may touch an earlier layer, and every edit
                and attention block must leave earlier positions alone (masked writes).
            reps: copies of the base rows.
            edits: full-length edits, as for :meth:`run` (they see zeros before the start
                position and their output there is dropped).
            block_attention: per layer, ``[reps*batch q_pos k_pos]`` as for :meth:`run`;
                rows ``q < start[1]`` must be False.
            save: sites at layers ``>= start[0]`` whose activations to return, over the
                positions ``>= start[1]`` only.
            logits: ``"final"`` or token ids ``[reps*batch k]``, as for :meth:`run`.
            metric, keep_graph: gradients of ``metric`` with respect to the saved activations
                (positions ``>= start[1]``), as for :meth:`run`.

        Returns:
            A :class:`Run` with the final-position ``logits`` ``[reps*batch d_vocab]``. Cost:
            about ``(n_layers - layer) / n_layers * (pos - position) / pos`` of a forward.
        """
        from transformers.cache_utils import Cache

        layer, p0 = start
        if not 0 <= layer < self.n_layers:
            raise OutOfRangeError(f"start layer {layer} out of range for {self.n_layers} layers")
        if not 0 <= p0 < prefix.n_pos:
            raise OutOfRangeError(f"start position {p0} is beyond the prompts' "
                                  f"{prefix.n_pos} tokens")
        rep = lambda t: t.repeat(reps, *([1] * (t.dim() - 1)))
        enc = {"input_ids": rep(prefix.enc["input_ids"][:, p0:]),
               "attention_mask": rep(prefix.enc["attention_mask"]),
               "position_ids": rep(prefix.enc["position_ids"][:, p0:])}
        cache = Cache(layers=[PrefixLayer(k[:, :, :p0], v[:, :, :p0], reps)
                              for k, v in zip(prefix.keys, prefix.values, strict=True)])
        resid = rep(prefix.resid[layer][:, p0:]) if layer > 0 else None
        blocks = {lay: b[:, p0:] for lay, b in (block_attention or {}).items()}
        save = [(Component(c), int(lay)) for c, lay in save]
        early = [k for k in save if k[1] < layer or (k[0] is Component.EMBED and layer > 0)]
        if early:
            raise ArgumentError(f"cannot save {early}: they lie before the start layer {layer}")
        return self.run(enc, edits=patch_edits(prefix, edits or {}, layer, p0), save=save,
                        block_attention=blocks, logits=logits, metric=metric,
                        keep_graph=keep_graph,
                        _resume=Resume(cache=cache, layer=layer, resid=resid))

    def _check_site(self, key: SiteKey, *, writing: bool) -> None:
        comp, layer = key
        if writing and comp not in WRITABLE:
            raise ArgumentError(f"cannot write to {comp}: writable sites are "
                             f"{', '.join(str(c) for c in WRITABLE)} (edit z to change a head)")
        if comp is not Component.EMBED and not 0 <= layer < self.n_layers:
            raise OutOfRangeError(f"layer {layer} out of range for {self.name} "
                             f"with {self.n_layers} layers")



def _access(envoy: Any, attr: str, key: SiteKey, need: set[SiteKey],
            edits: Mapping[SiteKey, Edit], acts: dict[SiteKey, Any]) -> None:
    """Inside a trace: replace ``envoy.<attr>`` (``input`` or ``output``) by its edit, if
    ``key`` has one, and read it (after the edit) into ``acts``, if ``key`` is needed."""
    if key in edits:
        setattr(envoy, attr, edits[key](getattr(envoy, attr)))
    if key in need:
        acts[key] = getattr(envoy, attr)


def _tree_map(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``leaf`` applied inside dicts, lists and plain tuples (the containers a sweep returns)."""
    if isinstance(value, dict):
        return {k: _tree_map(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree_map(v, leaf) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):  # not a namedtuple
        return tuple(_tree_map(v, leaf) for v in value)
    return leaf(value)


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside (lists, tuples, dicts) detached and on the CPU."""
    return _tree_map(value, lambda v: v.detach().cpu() if isinstance(v, Tensor) else v)


class LazyModule:
    """A module imported on first attribute access (how client-side modules travel to a
    server: see :meth:`Model.session`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "name":
            raise AttributeError(attr)
        import importlib

        return getattr(importlib.import_module(self.name), attr)


def _reduce_module(module: types.ModuleType, *, default: Callable[[Any], Any]) -> Any:
    """Modules a server has (torch, numpy, transformers, nnsight, the standard library) and
    factfind's own go as usual; any other becomes a :class:`LazyModule`."""
    from nnsight.intervention.backends.local import _SERVER_MODULES

    root = module.__name__.split(".")[0]
    if root in _SERVER_MODULES or root in sys.stdlib_module_names or root == "factfind":
        return default(module)
    return LazyModule, (module.__name__,)


def _reduce_cached_property(prop: functools.cached_property) -> tuple[Any, ...]:
    return _cached_property, (prop.func, prop.attrname)


def _cached_property(func: Callable[[Any], Any], name: str) -> functools.cached_property:
    prop = functools.cached_property(func)
    prop.__set_name__(object, name)
    return prop


def _for_server(value: Any) -> Any:
    """``value`` as it travels to a server: tensors and numbers as they are, dataclasses field by
    field, but a token batch's ``prompts`` (text records, not needed to run the model) left
    here."""
    def leaf(v: Any) -> Any:
        if not dataclasses.is_dataclass(v) or isinstance(v, type):
            return v
        changes = {f.name: () if f.name == "prompts" else _for_server(getattr(v, f.name))
                   for f in dataclasses.fields(v) if f.init}
        return dataclasses.replace(v, **changes)

    return _tree_map(value, leaf)


def _encoding(batch: Any, device: torch.device) -> dict[str, Any]:
    """Model inputs from a token batch, or from a mapping such as a tokenizer's
    ``BatchEncoding`` (which also has an ``input_ids`` attribute, but no ``position_ids``)."""
    if hasattr(batch, "input_ids") and not isinstance(batch, Mapping):
        enc = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
               "position_ids": batch.position_ids}
    else:
        enc = dict(batch)
        if "position_ids" not in enc and "attention_mask" in enc:
            mask = enc["attention_mask"]
            enc["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    enc = {k: v.to(device) for k, v in enc.items()}
    enc["use_cache"] = False
    return enc


def _block_mask(mask: Tensor | None, block: Tensor, enc: Mapping[str, Tensor]) -> Tensor:
    """Combine the model's 4-D attention mask with a knockout ``[batch q k]`` (True = block)."""
    block = block.to(enc["input_ids"].device)[:, None]  # [batch 1 q k]
    if mask is None:
        n = enc["input_ids"].shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=block.device).tril()
        pad = enc["attention_mask"].bool()[:, None, None, :]
        mask = causal[None, None] & pad
    if mask.dtype == torch.bool:
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)
