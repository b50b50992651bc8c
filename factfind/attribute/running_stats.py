"""Streaming per-node statistics over many prompts: count, mean, variance and mean |x|.

Attribution over thousands of prompts cannot keep a ``[prompt node]`` table. :class:`RunningStats`
accumulates batch by batch with Chan et al.'s parallel update (each block reduced on its own
device, merged on the CPU in float64), so memory grows with the number of nodes, never with the
number of prompts; :func:`running_update` is the same update as a pure function of torch tensors,
so a remote sweep can run it without shipping the class.

Example::

    stats = RunningStats(n_nodes)
    for block in blocks:          # [batch node]
        stats.update(block)
    stats.values()["effect"]      # the mean, with 95% intervals in ci_low / ci_high
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from factfind.results import t_quantile

# ----------------------------------------------------------------------------- streaming stats


def running_update(state: dict[str, Tensor], x: Tensor, valid: Tensor | None = None
                   ) -> dict[str, Tensor]:
    """:meth:`RunningStats.update` as a pure function of the accumulators (torch only, so a
    remote sweep can run it without shipping the class).

    The block's own count, mean, centred sum of squares and |x| statistics are reduced on the
    block's device and dtype (at least float32) with one temporary of its size, and only the
    ``[node]`` results are moved to the CPU and merged in float64 (Chan et al.'s update). A
    ``[batch node]`` block is as large as everything else AtP computes: a float64 copy per
    elementwise step once cost more than the forward pass."""
    x = x.detach()
    if not x.dtype.is_floating_point or x.dtype.itemsize < 4:
        x = x.float()
    cpu64 = {"device": "cpu", "dtype": torch.float64}
    count, mean = state["count"], state["mean"]
    if x.shape[0] == 0:
        return dict(state)
    if valid is None:
        w = None
        nb_dev = torch.full((x.shape[1],), float(x.shape[0]), device=x.device, dtype=x.dtype)
    else:  # masked entries (even NaN) count 0 with weight 0
        valid = valid.to(x.device, torch.bool).expand_as(x)
        w = valid.to(x.dtype)
        x = torch.where(valid, x, 0.0)
        nb_dev = w.sum(0)
    mb_dev = x.sum(0) / nb_dev.clamp(min=1)
    tmp = x - mb_dev
    if w is not None:
        tmp.mul_(w)
    m2b = tmp.mul_(tmp).sum(0).to(**cpu64)
    torch.abs(x, out=tmp)
    abs_sum, abs_max = tmp.sum(0).to(**cpu64), tmp.amax(0).to(**cpu64)
    nb, mb = nb_dev.to(**cpu64), mb_dev.to(**cpu64)
    tot = count + nb
    delta = mb - mean
    return {
        "count": tot,
        "mean": mean + delta * nb / tot.clamp(min=1),
        "m2": state["m2"] + m2b + delta ** 2 * count * nb / tot.clamp(min=1),
        "abs_sum": state["abs_sum"] + abs_sum,
        "abs_max": torch.maximum(state["abs_max"], abs_max),
    }


@dataclass
class RunningStats:
    """Per-node count, mean, variance, mean |x| and max |x| over a stream of prompts.

    ``update`` takes a ``[batch node]`` block (and which entries are valid); memory is
    ``O(node)`` however many prompts pass (Chan, Golub & LeVeque's parallel variance update).

    Example::

        >>> s = RunningStats(2)
        >>> s.update(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
        >>> s.mean.tolist(), s.var.tolist()
        ([2.0, 2.0], [2.0, 0.0])
    """

    n_nodes: int
    count: Tensor = field(init=False)
    mean: Tensor = field(init=False)
    m2: Tensor = field(init=False)
    abs_sum: Tensor = field(init=False)
    abs_max: Tensor = field(init=False)

    def __post_init__(self) -> None:
        z = torch.zeros(self.n_nodes, dtype=torch.float64)
        self.count, self.mean, self.m2, self.abs_sum, self.abs_max = (z.clone() for _ in range(5))

    def update(self, x: Tensor, valid: Tensor | None = None) -> None:
        """Add a ``[batch node]`` block; ``valid`` (bool, broadcastable) masks entries out."""
        state = running_update(self.state(), x, valid)
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
        self.abs_sum, self.abs_max = state["abs_sum"], state["abs_max"]

    def state(self) -> dict[str, Tensor]:
        """The accumulators as plain tensors (what a remote sweep sends back)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2,
                "abs_sum": self.abs_sum, "abs_max": self.abs_max}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> RunningStats:
        out = cls(len(state["count"]))
        out.count, out.mean, out.m2 = state["count"], state["mean"], state["m2"]
        out.abs_sum, out.abs_max = state["abs_sum"], state["abs_max"]
        return out

    @property
    def var(self) -> Tensor:
        """Sample variance (NaN with fewer than two values)."""
        return torch.where(self.count > 1, self.m2 / (self.count - 1).clamp(min=1),
                           torch.full_like(self.m2, float("nan")))

    @property
    def abs_mean(self) -> Tensor:
        return self.abs_sum / self.count.clamp(min=1)

    def ci(self, confidence: float = 0.95) -> tuple[Tensor, Tensor]:
        """Student-t interval for the mean (NaN with fewer than two values)."""
        sem = (self.var / self.count.clamp(min=1)).sqrt()
        counts, inverse = np.unique(self.count.numpy(), return_inverse=True)
        t = torch.from_numpy(t_quantile(counts, confidence)[inverse])  # few distinct n
        half = sem * t
        return self.mean - half, self.mean + half

    def values(self) -> dict[str, Tensor]:
        """``effect`` (mean; NaN where no prompt was valid), ``ci_low``, ``ci_high``, ``n``,
        ``abs_mean`` - ready for :func:`node_frame`."""
        low, high = self.ci()
        mean = torch.where(self.count > 0, self.mean, torch.full_like(self.mean, float("nan")))
        return {"effect": mean, "ci_low": low, "ci_high": high, "n": self.count,
                "abs_mean": self.abs_mean}
