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
EXIT_INTERRUPTED = 130


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


class Interrupted(QcliError):
    """SIGINT or SIGTERM arrived; partial output has been removed."""

    exit_code = EXIT_INTERRUPTED
