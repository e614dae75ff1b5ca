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
from qcli.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Interrupted, QcliError

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

EXIT_INTERNAL = 4


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
    """Exit codes: 0 ok; 1 a verify check failed; 2 unusable input or options; 3 writing the
    output failed; 4 internal error; 130 interrupted."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Interrupted("terminated (SIGTERM); partial output removed")


def _error(message: str) -> None:
    from qcli import report  # imported only when needed: rich's console costs --help ~25 ms

    report.error(message)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the app, turns every failure into one line on stderr."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Outside standalone mode click returns the code of typer.Exit(code) instead of exiting.
        rv = app(args=argv, standalone_mode=False, prog_name="qcli")
        code = rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except ClickException as e:  # usage errors: bad option, missing argument
        e.show()
        code = e.exit_code if e.exit_code else EXIT_BAD_INPUT
    except (KeyboardInterrupt, typer.Abort):
        _error("interrupted; partial output removed")
        code = EXIT_INTERRUPTED
    except QcliError as e:
        _error(str(e))
        code = e.exit_code
    except Exception as e:  # a bug in qcli: still one line, traceback on request
        if os.environ.get("QCLI_DEBUG"):
            raise
        _error(
            f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            " (rerun with QCLI_DEBUG=1 for the traceback)"
        )
        code = EXIT_INTERNAL
    sys.stdout.flush()
    return code


def run() -> None:
    sys.exit(main())
