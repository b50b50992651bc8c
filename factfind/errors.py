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


class EmptyGraphError(ArgumentError):
    """A circuit graph with no nodes was handed to something that draws or explores it (e.g. a
    graph pruned to nothing: lower the threshold or keep more edges)."""


class MissingLayerError(ArgumentError):
    """A graph node other than ``embed`` or ``logits`` has no ``layer`` attribute, so the
    explorer cannot place it on the layer axis; the message names the node."""


class NoFigureError(WrongTypeError):
    """:func:`factfind.show` was given an object that has no report figure (neither an
    analysis frame it recognises nor a circuit graph); the message names what it accepts."""


class CacheError(FactfindError, OSError):
    """A file of factfind's caches (a step result, a streamed chunk, a dequantized checkpoint,
    the organism's checkpoint) that cannot be read or written. The message names the file and
    what to do; ``path`` holds it. It is also an :class:`OSError`, so code that caught the raw
    error from inside pyarrow or the file system still catches it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(message)

    def __str__(self) -> str:  # OSError would prefix an errno
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> Any:
        state = dict(self.__dict__, errno=self.errno)
        return (_rebuild_cache_error, (type(self), self.args[0] if self.args else "", state))


def _rebuild_cache_error(cls: type[CacheError], message: str, state: dict[str, Any]
                         ) -> CacheError:
    err = cls.__new__(cls, message)
    CacheError.__init__(err, message)
    for name, value in state.items():
        setattr(err, name, value)
    return err


class CacheCorruptError(CacheError):
    """A cached entry failed its check (size or sha256 differ from what was recorded when it
    was written, its record is missing, or reading it fails) and cannot be rebuilt here.

    Attributes:
        path: the entry.
        reason: what failed, e.g. ``"size 100 bytes, recorded 48213"``.
        moved_to: where the entry was moved aside (``None`` if it could not be moved).
    """

    def __init__(self, message: str, *, path: str | None = None, reason: str = "",
                 moved_to: str | None = None) -> None:
        self.reason = reason
        self.moved_to = moved_to
        super().__init__(message, path=path)


class CacheWriteError(CacheError):
    """A write to a cache or output folder failed: no space left, permission denied, a
    read-only file system. Nothing partial was left behind.

    Attributes:
        path: the file that was being written.
        needed: bytes the write needed (``None`` where unknown).
        errno: the operating system's error number (``errno.ENOSPC``...), as on any
            :class:`OSError`.
    """

    def __init__(self, message: str, *, path: str | None = None, needed: int | None = None,
                 errno: int | None = None) -> None:
        self.needed = needed
        super().__init__(message, path=path)
        self.errno = errno


class DictionaryFileError(FactfindError, ValueError):
    """A sparse dictionary's file that is missing, unreadable (a truncated safetensors, bad JSON
    or YAML, a broken ``.npz``) or not laid out as its format says (a missing tensor, shapes
    that do not fit together); the message names the file. ``path`` holds it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(message)

    def __reduce__(self) -> Any:
        return (_rebuild_dictionary_error, (type(self), self.args[0] if self.args else "",
                                            self.path))


def _rebuild_dictionary_error(cls: type[DictionaryFileError], message: str, path: str | None
                              ) -> DictionaryFileError:
    return cls(message, path=path)


class UnknownHookError(DictionaryFileError):
    """A dictionary file names a hook point that does not map onto a factfind site (e.g.
    ``blocks.3.attn.hook_z``, or the residual stream before the MLP's norm where a transcoder
    must read ``mlp_in``); the message names the file, the hook and the sites factfind has."""


class FormatCapabilityError(ArgumentError):
    """A dictionary that the asked format cannot express (e.g. a TopK transcoder in
    circuit-tracer's format, an SAE in a transcoder set); the message names the dictionary,
    the format and the formats that can hold it."""


class HubUnavailableError(FactfindError, OSError):
    """A hub name that could not be fetched (no network, an offline hub, a repository that is
    not there); the message names it and says to download the folder and pass its path."""

    def __str__(self) -> str:  # OSError would prefix an errno
        return str(self.args[0]) if self.args else ""


class CheckpointError(FactfindError, ValueError):
    """A checkpoint that cannot be resolved or read: a missing or corrupt GGUF file, an unknown
    short name. ``argument`` names the argument at fault (the message starts with it)."""

    def __init__(self, message: str, *, argument: str = "source") -> None:
        self.argument = argument
        super().__init__(f"{argument}: {message}")

    def __reduce__(self) -> Any:
        return (_rebuild_checkpoint_error, (type(self), self.args[0] if self.args else "",
                                            dict(self.__dict__)))


def _rebuild_checkpoint_error(cls: type[CheckpointError], message: str, state: dict[str, Any]
                              ) -> CheckpointError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ModelNotInstalledError(CheckpointError):
    """A short model name (``"gemma-3-270m"``) whose package is not installed, with nothing
    cached and the hub's copy out of reach; the message names the package to install.

    Attributes:
        package: the pip name of the package that ships the checkpoint.
    """

    def __init__(self, message: str, *, package: str | None = None,
                 argument: str = "source") -> None:
        self.package = package
        super().__init__(message, argument=argument)


class IncompleteInstallError(CheckpointError):
    """A package that ships its checkpoint in chunk packages is installed, but some of the
    chunk packages are not (or lack their slice); the message names each one and the pip
    command that installs them.

    Attributes:
        missing: the pip names of the chunk packages to install.
    """

    def __init__(self, message: str, *, missing: tuple[str, ...] = (),
                 argument: str = "source") -> None:
        self.missing = missing
        super().__init__(message, argument=argument)
