"""The errors factfind raises for input a user can fix.

Every such error derives from :class:`FactfindError`. Its message is one sentence or two that
name the cause (the bad argument, record or result) and the fix; the command line prints it on
one line, without a traceback, and exits with status 2 (:func:`factfind.console.run_cli`).
Anything else that escapes is a bug in factfind and keeps its traceback.

This module imports nothing else of the package, so every module can raise these.
"""

from __future__ import annotations

from typing import Any


class FactfindError(Exception):
    """Input a user can fix: the message names the cause and the fix."""


class NotEnoughFactsError(FactfindError, ValueError):
    """Too few facts survive a step (known by the model, paired with a corrupt partner) for an
    analysis to mean anything."""


class EmptyInputError(FactfindError, ValueError):
    """An analysis was given no prompts (or no pairs)."""


def require_prompts(items: object, what: str = "prompts") -> None:
    """Raise :class:`EmptyInputError` if ``items`` is empty (anything with ``len``)."""
    try:
        n = len(items)  # type: ignore[arg-type]
    except TypeError:
        return
    if n == 0:
        raise EmptyInputError(f"no {what}: the dataset is empty (check the filters that "
                              "produced it, e.g. known_by or corrupt(on_missing='skip'))")


class ArgumentError(FactfindError, ValueError):
    """An argument outside the values a function accepts; the message names the argument, the
    accepted values and what was given."""


class OutOfRangeError(ArgumentError, IndexError):
    """A layer, head, neuron or position that the model or the prompts do not have."""


class WrongTypeError(ArgumentError, TypeError):
    """An argument of the wrong kind (e.g. a slow tokenizer, a list where a graph is needed)."""


class NotFoundError(ArgumentError, KeyError):
    """A name that is not there (a relation, a direction); the message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DegenerateResultError(FactfindError, ValueError):
    """A result that would be all NaN or infinite (e.g. every pair has equal clean and corrupt
    metrics, so a normalised effect divides by zero); the message names the cause and the fix."""


class FactDataError(FactfindError, ValueError):
    """Bad fact data: a missing or malformed file or record, or a prompt that cannot be aligned.

    Attributes:
        reason: what is wrong, without the location.
        path: the file it came from, if any.
        record: the record within the file (index, ``"line 4"``, ``"samples[3]"``...), if any.
    """

    def __init__(self, reason: str, *, path: str | None = None,
                 record: int | str | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        self.record = record
        where = [p for p in (self.path, None if record is None else f"record {record}") if p]
        super().__init__(f"{': '.join(where)}: {reason}" if where else reason)

    def at(self, *, path: str | None = None, record: int | str | None = None) -> FactDataError:
        """The same error located at ``path`` / ``record`` (existing location wins)."""
        return FactDataError(self.reason, path=self.path or path,
                             record=self.record if self.record is not None else record)

    def __reduce__(self) -> Any:  # keep path/record through pickling (multiprocessing, xdist)
        return (_rebuild_error, (self.reason, self.path, self.record))


def _rebuild_error(reason: str, path: str | None, record: int | str | None) -> FactDataError:
    return FactDataError(reason, path=path, record=record)


def check_mode(value: object, name: str, allowed: tuple[str, ...]) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of ``allowed`` (mode arguments)."""
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                            f"got {value!r}")
