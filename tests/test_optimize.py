"""`optimize` on the toy refuser: the search, its confirmation, the shipped edit, resuming, and the CLI.

One short search is shared by the module. The checks: the paper's edit is a trial and is confirmed; the shipped
edit meets the refusal target held out; the checkpoint `apply` writes from edit.json gives, by generation, exactly
the refusal rate and identical-reply share the confirmation measured on the hooked model; a second call with more
trials continues the same study (earlier trials unchanged, measurement reused); `--trial N` ships trial N; and
`run --optimize` writes a card that says which edit shipped and resumes an interrupted search.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.config import Config

N_TRIALS = 8


def small_config(**optimize: object) -> Config:
    from abliterate.demo import demo_config

    config = demo_config()
    config.prompts.n_eval = 40
    config.optimize.n_trials = N_TRIALS
    config.optimize.n_startup_trials = 4
    config.optimize.n_confirm = 2
    for key, value in optimize.items():
        setattr(config.optimize, key, value)
    return config


@pytest.fixture(scope="module")
def searched(toy_refuser_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None):
    from abliterate.optimize import optimize

    out = tmp_path_factory.mktemp("optimize") / "out"
    return optimize(str(toy_refuser_dir), out, small_config()), out


def _replies(model_dir: Path, prompts: list[str], config: Config) -> list[list[int]]:
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(str(model_dir), config.model)
    texts = format_instructions(tokenizer, prompts, config.model)
    stop = stop_token_ids(tokenizer, model.generation_config)
    return generate_transformers(model, tokenizer, texts, stop, config.optimize.confirm_tokens, 100)


def test_the_papers_edit_is_a_confirmed_trial_and_the_shipped_edit_meets_the_target(searched) -> None:
    result, out = searched
    record = json.loads((out / "optimize.json").read_text())
    assert record["n_trials"] == N_TRIALS and len(record["trials"]) == N_TRIALS
    assert record["paper_trial"] == 0 and record["trials"][0]["params"]["direction_index"] == float(result.layer)
    assert set(record["pareto"]) <= {row["trial"] for row in record["trials"]}
    confirmed = {row["trial"]: row for row in record["confirmation"]}
    assert 0 in confirmed and result.chosen_trial in confirmed
    chosen = confirmed[result.chosen_trial]
    assert chosen["harmful_refusal"] <= 0.05
    paper = confirmed[0]
    assert chosen["reply_kl"] <= paper["reply_kl"] or paper["harmful_refusal"] > 0.05
    # Refusal is generated in order of reply KL until an edit meets the target: those left are the gentler-first
    # ones' followers, never an edit with less KL than the one shipped.
    for row in record["confirmation"]:
        assert row["harmful_refusal"] is not None or row["reply_kl"] >= chosen["reply_kl"]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "edit.json").is_file()
    modes = {(out / name).stat().st_mode & 0o777 for name in ("edit.json", "edit_directions.safetensors", "scores.json")}
    assert len(modes) == 1  # written like every other output (not private like a temporary file)


@torch.no_grad()
def test_the_written_checkpoint_replies_exactly_as_the_confirmed_hooked_model(searched, toy_refuser_dir: Path,
                                                                             tmp_path: Path) -> None:
    from abliterate.apply import apply_direction
    from abliterate.prompts import prompt_sets

    result, out = searched
    config = small_config()
    record = apply_direction(str(toy_refuser_dir), out / "edit.json", tmp_path / "edited", config)
    assert record["parameterized_edit"]["params"] == result.params
    sets = prompt_sets(config.prompts)
    harmful = [p.text for p in sets.harmful_eval]
    harmless = [p.text for p in sets.harmless_eval]
    from abliterate.metrics import matcher_for
    from abliterate.refusal import load_profile

    # read as the confirmation reads them: the phrase set, the base model's openings and its own refusal phrases
    matcher = matcher_for(config.eval.refusal_set, load_profile(out))
    edited = _replies(tmp_path / "edited", harmful, config)
    refusal = sum(matcher.is_refusal(reply.text) for reply in edited) / len(edited)
    same = [a.token_ids == b.token_ids for a, b in zip(_replies(tmp_path / "edited", harmless, config),
                                                        _replies(toy_refuser_dir, harmless, config))]
    chosen = next(row for row in result.confirmation if row["trial"] == result.chosen_trial)
    assert refusal == chosen["harmful_refusal"]
    assert sum(same) / len(same) == chosen["identical_share"]


def test_more_trials_continue_the_same_study_and_trial_n_ships_trial_n(searched, tmp_path: Path,
                                                                        toy_refuser_dir: Path) -> None:
    from abliterate.optimize import optimize

    _, out = searched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "optimize.json").read_text())["trials"]
    candidates_mtime = (copy / "candidates.safetensors").stat().st_mtime_ns
    result = optimize(str(toy_refuser_dir), copy, small_config(n_trials=N_TRIALS + 2, trial=3))
    after = json.loads((copy / "optimize.json").read_text())
    assert len(after["trials"]) == N_TRIALS + 2
    def values(rows: list[dict]) -> list[tuple]:  # the front may change with more trials; the trials do not
        return [(row["trial"], row["refusal"], row["kl"], row["params"]) for row in rows]

    assert values(after["trials"][:N_TRIALS]) == values(before)
    assert (copy / "candidates.safetensors").stat().st_mtime_ns == candidates_mtime  # the measurement was reused
    assert result.chosen_trial == 3
    edit = json.loads((copy / "edit.json").read_text())
    assert edit["trial"] == 3 and edit["params"] == result.params


def test_run_optimize_ships_the_optimized_edit_and_says_so_on_the_card(toy_refuser_dir: Path, tmp_path: Path,
                                                                       one_thread: None) -> None:
    config = tmp_path / "small.toml"
    root = Path(__file__).resolve().parents[1]
    config.write_text((root / "configs" / "toy.toml").read_text()
                      + f"\n[optimize]\nn_trials = {N_TRIALS}\nn_startup_trials = 4\nn_confirm = 1\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(toy_refuser_dir), "--out", str(out), "--config", str(config),
                                      "--optimize", "--skip-eval"])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "Shipped: an optimized edit" in card
    # The card gives the shipped parameters, as recorded in edit.json.
    params = json.loads((out / "abliterate" / "measure" / "edit.json").read_text())["params"]
    assert f"position {params['position']}" in card and f"embedding {params['embed_weight']:.3f}" in card
    assert f"MLP: weight {params['mlp']['peak_weight']:.3f} at layer {params['mlp']['peak_layer']:.2f}" in card
    assert re.search(r"harmful refusal \d\.\d\d, harmless replies identical to the base model's \d+%", card)
    record = json.loads((out / "abliteration.json").read_text())
    assert record["parameterized_edit"]["format"].startswith("abliterate-parameterized-edit")
    # The whole edit is where the record says (every layer's direction, not only one), and the summary names it.
    for saved in record["direction"]["saved_as"]:
        assert (out / saved).is_file(), saved
    assert "abliterate/edit_directions.safetensors" in record["direction"]["saved_as"]
    assert f"position {params['position']}" in result.output and "optimized edit (" in result.output


@pytest.mark.parametrize("change", [{"search_projected": False}, {"max_weight": 1.2}])
def test_a_search_made_with_other_settings_is_refused_not_resumed(searched, toy_refuser_dir: Path, tmp_path: Path,
                                                                   change: dict) -> None:
    from abliterate.errors import UserError
    from abliterate.optimize import optimize

    _, out = searched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()}
    with pytest.raises(UserError, match="holds a search made with another model or other settings"):
        optimize(str(toy_refuser_dir), copy, small_config(**change))
    with pytest.raises(UserError, match="holds a search made with another model or other settings"):
        optimize(str(toy_refuser_dir) + "/", copy, small_config())  # another model, as far as the folder can tell
    assert {path.name: path.read_bytes() for path in copy.iterdir() if path.is_file()} == before


def test_a_search_whose_objectives_were_read_another_way_is_refused_not_resumed(
        searched, toy_refuser_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials scored by an earlier version of the search (another reading of refusal) are not mixed with new ones."""
    import abliterate.optimize as module
    from abliterate.errors import UserError

    _, out = searched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    monkeypatch.setattr(module, "OBJECTIVES", "refusal at the first reply token; per-token reply KL")
    with pytest.raises(UserError, match="or by an earlier version of the search"):
        module.optimize(str(toy_refuser_dir), copy, small_config())


def test_bad_out_and_trial_fail_at_once_with_one_line(toy_refuser_dir: Path, tmp_path: Path) -> None:
    """A file as --out and a negative --trial are refused before the model loads: exit 2, one line, no traceback."""
    import subprocess
    import sys

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for args, message in ((["--out", str(afile)], "is a file"), (["--out", str(tmp_path / "o"), "--trial", "-5"],
                                                                  "is not a trial number")):
        done = subprocess.run([sys.executable, "-m", "abliterate.cli", "optimize", str(toy_refuser_dir), *args],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_optimize_help_names_its_options() -> None:
    result = CliRunner().invoke(app, ["optimize", "--help"])
    assert result.exit_code == 0
    assert "--n-trials" in result.output and "--trial" in result.output


def test_optimize_command_on_a_finished_search_reruns_nothing_and_prints_the_confirmation(
        searched, toy_refuser_dir: Path, tmp_path: Path) -> None:
    _, out = searched
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = tmp_path / "small.toml"
    root = Path(__file__).resolve().parents[1]
    config.write_text((root / "configs" / "toy.toml").read_text().replace("n_eval = 100", "n_eval = 40")
                      + "\n[optimize]\nn_startup_trials = 4\nn_confirm = 2\n")
    result = CliRunner().invoke(app, ["optimize", str(toy_refuser_dir), "--out", str(copy), "--config", str(config),
                                      "--n-trials", str(N_TRIALS)])
    assert result.exit_code == 0, result.output
    assert "(paper)" in result.output and "yes" in result.output
    assert len((copy / "trials.jsonl").read_text().splitlines()) == N_TRIALS  # nothing new was run
    assert json.loads((copy / "optimize.json").read_text())["trials_per_s"] is None
    inspected = CliRunner().invoke(app, ["inspect", str(toy_refuser_dir), "--direction", str(copy / "edit.json")])
    assert inspected.exit_code == 0, inspected.output


def test_an_interrupted_run_optimize_resumes_its_search(toy_refuser_dir: Path, tmp_path: Path, one_thread: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from abliterate import search

    config = tmp_path / "small.toml"
    root = Path(__file__).resolve().parents[1]
    config.write_text((root / "configs" / "toy.toml").read_text().replace("n_eval = 100", "n_eval = 40")
                      + f"\n[optimize]\nn_trials = {N_TRIALS}\nn_startup_trials = 4\nn_confirm = 1\n")
    out = tmp_path / "run"
    args = ["run", str(toy_refuser_dir), "--out", str(out), "--config", str(config), "--optimize", "--skip-eval"]
    real, calls = search.objectives, []

    def interrupted(*a: object, **k: object) -> tuple[float, float, float]:
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("the machine went away")
        return real(*a, **k)

    monkeypatch.setattr(search, "objectives", interrupted)
    assert CliRunner().invoke(app, args).exit_code != 0
    (scratch,) = (out / "abliterate").glob(".optimize-*")
    logged = (scratch / "trials.jsonl").read_text().splitlines()
    assert len(logged) == 5
    monkeypatch.setattr(search, "objectives", real)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    final = (out / "abliterate" / "measure" / "trials.jsonl").read_text().splitlines()
    assert len(final) == N_TRIALS and final[:5] == logged
    assert not list((out / "abliterate").glob(".optimize-*"))


def test_an_edit_that_still_refuses_with_thinking_on_is_not_shipped() -> None:
    """Measuring with thinking switched off, the confirmation also generates with it on (as users run the model):
    an edit that meets the target only with thinking off loses to one that meets it in both modes."""
    from abliterate.config import OptimizeConfig
    from abliterate.confirm import choose

    rows = [{"trial": 1, "harmful_refusal": 0.0, "harmful_refusal_thinking_on": 0.07, "reply_kl": 0.0004,
             "identical_share": 1.0, "n_harmless": 100},
            {"trial": 2, "harmful_refusal": None, "harmful_refusal_thinking_on": None, "reply_kl": 0.0004,
             "identical_share": 1.0, "n_harmless": 100},  # not generated
            {"trial": 3, "harmful_refusal": 0.01, "harmful_refusal_thinking_on": 0.0, "reply_kl": 0.0005,
             "identical_share": 1.0, "n_harmless": 100},
            {"trial": 4, "harmful_refusal": 0.0, "harmful_refusal_thinking_on": None, "reply_kl": 0.0009,
             "identical_share": 1.0, "n_harmless": 100}]
    assert choose(rows, OptimizeConfig())["trial"] == 3
    assert choose([rows[0], rows[1]], OptimizeConfig())["trial"] == 1  # none meets it: the least refusing


def test_when_no_edit_meets_the_target_the_warning_names_what_may_reach_it(caplog) -> None:
    import logging

    from abliterate.config import OptimizeConfig
    from abliterate.confirm import choose

    row = {"trial": 5, "harmful_refusal": 0.25, "harmful_refusal_thinking_on": None, "reply_kl": 0.0006,
           "identical_share": 1.0, "n_harmless": 100}
    with caplog.at_level(logging.WARNING):
        assert choose([row], OptimizeConfig(max_weight=1.5))["trial"] == 5
    assert "No confirmed edit reaches harmful refusal <= 0.05" in caplog.text
    assert "--n-trials" in caplog.text and "--max-weight, now 1.5, in a new --out" in caplog.text


def test_the_search_draws_positions_back_to_the_earliest_that_removed_refusal() -> None:
    from abliterate.search import searched_positions

    rows = [{"position": -5, "layer": 1, "bypass": 2.0}, {"position": -3, "layer": 2, "bypass": -0.5},
            {"position": -1, "layer": 2, "bypass": -3.0}, {"position": -4, "layer": 0, "bypass": None}]
    assert searched_positions(rows, paper_position=-2, n_positions=5) == 3
    assert searched_positions(rows, paper_position=-4, n_positions=5) == 4  # never after the paper's position
    assert searched_positions([{"position": -2, "bypass": 1.0}], paper_position=-1, n_positions=5) == 5  # none did


def test_infeasible_trials_are_ordered_by_how_far_they_are_from_shipping_and_left_off_the_front() -> None:
    import math
    from types import SimpleNamespace

    from abliterate.search import pareto_front, violation

    assert violation(0.03, 0.2, target=0.05) <= 0 < violation(0.10, 0.2, 0.05) < violation(0.10, 0.6, 0.05)
    trials = [SimpleNamespace(number=n, values=v) for n, v in enumerate(
        [[0.02, 0.004], [0.03, 0.0005], [0.9, math.inf], [0.6, 0.0001], [0.5, 0.01]])]
    assert pareto_front(trials) == [0, 1, 3]  # 2 has no KL (kept refusing), 4 is dominated by 3


def test_a_picked_trial_that_misses_the_target_ships_with_a_warning(caplog) -> None:
    import logging

    from abliterate.config import OptimizeConfig
    from abliterate.confirm import choose

    rows = [{"trial": 0, "harmful_refusal": 1.0, "harmful_refusal_thinking_on": None, "reply_kl": 0.0001,
             "identical_share": 1.0}]
    with caplog.at_level(logging.WARNING, logger="abliterate.confirm"):
        assert choose(rows, OptimizeConfig(trial=0))["trial"] == 0
    assert "Trial 0 (optimize.trial) refuses 1.00" in caplog.text
