"""The flags of the config settings: every setting a command reads has one, with the config's own help, and a flag
given reaches its setting while a flag not given leaves the config file's value alone."""

import dataclasses

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.cli_options import NO_FLAG
from abliterate.config import Config, load_config

runner = CliRunner()
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# The config sections each command reads (what its library function is handed the config for).
READS = {
    "measure": ("model", "prompts", "measure"),
    "optimize": ("model", "prompts", "measure", "eval", "optimize"),
    "eval": ("model", "prompts", "eval"),
    "run": SECTIONS,
    "apply": ("model", "apply"),
    "inspect": ("model",),
}


def _keys(*sections: str) -> set[str]:
    return {f"{section}.{f.name}" for section in sections for f in dataclasses.fields(getattr(Config(), section))}


# Settings of those sections that the command never reads, so a flag for them would do nothing.
NOT_READ = {
    # measure draws only the fit prompts; the evaluation prompts are not even loaded.
    "measure": {"prompts.harmful_eval", "prompts.harmless_eval", "prompts.n_eval"},
    # optimize confirms its edits with eval's batch size and refusal substrings, nothing else of [eval].
    "optimize": _keys("eval") - {"eval.batch_size", "eval.refusal_set"},
    # apply and inspect stream the checkpoint's files and never load the model: of [model] only the revision counts.
    "apply": _keys("model") - {"model.revision"},
    "inspect": _keys("model") - {"model.revision"},
}

# Flags that existed before the flags were generated, and the setting each one set: they keep their names.
KEPT = {
    "measure": "--harmful=prompts.harmful_train --harmless=prompts.harmless_train --seed=prompts.seed "
               "--batch-size=measure.batch_size --revision --dtype --chat-template --system-prompt --column "
               "--n-train --n-val --kl-max --max-layer-fraction --filter-prompts --score-all --direction-file "
               "--use-reference --trust-remote-code --device-map --max-memory --offload-folder",
    "optimize": "--seed=optimize.seed --n-trials --trial --target-refusal",
    "eval": "--harmful=prompts.harmful_eval --harmless=prompts.harmless_eval --batch-size=eval.batch_size --n-eval "
            "--judge --judge-model --max-new-tokens --backend --refusal-set --ce-text --ce-chat --refusal-judge "
            "--actadd --trust-remote-code --device-map --max-memory --offload-folder",
    "run": "--harmful=prompts.harmful_train --harmless=prompts.harmless_train --seed=prompts.seed "
           "--optimize=run.optimize --trial=optimize.trial --harmful-eval --harmless-eval --revision --dtype "
           "--chat-template --n-train --n-eval --direction-file --use-reference --max-shard-size --max-new-tokens "
           "--judge --refusal-judge --actadd --skip-eval --push --trust-remote-code --device-map --max-memory "
           "--offload-folder",
    "apply": "--revision --max-shard-size",
    "inspect": "--revision",
}


def _setting_flags(command: str) -> dict[str, object]:
    """The command's generated options by setting key ("prompts.n_val"), as click sees them."""
    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    return {param.name.replace("__", "."): param for param in params if "__" in (param.name or "")}


def _help(section: str, name: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(getattr(Config(), section)) if f.name == name)


def test_every_command_with_a_config_is_listed():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    with_config = {name for name, command in commands.items()
                   if any("--config" in param.opts for param in command.params)}
    assert with_config == set(READS)


def test_only_list_and_table_settings_have_no_flag():
    defaults = {f"{s}.{k}": v for s, values in dataclasses.asdict(Config()).items() for k, v in values.items()}
    assert NO_FLAG == {key for key, value in defaults.items() if isinstance(value, (list, dict))}


@pytest.mark.parametrize("command", sorted(READS))
def test_every_setting_the_command_reads_has_its_flag_with_the_config_help(command):
    flags = _setting_flags(command)
    assert set(flags) == _keys(*READS[command]) - NO_FLAG - NOT_READ.get(command, set())
    for key, param in flags.items():
        assert Text.from_markup(param.help).plain == _help(*key.split(".")), key  # what --help shows


@pytest.mark.parametrize("command", sorted(KEPT))
def test_the_flags_that_existed_keep_their_names_and_settings(command):
    flags = _setting_flags(command)
    for item in KEPT[command].split():
        flag, _, key = item.partition("=")
        owners = [k for k, param in flags.items() if flag in param.opts]
        if not key:  # a flag named after its setting: the one key of that name among the command's sections
            key = next(k for k in flags if k.endswith("." + flag[2:].replace("-", "_")))
        assert owners == [key], flag


class Reached(Exception):
    """Raised by the stand-in library functions with the config the command built."""

    def __init__(self, config: Config) -> None:
        super().__init__("reached")
        self.config = config


LIBRARY = {"measure": "abliterate.measure.measure", "optimize": "abliterate.optimize.optimize",
           "eval": "abliterate.evaluation.evaluate", "run": "abliterate.pipeline.run",
           "apply": "abliterate.apply.apply_direction", "inspect": "abliterate.apply.inspect_checkpoint"}
ARGS = {"measure": ["m", "--out", "o"], "optimize": ["m", "--out", "o"], "eval": ["m"], "run": ["m", "--out", "o"],
        "apply": ["m", "--direction", "d.json", "--out", "o"], "inspect": ["m"]}
# Valid values other than the default for the settings whose values are checked at load time.
OTHER = {"model.dtype": "float32", "model.max_memory": "cpu=1GiB", "apply.max_shard_size": "1GB",
         "eval.backend": "vllm", "eval.judge": "none", "eval.judge_format": "paper", "eval.refusal_set": "extended",
         "eval.refusal_judge": "local:judge", "model.device_map": "cuda:1"}


def _config_reached(monkeypatch, command: str, args: list[str]) -> Config:
    def stand_in(*positional, **keywords):
        raise Reached(next(a for a in [*positional, *keywords.values()] if isinstance(a, Config)))

    monkeypatch.setattr(LIBRARY[command], stand_in)
    result = runner.invoke(app, [command, *ARGS[command], *args])
    assert isinstance(result.exception, Reached), result.output
    return result.exception.config


def _other_value(key: str, default: object) -> object:
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1 if isinstance(default, int) else default / 2
    return OTHER.get(key, f"x-{key}")


@pytest.mark.parametrize("command", sorted(READS))
def test_every_flag_reaches_its_setting(monkeypatch, command):
    expected, args = Config(), []
    for key, param in _setting_flags(command).items():
        section, name = key.split(".")
        value = _other_value(key, getattr(getattr(expected, section), name))
        setattr(getattr(expected, section), name, value)
        if isinstance(value, bool):
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    assert _config_reached(monkeypatch, command, args) == expected


def test_a_flag_overrides_the_config_file_and_the_flags_not_given_leave_it_alone(monkeypatch, tmp_path):
    config_file = tmp_path / "mine.toml"
    config_file.write_text("[prompts]\nn_val = 16\nn_train = 7\n[measure]\nkl_max = 0.3\n[eval]\nbatch_size = 3\n")
    expected = load_config(config_file)
    expected.prompts.n_val = 8
    assert _config_reached(monkeypatch, "run", ["--config", str(config_file), "--n-val", "8"]) == expected
    assert _config_reached(monkeypatch, "run", ["--config", str(config_file)]) == load_config(config_file)


def test_a_name_two_sections_share_is_told_apart_by_the_later_section(monkeypatch):
    config = _config_reached(monkeypatch, "run", ["--batch-size", "5", "--eval-batch-size", "6", "--seed", "1",
                                                  "--optimize-seed", "2"])
    assert (config.measure.batch_size, config.eval.batch_size, config.prompts.seed, config.optimize.seed) == (5, 6, 1, 2)
    config = _config_reached(monkeypatch, "optimize", ["--seed", "3", "--prompts-seed", "4"])
    assert (config.optimize.seed, config.prompts.seed) == (3, 4)
