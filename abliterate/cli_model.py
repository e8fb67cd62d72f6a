"""The commands that work on a checkpoint folder as it is: apply a direction, inspect a plan, push a folder.

abliterate.cli registers them; each only parses options and calls one library function.
"""

from __future__ import annotations

from typing import Annotated

import typer

from abliterate.cli_options import Token, config_options, use_token
from abliterate.config import Config
from abliterate.entry import console as _console
from abliterate.entry import nothing_written, on_interrupt


# apply and inspect stream the checkpoint's files and never load the model: of [model] they read only the revision.
@config_options("model.revision", "apply")
def apply(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    direction: Annotated[str, typer.Option("--direction", help="Direction file: .json, .safetensors, .pt/.pth or .npy.")],
    out: Annotated[str, typer.Option("--out", help="Directory to write the edited checkpoint to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    token: Token = None,
    *,
    config: Config,
) -> None:
    """Remove a direction from a checkpoint's weights, streaming shard by shard, and write a new checkpoint."""
    from pathlib import Path

    from abliterate.apply import apply_direction

    use_token(token)
    on_interrupt(nothing_written(out))
    record = apply_direction(model, Path(direction), Path(out), config, force=force)
    _console().print(f"Wrote {out}: {record['n_edited']} tensors edited ({record['architecture']}), "
                     f"{record['n_copied']} copied unchanged, {len(record['shards'])} shard(s); record in "
                     f"{out}/abliteration.json", soft_wrap=True)


@config_options("model.revision")
def inspect(
    model: Annotated[str, typer.Argument(help="Model: a local checkpoint directory or a Hub id (owner/name).")],
    direction: Annotated[str | None, typer.Option("--direction", help="Direction file to check against the model.")] = None,
    token: Token = None,
    *,
    config: Config,
) -> None:
    """Show which tensors `apply` would edit and how, without writing anything."""
    from collections import Counter
    from pathlib import Path

    from rich.table import Table

    from abliterate.apply import inspect_checkpoint

    use_token(token)
    plan = inspect_checkpoint(model, Path(direction) if direction else None, config)
    console = _console()
    for line in plan.describe():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    table = Table(title="Residual writers edited per layer")
    for column in ("layer", "edited", "by role"):
        table.add_column(column)
    for layer, names in sorted(plan.per_layer.items()):
        roles = Counter(plan.edits[name].role for name in names)
        table.add_row(str(layer), str(len(names)), ", ".join(f"{role} x{n}" for role, n in roles.items()))
    console.print(table)
    if direction:
        console.print(f"Direction {direction} fits: {plan.d_model} values.", markup=False, soft_wrap=True)


def push(
    folder: Annotated[str, typer.Argument(help="A finished output folder of `abliterate run` or `apply`.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub model repository, owner/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[str, typer.Option("--revision", help="Branch to push to (created if missing).")] = "",
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="Message of the Hub commit.")] = None,
    token: Token = None,
) -> None:
    """Upload a finished output folder to the Hugging Face Hub, after checking that it is complete."""
    from pathlib import Path

    from abliterate.hub import push as push_folder

    on_interrupt(lambda: "the Hub keeps what was uploaded so far; run the same command to send the rest")
    url = push_folder(Path(folder), repo, private=private, revision=revision, token=token,
                      commit_message=commit_message)
    _console().print(f"Pushed {folder} to {repo}: {url}")
