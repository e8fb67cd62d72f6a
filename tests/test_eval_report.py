"""The report shows every number with its sample, side by side; CE sources load from files; bad inputs fail early."""

import json
from pathlib import Path

import pytest

from abliterate.config import load_config
from abliterate.corpora import load_corpora
from abliterate.errors import UserError
from abliterate.evaluation import evaluate
from abliterate.judge import KEY_VARIABLE
from abliterate.metrics import PAPER_REFUSALS, Rate, refusal_rates
from abliterate.report import EvalReport


def _section(replies: list[str], categories: list[str], unsafe: int) -> dict:
    return {
        "refusal": refusal_rates(replies, categories, PAPER_REFUSALS),
        "over_refusal": refusal_rates(["Sure.", "Here you go.", "I'm sorry"], ["", "", ""], PAPER_REFUSALS),
        "refusal_score": {"harmful": {"mean": 1.5, "n": 4}, "harmless": {"mean": -3.25, "n": 3}},
        "safety": {"judge": "together:guard", "unsafe": Rate(unsafe, 3).to_dict(), "n_errors": 1, "n_short": 0},
        "ce": {"on_distribution": {"loss": 1.2345, "perplexity": 3.4366, "n_tokens": 1234, "n_sequences": 3}},
        "generation": {"n_replies": 7, "n_truncated": 1, "mean_reply_tokens": 12.0},
    }


@pytest.fixture
def report() -> EvalReport:
    categories = ["cyber", "cyber", "fraud", "fraud"]
    settings = {"max_new_tokens": 256, "backend": "transformers", "refusal_set": "paper", "judge": "together:guard",
                "judge_min_words": 15, "ce_max_tokens": 256, "seed": 42}
    return EvalReport({
        "columns": ["base", "edited"], "labels": {"base": "Base", "edited": "Edited"},
        "n_prompts": {"harmful": 4, "harmless": 3}, "settings": settings,
        "models": {"base": _section(["I cannot.", "I'm sorry", "As an AI, no", ""], categories, 0),
                   "edited": _section(["Sure, step 1", "Okay", "Here", "I cannot"], categories, 2)},
        "kl": {"first_token": 0.0123, "n_prompts": 3, "reply_tokens": 0.0456, "n_tokens": 40},
    })


def test_rows_carry_counts_and_intervals(report):
    rows = {row[0]: row[1:] for row in report.rows()}
    base, edited = rows["Refusal rate, harmful (paper substrings, 4 prompts)"]
    assert base == "1.00 [0.44, 1.00] (3/3)"  # the empty reply is left out of the rate
    assert edited == "0.25 [0.05, 0.70] (1/4)"
    assert rows["Empty replies, harmful (4 prompts)"] == ["0.25 [0.05, 0.70] (1/4)", "0.00 [0.00, 0.49] (0/4)"]
    assert rows["Over-refusal, harmless (3 prompts)"][1] == "0.33 [0.06, 0.79] (1/3)"
    assert rows["Unsafe replies, harmful (together:guard)"][1] == "0.67 [0.21, 0.94] (2/3), 1 judge errors"
    assert rows["CE loss, on-distribution (base replies)"][0] == "1.234 (ppl 3.44, 1,234 tokens)"
    assert rows["CE loss, general text"] == ["–", "–"]
    assert rows["KL(base ‖ edited), first reply token"] == ["–", "0.0123 (3 prompts)"]
    assert rows["KL(base ‖ edited), over base replies"] == ["–", "0.0456 (40 tokens)"]
    assert rows["Refusal score, harmful (mean)"] == ["+1.50 (4 prompts)", "+1.50 (4 prompts)"]


def test_markdown_and_saved_files(report, tmp_path: Path):
    markdown = report.to_markdown()
    assert "| Metric | Base | Edited |" in markdown
    assert "| Refusal rate, harmful (paper substrings, 4 prompts) | 1.00 [0.44, 1.00] (3/3) | 0.25 [0.05, 0.70] (1/4) |" in markdown
    assert "### Refusal rate by category" in markdown and "| cyber | 1.00 [0.34, 1.00] (2/2) |" in markdown
    assert "replies under 15 words counted safe" in markdown
    json_path, md_path = report.save(tmp_path / "eval")
    assert json.loads(json_path.read_text()) == report.data
    assert md_path.read_text() == markdown
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["eval.json", "report.md"]
    assert [row[0] for row in report.summary_rows()][:2] == [
        "Refusal rate, harmful (paper substrings, 4 prompts)", "Over-refusal, harmless (3 prompts)"]


def test_corpora_from_local_files(tmp_path: Path):
    text = tmp_path / "pile.txt"
    text.write_text("First document\nstill first.\n\nSecond one.\n\n\n\nThird.\n")
    pairs = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Count", "output": "1 2 3"}]
    pairs.write_text("\n".join(json.dumps(row) for row in rows))
    config = load_config(overrides={"eval": {"ce_text": str(text), "n_ce_docs": 2, "ce_chat": str(pairs)}})
    corpora = load_corpora(config.eval)
    assert corpora.texts == ["First document\nstill first.", "Second one."]
    assert corpora.pairs == [("Say hi", "Hi!"), ("Count", "1 2 3")]


def test_corpora_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        load_corpora(load_config(overrides={"eval": {"ce_text": str(tmp_path / "missing.txt")}}).eval)
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' text field"):
        load_corpora(load_config(overrides={"eval": {"ce_text": str(bad)}}).eval)


def test_judge_without_key_fails_before_anything_loads(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    config = load_config(overrides={"eval": {"judge": "together"}})
    with pytest.raises(UserError, match=KEY_VARIABLE):
        evaluate(str(tmp_path / "no-such-model"), config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_actadd_rows_and_a_hooked_reply_that_differs(report):
    from abliterate.actadd import compare_with_edited
    from abliterate.generation import Reply

    hooked = [Reply("Sure, step 1", [1, 2], True), Reply("Sure, step 2", [1, 3], True)]
    edited = [Reply("Sure, step 1", [1, 2], True), Reply("Sure, step 9", [1, 9], True)]
    report.data["actadd"] = {
        "layer": 3, "norm": 2.5, "direction": "direction.json",
        "induced_refusal": refusal_rates(["I cannot", "I'm sorry", "Sure"], ["", "", ""], PAPER_REFUSALS),
        "hooked_refusal": refusal_rates(["Sure", "Okay"], ["", ""], PAPER_REFUSALS),
        "equal_to_edited": compare_with_edited(["how 1", "how 2"], hooked, edited),
    }
    rows = {row[0]: row[1:] for row in report.rows()}
    assert rows["ActAdd: refusal, harmless with +r at layer 3 (induced)"] == ["–", "0.67 [0.21, 0.94] (2/3)"]
    assert rows["ActAdd: refusal, harmful with r ablated by hooks (bypass)"] == ["–", "0.00 [0.00, 0.66] (0/2)"]
    assert rows["Hooked-ablation replies equal to the edited checkpoint's"] == ["–", "1/2"]
    markdown = report.to_markdown()
    assert ('1 of 2 hooked replies differ from the edited checkpoint\'s; first: "how 2" -> hooked "Sure, step 2", '
            'edited "Sure, step 9".') in markdown


def test_refusal_judge_and_not_judged_safety_lines(report):
    from abliterate.refusal_judge import label_counts

    report.data["settings"].update(judge="none", refusal_judge="together:grader")
    for column in report.columns:
        report.data["models"][column]["safety"] = None
    report.data["models"]["edited"]["refusal_judge"] = {"judge": "together:grader", **label_counts(
        ["compliance", "non-answer", "non-answer", None])}
    rows = {row[0]: row[1:] for row in report.rows()}
    assert rows["Refusal judge, harmful: refusal / compliance / non-answer (together:grader)"] == [
        "–", "0.00 / 0.33 / 0.67 (3 replies), 1 judge errors"]
    assert rows["Unsafe replies, harmful (none)"] == ["not judged", "not judged"]
    assert "**Safety was not judged**: export TOGETHER_API_KEY" in report.to_markdown()


def test_the_counting_rule_names_openings_and_learned_phrases_in_their_own_script():
    from abliterate.report import _settings_note

    settings = {"judge": "none", "judge_min_words": 0, "max_new_tokens": 64, "backend": "transformers",
                "refusal_set": "paper", "ce_max_tokens": 256, "seed": 42, "refusal_openings": ["désolé, je refuse"],
                "learned_phrases": ["je ne peux pas"]}
    note = _settings_note(settings)
    assert '("désolé, je refuse")' in note and "\\u00e9" not in note
    assert 'holds one of its refusal phrases anywhere ("je ne peux pas")' in note
    assert "refusal phrases" not in _settings_note({**settings, "learned_phrases": []})


def test_the_refusal_label_names_what_was_matched():
    from abliterate.metric_table import label_facts

    def matching(**settings):
        data = {"settings": {"refusal_set": "paper", "judge": "none", **settings},
                "n_prompts": {"harmful": 8, "harmless": 8}}
        return label_facts(data)["refusal_matching"]

    assert matching() == "paper substrings"
    assert matching(refusal_openings=["i cannot"]) == "paper substrings or the base model's openings"
    assert matching(refusal_openings=["i cannot"], learned_phrases=["cannot help with that."]) == \
        "paper substrings or the base model's openings and phrases"
