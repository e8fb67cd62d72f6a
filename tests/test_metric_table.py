"""A metric is one entry of `metric_table.METRICS`: an entry added there alone reaches eval.json, the report, the
printed table, the run summary (when it is a headline) and the model card with its model-index."""

import json
from pathlib import Path

import pytest
from huggingface_hub.repocard import metadata_load
from typer.testing import CliRunner

from abliterate import metric_table
from abliterate.card import CardFacts, eval_results, write_card
from abliterate.cli import app
from abliterate.metric_table import Metric, ModelIndex, ModelInputs
from abliterate.metrics import Rate
from abliterate.pipeline import summary_rows
from abliterate.report import EvalReport

ROOT = Path(__file__).resolve().parents[1]
N_EVAL = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _cannot_openings(inputs: ModelInputs) -> dict:
    harmful = inputs.replies["harmful"]
    return Rate(sum(reply.text.startswith("I cannot") for reply in harmful), len(harmful)).to_dict()


def _mean_words(inputs: ModelInputs) -> float:
    harmful = inputs.replies["harmful"]
    return sum(len(reply.text.split()) for reply in harmful) / len(harmful)


EXTRA = [
    Metric("cannot_openings", "Opens with I cannot ({n_harmful} prompts)", compute=_cannot_openings,
           format=lambda rate: f"{rate['count']} of {rate['n']} open so", headline=True,
           index=ModelIndex("cannot_rate", "Replies opening with I cannot, harmful prompts", "harmful")),
    Metric("lengths.harmful_words", "Mean words, harmful", compute=_mean_words,
           format=lambda words: f"{words:.1f} words"),
]


def test_one_entry_reaches_eval_json_report_summary_and_card(toy_refuser_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(metric_table, "METRICS", [*metric_table.METRICS, *EXTRA])
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(toy_refuser_dir), "--config", str(ROOT / "configs" / "toy.toml"),
                                      "--n-eval", str(N_EVAL), "--max-new-tokens", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    replies = [json.loads(line)["reply"] for line in (out / "completions_model_harmful.jsonl").read_text().splitlines()]
    n_cannot = sum(reply.startswith("I cannot") for reply in replies)
    words = sum(len(reply.split()) for reply in replies) / N_EVAL
    assert n_cannot == N_EVAL  # the toy refuses every harmful request, so the figure is not a vacuous zero

    data = json.loads((out / "eval.json").read_text())
    section = data["models"]["model"]
    assert section["cannot_openings"] == Rate(n_cannot, N_EVAL).to_dict()
    assert section["lengths"] == {"harmful_words": words}  # a dotted key nests
    assert section["refusal"]["count"] == N_EVAL  # the table's own entries are all still there

    cannot_row = f"| Opens with I cannot ({N_EVAL} prompts) | {n_cannot} of {N_EVAL} open so |"
    words_row = f"| Mean words, harmful | {words:.1f} words |"
    markdown = (out / "report.md").read_text()
    assert cannot_row in markdown and words_row in markdown
    assert markdown.index("| Replies cut at max_new_tokens |") < markdown.index(cannot_row)  # in table order
    assert f"Opens with I cannot ({N_EVAL} prompts)" in result.output  # the printed table

    summary = summary_rows(EvalReport(data))  # what `run` prints and records as its eval step's metrics
    assert [f"Opens with I cannot ({N_EVAL} prompts)", f"{n_cannot} of {N_EVAL} open so"] in summary
    assert "Mean words, harmful" not in [row[0] for row in summary]  # not a headline

    results = eval_results(data, "hf:org/harmful@abc:train#prompt", "builtin:toy_harmless_eval")
    facts = CardFacts(base_model="org/model", model_type="llama", n_layers=2, layer=1, position=-1,
                      edited_counts={"o_proj": 2}, command="abliterate run org/model --out m", version="0.1.0",
                      eval_markdown=markdown, eval_results=results)
    card = write_card(tmp_path, facts)
    assert cannot_row in card.read_text() and words_row in card.read_text()
    (entry,) = metadata_load(card)["model-index"]
    metrics = {m["type"]: (m["value"], m["name"], result["dataset"]["type"])
               for result in entry["results"] for m in result["metrics"]}
    assert metrics["cannot_rate"] == (1.0, "Replies opening with I cannot, harmful prompts", "org/harmful")
    assert set(metrics) == {"refusal_rate", "over_refusal_rate", "cannot_rate"}  # no judge: no unsafe rate


def test_an_entry_without_a_value_shows_a_dash_and_an_optional_one_no_row(monkeypatch):
    monkeypatch.setattr(metric_table, "METRICS", [
        Metric("refusal", "Refusal ({n_harmful} prompts)", headline=True),
        Metric("never_written", "Never written"),
        Metric("judge_only", "Judged", optional=True),
        Metric("kl", "KL first", format=lambda kl: f"{kl['first_token']:.2f}", scope="record", optional=True),
    ])
    rate = Rate(1, 2).to_dict()
    data = {"columns": ["base", "edited"], "n_prompts": {"harmful": 2, "harmless": 2},
            "settings": {"refusal_set": "paper", "judge": "none"},
            "models": {"base": {"refusal": rate}, "edited": {"refusal": rate}}, "kl": {"first_token": 0.25}}
    report = EvalReport(data)
    assert report.rows() == [["Refusal (2 prompts)", "0.50 [0.09, 0.91] (1/2)", "0.50 [0.09, 0.91] (1/2)"],
                             ["Never written", "–", "–"], ["KL first", "–", "0.25"]]
    assert report.summary_rows() == report.rows()[:1]
    data["kl"] = None
    assert [row[0] for row in report.rows()] == ["Refusal (2 prompts)", "Never written"]
