"""Token batches: prompts tokenized and padded together, with the position of every role.

A :class:`TokenBatch` is what the model runs: ``input_ids [batch pos]`` with the absolute
position of each point role (``subject_first``, ``subject_last``, ``final``) and a mask for each
group role, so results can be indexed by what a token holds rather than where it is
(:mod:`factfind.data.spans` builds it from prompts). A :class:`PairBatch` holds a clean and a
corrupt batch tokenized *together*, so their padding and role positions agree and activations
can be copied between them position by position - the precondition of every patching method.

The helpers every method needs live here as methods: rows (:meth:`TokenBatch.take`),
copies stacked for batched sweeps (:meth:`TokenBatch.repeat`), role masks
(:meth:`TokenBatch.position_mask`, :meth:`TokenBatch.role_labels`), and for pairs the run
patched and its source (:meth:`PairBatch.base_and_source`) and the logit difference
(:meth:`PairBatch.logit_diff`).

Example::

    pb = encode_pairs(model, pairs)              # clean and corrupt, aligned
    base, source = pb.base_and_source("noise")   # clean run, corrupt activations
    mask = base.position_mask(Role.SUBJECT_LAST) # [batch pos]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from factfind.errors import (
    ArgumentError,
    EmptyInputError,
    FactDataError,
    OutOfRangeError,
    check_mode,
)
from factfind.metrics import logit_diff
from factfind.types import (
    DIRECTIONS,
    GROUP_ROLES,
    POINT_ROLES,
    ROLE_NAMES,
    Direction,
    Metric,
    Role,
)

if TYPE_CHECKING:
    from factfind.data.pairs import FactPairs
    from factfind.data.prompts import FactPrompt


class Tokenizes(Protocol):
    """Anything with ``tokenize(prompts) -> TokenBatch`` (a :class:`~factfind.model.Model`)."""

    def tokenize(self, prompts: list[FactPrompt]) -> TokenBatch: ...


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch of fact prompts with the position of every role.

    Attributes:
        input_ids: ``[batch pos]`` token ids.
        attention_mask: ``[batch pos]`` 1 for real tokens, 0 for padding.
        position_ids: ``[batch pos]`` ``cumsum(attention_mask) - 1`` clamped at 0.
        positions: for each of :data:`~factfind.types.POINT_ROLES`, ``[batch]`` absolute indices.
        masks: for each of :data:`~factfind.types.GROUP_ROLES`, ``[batch pos]`` bool.
        attribute_ids: ``[batch]`` first token of ``" " + attribute``.
        lengths: ``[batch]`` number of real tokens.
        merged: ``[batch]`` bool, rows where a subject token also holds template text.
        prompts: the prompts, in row order.
        padding_side: ``"left"`` or ``"right"``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    positions: dict[Role, Tensor]
    masks: dict[Role, Tensor]
    attribute_ids: Tensor
    lengths: Tensor
    merged: Tensor
    prompts: tuple[FactPrompt, ...]
    padding_side: str = "left"

    def __len__(self) -> int:
        return self.input_ids.shape[0]  # not len(prompts): a batch shipped to a server has none

    def mask(self, role: Role | str) -> Tensor:
        """``[batch pos]`` bool mask of a role (point roles give one position per row)."""
        role = Role(role)
        if role in self.masks:
            return self.masks[role]
        out = torch.zeros_like(self.input_ids, dtype=torch.bool)
        out[torch.arange(len(self)), self.positions[role]] = True
        return out

    def to(self, device: torch.device | str) -> TokenBatch:
        """A copy with every tensor on ``device``."""
        return replace(
            self, input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            positions={k: v.to(device) for k, v in self.positions.items()},
            masks={k: v.to(device) for k, v in self.masks.items()},
            attribute_ids=self.attribute_ids.to(device), lengths=self.lengths.to(device),
            merged=self.merged.to(device),
        )

    # ------------------------------------------------------------------ rows and positions

    def take(self, index: slice | Tensor) -> TokenBatch:
        """Rows ``index`` of the batch (every per-row tensor sliced alike)."""
        prompts = self.prompts[index] if isinstance(index, slice) else tuple(
            self.prompts[int(i)] for i in index) if self.prompts else ()
        return replace(
            self, input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            position_ids=self.position_ids[index],
            positions={k: v[index] for k, v in self.positions.items()},
            masks={k: v[index] for k, v in self.masks.items()},
            attribute_ids=self.attribute_ids[index], lengths=self.lengths[index],
            merged=self.merged[index], prompts=tuple(prompts),
        )

    def repeat(self, n: int) -> TokenBatch:
        """The batch stacked ``n`` times along the batch dimension (copy-major: row ``c*B + b``
        is copy ``c`` of row ``b``)."""

        def rep(t: Tensor) -> Tensor:
            return t.repeat(n, *([1] * (t.dim() - 1)))

        return replace(
            self, input_ids=rep(self.input_ids), attention_mask=rep(self.attention_mask),
            position_ids=rep(self.position_ids),
            positions={k: rep(v) for k, v in self.positions.items()},
            masks={k: rep(v) for k, v in self.masks.items()},
            attribute_ids=rep(self.attribute_ids), lengths=rep(self.lengths),
            merged=rep(self.merged), prompts=tuple(self.prompts) * n,
        )

    def position_mask(self, position: Role | int) -> Tensor:
        """``[batch pos]`` bool on the CPU: the token positions a role (or an absolute index)
        names in each row."""
        n_rows, n_pos = self.input_ids.shape
        if isinstance(position, Role):
            if position in POINT_ROLES:
                mask = torch.zeros(n_rows, n_pos, dtype=torch.bool)
                mask[torch.arange(n_rows), self.positions[position].cpu()] = True
                return mask
            if position in GROUP_ROLES:
                return self.masks[position].cpu().clone()
            raise ArgumentError(f"unknown role {position!r}; choose from {ROLE_NAMES}")
        if not -n_pos <= position < n_pos:
            raise OutOfRangeError(f"position {position} is beyond the prompts' {n_pos} tokens "
                                  f"(accepted: {-n_pos} to {n_pos - 1}, or a role)")
        mask = torch.zeros(n_rows, n_pos, dtype=torch.bool)
        mask[:, position] = True
        return mask & self.attention_mask.bool().cpu()

    def role_names(self) -> list[list[str | None]]:
        """One role per token and row, the partition of the prompt into ``prefix``,
        ``subject_first``, ``subject`` (inner subject tokens), ``subject_last``, ``relation`` and
        ``final``; ``None`` for padding. A one-token subject is ``subject_last``."""
        rows, n_pos = self.input_ids.shape
        out: list[list[str | None]] = []
        for b in range(rows):
            final = int(self.positions[Role.FINAL][b])
            last = int(self.positions[Role.SUBJECT_LAST][b])
            first = int(self.positions[Role.SUBJECT_FIRST][b])
            labels: list[str | None] = []
            for p in range(n_pos):
                if not self.attention_mask[b, p]:
                    labels.append(None)
                elif p == final:
                    labels.append(str(Role.FINAL))
                elif p == last:
                    labels.append(str(Role.SUBJECT_LAST))
                elif p == first:
                    labels.append(str(Role.SUBJECT_FIRST))
                elif self.masks[Role.SUBJECT][b, p]:
                    labels.append(str(Role.SUBJECT))
                elif self.masks[Role.RELATION][b, p]:
                    labels.append(str(Role.RELATION))
                else:
                    labels.append(str(Role.PREFIX))
            out.append(labels)
        return out

    def role_labels(self) -> Tensor:
        """``[batch pos]`` long: each token's index into :data:`~factfind.types.ROLE_NAMES`
        (the partition of :meth:`role_names`), -1 for padding."""
        rows = self.role_names()
        return torch.tensor([[ROLE_NAMES.index(r) if r else -1 for r in row] for row in rows],
                            dtype=torch.long).reshape(self.input_ids.shape)

    def roles_present(self) -> list[str]:
        """The partition roles that hold at least one token of some row, in role order."""
        labels = self.role_labels()
        return [r for i, r in enumerate(ROLE_NAMES) if bool((labels == i).any())]


@dataclass
class PairBatch:
    """Clean and corrupt prompts tokenized together, so their padding and positions agree."""

    clean: TokenBatch
    corrupt: TokenBatch
    correct: Tensor  # [batch] clean attribute token
    wrong: Tensor  # [batch] corrupt attribute token

    def __len__(self) -> int:
        return len(self.correct)

    def take(self, index: slice) -> PairBatch:
        """Pairs ``index`` (both sides and both answers sliced alike)."""
        return PairBatch(self.clean.take(index), self.corrupt.take(index), self.correct[index],
                         self.wrong[index])

    def base_and_source(self, direction: Direction | str) -> tuple[TokenBatch, TokenBatch]:
        """The run that is patched and the run its activations come from: noising runs the
        clean prompts with corrupt activations patched in, denoising the reverse."""
        check_mode(direction, "direction", DIRECTIONS)
        return (self.clean, self.corrupt) if direction == "noise" else (self.corrupt, self.clean)

    def logit_diff(self, logits: Tensor, reps: int = 1) -> Tensor:
        """``[reps * batch]`` float: logit of the clean attribute minus the corrupt one, for
        ``logits [reps * batch d_vocab]`` of the batch stacked ``reps`` times."""
        return logit_diff(logits, self.correct.repeat(reps), self.wrong.repeat(reps)).float()

    def answer_ids(self, reps: int = 1) -> Tensor:
        """``[reps * batch 2]``: each row's correct and wrong answer token, for a run that
        computes only those logits (``Model.run(..., logits=pb.answer_ids(reps))``)."""
        return torch.stack([self.correct, self.wrong], 1).repeat(reps, 1)

    def measure_run(self, run: Callable[[str | Tensor], Tensor], reps: int = 1,
                    metric: Metric | None = None) -> Tensor:
        """``[reps * batch]`` float: the metric of a forward ``run(logits) -> logits`` of the
        batch stacked ``reps`` times (``logits`` as for ``Model.run``). With the default metric
        the run unembeds the two answers only (:meth:`answer_ids`): the logit difference needs
        no other logit, and the full ``d_model x d_vocab`` unembedding of every stacked row is
        the largest single product of a late-starting incremental run."""
        if metric is None:
            return self.measure(run(self.answer_ids(reps)), reps, answers=True)
        return self.measure(run("final").float(), reps, metric)

    def measure(self, logits: Tensor, reps: int = 1, metric: Metric | None = None, *,
                answers: bool = False) -> Tensor:
        """``[reps * batch]`` float: ``metric(logits, correct, wrong)`` (default the logit
        difference, :meth:`logit_diff`) for the batch stacked ``reps`` times. With
        ``answers=True`` the logits are those of :meth:`answer_ids` only (``[rows 2]``), which
        suffice for the default metric and no other."""
        if answers:
            if metric is not None:
                raise ArgumentError("a metric of its own needs every logit: run with "
                                    "logits='final', not the answers' only")
            lg = logits.float()  # before the difference (bf16 logits would lose it)
            return lg[:, 0] - lg[:, 1]
        if metric is None:
            return self.logit_diff(logits, reps)
        out = metric(logits, self.correct.repeat(reps).to(logits.device),
                     self.wrong.repeat(reps).to(logits.device))
        if out.shape != (logits.shape[0],):
            raise ArgumentError(f"metric must return one number per row, shape "
                                f"({logits.shape[0]},); got {tuple(out.shape)}")
        return out.float()


def encode_pairs(model: Tokenizes, pairs: FactPairs) -> PairBatch:
    """Tokenize clean and corrupt prompts in one padded batch and check that they align.

    Raises:
        EmptyInputError: no pairs.
        FactDataError: a pair differs in token length or in a role's position.
    """
    if len(pairs) == 0:
        raise EmptyInputError("no prompt pairs to patch: the dataset is empty (check the "
                              "filters that produced it, e.g. known_by or corrupt(on_missing="
                              "'skip'))")
    both = model.tokenize(list(pairs.clean) + list(pairs.corrupt))
    n = len(pairs)
    clean, corrupt = both.take(slice(0, n)), both.take(slice(n, None))
    if not torch.equal(clean.attention_mask, corrupt.attention_mask):
        bad = int((clean.attention_mask != corrupt.attention_mask).any(-1).nonzero()[0, 0])
        raise FactDataError(
            f"clean and corrupt prompts differ in token length: "
            f"{pairs.clean[bad].prompt!r} vs {pairs.corrupt[bad].prompt!r}", record=bad)
    for role in POINT_ROLES:
        if not torch.equal(clean.positions[role], corrupt.positions[role]):
            bad = int((clean.positions[role] != corrupt.positions[role]).nonzero()[0, 0])
            raise FactDataError(f"clean and corrupt prompts put role {role} at different "
                                "positions", record=bad)
    return PairBatch(clean, corrupt, clean.attribute_ids, corrupt.attribute_ids)


def pair_batches(model: Tokenizes, pairs: FactPairs | PairBatch, batch_size: int
                 ) -> Iterator[tuple[int, PairBatch]]:
    """``(first pair, PairBatch)`` slices of all pairs tokenized together (or of an already
    encoded :class:`PairBatch`), so absolute positions mean the same in every slice."""
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    pb = pairs if isinstance(pairs, PairBatch) else encode_pairs(model, pairs)
    n = len(pb.correct)
    for start in range(0, n, batch_size):
        yield start, pb.take(slice(start, min(n, start + batch_size)))


__all__ = ["PairBatch", "TokenBatch", "encode_pairs", "pair_batches"]
