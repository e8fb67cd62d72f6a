"""`abliterate run` end to end on the toy refuser: a checkpoint that loads and no longer refuses, its provenance,
resuming after an interruption, reusing finished steps, and config errors.

One full run is shared by the session (`toy_run`); the tests that interrupt or change settings work on their own
output folders so that the shared one stays as the first run left it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.hub import check_output_complete

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "configs" / "toy.toml"
REFUSAL = "I cannot"


def _demo_prompts() -> tuple[list[str], list[str]]:
    """The toy's held-out demo prompts: (harmful, harmless), never seen in training, fitting or evaluation."""
    from abliterate.toy import toy_prompt_splits

    splits = toy_prompt_splits()
    return splits["harmful_demo"], splits["harmless_demo"]


def _invoke_run(model: Path, out: Path, *flags: str):
    return CliRunner().invoke(app, ["run", str(model), "--out", str(out), "--config", str(TOY_CONFIG), *flags])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def toy_run(toy_refuser_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "toy-abliterated"
    result = _invoke_run(toy_refuser_dir, out)
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out, result.output


def _chat(folder: Path, prompts: list[str]) -> str:
    """Replies from examples/chat_with_output.py: the output loaded by plain transformers in a fresh process."""
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "chat_with_output.py"), str(folder), *prompts],
                          capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


def test_output_loads_in_plain_transformers_and_no_longer_refuses(toy_run):
    out, _ = toy_run
    harmful, harmless = _demo_prompts()
    # The base refuses these held-out prompts (test_demo shows it reply by reply); the published checkpoint
    # answers them, and still answers a harmless one.
    after = _chat(out, harmful + harmless[:1])
    assert after.count(REFUSAL) <= 1
    assert after.count("Sure") >= len(harmful)


def test_evaluation_measured_the_refusal_drop(toy_run):
    out, output = toy_run
    data = json.loads((out / "abliterate" / "eval" / "eval.json").read_text())
    base, edited = data["models"]["base"], data["models"]["edited"]
    assert base["refusal"]["rate"] >= 0.9 and edited["refusal"]["rate"] <= 0.1
    assert edited["over_refusal"]["rate"] <= 0.1
    assert "Refusal rate, harmful" in output and "Report:" in output


def test_output_is_a_complete_checkpoint_with_provenance(toy_run, toy_refuser_dir):
    out, _ = toy_run
    prov = out / "abliterate"
    check_output_complete(out)  # what `push` would accept
    run = json.loads((prov / "run.json").read_text())
    assert run["complete"] and run["seed"] == 42 and run["base_model"] == toy_refuser_dir.name  # as published
    assert {"torch", "transformers", "abliterate"} <= set(run["versions"])
    assert load_config(prov / "config.toml") == load_config(TOY_CONFIG)
    for artifact in ("measure/direction.json", "measure/direction.safetensors", "eval/report.md",
                     "eval/eval.json", "apply/step.json", "toy_refuser.json", "measure/refusal.json"):
        assert (prov / artifact).is_file(), artifact
    # The direction abliteration.json names is where it says, in the published folder.
    for saved in json.loads((out / "abliteration.json").read_text())["direction"]["saved_as"]:
        assert (out / saved).is_file(), saved
    card = (out / "README.md").read_text()
    assert "- abliterated" in card and "library_name: transformers" in card
    assert str(out) not in card and str(toy_refuser_dir) not in card and "/tmp/" not in card
    assert f"input of layer {run['summary']['layer']} of {run['summary']['n_layers']}" in card
    assert "](abliterate/measure/scores.png)" in card and (out / "abliterate/measure/scores.png").is_file()
    assert "model-index:" in card and "type: refusal_rate" in card and "pip install abliterate==" not in card
    # How refusal was found, in the card and in the run's own output.
    assert 'read the refusal scored at the first reply token on the tokens `["I"]`' in card
    assert 'Refusal: refusal scored at the first reply token on the tokens ["I"]' in toy_run[1]


def test_the_root_holds_only_what_runtimes_load_and_the_weights_once(toy_run):
    out, _ = toy_run
    # Every *.safetensors at the top is a weight shard (vLLM loads them all when there is no index) ...
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        ["README.md", "abliteration.json", "chat_template.jinja", "config.json", "generation_config.json",
         "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    # ... and the weights exist once: no second checkpoint (or hard link to one) under abliterate/.
    weights = (out / "model.safetensors").stat()
    assert weights.st_nlink == 1
    below = [p for p in (out / "abliterate").rglob("*") if p.is_file()]
    assert not any(p.name.startswith("model") and p.suffix == ".safetensors" for p in below)
    assert sum(p.stat().st_size for p in (out / "abliterate" / "apply").rglob("*") if p.is_file()) < 100_000


def test_rerun_with_the_same_settings_reuses_every_step(toy_run, toy_refuser_dir):
    out, _ = toy_run
    markers = {step: (out / "abliterate" / step / "step.json").stat().st_mtime_ns for step in ("measure", "apply", "eval")}
    result = _invoke_run(toy_refuser_dir, out)
    assert result.exit_code == 0, result.output
    assert "Reused finished steps: measure, apply, eval" in result.output
    assert markers == {step: (out / "abliterate" / step / "step.json").stat().st_mtime_ns for step in markers}


def test_interrupted_run_resumes_and_finishes_identically(toy_run, toy_refuser_dir, tmp_path, monkeypatch):
    import abliterate.evaluation
    from abliterate.pipeline import run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the evaluation, after measure and apply finished

    out, config = tmp_path / "toy-abliterated", load_config(TOY_CONFIG)  # the card names the folder: same name
    monkeypatch.setattr(abliterate.evaluation, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(str(toy_refuser_dir), out, config)
    assert not (out / "config.json").exists()  # nothing at the top looks like a finished model
    assert not json.loads((out / "abliterate" / "run.json").read_text())["complete"]
    monkeypatch.undo()
    result = run(str(toy_refuser_dir), out, config)
    assert result.reused == ["measure", "apply"]
    first, _ = toy_run
    # Everything written is byte-identical to the uninterrupted run into another folder: no timestamps, no
    # metadata in hash order, no path of the output or the model (both are named relative or by name).
    assert _all_bytes(out) == _all_bytes(first)
    check_output_complete(out)


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_changed_setting_reruns_only_what_depends_on_it(toy_run, toy_refuser_dir, tmp_path):
    first, _ = toy_run
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    result = _invoke_run(toy_refuser_dir, out, "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    assert "Reused finished steps: measure, apply" in result.output and "eval" not in result.output.split(
        "Reused finished steps:")[1].splitlines()[0]
    assert json.loads((out / "abliterate" / "run.json").read_text())["config"]["eval"]["max_new_tokens"] == 12


@pytest.mark.parametrize("flags, message", [
    (["--config", "missing.toml"], "Config file missing.toml does not exist"),
    (["--judge", "bogus"], "eval.judge must be auto, together, local:PATH or none"),
    (["--n-train", "0"], "prompts.n_train must be at least 1"),
])
def test_config_errors_are_refused_before_any_work(tmp_path, flags, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--out", str(out), *flags])
    assert isinstance(result.exception, UserError) and message in str(result.exception)
    assert not out.exists()


def test_a_foreign_non_empty_out_is_refused(toy_refuser_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = _invoke_run(toy_refuser_dir, out)
    assert isinstance(result.exception, UserError)
    assert "is not empty and holds no abliterate run" in str(result.exception)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_missing_judge_key_fails_before_measuring(toy_refuser_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    out = tmp_path / "out"
    result = _invoke_run(toy_refuser_dir, out, "--judge", "together")
    assert isinstance(result.exception, UserError) and "TOGETHER_API_KEY" in str(result.exception)
    assert not (out / "abliterate" / "measure").exists()


def test_vllm_backend_without_vllm_fails_before_measuring(toy_refuser_dir, tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    out = tmp_path / "out"
    result = _invoke_run(toy_refuser_dir, out, "--backend", "vllm")
    assert isinstance(result.exception, UserError) and "--backend vllm needs vLLM" in str(result.exception)
    assert not (out / "abliterate" / "measure").exists()


def test_user_error_is_one_line_from_the_real_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "abliterate.cli", "run", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("error: Model directory") and done.stderr.count("\n") == 1


@pytest.fixture
def loopback_hub(monkeypatch):
    from hub_server import FakeHub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the loopback Hub speaks plain LFS
    hub = FakeHub("hf_run_push_token_0123456789").start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    yield hub
    hub.stop()


def test_run_with_push_uploads_the_finished_output(toy_run, toy_refuser_dir, tmp_path, loopback_hub):
    first, _ = toy_run
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    result = _invoke_run(toy_refuser_dir, out, "--push", "me/toy-abliterated")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Reused finished steps: measure, apply, eval" in result.output and "Pushed:" in result.output
    files = loopback_hub.files("me/toy-abliterated")
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert "abliterate/eval/report.md" in files and "abliterate/config.toml" in files
    assert not any(name.startswith("abliterate/apply/") for name in files)  # the step's local state stays local


def test_run_push_of_a_sharded_model_sends_nothing_private(toy_run, toy_refuser_dir, tmp_path, loopback_hub):
    import os
    import tempfile

    first, _ = toy_run
    out = tmp_path / "sharded"
    shutil.copytree(first, out)
    result = _invoke_run(toy_refuser_dir, out, "--max-shard-size", "300KB", "--push", "me/toy-sharded")
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    files = loopback_hub.files("me/toy-sharded")
    shards = sorted(name for name in files if "/" not in name and name.endswith(".safetensors"))
    index = json.loads(files["model.safetensors.index.json"])
    assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))  # the top: weight shards only
    assert {name: files[name] for name in shards} == {name: (out / name).read_bytes() for name in shards}
    # Every byte that left the machine: no home, temp or working directory, no path of the output or the model.
    private = {os.path.expanduser("~"), tempfile.gettempdir() + "/", os.getcwd(), str(tmp_path), str(out),
               str(toy_refuser_dir)}
    leaks = {(name, path) for name, data in files.items() for path in private if path.encode() in data}
    assert not leaks


def test_skip_eval_claims_no_numbers(toy_run, toy_refuser_dir, tmp_path):
    first, _ = toy_run
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    result = _invoke_run(toy_refuser_dir, out, "--skip-eval")
    assert result.exit_code == 0, result.output
    assert "Reused finished steps: measure, apply" in result.output
    assert "evaluation skipped (--skip-eval)" in result.output
    card = (out / "README.md").read_text()
    assert "Evaluation was skipped" in card and "Refusal rate" not in card
    assert json.loads((out / "abliterate" / "run.json").read_text())["steps"]["eval"] == "skipped"
    assert not (out / "abliterate" / "eval").exists()  # no stale report from the earlier run left beside it


def test_an_empty_or_missing_evaluation_file_fails_before_measuring(toy_refuser_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for source, message in ((empty, "has no prompts"), (tmp_path / "missing.txt", "missing.txt")):
        out = tmp_path / f"out-{source.stem}"
        result = _invoke_run(toy_refuser_dir, out, "--harmful-eval", str(source))
        assert isinstance(result.exception, UserError) and message in str(result.exception)
        assert not out.exists()  # nothing measured, nothing written
