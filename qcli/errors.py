"""Errors that the CLI turns into a one-line message and an exit code.

Anything else that escapes is a bug in qcli; the CLI still reports it on one line, with a hint
to rerun with QCLI_DEBUG=1 for the traceback.
"""

from __future__ import annotations

# Exit codes shared by every command: scripts depend on them.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_OUTPUT_FAILED = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as shells report a process a SIGTERM ended


class QcliError(Exception):
    """A failure with a message fit for users; ``exit_code`` tells scripts what kind."""

    exit_code = EXIT_BAD_INPUT


class InputError(QcliError):
    """The source checkpoint, an option, or an argument cannot be used."""


class CheckpointError(InputError):
    """A checkpoint file or index is malformed; the message names the file and tensor."""


class PlanError(InputError):
    """The options cannot be applied to this checkpoint (e.g. a split fused layer)."""


class OutputError(QcliError):
    """Writing the output failed (disk full, permissions, a concurrent run)."""

    exit_code = EXIT_OUTPUT_FAILED


class InternalError(QcliError):
    """qcli caught itself doing something wrong (a bug) before it could do harm."""

    exit_code = EXIT_INTERNAL


class Interrupted(QcliError):
    """SIGINT or SIGTERM arrived; partial output has been removed."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, exit_code: int = EXIT_INTERRUPTED):
        super().__init__(message)
        self.exit_code = exit_code
