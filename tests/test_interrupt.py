"""Ctrl-C, for real: SIGINT sent to the `abliterate` command in a subprocess while it measures, applies or evaluates.

Each case checks the exit status (130, never 0: `abliterate run ... && upload` must stop), the one line that says
what was finished and how to go on, that nothing half-written is left where it would be taken for a result, and
that the same command then finishes the job.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from abliterate.direction import save_direction

ROOT = Path(__file__).resolve().parents[1]
TOY_CONFIG = ROOT / "configs" / "toy.toml"


class Command:
    """`python -m abliterate.cli ARGS` with its stderr read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "abliterate.cli", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.process.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout_s: float = 240.0) -> None:
        self.wait_until(lambda: any(text in line for line in self.lines), f"'{text}' printed", timeout_s)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float = 240.0) -> None:
        """Poll `ready` (every 5 ms: apply's staging folder lives well under a second) while the command runs."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"the command ended before {what}:\n{''.join(self.lines)}")
            assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
            time.sleep(0.005)

    def interrupt(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=120)
        self._reader.join(timeout=10)
        return code, "".join(self.lines)


def _run(toy: Path, out: Path) -> Command:
    return Command("run", str(toy), "--out", str(out), "--config", str(TOY_CONFIG))


def test_ctrl_c_while_measuring_exits_130_and_claims_no_finished_step(toy_refuser_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    command = _run(toy_refuser_dir, out)
    command.wait_for("Step measure: running")
    time.sleep(1.0)  # inside the measurement (loading the model or collecting activations)
    code, stderr = command.interrupt()
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == f"interrupted: no step had finished; run the same command to start again " \
                                      f"(into {out})"
    assert not (out / "config.json").exists() and not (out / "abliterate" / "measure").exists()
    assert "\r" not in stderr and "it/s" not in stderr  # a pipe gets no progress-bar noise


def test_ctrl_c_while_evaluating_names_the_finished_steps_and_the_rerun_resumes(toy_refuser_dir: Path,
                                                                                 tmp_path: Path):
    out = tmp_path / "out"
    command = _run(toy_refuser_dir, out)
    command.wait_for("Step eval: running")
    time.sleep(0.5)
    code, stderr = command.interrupt()
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == (f"interrupted: finished measure, apply (kept in {out}/abliterate); run the "
                                       "same command to resume")
    assert "Traceback" not in stderr and "\r" not in stderr
    assert not (out / "config.json").exists()  # nothing at the top looks like a finished model
    again = subprocess.run([sys.executable, "-m", "abliterate.cli", "-q", "run", str(toy_refuser_dir), "--out",
                            str(out), "--config", str(TOY_CONFIG)], capture_output=True, text=True, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stderr
    assert "Reused finished steps: measure, apply" in again.stdout and (out / "config.json").is_file()


def _big_checkpoint(path: Path, tokenizer_from: Path | None = None) -> Path:
    """A Llama large enough (about 270 MB) that writing its edit takes long enough to be interrupted.

    With `tokenizer_from` (the toy refuser) it gets that tokenizer and chat template and random weights, so that
    `run` can measure it; otherwise constant weights and empty tokenizer files, which only `apply` reads.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32768, hidden_size=1024, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if tokenizer_from is None:
                parameter.fill_(0.01)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(path)
    if tokenizer_from is None:
        (path / "tokenizer_config.json").write_text("{}")
        (path / "tokenizer.json").write_text("{}")
    else:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


def test_ctrl_c_while_run_applies_keeps_the_measurement_and_the_rerun_resumes(toy_refuser_dir: Path, tmp_path: Path):
    model = _big_checkpoint(tmp_path / "model", tokenizer_from=toy_refuser_dir)
    # Random weights refuse nothing: the refusal token is named and the paper's filters are off, so that measure
    # finishes quickly and the run reaches apply.
    config = tmp_path / "config.toml"
    config.write_text(TOY_CONFIG.read_text().replace("[measure]", "[measure]\nfilter_prompts = false\n"
                                                     "require_induce = false\nkl_max = 1e9\n"
                                                     "max_layer_fraction = 1.0\nrefusal_openings = [\"I\"]"))
    out = tmp_path / "out"
    args = ["run", str(model), "--out", str(out), "--config", str(config), "--n-train", "8", "--n-val", "4",
            "--n-discovery", "4", "--skip-eval"]
    command = Command(*args)
    command.wait_until(lambda: (out / "abliterate" / ".apply.partial").exists(), "run's apply step started")
    code, stderr = command.interrupt()
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == (f"interrupted: finished measure (kept in {out}/abliterate); run the same "
                                       "command to resume")
    assert "Traceback" not in stderr and not (out / "config.json").exists()
    again = subprocess.run([sys.executable, "-m", "abliterate.cli", "-q", *args], capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    assert "Reused finished steps: measure" in again.stdout and (out / "config.json").is_file()
    # What the interrupted step left is removed, and the rerun says so.
    assert "Step apply: removing what an interrupted run left" in " ".join(again.stderr.split())
    assert not (out / "abliterate" / ".apply.partial").exists()


def test_ctrl_c_while_applying_leaves_no_output_and_no_staging_folder(tmp_path: Path):
    model = _big_checkpoint(tmp_path / "model")
    direction = save_direction(tmp_path / "direction", torch.ones(1024), {"layer": 1, "position": -1})
    out = tmp_path / "edited"
    command = Command("apply", str(model), "--direction", str(direction), "--out", str(out))
    command.wait_until(lambda: bool(list(tmp_path.glob(".edited.abliterate-tmp-*"))), "apply staged its output")
    code, stderr = command.interrupt()
    assert code == 130, stderr
    assert stderr.splitlines()[-1] == (f"interrupted: nothing was written to {out} (outputs are moved into place "
                                       "only when complete); run the same command to start again")
    assert not out.exists() and not list(tmp_path.glob(".edited.*"))  # the staging folder was removed on the way out


def test_a_rerun_after_a_killed_apply_removes_its_staging_folder_and_says_so(tmp_path: Path):
    model = _big_checkpoint(tmp_path / "model")
    direction = save_direction(tmp_path / "direction", torch.ones(1024), {"layer": 1, "position": -1})
    out = tmp_path / "edited"
    args = ("apply", str(model), "--direction", str(direction), "--out", str(out))
    command = Command(*args)
    command.wait_until(lambda: bool(list(tmp_path.glob(".edited.abliterate-tmp-*"))), "apply staged its output")
    command.process.send_signal(signal.SIGKILL)  # no handler runs: the staging folder stays behind
    command.process.wait(timeout=60)
    left = list(tmp_path.glob(".edited.abliterate-tmp-*"))
    assert left and not out.exists()
    again = subprocess.run([sys.executable, "-m", "abliterate.cli", *args], capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stderr.split())  # the console wraps long log lines
    assert f"Removed {left[0].name}, left by an interrupted write to edited" in said
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".edited.abliterate-tmp-*"))
