"""One error family for everything slimship raises on purpose.

Every message says what went wrong, where (file, config key, graph node, op) and what to do.
"""

from __future__ import annotations

import re


class SlimshipError(Exception):
    """Base class: a problem a user can act on.

    `every_rank` is True for an error that every torchrun rank raises alike (the config, the kind of data):
    the CLI prints it on rank 0 only. Other errors are printed by the rank that raised them."""

    every_rank: bool = False


def on_every_rank(exc: SlimshipError) -> SlimshipError:
    """`exc`, marked as raised alike by every torchrun rank (printed once, by rank 0)."""
    exc.every_rank = True
    return exc


class ConfigError(SlimshipError):
    """A configuration file or option is invalid; the message names the key path."""


class SlimmingError(SlimshipError):
    """The slimming engine could not trace, analyse, rewrite or verify a model."""


class VerificationError(SlimmingError):
    """A slim or exported model does not match its source within tolerance."""


class ExportError(SlimshipError):
    """A model could not be exported or converted (names the op / node where known)."""


class ModelFileError(SlimshipError):
    """A model file is missing, corrupt, truncated or of an unknown format."""


class TargetError(SlimshipError):
    """A target profile is invalid, unreachable or lacks the runtime it needs."""


class DeviceError(TargetError):
    """A remote device disconnected, timed out or returned an invalid result."""


class TransportError(ConfigError, TargetError):
    """A target's transport string is invalid (e.g. an SSH user or host that ssh would read as an option).

    Both a config error (where it was written) and a target error (the target cannot be reached).
    """


class ReleaseError(SlimshipError):
    """A release bundle could not be written or does not verify."""


class CompressionError(SlimshipError):
    """A compression method was misconfigured or failed to reach its target."""


class GateError(SlimshipError):
    """A quality gate failed: the release would not meet what the config demands (CLI exit status 3)."""


class StoppedEarly(SlimshipError):
    """Training stopped on purpose before its last epoch (`stop_after`): the checkpoint is saved and nothing
    is released (CLI exit status STOPPED_EXIT)."""


#: CLI exit status of a run that stopped at `stop_after` (2: an error, 3: a gate failed)
STOPPED_EXIT = 4


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc`'s message for a one-line error (its type's name when it has no message),
    without ANSI colour codes (some exporters colour their messages)."""
    text = _ANSI.sub("", str(exc)).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
