"""The console entry point around the Typer app: global flags anywhere, one line per failure, honest exit codes.

- `-q/--quiet` and `-v/--verbose` are accepted after the subcommand too (`abliterate run M --out o -q`): they are
  moved in front of it before parsing, as click only knows them there.
- Exit codes: 0 done, 2 a user mistake (`UserError`) or a usage error (unknown option, missing argument, no
  arguments; shown with a usage hint), 130 Ctrl-C, 1 anything else (the traceback only with ABLITERATE_DEBUG=1).
- Ctrl-C: Typer turns KeyboardInterrupt into a return value that looks like success when not in standalone mode,
  so SIGINT raises `Interrupted` (not a KeyboardInterrupt) instead; the command's `on_interrupt` note says in one
  line what was finished and how to go on.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer

from abliterate.errors import UserError

GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")
# What a command says after Ctrl-C; commands replace it with one that knows their output (see `on_interrupt`).
_interrupt_note: list[Callable[[], str]] = [lambda: "run the same command again"]


class Interrupted(BaseException):
    """Ctrl-C. A BaseException like KeyboardInterrupt, so `except Exception` cleanup code lets it through."""


def on_interrupt(note: Callable[[], str]) -> None:
    """Set what the one line after Ctrl-C says (called at interrupt time, so it can look at the output)."""
    _interrupt_note[0] = note


def _raise_interrupted(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C during cleanup stops at once
    raise Interrupted


def _value_options(app: typer.Typer, name: str) -> set[str]:
    """The options of subcommand `name` that take a value (so a following `-v` is that value, not a flag)."""
    command = typer.main.get_command(app)
    sub = getattr(command, "commands", {}).get(name)
    found: set[str] = set()
    for param in getattr(sub, "params", []):
        if getattr(param, "param_type_name", "") == "option" and not getattr(param, "is_flag", False):
            found.update(param.opts)
    return found


def hoist_global_flags(app: typer.Typer, args: list[str]) -> list[str]:
    """`args` with -q/-v (wherever they are before `--`) moved in front of the subcommand."""
    position = next((i for i, arg in enumerate(args) if not arg.startswith("-")), None)
    if position is None:
        return args
    takes_value = _value_options(app, args[position])
    hoisted, rest = [], list(args[:position + 1])
    tail = args[position + 1:]
    for i, arg in enumerate(tail):
        if arg == "--":
            rest += tail[i:]
            break
        previous = tail[i - 1] if i else ""
        if arg in GLOBAL_FLAGS and previous not in takes_value:
            hoisted.append(arg)
        else:
            rest.append(arg)
    return args[:position] + hoisted + rest[position:]


def _show_usage_error(error: Exception) -> int:
    """Typer's usage errors (its bundled click's, or click's for older Typer) know how to show themselves."""
    error.show()  # type: ignore[attr-defined]
    return int(getattr(error, "exit_code", 2))


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run `app` on `argv` (default: sys.argv) and exit with the code the module docstring lists."""
    args = hoist_global_flags(app, list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGINT, _raise_interrupted)
    debug = os.environ.get("ABLITERATE_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="abliterate", standalone_mode=False)
    except UserError as error:
        if debug:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt):
        typer.echo(f"interrupted: {_interrupt_note[0]()}", err=True)
        sys.exit(130)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as error:  # the one place that decides how failures look
        if hasattr(error, "show") and hasattr(error, "exit_code"):
            sys.exit(_show_usage_error(error))
        if debug:
            raise
        typer.echo(f"error: {type(error).__name__}: {error} (set ABLITERATE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
