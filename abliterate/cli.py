"""The `abliterate` command line: thin commands that parse options, build one config and call one library function.

The flags of config settings are not written here: `config_options` (abliterate.cli_options) generates them
from the config's own fields and helps for the settings a command reads, and hands the command the loaded config.
Heavy imports (torch, transformers) happen inside the commands so that `abliterate --help` is instant.
abliterate.entry runs the app: exit codes (a `UserError` is one line on stderr and exit 2), Ctrl-C, the console.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from abliterate.cli_model import apply, inspect, push
from abliterate.cli_options import Token, config_options
from abliterate.cli_options import use_token as _use_token
from abliterate.config import Config
from abliterate.entry import console as _console
from abliterate.entry import nothing_written as _nothing_written
from abliterate.entry import on_interrupt, run_app, silence_library_bars
from abliterate.entry import rich_reporter as _rich_reporter
from abliterate.entry import run_progress as _run_progress

app = typer.Typer(
    name="abliterate",
    help="Find a chat model's refusal direction, remove it from the weights, evaluate the edit, and save or push it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        from abliterate import __version__

        typer.echo(f"abliterate {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logging (here or after the command).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings, errors and results, no progress bars.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Configure logging and progress bars for every command."""
    from rich.logging import RichHandler

    from abliterate import progress

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=_console(stderr=True), show_path=False, show_time=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # huggingface_hub prints its warnings through a handler of its own as well: each retry warning came twice.
    # Its handler is added when its logging module is imported, so import it first, then take the handler off.
    from huggingface_hub.utils import logging as hub_logging

    hub_logger = hub_logging.get_logger()
    for own in [h for h in hub_logger.handlers if type(h) is logging.StreamHandler]:
        hub_logger.removeHandler(own)
    bars = not quiet and sys.stderr.isatty()  # a pipe or a log file gets no carriage-return noise
    if not bars:
        silence_library_bars()
    progress.set_reporter(_rich_reporter if bars else None)


# Commands are registered below, one block per stage; each block only parses options and calls the library.
# ---- commands ----


# What each command reads of the config, in the order --help lists it; "section" stands for all its settings.
# measure never loads the evaluation prompts; eval reads every prompt setting, as the evaluation prompts are drawn
# apart from the fit prompts with the same seed; optimize measures first and confirms with eval's generation.
FIT_PROMPTS = ("prompts.harmful_train", "prompts.harmful_val", "prompts.harmless_train", "prompts.column",
               "prompts.n_train", "prompts.n_val", "prompts.seed")
FIT_NAMES = {"prompts.harmful_train": "--harmful", "prompts.harmless_train": "--harmless"}
EVAL_NAMES = {"prompts.harmful_eval": "--harmful", "prompts.harmless_eval": "--harmless"}


@app.command("measure")
@config_options("model", *FIT_PROMPTS, "measure", names=FIT_NAMES)
def measure_command(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Directory for direction.json, scores.json, candidates and plots.")],
    token: Token = None,
    *,
    config: Config,
) -> None:
    """Find the refusal direction: candidates at every layer and end-of-instruction position, scored and chosen."""
    from pathlib import Path

    from abliterate.measure import measure

    _use_token(token)
    on_interrupt(_nothing_written(out))
    _print_measure_result(model, measure(model, Path(out), config))


def _print_measure_result(model: str, result) -> None:
    """The chosen candidate as a table, then the reference comparison, the refusal found and where the files are."""
    from rich.table import Table

    table = Table(title=f"abliterate measure: {model}")
    for header in ("layer", "position", "token", "bypass", "KL", "induce"):
        table.add_column(header)
    table.add_row(*(str(v) for v in (result.layer, result.position, repr(result.token_text))),
                  *("-" if result.chosen[k] is None else f"{result.chosen[k]:.4f}" for k in ("bypass", "kl", "induce")))
    console = _console()
    console.print(table)
    if result.reference:
        best = result.reference["best_candidate"]
        chosen_cosine = result.reference.get("chosen_cosine")
        console.print(f"Reference: best cosine {best['cosine']:.4f} at layer {best['layer']}, position "
                      f"{best['position']}; the chosen candidate's cosine "
                      + ("-" if chosen_cosine is None else f"{chosen_cosine:.4f}"))
    if result.refusal is not None:
        console.print(f"Refusal: {result.refusal.describe()} ({result.out_dir / 'refusal.json'})", soft_wrap=True)
    console.print(f"Direction: {result.direction_path} (scores in {result.out_dir / 'scores.json'})", soft_wrap=True)


@app.command("optimize")
@config_options("optimize", "model", "prompts", "measure", "eval.batch_size", "eval.refusal_set", names=FIT_NAMES)
def optimize_command(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Directory for the measurement, optimize.json, pareto.png and edit.json (resumable).")],
    token: Token = None,
    *,
    config: Config,
) -> None:
    """Search an edit with less damage than the paper's (Pareto front of refusal vs KL), confirm it by generation."""
    from pathlib import Path

    from rich.table import Table

    from abliterate.optimize import optimize

    _use_token(token)
    result = optimize(model, Path(out), config)
    table = Table(title=f"abliterate optimize: {model} ({result.n_trials} trials)")
    for header in ("trial", "harmful refusal", "harmless identical", "reply KL", "shipped"):
        table.add_column(header)
    for row in result.confirmation:
        name = f"{row['trial']}" + (" (paper)" if row["trial"] == result.paper_trial else "")
        table.add_row(name, _refusal_cell(row), f"{row['identical_share']:.2f}", f"{row['reply_kl']:.5f}",
                      "yes" if row["trial"] == result.chosen_trial else "")
    console = _console()
    console.print(table)
    if any(row["harmful_refusal"] is None for row in result.confirmation):
        console.print("-: not generated (" + ("--trial picks the shipped edit" if config.optimize.trial >= 0
                                              else "an edit with less reply KL met the target first") + ").")
    if any(row.get("refusal_stopped_early") for row in result.confirmation):
        console.print(">=: generation stopped once more replies refused than the target allows (at least this share).")
    speed = f" ({result.trials_per_s:.1f} trials/s)" if result.trials_per_s else ""
    console.print(f"Search: {result.timings_s.get('search_s', 0.0):.1f} s{speed}")
    console.print(f"Edit: {result.edit_path} (write it with: abliterate apply MODEL --direction {result.edit_path} "
                  "--out DIR)", soft_wrap=True)


def _refusal_cell(row: dict) -> str:
    """A confirmed edit's harmful refusal: "-" not generated, ">=" a lower bound (its generation stopped early: with
    thinking on, generated first, a stop there leaves thinking off ungenerated)."""
    off, on = row["harmful_refusal"], row.get("harmful_refusal_thinking_on")
    if off is None and on is None:
        return "-"
    stopped = row.get("refusal_stopped_early")
    cell = "-" if off is None else f"{'>=' if stopped else ''}{off:.2f}"
    return cell if on is None else f"{cell} (thinking on {'>=' if stopped and off is None else ''}{on:.2f})"


@app.command("eval")
@config_options("model", "prompts", "eval", names=EVAL_NAMES)
def eval_command(
    model: Annotated[str, typer.Argument(help="Model to evaluate: a local checkpoint directory or a Hub id.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model, evaluated side by side on the same prompts (adds KL).")] = None,
    measure_dir: Annotated[str | None, typer.Option("--measure", help="Folder `abliterate measure` wrote: its refusal.json and direction.json.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Directory for eval.json, report.md and completions (default: eval-NAME).")] = None,
    token: Token = None,
    *,
    config: Config,
) -> None:
    """Evaluate a model (and its base side by side): refusal, over-refusal, safety judge, CE loss and KL."""
    from pathlib import Path

    from rich.table import Table

    from abliterate.evaluation import evaluate

    out_dir = Path(out) if out else Path(f"eval-{Path(model.rstrip('/')).name}")
    _use_token(token)
    on_interrupt(lambda: f"no report was written to {out_dir}; run the same command to start again")
    report = evaluate(model, config, out_dir, base=base, measure_dir=Path(measure_dir) if measure_dir else None)
    table = Table(title=f"abliterate eval: {model}" + (f" vs {base}" if base else ""))
    for header in ["metric"] + [report.data["labels"][column] for column in report.columns]:
        table.add_column(header)
    for row in report.rows():
        table.add_row(*row)
    console = _console()
    console.print(table)
    console.print(f"Report: {out_dir / 'report.md'} (numbers in {out_dir / 'eval.json'})", soft_wrap=True)


def _print_run_summary(result, console) -> None:
    from rich.table import Table

    table = Table(title=f"abliterate run: {result.out_dir}")
    for column in ("", "base", "edited"):
        table.add_column(column)
    table.add_row("direction", "", result.shipped or f"layer {result.layer} of {result.n_layers}, position "
                                                       f"{result.position}")
    table.add_row("tensors edited", "", str(result.n_edited))
    for metric, base, edited in result.metrics:
        table.add_row(metric, base, edited)
    console.print(table)
    if result.refusal:
        from abliterate.refusal import RefusalProfile

        console.print(f"Refusal: {RefusalProfile.from_dict(result.refusal).describe()}", soft_wrap=True)
    if result.reused:
        console.print(f"Reused finished steps: {', '.join(result.reused)}")
    console.print(f"Report: {result.report_path or 'evaluation skipped (--skip-eval)'}", soft_wrap=True)
    if result.pushed_url:
        console.print(f"Pushed: {result.pushed_url}", soft_wrap=True)


@app.command()
@config_options("model", "prompts", "measure", "apply", "eval", "run", "optimize", names=FIT_NAMES)
def run(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Output directory: the edited checkpoint plus abliterate/ provenance.")],
    force: Annotated[bool, typer.Option("--force", help="Rerun every step; allow a non-empty --out.")] = False,
    token: Token = None,
    *,
    config: Config,
) -> None:
    """The whole job: measure the refusal direction, remove it from the weights, evaluate, write the model card."""
    from pathlib import Path

    from abliterate.pipeline import run as run_pipeline

    _use_token(token)
    on_interrupt(_run_progress(out))
    result = run_pipeline(model, Path(out), config, force=force)
    _print_run_summary(result, _console())


@app.command()
def demo(
    out: Annotated[str | None, typer.Option("--out", help="Output directory (default: a new temporary one).")] = None,
) -> None:
    """Abliterate the bundled toy refuser end to end, offline, and show its replies before and after."""
    from pathlib import Path

    from rich.table import Table

    from abliterate.demo import demo as run_demo

    if out:
        on_interrupt(_run_progress(out))
    result = run_demo(Path(out) if out else None)
    console = _console()
    table = Table(title="Held-out prompts, toy refuser before and after abliteration")
    for column in ("prompt", "before", "after"):
        table.add_column(column)
    for prompt, before, after in result.replies:
        table.add_row(prompt, before, after)
    console.print(table)
    _print_run_summary(result.run, console)


# The commands on a checkpoint folder live in abliterate.cli_model; registered here, after demo, in help order.
for _command in (apply, inspect, push):
    app.command()(_command)


def main() -> None:
    """Console entry point (see abliterate.entry for exit codes, Ctrl-C and flags after the command)."""
    run_app(app)


if __name__ == "__main__":
    main()
