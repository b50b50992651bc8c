"""The errors factfind raises for input a user can fix.

Every such error derives from :class:`FactfindError`. Its message is one sentence or two that
name the cause (the bad argument, record or result) and the fix; the command line prints it on
one line, without a traceback, and exits with status 2 (:func:`factfind.console.run_cli`).
Anything else that escapes is a bug in factfind and keeps its traceback.

This module imports nothing else of the package, so every module can raise these.
"""

from __future__ import annotations


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
