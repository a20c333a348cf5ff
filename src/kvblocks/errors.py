"""Errors raised by kvblocks.

Every error the library raises on bad input is a :class:`KvBlocksError`. Errors about a
caller's argument are :class:`InvalidArgumentError` subclasses: they carry the argument's
name in ``argument`` and their message starts with it, so ``str(err)`` reads
``"nt must be a positive int, got 0"``.

The argument errors also derive from the matching builtin (``ValueError``, ``TypeError``,
``IndexError``) so code that already catches those keeps working.
"""

from __future__ import annotations


class KvBlocksError(Exception):
    """Base class of every error kvblocks raises."""


class InvalidArgumentError(KvBlocksError, ValueError):
    """An argument has a value kvblocks cannot use.

    Args:
        argument: the name of the offending argument, as the caller wrote it.
        problem: what is wrong, phrased to follow the name ("must be positive, got 0").
    """

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument} {problem}")


class UnsupportedDtypeError(InvalidArgumentError, TypeError):
    """A dtype that kvblocks does not move or convert."""


class LengthMismatchError(InvalidArgumentError):
    """Two sequences (or a table and its expected size) that must agree in length do not."""


class ShapeMismatchError(InvalidArgumentError):
    """A tensor whose shape or size does not match the dims it is used with."""


class BlockIdOutOfRangeError(InvalidArgumentError, IndexError):
    """A block, layer or outer index outside its layout's range."""


class LayoutFormatError(InvalidArgumentError):
    """A block format that the requested operation cannot work with."""


class OverlapError(InvalidArgumentError):
    """Destinations that overlap each other or a source: the result would depend on timing."""


class BackendUnavailableError(KvBlocksError):
    """A path that this machine cannot run (no GPU, no cuda-bindings, a closed NIXL agent, ...)."""


class ConfigMismatchError(InvalidArgumentError):
    """Two layouts whose block shapes differ where a transfer needs them equal."""


class StorageError(KvBlocksError):
    """Storage that cannot be allocated, read or written (a full disk, a read-only path, ...).

    ``path`` is set when the storage is a file.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message if path is None else f"{path}: {message}")


class LayoutReleasedError(KvBlocksError):
    """A layout or allocation used after it was released."""


class TransferError(KvBlocksError):
    """A transfer that failed while it ran; its notification completes with this error."""


class SerializationError(KvBlocksError):
    """A serialized layout that cannot be read: another format version, or damaged bytes."""


class PeerError(KvBlocksError):
    """Another worker that did not answer in time, answered with an error, or speaks another
    version of the block-sharing protocol."""
