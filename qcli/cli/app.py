"""The Typer app and the one place where errors become messages and exit codes."""

from __future__ import annotations

import os
import signal
import sys

import typer

try:  # Typer >= 0.29 vendors its own click: the installed click's exceptions never reach us.
    from typer._click.exceptions import ClickException
except ImportError:  # older Typer runs on click itself
    from click import ClickException

from qcli import __version__
from qcli.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Interrupted,
    QcliError,
)

app = typer.Typer(
    name="qcli",
    help=(
        "Quantize Hugging Face checkpoints to 8-bit compressed-tensors (int8 / fp8, per-channel"
        " scales, lm_head included) for vLLM and transformers, inspect them, and verify them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help formatter: Typer's rich formatter imports rich.markdown, markdown_it
    # and pygments (~100 ms, more than the rest of `qcli --help` together).
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Exit codes: 0 ok; 1 a check failed; 2 unusable input or options; 3 writing the output
    failed; 4 internal error; 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_INTERRUPTED = "interrupted; partial output removed"


def _on_signal(signum: int, frame: object) -> None:
    # The first signal starts a clean abort; later ones (an impatient second Ctrl-C, a process
    # manager repeating SIGTERM) are ignored, so they cannot cut the cleanup short and leave a
    # partial folder behind, nor turn the one-line message into a traceback.
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGTERM:
        raise Interrupted("terminated (SIGTERM); partial output removed", EXIT_TERMINATED)
    raise KeyboardInterrupt


def _error(message: str, code: int, argv: list[str]) -> None:
    # imported only when needed: rich's console costs --help ~25 ms
    from qcli.cli import output

    # Messages quote user input (regexes, tensor and file names from a stranger's checkpoint):
    # output.error prints them as text, not rich markup, on one line.
    output.error(message, code, as_json=_wants_json(argv))


def _wants_json(argv: list[str]) -> bool:
    """--json was asked for (before any "--"): errors then also go out as JSON on stdout."""
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app, turns every failure into one line on stderr."""
    saved = {sig: signal.signal(sig, _on_signal) for sig in _SIGNALS}
    try:
        return _main(argv)
    finally:  # in-process callers (tests) get their own handlers back
        for sig, handler in saved.items():
            # None: a handler installed outside Python, which cannot be put back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _main(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    reported = False
    try:
        # Outside standalone mode click returns the code of typer.Exit(code) instead of exiting.
        rv = app(args=args, standalone_mode=False, prog_name="qcli")
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except ClickException as e:  # usage errors: bad option, missing argument
        # one line like every other error (click's own display adds a usage block)
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `qcli`: its message is the help
            e.show()
        else:
            hint = f" (see '{ctx.command_path} -h')" if ctx is not None else ""
            code = e.exit_code if e.exit_code else EXIT_BAD_INPUT
            _error(e.format_message() + hint, code, args)
        code = e.exit_code if e.exit_code else EXIT_BAD_INPUT
        reported = True
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    except QcliError as e:
        _error(str(e), e.exit_code, args)
        code, reported = e.exit_code, True
    except Exception as e:  # a bug in qcli: still one line, traceback on request
        if os.environ.get("QCLI_DEBUG"):
            raise
        _error(
            f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            " (rerun with QCLI_DEBUG=1 for the traceback)",
            EXIT_INTERNAL,
            args,
        )
        code, reported = EXIT_INTERNAL, True
    if code == EXIT_INTERRUPTED and not reported:
        # Typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130: say what happened.
        _error(_INTERRUPTED, code, args)
    sys.stdout.flush()
    return code


def run() -> None:
    """The `qcli` console script: like main(), but the process is about to exit, so signals
    stay ignored once the run is over (a late one would otherwise kill it mid-exit)."""
    for sig in _SIGNALS:
        signal.signal(sig, _on_signal)
    code = _main(None)
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
