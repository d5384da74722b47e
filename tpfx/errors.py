"""The one exception family that tpfx raises for anything a user can cause.

Each message is a single line naming the module or node, the offending value and the fix.
"""

from __future__ import annotations


class TpfxError(Exception):
    """Base class of every error tpfx raises for a user's input."""


class CaptureError(TpfxError):
    """The model could not be captured as a graph."""


class ShardingError(TpfxError):
    """A site cannot be sharded as asked (for example tp does not divide its out_features)."""


class ConfigError(TpfxError):
    """Bad options: tp, rank, process group or call form."""


class LoadError(TpfxError):
    """A checkpoint does not match the parallelized program."""


class ReplicaError(TpfxError):
    """The ranks of a tensor-parallel group do not hold the same model (weights, configuration, random state)."""


class CollectiveError(TpfxError):
    """A collective of a tensor-parallel program failed or timed out: a rank did not join it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of a third-party exception (``Type`` alone without a message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class TpfxWarning(UserWarning):
    """Base class of every warning tpfx issues."""


class NoSitesWarning(TpfxWarning):
    """``parallelize`` found no linear to shard: every rank holds and computes the whole model."""


class DefaultTimeoutWarning(TpfxWarning):
    """The tensor-parallel group has torch's default timeout (30 minutes): a hang would last that long."""
