"""Command-line options shared by several commands, and the one way flags become config overrides.

The flags that override config settings are generated from the config dataclasses (abliterate.config), so they
cannot drift from it: a setting's flag is named after its key (`prompts.n_val` is `--n-val`), its help is the
setting's own `help` (the line configs/default.toml shows above it), and `--help` lists it under its [section].
`config_options` adds `--config` and the flags of the settings a command reads, loads the config and hands it to
the command: a flag not given is None, so it leaves the config file's value alone.

Kept apart from abliterate.cli so that the command modules can share them without importing each other.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import typer

from abliterate import config as config_module

# Settings with no flag: a list or a table would need a command-line syntax of its own; set them in --config.
NO_FLAG = frozenset({"model.template_kwargs", "measure.refusal_openings"})

ConfigFile = Annotated[str | None, typer.Option(
    "--config", help="TOML config file (see configs/); the flags of its settings override it.")]
Token = Annotated[str | None, typer.Option(
    "--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`); never written to a file.")]

_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """One setting's flag: `key` is "section.name", `flag` the option ("--n-val"), `kind` the value's type."""

    key: str
    flag: str
    help: str
    kind: type

    @property
    def param(self) -> str:
        """The command parameter that holds the flag's value (a name no hand-written option uses)."""
        return self.key.replace(".", "__")

    def option(self) -> Any:
        """The Annotated type Typer reads: the flag, or a --x/--no-x pair for a switch, under the [section] panel."""
        from rich.markup import escape  # help texts are rich markup: "hf:owner/name[/config]" is text, not a tag

        declaration = f"{self.flag}/--no-{self.flag[2:]}" if self.kind is bool else self.flag
        panel = escape(f"[{self.key.split('.')[0]}]") + " settings (override --config)"
        return Annotated[self.kind | None, typer.Option(declaration, help=escape(self.help), rich_help_panel=panel)]


def _settings(selection: Sequence[str]) -> list[tuple[str, dataclasses.Field]]:
    """(section, field) for each item of `selection`: "section" stands for every setting of it, in order."""
    sections = {f.name: f.default_factory for f in dataclasses.fields(config_module.Config)}
    chosen = []
    for item in selection:
        section, _, name = item.partition(".")
        fields = [f for f in dataclasses.fields(sections[section]()) if not name or f.name == name]  # type: ignore[misc]
        if not fields:
            raise ValueError(f"No config setting '{item}'.")
        chosen += [(section, f) for f in fields]
    return [(section, f) for section, f in chosen if f"{section}.{f.name}" not in NO_FLAG]


def config_flags(selection: Sequence[str], names: Mapping[str, str] | None = None) -> list[ConfigFlag]:
    """The flags of the settings in `selection`, in order.

    A flag is `--NAME` for the key `section.NAME`, except where `names` gives it another ({"prompts.harmful_eval":
    "--harmful"}) and where two selected sections share a name: the later section's is `--SECTION-NAME` (in `run`,
    measure.batch_size is `--batch-size` and eval.batch_size `--eval-batch-size`).
    """
    names = names or {}
    flags: list[ConfigFlag] = []
    seen: set[str] = set()
    for section, f in _settings(selection):
        key = f"{section}.{f.name}"
        flag = names.get(key) or "--" + (f"{section}-" if f.name in seen else "") + f.name.replace("_", "-")
        seen.add(f.name)
        flags.append(ConfigFlag(key, flag, f.metadata["help"], _TYPES[str(f.type)]))
    duplicated = {flag.flag for flag in flags if [other.flag for other in flags].count(flag.flag) > 1}
    if duplicated:
        raise ValueError(f"Two settings share the flag(s) {sorted(duplicated)}; give one another name.")
    return flags


def overrides(flags: Sequence[ConfigFlag], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of the flags that were given (`values` by parameter name; None: not given)."""
    nested: dict[str, dict[str, Any]] = {}
    for flag in flags:
        if values.get(flag.param) is not None:
            section, key = flag.key.split(".")
            nested.setdefault(section, {})[key] = values[flag.param]
    return nested


def config_options(*selection: str, names: Mapping[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Give a command `--config` and a flag for every setting in `selection`; it receives the loaded `config`.

    The command is declared with its own options and a last parameter `config`; Typer sees, in its place,
    `--config` and the generated flags (built as an `inspect.Signature`, which Typer reads like a written one).
    """
    flags = config_flags(selection, names)

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "config"]
        added = [inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=ConfigFile, default=None)]
        added += [inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, annotation=flag.option(), default=None)
                  for flag in flags]

        @functools.wraps(command)
        def with_config(**values: Any) -> Any:
            given = {flag.param: values.pop(flag.param) for flag in flags}
            config = config_module.load_config(values.pop("config_file"), overrides(flags, given))
            return command(**values, config=config)

        with_config.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        with_config.__annotations__ = {p.name: p.annotation for p in own + added}
        del with_config.__wrapped__  # type: ignore[attr-defined]  # the signature above is the command's, not this
        return with_config
    return decorate


def use_token(token: str | None) -> None:
    """Hand --token to huggingface_hub the way it reads one (HF_TOKEN), so it is never part of a config."""
    if token:
        os.environ["HF_TOKEN"] = token
