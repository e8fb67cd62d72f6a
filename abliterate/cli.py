"""The `abliterate` command line: thin commands that parse options, build one config and call one library function.

Heavy imports (torch, transformers) happen inside the commands so that `abliterate --help` is instant.
abliterate.entry runs the app: exit codes (a `UserError` is one line on stderr and exit 2), Ctrl-C, the console.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from abliterate.cli_model import apply, inspect, push
from abliterate.cli_options import DeviceMap, MaxMemory, OffloadFolder, Token, TrustRemoteCode
from abliterate.cli_options import model_flags as _model_flags
from abliterate.cli_options import use_token as _use_token
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
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
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


@app.command("measure")
def measure_command(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Directory for direction.json, scores.json, candidates and plots.")],
    config_file: Annotated[str | None, typer.Option("--config", help="TOML config file (see configs/).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of the model.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Dtype to load the model in.")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="Jinja chat template file.")] = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="System prompt before every instruction.")] = None,
    harmful: Annotated[str | None, typer.Option("--harmful", help="Harmful prompts for fitting: a file, hf:owner/name or builtin:NAME.")] = None,
    harmless: Annotated[str | None, typer.Option("--harmless", help="Harmless prompts for fitting.")] = None,
    column: Annotated[str | None, typer.Option("--column", help="Column holding the instruction in table-like files.")] = None,
    n_train: Annotated[int | None, typer.Option("--n-train", help="Training prompts per side.")] = None,
    n_val: Annotated[int | None, typer.Option("--n-val", help="Validation prompts per side.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling prompts.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts per forward pass.")] = None,
    kl_max: Annotated[float | None, typer.Option("--kl-max", help="Discard candidates with a larger harmless KL.")] = None,
    max_layer_fraction: Annotated[float | None, typer.Option("--max-layer-fraction", help="Discard layers >= this fraction of the depth.")] = None,
    filter_prompts: Annotated[bool | None, typer.Option("--filter-prompts/--no-filter-prompts", help="Keep only prompts the base model refuses (harmful) or answers (harmless).")] = None,
    score_all: Annotated[bool | None, typer.Option("--score-all", help="Compute every candidate's induce score (full figure).")] = None,
    direction_file: Annotated[str | None, typer.Option("--direction-file", help="Reference direction to compare every candidate with.")] = None,
    use_reference: Annotated[bool | None, typer.Option("--use-reference", help="Use --direction-file instead of selecting.")] = None,
    trust_remote_code: TrustRemoteCode = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    token: Token = None,
) -> None:
    """Find the refusal direction: candidates at every layer and end-of-instruction position, scored and chosen."""
    from pathlib import Path

    from abliterate.config import load_config
    from abliterate.measure import measure

    overrides = _nested({
        "model.revision": revision, "model.dtype": dtype, "model.chat_template": chat_template,
        "model.system_prompt": system_prompt, "prompts.harmful_train": harmful, "prompts.harmless_train": harmless,
        "prompts.column": column, "prompts.n_train": n_train, "prompts.n_val": n_val, "prompts.seed": seed,
        "measure.batch_size": batch_size, "measure.kl_max": kl_max, "measure.max_layer_fraction": max_layer_fraction,
        "measure.filter_prompts": filter_prompts, "measure.score_all": score_all,
        "measure.direction_file": direction_file, "measure.use_reference": use_reference,
        **_model_flags(trust_remote_code, device_map, max_memory, offload_folder),
    })
    config = load_config(config_file, overrides)
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
def optimize_command(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Directory for the measurement, optimize.json, pareto.png and edit.json (resumable).")],
    config_file: Annotated[str | None, typer.Option("--config", help="TOML config file (see configs/).")] = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", help="Trials of the search (more continue a stopped or finished one).")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Ship this trial instead of the automatic choice.")] = None,
    target_refusal: Annotated[float | None, typer.Option("--target-refusal", help="Held-out harmful refusal the shipped edit must reach.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the search's sampler.")] = None,
) -> None:
    """Search an edit with less damage than the paper's (Pareto front of refusal vs KL), confirm it by generation."""
    from pathlib import Path

    from rich.table import Table

    from abliterate.config import load_config
    from abliterate.optimize import optimize

    overrides = _nested({"optimize.n_trials": n_trials, "optimize.trial": trial,
                         "optimize.target_refusal": target_refusal, "optimize.seed": seed})
    result = optimize(model, Path(out), load_config(config_file, overrides))
    table = Table(title=f"abliterate optimize: {model} ({result.n_trials} trials)")
    for header in ("trial", "harmful refusal", "harmless identical", "reply KL", "shipped"):
        table.add_column(header)
    for row in result.confirmation:
        name = f"{row['trial']}" + (" (paper)" if row["trial"] == result.paper_trial else "")
        table.add_row(name, f"{row['harmful_refusal']:.2f}", f"{row['identical_share']:.0%}", f"{row['reply_kl']:.5f}",
                      "yes" if row["trial"] == result.chosen_trial else "")
    console = _console()
    console.print(table)
    speed = f" ({result.trials_per_s:.1f} trials/s)" if result.trials_per_s else ""
    console.print(f"Search: {result.timings_s.get('search_s', 0.0):.1f} s{speed}")
    console.print(f"Edit: {result.edit_path} (write it with: abliterate apply MODEL --direction {result.edit_path} "
                  "--out DIR)", soft_wrap=True)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="Model to evaluate: a local checkpoint directory or a Hub id.")],
    base: Annotated[str | None, typer.Option("--base", help="Base model, evaluated side by side on the same prompts (adds KL).")] = None,
    harmful: Annotated[str | None, typer.Option("--harmful", help="Harmful evaluation prompts: a file, hf:owner/name or builtin:NAME.")] = None,
    harmless: Annotated[str | None, typer.Option("--harmless", help="Harmless evaluation prompts (over-refusal, KL).")] = None,
    n_eval: Annotated[int | None, typer.Option("--n-eval", help="Evaluation prompts per side.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Safety judge: auto, together, local:PATH or none.")] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Judge model on Together.")] = None,
    refusal_judge: Annotated[str | None, typer.Option("--refusal-judge", help="Refusal/compliance judge: together:MODEL or local:PATH.")] = None,
    measure_dir: Annotated[str | None, typer.Option("--measure", help="Folder `abliterate measure` wrote: its refusal.json and direction.json.")] = None,
    actadd: Annotated[bool | None, typer.Option("--actadd/--no-actadd", help="ActAdd completions on the base model (needs --measure).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Directory for eval.json, report.md and completions (default: eval-NAME).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest reply generated.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Prompts generated at once.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Generation engine: transformers or vllm.")] = None,
    refusal_set: Annotated[str | None, typer.Option("--refusal-set", help="Refusal substrings: paper or extended.")] = None,
    ce_text: Annotated[str | None, typer.Option("--ce-text", help="General text for CE loss: .txt, .jsonl or hf:owner/name.")] = None,
    ce_chat: Annotated[str | None, typer.Option("--ce-chat", help="Instruction/output pairs for reply-only CE loss.")] = None,
    config_file: Annotated[str | None, typer.Option("--config", help="TOML config file (see configs/).")] = None,
    trust_remote_code: TrustRemoteCode = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    token: Token = None,
) -> None:
    """Evaluate a model (and its base side by side): refusal, over-refusal, safety judge, CE loss and KL."""
    from pathlib import Path

    from rich.table import Table

    from abliterate.config import load_config
    from abliterate.evaluation import evaluate

    overrides = _nested({
        "prompts.harmful_eval": harmful, "prompts.harmless_eval": harmless, "prompts.n_eval": n_eval,
        "eval.judge": judge, "eval.judge_model": judge_model, "eval.max_new_tokens": max_new_tokens,
        "eval.batch_size": batch_size, "eval.backend": backend, "eval.refusal_set": refusal_set,
        "eval.ce_text": ce_text, "eval.ce_chat": ce_chat, "eval.refusal_judge": refusal_judge, "eval.actadd": actadd,
        **_model_flags(trust_remote_code, device_map, max_memory, offload_folder),
    })
    out_dir = Path(out) if out else Path(f"eval-{Path(model.rstrip('/')).name}")
    config = load_config(config_file, overrides)
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


def _nested(flat: dict[str, object]) -> dict[str, dict[str, object]]:
    """{"section.key": value} -> {section: {key: value}}, leaving out flags that were not given (None)."""
    nested: dict[str, dict[str, object]] = {}
    for dotted, value in flat.items():
        if value is not None:
            section, key = dotted.split(".")
            nested.setdefault(section, {})[key] = value
    return nested


def _print_run_summary(result, console) -> None:
    from rich.table import Table

    table = Table(title=f"abliterate run: {result.out_dir}")
    for column in ("", "base", "edited"):
        table.add_column(column)
    table.add_row("direction", "", f"layer {result.layer} of {result.n_layers}, position {result.position}")
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
def run(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    out: Annotated[str, typer.Option("--out", help="Output directory: the edited checkpoint plus abliterate/ provenance.")],
    config_file: Annotated[str | None, typer.Option("--config", help="TOML config file (see configs/).")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision of the model.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Dtype for measuring and evaluating.")] = None,
    chat_template: Annotated[str | None, typer.Option("--chat-template", help="Jinja chat template file.")] = None,
    harmful: Annotated[str | None, typer.Option("--harmful", help="Harmful prompts for fitting.")] = None,
    harmless: Annotated[str | None, typer.Option("--harmless", help="Harmless prompts for fitting.")] = None,
    harmful_eval: Annotated[str | None, typer.Option("--harmful-eval", help="Harmful prompts for evaluation.")] = None,
    harmless_eval: Annotated[str | None, typer.Option("--harmless-eval", help="Harmless prompts for evaluation.")] = None,
    n_train: Annotated[int | None, typer.Option("--n-train", help="Training prompts per side.")] = None,
    n_eval: Annotated[int | None, typer.Option("--n-eval", help="Evaluation prompts per side.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling prompts.")] = None,
    direction_file: Annotated[str | None, typer.Option("--direction-file", help="Reference direction to compare with.")] = None,
    use_reference: Annotated[bool | None, typer.Option("--use-reference", help="Use --direction-file instead of selecting.")] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="Longest reply in the evaluation.")] = None,
    judge: Annotated[str | None, typer.Option("--judge", help="Safety judge: auto, together, local:PATH or none.")] = None,
    refusal_judge: Annotated[str | None, typer.Option("--refusal-judge", help="Refusal/compliance judge: together:MODEL or local:PATH.")] = None,
    actadd: Annotated[bool | None, typer.Option("--actadd/--no-actadd", help="ActAdd completions in the evaluation.")] = None,
    skip_eval: Annotated[bool | None, typer.Option("--skip-eval", help="Skip the evaluation step.")] = None,
    push: Annotated[str | None, typer.Option("--push", help="Push the finished output to this Hub repo (owner/name).")] = None,
    optimize: Annotated[bool | None, typer.Option("--optimize", help="Ship an optimized edit (see abliterate optimize).")] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="With --optimize: ship this trial.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun every step; allow a non-empty --out.")] = False,
    trust_remote_code: TrustRemoteCode = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    offload_folder: OffloadFolder = None,
    token: Token = None,
) -> None:
    """The whole job: measure the refusal direction, remove it from the weights, evaluate, write the model card."""
    from pathlib import Path

    from abliterate.config import load_config
    from abliterate.pipeline import run as run_pipeline

    overrides = _nested({
        "model.revision": revision, "model.dtype": dtype, "model.chat_template": chat_template,
        "prompts.harmful_train": harmful, "prompts.harmless_train": harmless, "prompts.harmful_eval": harmful_eval,
        "prompts.harmless_eval": harmless_eval, "prompts.n_train": n_train, "prompts.n_eval": n_eval,
        "prompts.seed": seed, "measure.direction_file": direction_file, "measure.use_reference": use_reference,
        "apply.max_shard_size": max_shard_size, "eval.max_new_tokens": max_new_tokens, "eval.judge": judge,
        "eval.refusal_judge": refusal_judge, "eval.actadd": actadd, "run.skip_eval": skip_eval, "run.push": push,
        "run.optimize": optimize, "optimize.trial": trial,
        **_model_flags(trust_remote_code, device_map, max_memory, offload_folder),
    })
    config = load_config(config_file, overrides)
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
