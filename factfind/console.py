"""How factfind talks to a person at a terminal: logging without repetition, one-line errors.

Two habits of a command-line tool, shared by ``factfind`` and the ``analyses/`` scripts:

* :func:`configure_logging` installs one handler whose :class:`RepeatFilter` collapses a run
  of identical log records (same logger, level and rendered message) into the first record
  plus one line "(the previous message repeated N more times)". A sweep that logs the same
  warning for every chunk then writes two lines, not thirty.
* :func:`run_cli` calls a ``main`` function; a :class:`~factfind.errors.FactfindError` (input
  the user can fix: the message names the cause and the fix) is printed as
  ``factfind: error: <message>`` on one line with exit status 2, and no traceback. Other
  exceptions are bugs and keep their traceback.

Example::

    from factfind.console import configure_logging, run_cli
    configure_logging()
    sys.exit(run_cli(main))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from factfind.errors import FactfindError

FORMAT = "%(asctime)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Drop a record that repeats the previous one's logger, level and message (as rendered:
    lines that differ in an argument are all kept); when the run ends, say how many were
    dropped.

    The count is emitted through the same handler as an ordinary record of the repeated
    logger, just before the next different record (or at :meth:`flush`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: tuple[str, int, str] | None = None
        self._last_record: logging.LogRecord | None = None
        self._repeats = 0
        self._emit: Callable[[logging.LogRecord], None] | None = None

    def bind(self, emit: Callable[[logging.LogRecord], None]) -> None:
        """Where the "repeated" summary goes (the handler's ``emit``)."""
        self._emit = emit

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key == self._last:
            self._repeats += 1
            return False
        self.flush()
        self._last, self._last_record = key, record
        return True

    def flush(self) -> None:
        """Emit the pending "(the previous message repeated N more times)" line, if any."""
        repeats, self._repeats = self._repeats, 0  # reset first: emitting flushes again
        if repeats and self._last_record is not None and self._emit is not None:
            last = self._last_record
            self._emit(logging.LogRecord(
                last.name, last.levelno, last.pathname, last.lineno,
                "(the previous message repeated %d more times)", (repeats,), None))


class _Handler(logging.StreamHandler):  # pyright: ignore[reportMissingTypeArgument]
    """A stream handler whose :class:`RepeatFilter` flushes its summary on close."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.repeats = RepeatFilter()
        self.repeats.bind(super().emit)
        self.addFilter(self.repeats)

    def flush(self) -> None:
        if getattr(self.stream, "closed", False):  # e.g. at interpreter exit after a capture
            return
        self.repeats.flush()
        super().flush()


def configure_logging(level: int = logging.INFO, *, stream: Any = None) -> logging.Handler:
    """Log to ``stream`` (default stderr) at ``level`` with repeats collapsed; replaces the
    root logger's handlers, so calling it twice does not duplicate lines."""
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def run_cli(main: Callable[..., Any], *args: Any, prog: str = "factfind") -> int:
    """Call ``main(*args)``; return 0, or 2 after printing a :class:`FactfindError` on one
    line (``prog: error: message``) without a traceback. ``SystemExit`` passes through."""
    try:
        main(*args)
    except FactfindError as err:
        for handler in logging.getLogger().handlers:
            handler.flush()
        message = " ".join(str(err).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
