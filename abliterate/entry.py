"""The console around the Typer app (progress bars, library noise, notes after Ctrl-C) and its entry point.

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
from collections.abc import Callable, Iterable, Iterator
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


# Set once SIGINT arrived: Python drops an exception raised where it cannot propagate (a weakref callback, a
# __del__), so the interrupt is raised again at the next progress step and checked once more at the end.
_signalled: list[bool] = [False]


def _raise_interrupted(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C during cleanup stops at once
    _signalled[0] = True
    raise Interrupted


def _raise_if_signalled() -> None:
    if _signalled[0]:
        raise Interrupted


def _unraisable(info: Any) -> None:
    """Python's report of an exception it had to drop: silent for Ctrl-C, which `_signalled` raises again."""
    if not isinstance(info.exc_value, (Interrupted, KeyboardInterrupt)):
        sys.__unraisablehook__(info)


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
    from abliterate import progress

    progress.set_checkpoint(_raise_if_signalled)
    sys.unraisablehook = _unraisable
    debug = os.environ.get("ABLITERATE_DEBUG") == "1"
    try:
        code = app(args=args, prog_name="abliterate", standalone_mode=False)
        _raise_if_signalled()  # a swallowed Ctrl-C after the last progress step is still not a success
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


# ---- the console: progress bars, library noise, what to say after Ctrl-C ----

def rich_reporter(items: Iterable, description: str, total: int | None) -> Iterator:
    """Progress bars for `abliterate.progress` (installed only when stderr is a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[rate]}")]  # items per second: trials/s of a search, candidates/s
    with Progress(*columns, transient=True, console=console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, rate="")
        for item in items:
            yield item
            bar.advance(task)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f}/s" if speed else "")


def console(stderr: bool = False) -> Any:
    """A rich console on stdout (results) or stderr (logging, progress)."""
    from rich.console import Console

    return Console(stderr=stderr)


def silence_library_bars() -> None:
    """No progress bars from huggingface_hub and transformers ("Loading weights", downloads): for -q and pipes."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by both libraries when they are imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def nothing_written(out: object) -> Callable[[], str]:
    """The note after Ctrl-C for a command that writes its output in one move at the end."""
    return lambda: (f"nothing was written to {out} (outputs are moved into place only when complete); run the same "
                    "command to start again")


def run_progress(out: object) -> Callable[[], str]:
    """The note after Ctrl-C for `run` and `demo`: the steps finished in `out` (they are kept and reused)."""
    def note() -> str:
        from pathlib import Path

        from abliterate.pipeline import finished_steps

        done = finished_steps(Path(str(out)).expanduser())
        if not done:
            return f"no step had finished; run the same command to start again (into {out})"
        return f"finished {', '.join(done)} (kept in {out}/abliterate); run the same command to resume"
    return note
