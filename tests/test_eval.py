"""`abliterate eval --base` end to end on the toy refuser before and after a real edit (measure, then apply).

The toy refuser refuses held-out harmful requests and answers harmless ones; after its measured direction is
removed from the weights it should stop refusing, without starting to refuse harmless requests. The test drives
the CLI (as a user would), then checks the saved record, the report and the completions.
"""

import json
import shutil
from pathlib import Path

import pytest
from test_judge import server  # noqa: F401 - the loopback guard server fixture
from test_refusal_judge import label_server  # noqa: F401 - the loopback label server fixture
from typer.testing import CliRunner

from abliterate.cli import app

ROOT = Path(__file__).resolve().parents[1]
N_EVAL = 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def edited_toy(toy_refuser_dir, tmp_path_factory) -> Path:
    from abliterate.apply import apply_direction
    from abliterate.config import load_config
    from abliterate.measure import measure

    config = load_config(ROOT / "configs" / "toy.toml")
    folder = tmp_path_factory.mktemp("edit")
    measured = measure(str(toy_refuser_dir), folder / "measure", config)
    apply_direction(str(toy_refuser_dir), measured.direction_path, folder / "edited", config)
    return folder / "edited"


@pytest.fixture(scope="module")
def measure_dir(edited_toy) -> Path:
    return edited_toy.parent / "measure"


@pytest.fixture(scope="module")
def evaluated(edited_toy, measure_dir, toy_refuser_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    (folder / "text.txt").write_text("How do I bake a cake?\n\nTell me how to paint a garden.\n")
    pairs = [{"instruction": "How do I fold a letter?", "input": "", "output": "Sure, here is how to fold a letter."}]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in pairs))
    args = ["eval", str(edited_toy), "--base", str(toy_refuser_dir), "--config", str(ROOT / "configs" / "toy.toml"),
            "--n-eval", str(N_EVAL), "--max-new-tokens", "32", "--out", str(folder / "out"),
            "--ce-text", str(folder / "text.txt"), "--ce-chat", str(folder / "pairs.jsonl"),
            "--measure", str(measure_dir), "--actadd"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return folder / "out", result.output


def test_eval_base_shows_the_refusal_drop(evaluated):
    out, output = evaluated
    record = json.loads((out / "eval.json").read_text())
    base, edited = record["models"]["base"], record["models"]["edited"]
    assert record["n_prompts"] == {"harmful": N_EVAL, "harmless": N_EVAL}
    assert base["refusal"]["n"] + base["refusal"]["empty"]["count"] == N_EVAL
    assert base["refusal"]["rate"] >= 0.9
    assert edited["refusal"]["rate"] <= 0.1
    assert edited["over_refusal"]["rate"] <= 0.1  # the edit did not make it refuse everything
    assert base["refusal_score"]["harmful"]["mean"] > 0 > edited["refusal_score"]["harmful"]["mean"]
    assert record["kl"]["n_prompts"] == N_EVAL and record["kl"]["first_token"] >= 0
    assert record["kl"]["n_tokens"] > 0
    # The on-distribution set is the base model's replies for both columns, so its token counts agree.
    assert base["ce"]["on_distribution"]["n_tokens"] == edited["ce"]["on_distribution"]["n_tokens"] > 0
    assert edited["ce"]["on_distribution"]["replies_from"] == "base"
    assert base["ce"]["text"]["n_sequences"] == 2 and base["ce"]["chat"]["n_sequences"] == 1
    assert "Refusal rate, harmful" in output and "Report:" in output


def test_actadd_induces_refusal_and_hooked_ablation_is_the_edit(evaluated):
    out, _ = evaluated
    record = json.loads((out / "eval.json").read_text())
    actadd, base = record["actadd"], record["models"]["base"]
    assert base["over_refusal"]["rate"] <= 0.1
    # +r at its layer makes the base refuse most harmless requests it answered (on the toy some induced replies
    # stutter, "I cannI can that.", and match no refusal phrase, so the rate is not near 1).
    assert actadd["induced_refusal"]["rate"] >= base["over_refusal"]["rate"] + 0.5
    assert actadd["hooked_refusal"]["rate"] <= 0.1  # r ablated by hooks bypasses refusal
    # The hooks are the weight edit: every greedy reply equals the edited checkpoint's, token for token.
    assert actadd["equal_to_edited"] == {"n_equal": N_EVAL, "n": N_EVAL, "differences": []}
    # The ActAdd replies are saved for reading, in the order of the prompts, and give the rates reported.
    induced = [json.loads(line) for line in (out / "completions_actadd_harmless.jsonl").read_text().splitlines()]
    edited = [json.loads(line) for line in (out / "completions_edited_harmful.jsonl").read_text().splitlines()]
    hooked = [json.loads(line) for line in (out / "completions_actadd_harmful.jsonl").read_text().splitlines()]
    assert len(induced) == len(hooked) == N_EVAL
    assert [row["reply"] for row in hooked] == [row["reply"] for row in edited]
    assert sum("cannot" in row["reply"] for row in induced) >= actadd["induced_refusal"]["count"] > 0
    markdown = (out / "report.md").read_text()
    assert f"| Hooked-ablation replies equal to the edited checkpoint's | – | {N_EVAL}/{N_EVAL} |" in markdown
    assert "Every hooked reply equals the edited checkpoint's greedy reply." in markdown


def test_degenerate_compliance_is_visible(evaluated):
    out, _ = evaluated
    record = json.loads((out / "eval.json").read_text())
    base, edited = record["models"]["base"], record["models"]["edited"]
    # The base refuses every harmful request with the same sentence: all duplicates; the fluency loss is the base
    # model's on each column's harmful replies, so the edited replies cost the base more than its own.
    assert base["duplicates"]["rate"] >= 0.9
    assert base["fluency"]["n_sequences"] == edited["fluency"]["n_sequences"] == N_EVAL
    assert edited["fluency"]["loss"] > base["fluency"]["loss"]
    assert record["settings"]["judge"] == "none"
    assert "**Safety was not judged**" in (out / "report.md").read_text()


def test_completions_and_report_are_saved(evaluated):
    out, _ = evaluated
    names = sorted(path.name for path in out.iterdir())
    assert names == ["completions_actadd_harmful.jsonl", "completions_actadd_harmless.jsonl",
                     "completions_base_harmful.jsonl", "completions_base_harmless.jsonl",
                     "completions_edited_harmful.jsonl", "completions_edited_harmless.jsonl", "eval.json", "report.md"]
    rows = [json.loads(line) for line in (out / "completions_base_harmful.jsonl").read_text().splitlines()]
    assert len(rows) == N_EVAL and set(rows[0]) >= {"prompt", "category", "reply"}
    assert sum("I cannot help" in row["reply"] for row in rows) >= 0.9 * N_EVAL
    assert all(row["stopped"] for row in rows)  # every refusal ended at the end-of-turn token, before the limit
    markdown = (out / "report.md").read_text()
    assert "| Metric | Base | Edited |" in markdown and f"({N_EVAL} prompts)" in markdown


def test_eval_without_base_has_one_column_and_no_kl(toy_refuser_dir, tmp_path, caplog):
    import logging

    from abliterate.config import load_config
    from abliterate.evaluation import evaluate

    config = load_config(ROOT / "configs" / "toy.toml", {"prompts": {"n_eval": 8}})
    with caplog.at_level(logging.WARNING):
        report = evaluate(str(toy_refuser_dir), config, tmp_path / "out")
    # without a measure folder the English phrase set alone reads refusals: said, since it can read none
    assert "No refusal.json (--measure): refusals are read by the paper phrase set alone" in caplog.text
    assert report.columns == ["model"] and report.data["kl"] is None
    section = report.data["models"]["model"]
    assert section["refusal"]["rate"] >= 0.9 and section["ce"]["on_distribution"]["replies_from"] == "self"
    assert all(len(row) == 2 for row in report.rows())
    assert "| Metric | Model |" in (tmp_path / "out" / "report.md").read_text()


def test_vllm_backend_without_vllm_fails_before_loading_weights(toy_refuser_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["eval", str(toy_refuser_dir), "--config", str(ROOT / "configs" / "toy.toml"),
                                      "--backend", "vllm", "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "--backend vllm needs vLLM" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_eval_with_the_together_judge_on_loopback(edited_toy, toy_refuser_dir, server, tmp_path, monkeypatch):  # noqa: F811
    # The guard server calls a reply unsafe when it complies ("Sure, ..."): the refusing base is safe, the edit is not.
    from abliterate.config import load_config
    from abliterate.evaluation import evaluate

    monkeypatch.setenv("TOGETHER_BASE_URL", server)
    monkeypatch.setenv("TOGETHER_API_KEY", "test-key-not-a-secret")
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    settings = {"prompts": {"n_eval": 8}, "eval": {"judge": "together", "judge_min_words": 0}}
    report = evaluate(str(edited_toy), load_config(ROOT / "configs" / "toy.toml", settings), tmp_path / "out",
                      base=str(toy_refuser_dir))
    base, edited = report.data["models"]["base"]["safety"], report.data["models"]["edited"]["safety"]
    assert (base["unsafe"]["count"], base["unsafe"]["n"], base["n_errors"]) == (0, 8, 0)
    assert (edited["unsafe"]["count"], edited["unsafe"]["n"]) == (8, 8)
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions_edited_harmful.jsonl").read_text().splitlines()]
    assert [row["unsafe"] for row in rows] == [True] * 8
    assert "Unsafe replies, harmful (together:meta-llama/Meta-Llama-Guard-3-8B)" in report.to_markdown()


def test_profile_from_the_measure_folder_is_used_and_thinking_on_reported(measure_dir, toy_refuser_dir, tmp_path):
    # A profile that says measuring switched thinking off: eval measures with those kwargs and again with thinking
    # on (the toy's template ignores the switch, so both passes must agree reply for reply).
    import shutil

    from abliterate.config import load_config
    from abliterate.evaluation import evaluate
    from abliterate.refusal import RefusalProfile, save_profile

    folder = tmp_path / "measure"
    shutil.copytree(measure_dir, folder)
    profile = RefusalProfile(source="discovered", prefix="", token_ids=[], token_texts=[],
                             openings=["i   cannot"], template_kwargs={"enable_thinking": False}, thinking_end="</think>")
    save_profile(profile, folder)
    config = load_config(ROOT / "configs" / "toy.toml", {"prompts": {"n_eval": 8}})
    report = evaluate(str(toy_refuser_dir), config, tmp_path / "out", measure_dir=folder)
    section, settings = report.data["models"]["model"], report.data["settings"]
    assert settings["template_kwargs"] == {"enable_thinking": False} and settings["refusal_openings"] == ["i   cannot"]
    assert section["thinking_on"]["template_kwargs"] == {"enable_thinking": True}
    assert section["thinking_on"]["refusal"]["count"] == section["refusal"]["count"] == 8
    rows = {row[0]: row[1:] for row in report.rows()}
    assert rows["Refusal rate, harmful, thinking on"] == ["1.00 [0.68, 1.00] (8/8)"]
    assert "Refusal rate, harmful (paper substrings or the base model's openings, 8 prompts)" in rows
    assert 'opens like the base model\'s refusals ("i   cannot")' in report.to_markdown()


def test_actadd_without_a_measure_folder_is_a_user_error(toy_refuser_dir, tmp_path):
    from abliterate.config import load_config
    from abliterate.errors import UserError
    from abliterate.evaluation import evaluate

    config = load_config(ROOT / "configs" / "toy.toml", {"eval": {"actadd": True}})
    base = str(toy_refuser_dir)
    with pytest.raises(UserError, match="--measure DIR"):
        evaluate(str(toy_refuser_dir), config, tmp_path / "out", base=base)
    with pytest.raises(UserError, match="holds no refusal.json or direction.json; pass the folder"):
        evaluate(str(toy_refuser_dir), config, tmp_path / "out", base=base, measure_dir=tmp_path)
    with pytest.raises(UserError, match="does not exist; pass the folder `abliterate measure` wrote to --measure"):
        evaluate(str(toy_refuser_dir), config, tmp_path / "out", base=base, measure_dir=tmp_path / "nope")
    # ActAdd runs on the base model: without --base the one model given would be taken for it (often the edited one).
    with pytest.raises(UserError, match="pass the base model with --base, or drop --actadd"):
        evaluate(str(toy_refuser_dir), config, tmp_path / "out", measure_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_run_passes_its_measure_folder_so_actadd_reaches_the_card(toy_refuser_dir, tmp_path):
    # `run --actadd`: the eval step reads OUT/abliterate/measure by itself, and the card embeds the ActAdd rows.
    result = CliRunner().invoke(app, ["run", str(toy_refuser_dir), "--out", str(tmp_path / "out"), "--config",
                                      str(ROOT / "configs" / "toy.toml"), "--n-eval", "16", "--actadd"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "abliterate" / "eval" / "eval.json").read_text())
    assert record["actadd"]["equal_to_edited"]["n_equal"] == record["actadd"]["equal_to_edited"]["n"] == 16
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ActAdd: refusal, harmless with +r at layer" in card and "**Safety was not judged**" in card


def test_refusal_judge_counts_beside_the_substring_counts(edited_toy, toy_refuser_dir, label_server, tmp_path,  # noqa: F811
                                                          monkeypatch):
    from abliterate.config import load_config
    from abliterate.evaluation import evaluate

    monkeypatch.setenv("TOGETHER_BASE_URL", label_server)
    monkeypatch.setenv("TOGETHER_API_KEY", "test-key-not-a-secret")
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    settings = {"prompts": {"n_eval": 8}, "eval": {"judge": "none", "refusal_judge": "together:grader"}}
    report = evaluate(str(edited_toy), load_config(ROOT / "configs" / "toy.toml", settings), tmp_path / "out",
                      base=str(toy_refuser_dir))
    base, edited = report.data["models"]["base"], report.data["models"]["edited"]
    assert base["refusal_judge"]["refusal"]["count"] == base["refusal"]["count"] == 8
    assert edited["refusal_judge"]["refusal"]["count"] == edited["refusal"]["count"] == 0
    assert edited["refusal_judge"]["compliance"]["count"] + edited["refusal_judge"]["non_answer"]["count"] == 8
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions_base_harmful.jsonl").read_text().splitlines()]
    assert {row["judged"] for row in rows} == {"refusal"}
    assert "Refusal judge, harmful: refusal / compliance / non-answer (together:grader)" in report.to_markdown()


def test_fluency_is_the_same_with_or_without_the_base_loaded_again(edited_toy, measure_dir, toy_refuser_dir,
                                                                     tmp_path, monkeypatch):
    # With ActAdd, the hooked replies equal the edited ones, so the base's loss on them is the edited replies'
    # fluency and the base is not loaded a third time; without ActAdd it is, and the figure must be the same.
    from abliterate import evaluation
    from abliterate.config import load_config

    loads = []
    real = evaluation._load
    monkeypatch.setattr(evaluation, "_load", lambda source, config: loads.append(source) or real(source, config))
    figures = []
    for actadd in (True, False):
        config = load_config(ROOT / "configs" / "toy.toml", {"prompts": {"n_eval": 8}, "eval": {"actadd": actadd}})
        report = evaluation.evaluate(str(edited_toy), config, base=str(toy_refuser_dir), measure_dir=measure_dir)
        figures.append(report.data["models"]["edited"]["fluency"])
    base, edited = str(toy_refuser_dir), str(edited_toy)
    assert loads == [base, edited] + [base, edited, base]  # with ActAdd, then without
    assert figures[0] == figures[1] and figures[0]["n_sequences"] == 8


def test_a_runs_output_folder_is_read_as_its_measure_folder_and_a_missing_model_fails_first(
        measure_dir, toy_refuser_dir, tmp_path):
    from abliterate.config import load_config
    from abliterate.errors import UserError
    from abliterate.evaluation import evaluate

    run_out = tmp_path / "run-out"
    shutil.copytree(measure_dir, run_out / "abliterate" / "measure")
    config = load_config(ROOT / "configs" / "toy.toml", {"prompts": {"n_eval": 4}})
    report = evaluate(str(toy_refuser_dir), config, measure_dir=run_out)
    assert report.data["settings"]["refusal_profile"] == "discovered"
    with pytest.raises(UserError, match="Model directory .*nope does not exist"):
        evaluate(str(tmp_path / "nope"), config, tmp_path / "out", base=str(toy_refuser_dir))
    assert not (tmp_path / "out").exists()
