"""The trainer's step: one TopK / BatchTopK dictionary, AuxK revival, sparse gradients.

:mod:`factfind.features.training` teaches the method and drives it (``fit_dictionary``,
``train_dictionaries``); this module is its state and its step:

* the forward keeps only the ``k`` (or, BatchTopK, ``k * batch``) largest pre-activations and
  decodes them with ``embedding_bag`` (a weighted sum of ``k`` decoder rows per token);
* the encoder's gradient is written by hand as a sparse ``[width batch] @ [batch d_in]``
  product over the kept entries (and the AuxK entries), not as autograd's dense
  ``[d_in batch] @ [batch width]`` product over a gradient that is zero almost everywhere;
* decoder rows stay unit norm (the parallel gradient component removed before Adam's step, the
  rows renormalised after it); a checkpoint holds weights, Adam's moments and counters.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from factfind.cache import atomic_write_bytes
from factfind.errors import ArgumentError, EmptyInputError
from factfind.features.dictionary import Activation, Dictionary, DictKind
from factfind.types import Component

log = logging.getLogger(__name__)

#: the key of a checkpoint's counters in its safetensors metadata
CHECKPOINT_META = "factfind.trainer"


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its header: an 8-byte little-endian
    length, then JSON); ``{}`` when it has none."""
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or n > len(raw) - 8:
        raise ValueError("not a safetensors file (its header runs past the end)")
    header = json.loads(raw[8:8 + n])
    return dict(header.get("__metadata__") or {})


@dataclass(frozen=True)
class FitConfig:
    """Everything that determines a fitted dictionary besides its data (saved beside it).

    Attributes:
        kind: ``sae`` | ``transcoder`` | ``skip_transcoder``.
        activation: ``topk`` | ``batchtopk``.
        width: number of features; k: active features per token (on average for BatchTopK).
        batch_size: tokens per step; epochs: passes over in-memory data.
        lr: Adam's learning rate; ``None`` is sparsify's ``2e-4 / sqrt(width / 2**14)`` times
            ``lr_scale``.
        decay: the fraction of the last steps over which lr decays linearly to 0.
        aux_k: dead features asked to explain the residual (``None``: ``d_out // 2``);
            aux_alpha: the AuxK loss weight (0 disables it).
        dead_after: tokens without firing after which a feature counts as dead.
        seed: the initialisation and shuffling seed.
    """

    kind: str = "skip_transcoder"
    activation: str = "topk"
    width: int = 4608
    k: int = 32
    batch_size: int = 4096
    epochs: int = 1
    lr: float | None = None
    lr_scale: float = 1.0
    decay: float = 0.2
    aux_k: int | None = None
    aux_alpha: float = 1 / 32
    dead_after: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            kind, act = DictKind(self.kind), Activation(self.activation)
        except ValueError as e:
            raise ArgumentError(f"fit_dictionary: {e}; kind is one of "
                                f"{[k.value for k in DictKind]}, activation topk or batchtopk") \
                from None
        if act not in (Activation.TOPK, Activation.BATCHTOPK):
            raise ArgumentError(f"fit_dictionary trains activation='topk' or 'batchtopk', got "
                                f"{act.value!r} (load a JumpReLU dictionary instead)")
        del kind
        for name in ("width", "k", "batch_size", "epochs", "dead_after", "seed", "aux_k"):
            v = getattr(self, name)
            if v is None and name == "aux_k":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ArgumentError(f"fit_dictionary: {name} must be an integer, got {v!r}")
        for name in ("lr", "lr_scale", "aux_alpha", "decay"):
            v = getattr(self, name)
            if v is None and name == "lr":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (v == 0 and name in ("lr", "lr_scale")):
                raise ArgumentError(f"fit_dictionary: {name} must be a finite number "
                                    f"{'> 0' if name in ('lr', 'lr_scale') else '>= 0'}, "
                                    f"got {v!r}")
        if self.seed < 0 or self.dead_after <= 0 or (self.aux_k is not None and self.aux_k <= 0):
            raise ArgumentError(f"fit_dictionary: seed must be >= 0 and dead_after, aux_k > 0, "
                                f"got {self.seed}, {self.dead_after}, {self.aux_k}")
        if self.width <= 0:
            raise ArgumentError(f"width must be > 0, got {self.width}")
        if self.k <= 0:
            raise ArgumentError(f"k must be > 0, got {self.k}")
        if self.k > self.width:
            raise ArgumentError(f"k ({self.k}) must be <= width ({self.width})")
        if self.batch_size <= 0 or self.epochs <= 0:
            raise ArgumentError(f"batch_size and epochs must be > 0, got {self.batch_size}, "
                                f"{self.epochs}")
        if not 0 <= self.decay <= 1:
            raise ArgumentError(f"decay is a fraction of the steps in [0, 1], got {self.decay}")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else \
            self.lr_scale * 2e-4 / math.sqrt(self.width / 2 ** 14)


@dataclass
class _State:
    """The trainer's state: what a checkpoint holds."""

    W_encT: Tensor                  # [width d_in] (rows, for sparse gathers)
    b_enc: Tensor                   # [width]
    W_dec: Tensor                   # [width d_out]
    b_dec: Tensor                   # [d_out]
    W_skip: Tensor | None           # [d_in d_out]
    since_fired: Tensor             # [width] tokens since each feature last fired
    fired: Tensor                   # [width] times each feature fired (for the dead fraction)
    threshold: Tensor               # [] BatchTopK's running inference threshold
    x_scale: Tensor                 # [] input scale, fixed on the first batch
    y_scale: Tensor
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


class Trainer:
    """The compact TopK / BatchTopK trainer (see the module docstring): ``step(x, y)`` per batch,
    ``dictionary()`` at the end. ``fit_dictionary`` drives it; ``train_dictionaries`` drives one
    per site over the activation cache."""

    def __init__(self, config: FitConfig, d_in: int, d_out: int, *, total_steps: int,
                 layer: int = 0, site: Component | str | None = None) -> None:
        self.cfg = config
        self.kind = DictKind(config.kind)
        self.act = Activation(config.activation)
        if self.kind is DictKind.SAE and d_in != d_out:
            raise ArgumentError(f"an SAE reconstructs its input, but d_in={d_in} and "
                                f"d_out={d_out}: pass y=None")
        self.d_in, self.d_out, self.layer = d_in, d_out, layer
        self.site = Component(site) if site is not None else (
            Component.RESID_POST if self.kind is DictKind.SAE else Component.MLP_IN)
        self.total_steps = max(total_steps, 1)
        W = config.width
        g = torch.Generator().manual_seed(config.seed)
        W_dec = torch.randn(W, d_out, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_encT = W_dec.clone() if d_in == d_out else torch.randn(W, d_in, generator=g) / d_in ** .5
        self.s = _State(W_encT=W_encT, b_enc=torch.zeros(W), W_dec=W_dec,
                        b_dec=torch.zeros(d_out),
                        W_skip=torch.zeros(d_in, d_out) if self.kind is DictKind.SKIP_TRANSCODER
                        else None,
                        since_fired=torch.zeros(W, dtype=torch.long),
                        fired=torch.zeros(W, dtype=torch.long),
                        threshold=torch.tensor(-1.0), x_scale=torch.tensor(0.0),
                        y_scale=torch.tensor(0.0))
        self._make_optimizer()

    # ------------------------------------------------------------------ parameters

    def params(self) -> list[Tensor]:
        ps = [self.s.W_encT, self.s.b_enc, self.s.W_dec, self.s.b_dec]
        return ps + ([self.s.W_skip] if self.s.W_skip is not None else [])

    def _make_optimizer(self) -> None:
        for p in self.params():
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params(), lr=self.cfg.learning_rate(), eps=6.25e-10)

    def lr_at(self, step: int) -> float:
        lr = self.cfg.learning_rate()
        start = int(self.total_steps * (1 - self.cfg.decay))
        if step < start or self.cfg.decay == 0:
            return lr
        return lr * max(self.total_steps - step, 0) / max(self.total_steps - start, 1)

    # ------------------------------------------------------------------ one step

    def initialize(self, x: Tensor, y: Tensor | None) -> None:
        """Fix the scales and the initial ``b_dec`` (and ``W_skip``) from sample rows (the first
        batch unless the caller passes a larger sample). A skip transcoder's linear path starts
        at the ridge least-squares fit of ``y`` on ``x``: the features then only learn what the
        best linear map misses (on SmolLM2's MLPs that map alone explains 0.36-0.74 of the
        variance, which Adam needs thousands of steps to find)."""
        s = self.s
        x = x.float()
        y = x if y is None else y.float()
        with torch.no_grad():
            s.x_scale = (self.d_in ** .5 / x.norm(dim=1).mean().clamp_min(1e-12)).float()
            s.y_scale = s.x_scale.clone() if self.kind is DictKind.SAE else \
                (self.d_out ** .5 / y.norm(dim=1).mean().clamp_min(1e-12)).float()
            xs, ys = x * s.x_scale, y * s.y_scale
            s.b_dec.copy_(ys.mean(0))
            if s.W_skip is not None:
                xc, yc = (xs - xs.mean(0)).double(), (ys - ys.mean(0)).double()
                ridge = 1e-3 * float(xc.pow(2).sum()) / max(xc.shape[0], 1)
                A = xc.T @ xc + ridge * torch.eye(self.d_in, dtype=torch.float64)
                W = torch.linalg.solve(A, xc.T @ yc)                      # [d_in d_out]
                s.W_skip.copy_(W.float())
                s.b_dec.copy_((ys - xs @ s.W_skip).mean(0))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The kept entries of ``relu(pre)`` ``[B W]``: flat ``rows``, ``cols`` (row-major) and
        the ``offsets`` of each row's run, for ``embedding_bag``."""
        B, W = pre.shape
        k = self.cfg.k
        if self.act is Activation.TOPK:
            # the top k of pre are the top k of relu(pre) (negative ones are dropped below)
            _, idx = pre.topk(k, dim=1, sorted=False)                 # [B k]
            idx, _ = idx.sort(dim=1)
            rows = torch.arange(B).repeat_interleave(k)
            cols = idx.reshape(-1)
            offsets = torch.arange(0, B * k, k)
        else:
            flat = pre.reshape(-1)
            _, pos = flat.topk(min(k * B, flat.numel()), sorted=False)
            pos, _ = pos.sort()
            pos = pos[flat[pos] > 0]
            rows, cols = pos // W, pos % W
            counts = torch.bincount(rows, minlength=B)
            offsets = torch.cumsum(counts, 0) - counts
        return rows, cols, offsets

    def step(self, x: Tensor, y: Tensor | None) -> float:
        """One Adam step on a batch ``x [B d_in]`` (``y [B d_out]``, None for an SAE); returns
        the batch's fraction of variance unexplained (before the step)."""
        s, cfg = self.s, self.cfg
        x = x.float()
        y = x if y is None else y.float()
        if s.step == 0 and float(s.x_scale) == 0:
            self.initialize(x, y)
        x = x * s.x_scale
        y = y * s.y_scale
        B = x.shape[0]
        sae = self.kind is DictKind.SAE
        with torch.no_grad():
            xin = x - s.b_dec if sae else x
            pre = torch.addmm(s.b_enc, xin, s.W_encT.T)                  # [B W]
        rows, cols, offsets = self._select(pre)
        vals = torch.relu(pre[rows, cols]).requires_grad_(True)           # [nnz]
        y_hat = F.embedding_bag(cols, s.W_dec, offsets, mode="sum",
                                per_sample_weights=vals) + s.b_dec        # [B d_out]
        if s.W_skip is not None:
            y_hat = y_hat + x @ s.W_skip
        e = y - y_hat
        total_var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = e.pow(2).sum() / total_var
        loss = fvu
        # AuxK: dead features explain the residual (Gao et al. 2024, appendix B.1)
        dead = s.since_fired >= cfg.dead_after
        n_dead = int(dead.sum())
        aux = None
        if cfg.aux_alpha > 0 and n_dead > 0:
            aux_k = min(cfg.aux_k or self.d_out // 2, n_dead)
            scale = min(n_dead / (cfg.aux_k or self.d_out // 2), 1.0)
            with torch.no_grad():
                dead_cols = dead.nonzero().reshape(-1)                       # [n_dead]
                _, a_pos = pre.index_select(1, dead_cols).topk(aux_k, dim=1, sorted=False)
                a_idx, _ = dead_cols[a_pos].sort(dim=1)                      # [B aux_k]
            a_rows = torch.arange(B).repeat_interleave(aux_k)
            a_cols = a_idx.reshape(-1)
            a_vals = torch.relu(pre[a_rows, a_cols]).requires_grad_(True)
            e_hat = F.embedding_bag(a_cols, s.W_dec, torch.arange(0, B * aux_k, aux_k),
                                    mode="sum", per_sample_weights=a_vals)
            aux_loss = scale * (e_hat - e.detach()).pow(2).sum() / total_var
            loss = loss + cfg.aux_alpha * aux_loss
            aux = (a_rows, a_cols, a_vals)
        for p in self.params():
            p.grad = None
        loss.backward()
        # the encoder's gradient, by hand over the kept entries only (sparse)
        assert vals.grad is not None
        g_rows, g_cols = rows, cols
        g_vals = vals.grad * (vals > 0)
        if aux is not None:
            a_rows, a_cols, a_vals = aux
            assert a_vals.grad is not None
            g_rows = torch.cat([rows, a_rows])
            g_cols = torch.cat([cols, a_cols])
            g_vals = torch.cat([g_vals, a_vals.grad * (a_vals > 0)])
        with torch.no_grad():
            G = torch.sparse_coo_tensor(torch.stack([g_cols, g_rows]), g_vals,
                                        (cfg.width, B), check_invariants=False).coalesce()
            s.W_encT.grad = torch.sparse.mm(G, xin)                           # [W d_in]
            s.b_enc.grad = torch.zeros(cfg.width).index_add_(0, g_cols, g_vals)
            if sae:  # xin = x - b_dec: b_dec's share of the encoder gradient
                assert s.b_dec.grad is not None
                s.b_dec.grad -= torch.sparse.mm(G, torch.ones(B, 1)).reshape(-1) @ s.W_encT
            # remove the gradient parallel to each decoder row (it only changes the norm)
            gd = s.W_dec.grad
            assert gd is not None
            gd -= (gd * s.W_dec).sum(1, keepdim=True) * s.W_dec
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(s.step)
            self.opt.step()
            s.W_dec /= s.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            # firing statistics
            fired = torch.zeros(cfg.width, dtype=torch.bool)
            fired[cols[vals.detach() > 0]] = True
            s.since_fired += B
            s.since_fired[fired] = 0
            s.fired += torch.bincount(cols[vals.detach() > 0], minlength=cfg.width)
            if self.act is Activation.BATCHTOPK and vals.numel():
                low = vals.detach()[vals.detach() > 0].min()
                s.threshold = low.clone() if float(s.threshold) < 0 else \
                    0.99 * s.threshold + 0.01 * low
        s.step += 1
        s.tokens += B
        out = float(fvu.detach())
        s.losses.append(out)
        return out

    # ------------------------------------------------------------------ results

    def dictionary(self, *, model: str | None = None,
                   meta: dict[str, Any] | None = None) -> Dictionary:
        """The trained dictionary, with the training scales folded into its weights so that it
        reads and writes unscaled activations."""
        s = self.s
        with torch.no_grad():
            sx, sy = s.x_scale, s.y_scale
            if float(sx) == 0:
                raise EmptyInputError("fit_dictionary: no batch was trained on (empty data)")
            sae = self.kind is DictKind.SAE
            # pre = (x*sx [- b]) @ W_enc + b_enc = (x [- b/sx]) @ (sx*W_enc) + b_enc
            W_enc = (s.W_encT.T * sx).contiguous()
            W_dec = s.W_dec / sy
            b_dec = s.b_dec / sy
            W_skip = None if s.W_skip is None else s.W_skip * sx / sy
            threshold = None
            if self.act is Activation.BATCHTOPK:
                threshold = s.threshold.clamp_min(0).clone()
            d = Dictionary(kind=self.kind, activation=self.act, layer=self.layer,
                           site=self.site, W_enc=W_enc, b_enc=s.b_enc.detach().clone(),
                           W_dec=W_dec.detach().clone(), b_dec=b_dec.detach().clone(),
                           threshold=threshold,
                           W_skip=None if W_skip is None else W_skip.detach().clone(),
                           k=self.cfg.k, subtract_b_dec=sae, model=model,
                           meta={"training": {**asdict(self.cfg), "tokens": s.tokens,
                                              "steps": s.step,
                                              "dead_fraction": self.dead_fraction(),
                                              "final_fvu": self.recent_fvu(),
                                              "x_scale": float(sx), "y_scale": float(sy)},
                                 **(meta or {})})
        return d

    def dead_fraction(self) -> float:
        """Features that did not fire in the last ``dead_after`` tokens (or the whole run if
        shorter)."""
        window = min(self.cfg.dead_after, self.s.tokens)
        return float((self.s.since_fired >= max(window, 1)).float().mean())

    def recent_fvu(self, n: int = 10) -> float:
        tail = self.s.losses[-n:]
        return float(sum(tail) / len(tail)) if tail else float("nan")

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: Path) -> None:
        """An atomic checkpoint: weights, Adam's moments, counters (safetensors + JSON).

        The counters also ride in the safetensors file's own metadata, and :meth:`load` reads
        them from there: the two files are written one after the other, so a run killed
        between the writes leaves weights of one step beside counters of the step before, and
        a resume from that pair would not reproduce the uninterrupted run. The JSON is kept
        for people (and older checkpoints, which have no metadata)."""
        from safetensors.torch import save as st_save

        s = self.s
        tensors = {"W_encT": s.W_encT, "b_enc": s.b_enc, "W_dec": s.W_dec, "b_dec": s.b_dec,
                   "since_fired": s.since_fired, "fired": s.fired, "threshold": s.threshold,
                   "x_scale": s.x_scale, "y_scale": s.y_scale}
        if s.W_skip is not None:
            tensors["W_skip"] = s.W_skip
        for i, p in enumerate(self.params()):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"opt.{i}.{key}"] = st[key].reshape(-1) if key == "step" else st[key]
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        meta = {"step": s.step, "tokens": s.tokens, "losses": s.losses,
                "config": asdict(self.cfg)}
        text = json.dumps(meta)
        atomic_write_bytes(path.with_suffix(".safetensors"),
                           st_save(tensors, metadata={CHECKPOINT_META: text}))
        atomic_write_bytes(path.with_suffix(".json"), text.encode())

    def load(self, path: Path) -> bool:
        """Restore a checkpoint written by :meth:`save`; False when there is none (or it was
        written for another configuration)."""
        from safetensors.torch import load as st_load

        st_path, js_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if not st_path.exists():
            return False
        try:
            raw = st_path.read_bytes()
            inner = _safetensors_metadata(raw).get(CHECKPOINT_META)
            if inner is None and not js_path.exists():
                return False
            meta = json.loads(inner if inner is not None else js_path.read_text())
            tensors = st_load(raw)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable checkpoint %s (%s)", path, e)
            return False
        if meta.get("config") != asdict(self.cfg):
            log.warning("ignoring checkpoint %s: written for another configuration", path)
            return False
        s = self.s
        with torch.no_grad():
            for name in ("W_encT", "b_enc", "W_dec", "b_dec", "W_skip"):
                t = getattr(s, name)
                if t is not None:
                    t.copy_(tensors[name])
        s.since_fired, s.fired = tensors["since_fired"].clone(), tensors["fired"].clone()
        s.threshold, s.x_scale = tensors["threshold"].clone(), tensors["x_scale"].clone()
        s.y_scale = tensors["y_scale"].clone()
        s.step, s.tokens, s.losses = int(meta["step"]), int(meta["tokens"]), list(meta["losses"])
        for i, p in enumerate(self.params()):
            if f"opt.{i}.exp_avg" in tensors:
                self.opt.state[p] = {"step": tensors[f"opt.{i}.step"].reshape(()).clone(),
                                     "exp_avg": tensors[f"opt.{i}.exp_avg"].clone(),
                                     "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].clone()}
        return True
