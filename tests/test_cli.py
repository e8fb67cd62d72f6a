"""The CLI surface: `--help` works for every command, and user errors are one line with a non-zero exit."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from abliterate.cli import app

runner = CliRunner()
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def test_top_level_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from abliterate.cli import app; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "abliterate.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("args, message", [
    ([], "Usage: abliterate"),
    (["run"], "Missing argument"),
    (["run", "m", "--out", "o", "--bogus"], "--bogus"),
    (["measure", "m", "--out", "o", "--kl-max", "many"], "Invalid value for '--kl-max'"),
])
def test_usage_errors_exit_2_with_a_usage_hint(args, message):
    done = _cli(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stdout + done.stderr
    assert "Try 'abliterate" in done.stderr or not args  # the usage hint (no arguments: the whole help)
    assert "Traceback" not in done.stderr


def test_version():
    from abliterate import __version__

    done = _cli("--version")
    assert done.returncode == 0 and done.stdout == f"abliterate {__version__}\n"


def test_quiet_and_verbose_are_accepted_after_the_subcommand(tmp_path):
    import logging

    from abliterate.entry import hoist_global_flags, run_app

    assert hoist_global_flags(app, ["run", "M", "--out", "o", "-q"]) == ["-q", "run", "M", "--out", "o"]
    # The value of an option stays the value, and nothing after `--` moves.
    assert hoist_global_flags(app, ["measure", "M", "--system-prompt", "-v", "--out", "o"]) == [
        "measure", "M", "--system-prompt", "-v", "--out", "o"]
    assert hoist_global_flags(app, ["-v", "push", "f", "--", "-q"]) == ["-v", "push", "f", "--", "-q"]
    with pytest.raises(SystemExit) as exited:
        run_app(app, ["push", str(tmp_path / "missing"), "--repo", "a/b", "-v"])
    assert exited.value.code == 2 and logging.getLogger().level == logging.DEBUG


def test_model_loading_and_hub_flags_reach_the_config_and_the_token_only_the_environment(tmp_path, monkeypatch):
    import abliterate.hub
    import abliterate.pipeline
    from abliterate.config import parse_max_memory

    seen: dict = {}
    monkeypatch.setattr(abliterate.pipeline, "run", lambda model, out, config, force: seen.setdefault("config", config))
    monkeypatch.setattr("abliterate.cli._print_run_summary", lambda result, console: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["run", "m", "--out", str(tmp_path / "o"), "--trust-remote-code", "--device-map",
                                 "cpu", "--max-memory", "0=20GiB,cpu=60GiB", "--offload-folder", "offload",
                                 "--token", "hf_secret_0123456789abcdef"])
    assert result.exit_code == 0, result.output
    model = seen["config"].model
    assert (model.trust_remote_code, model.device_map, model.offload_folder) == (True, "cpu", "offload")
    assert parse_max_memory(model.max_memory) == {0: "20GiB", "cpu": "60GiB"}
    assert "hf_secret" not in repr(seen["config"])  # never part of a config, so never in run.json
    import os

    assert os.environ.pop("HF_TOKEN") == "hf_secret_0123456789abcdef"

    pushed: dict = {}
    monkeypatch.setattr(abliterate.hub, "push", lambda folder, repo, **kwargs: pushed.update(kwargs) or "url")
    result = runner.invoke(app, ["push", str(tmp_path), "--repo", "a/b", "--commit-message", "first cut",
                                 "--token", "hf_other_0123456789abcdef"])
    assert result.exit_code == 0, result.output
    assert pushed["commit_message"] == "first cut" and pushed["token"] == "hf_other_0123456789abcdef"


def test_a_bad_max_memory_is_a_one_line_user_error():
    done = _cli("run", "m", "--out", "o", "--max-memory", "lots")
    assert done.returncode == 2 and done.stderr.startswith("error: Invalid --max-memory entry 'lots'")


@pytest.mark.parametrize("quiet, bars_expected", [(True, False), (False, True)])
def test_quiet_silences_the_progress_bars_of_transformers_and_huggingface_hub(quiet, bars_expected):
    import os
    import pty

    code = ("from abliterate.cli import _setup\n"
            f"_setup(verbose=False, quiet={quiet}, version=False)\n"
            "from huggingface_hub.utils import are_progress_bars_disabled\n"
            "from transformers.utils import logging\n"
            "print(logging.is_progress_bar_enabled(), not are_progress_bars_disabled())\n")
    leader, follower = pty.openpty()  # stderr is a terminal, as in an interactive shell
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_DISABLE_PROGRESS_BARS"}
    try:
        done = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.PIPE, text=True,
                              timeout=120, check=True, env=env)
    finally:
        os.close(leader)
        os.close(follower)
    assert done.stdout.split() == [str(bars_expected)] * 2


def test_verbose_logging_leaves_the_plotting_libraries_quiet():
    import logging

    from abliterate.cli import _setup

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        _setup(verbose=True, quiet=False)
        assert root.getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.WARNING
    finally:
        root.handlers[:], root.level = handlers, level
