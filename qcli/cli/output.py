"""The one output layer of every command (as the `hf` CLI's cli/_output.py is for it).

- Results go to stdout: tables and summaries for people, or one JSON document with --json.
  `qcli inspect X | grep lm_head` and `qcli verify X > report.txt` work.
- Diagnostics, warnings and progress go to stderr.
- --quiet silences everything but errors and the JSON document: the exit code speaks.
- Errors are one line on stderr, and with --json also one JSON object on stdout.
- When a stream is not a terminal nothing is cut or wrapped: CI logs keep whole names.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

# A stream that is not a terminal gets lines as long as their content (no 80-column wrap).
_UNBOUNDED = 1 << 16


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr): the terminal's width there, unbounded elsewhere."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = stream.isatty()
    return Console(
        stderr=stderr,
        highlight=False,
        width=None if terminal else _UNBOUNDED,
        soft_wrap=not terminal,
    )


def one_line(message: str) -> str:
    """A message that prints as one line: newlines and other control characters escaped."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message
    )


class Output:
    """Where a command's words go. Human mode prints results as rich renderables on stdout;
    JSON mode prints only the JSON document there; quiet mode prints nothing but errors."""

    def __init__(self, *, as_json: bool = False, quiet: bool = False):
        self.as_json, self.quiet = as_json, quiet
        self.out = console()
        self.err = console(stderr=True)

    @property
    def human(self) -> bool:
        return not self.as_json

    @property
    def wide(self) -> bool:
        """Whether tables may stretch to the screen (only on a terminal)."""
        return self.out.is_terminal

    def result(self, *renderables: Any) -> None:
        """Part of the command's result, for people (nothing in JSON or quiet mode)."""
        if self.human and not self.quiet:
            for r in renderables:
                self.out.print(r)

    def info(self, message: str) -> None:
        """A diagnostic line on stderr (rich markup allowed; quote user text with escape)."""
        if not self.quiet:
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr; `message` is plain text."""
        if not self.quiet:
            self.err.print(f"[yellow]warning:[/] {escape(one_line(message))}")

    def json(self, data: Any) -> None:
        if self.as_json:
            emit_json(data)

    @contextmanager
    def progress(self, label: str, total: int | None, unit: str = "bytes") -> Iterator[Progress]:
        """A progress bar on stderr while the block runs (a terminal only, never quiet)."""
        bar = Progress(self.err, label, total, unit, enabled=not self.quiet)
        with bar:
            yield bar


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def error(message: str, exit_code: int, as_json: bool = False) -> None:
    """The one error line on stderr (and the JSON object on stdout with --json)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]qcli: error:[/] {escape(one_line(message))}"
    )
    if as_json:
        emit_json({"error": message, "exit_code": exit_code})


class Progress:
    """One progress bar for every command: bytes (quantize) or items (layers, windows)."""

    def __init__(self, err: Console, label: str, total: int | None, unit: str, enabled: bool):
        self._err, self.label, self.total, self.unit = err, label, total, unit
        self.enabled = enabled and err.is_terminal
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        counters = (
            (DownloadColumn(), TransferSpeedColumn())
            if self.unit == "bytes"
            else (MofNCompleteColumn(),)
        )
        self._bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            *counters,
            TimeRemainingColumn(),
            TextColumn("[dim]{task.fields[detail]}"),
            console=self._err,
            transient=True,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(self.label, total=self.total, detail="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, amount: int, detail: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, detail=escape(detail))

    def update(self, done: int, total: int | None, detail: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, detail=escape(detail))

    def callback(self) -> Callable[[int, str], None]:
        return self.advance
