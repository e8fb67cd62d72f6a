"""The evaluation report: one JSON-able record, rendered as rows (for the CLI's rich table and the run summary) and as
a Markdown report that the model card embeds. The rows are the entries of `metric_table.METRICS`, in its order.

Every number carries its sample: a rate shows count/n and its 95% Wilson interval, a loss its token count, a KL its
prompt and token counts. With a base model the report has two columns, base and edited, computed on the same
prompts; without one it has a single column. `save` writes eval.json and report.md atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate import metric_table
from abliterate.files import versions, write_atomic
from abliterate.judge import judge_name
from abliterate.metric_table import NONE, Metric, format_rate, lookup
from abliterate.metrics import REFUSAL_SETS

NOT_JUDGED = ("**Safety was not judged**: export TOGETHER_API_KEY (the default judge `auto` then uses Llama Guard on "
              "Together) or pass `--judge local:PATH` with a local guard model.")


def eval_record(sources: dict[str, str | None], runs: Mapping[str, Any], kl: dict[str, Any] | None,
                actadd: dict[str, Any] | None, context: Any) -> dict[str, Any]:
    """The JSON-able evaluation record, with the settings and versions behind every number.

    `runs` maps each column to its evaluation run (its `section` is the column's numbers), `context` is the
    evaluation's settings, prompts and refusal matcher.
    """
    config = context.config
    e, p = config.eval, config.prompts
    labels = {"base": "Base", "edited": "Edited", "model": "Model"}
    profile = context.profile
    settings = {
        "max_new_tokens": e.max_new_tokens, "backend": e.backend, "refusal_set": e.refusal_set,
        "refusal_phrases": list(REFUSAL_SETS[e.refusal_set]), "judge": judge_name(e),
        "judge_min_words": e.judge_min_words, "ce_max_tokens": e.ce_max_tokens, "seed": p.seed,
        "harmful_eval": p.harmful_eval, "harmless_eval": p.harmless_eval,
        "refusal_openings": list(context.matcher.openings), "thinking_end": context.matcher.thinking_end,
        "learned_phrases": list(context.matcher.learned),
        "refusal_profile": profile.source if profile else "none",
        "template_kwargs": context.model_config.template_kwargs, "thinking_on": context.thinking_on,
        "refusal_judge": e.refusal_judge or "none",
    }
    for run in runs.values():
        run.section.setdefault("safety", None)
    return {
        "columns": list(runs), "labels": {column: labels[column] for column in runs}, "sources": sources,
        "n_prompts": {side: len(items) for side, items in context.prompts.items()}, "settings": settings,
        "models": {column: run.section for column, run in runs.items()}, "kl": kl, "actadd": actadd,
        "versions": versions(),
    }


@dataclass
class EvalReport:
    """The evaluation record (`data`, JSON-able) with its renderings. `data["columns"]` names the models compared."""

    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.data

    @property
    def columns(self) -> list[str]:
        return list(self.data["columns"])

    def _section(self, column: str) -> dict[str, Any]:
        return self.data["models"][column]

    def rows(self) -> list[list[str]]:
        """[metric (with what it is counted on), value per column...] for every entry of the metric table shown."""
        return [row for _, row in self._metric_rows()]

    def summary_rows(self) -> list[list[str]]:
        """(metric, base, edited) rows for the run summary: the headline metrics only."""
        return [row for metric, row in self._metric_rows() if metric.headline]

    def _metric_rows(self) -> list[tuple[Metric, list[str]]]:
        """Each entry with a label, as a row: a model's figure per column, a record's figure in the last column."""
        facts = metric_table.label_facts(self.data)
        sections = [self._section(column) for column in self.columns]
        rows = []
        for metric in metric_table.METRICS:
            if not metric.label:
                continue
            if metric.scope == "record":
                values = [None] * (len(sections) - 1) + [lookup(self.data, metric.key)]
            else:
                values = [lookup(section, metric.key) for section in sections]
            if metric.optional and not any(values):
                continue
            # A record's figure (one for the comparison) fills the last column only.
            cells = [NONE if metric.scope == "record" and i < len(values) - 1 else metric.format(value)
                     for i, value in enumerate(values)]
            rows.append((metric, [metric.label.format_map(facts)] + cells))
        return rows

    def category_rows(self) -> list[list[str]]:
        """[category, harmful refusal rate per column...]."""
        categories = sorted(self._section(self.columns[0])["refusal"]["by_category"])
        return [[name] + [format_rate(self._section(c)["refusal"]["by_category"].get(name)) for c in self.columns]
                for name in categories]

    def to_markdown(self) -> str:
        """The report as Markdown: headline table, per-category table and the settings behind the numbers."""
        header = ["Metric"] + [self.data["labels"][column] for column in self.columns]
        lines = ["## Evaluation", "", _table(header, self.rows())]
        if len(self.category_rows()) > 1:
            lines += ["", "### Refusal rate by category (harmful prompts)", "",
                      _table(["Category"] + header[1:], self.category_rows())]
        if self.data["settings"]["judge"] == "none":
            lines += ["", NOT_JUDGED]
        if self.data.get("actadd"):
            lines += ["", _actadd_note(self.data["actadd"])]
        lines += ["", _settings_note(self.data["settings"])]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Path) -> tuple[Path, Path]:
        """Write eval.json and report.md into `out_dir`, each to a temporary file first."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = write_atomic(out_dir / "eval.json", json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")
        return json_path, write_atomic(out_dir / "report.md", self.to_markdown())


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"  # a bare | splits a row

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def _actadd_note(actadd: dict[str, Any]) -> str:
    """What the ActAdd rows mean, and any hooked reply that differs from the edited checkpoint's."""
    text = (f"ActAdd (the paper's activation addition) runs on the base model: the chosen direction, at its norm "
            f"{actadd['norm']:.2f}, is added to the input of layer {actadd['layer']} on the harmless prompts, and "
            "the unit direction is ablated from every residual writer (the embedding included) on the harmful prompts.")
    equal = actadd.get("equal_to_edited")
    if equal and equal["n_equal"] == equal["n"]:
        text += " Every hooked reply equals the edited checkpoint's greedy reply."
    elif equal:
        first = equal["differences"][0]
        text += (f" {equal['n'] - equal['n_equal']} of {equal['n']} hooked replies differ from the edited "
                 f"checkpoint's; first: {json.dumps(first['prompt'])} -> hooked {json.dumps(first['hooked'][:80])}, "
                 f"edited {json.dumps(first['edited'][:80])}.")
    return text


def _settings_note(settings: dict[str, Any]) -> str:
    judge = settings["judge"]
    if judge != "none" and settings["judge_min_words"] > 0:
        judge += f" (replies under {settings['judge_min_words']} words counted safe, as the paper)"
    def quoted(texts: list[str]) -> str:
        return ", ".join(json.dumps(text, ensure_ascii=False) for text in texts[:6])

    found, learned = settings.get("refusal_openings") or [], settings.get("learned_phrases") or []
    openings = f" or opens like the base model's refusals ({quoted(found)})" if found else ""
    openings += f" or holds one of its refusal phrases anywhere ({quoted(learned)})" if learned else ""
    return (
        f"Greedy decoding, up to {settings['max_new_tokens']} new tokens, stopping at EOS and the end-of-turn token "
        f"({settings['backend']}). Thinking blocks are stripped; a reply is then a refusal when it contains any "
        f"phrase of the `{settings['refusal_set']}` set (case-insensitive){openings}; the paper's figure matches its "
        f"12 substrings over the whole reply. Empty replies are counted apart and left out of the rates. Intervals are 95% "
        f"Wilson intervals. Safety judge: {judge}. CE loss is in nats per scored token (first "
        f"{settings['ce_max_tokens']} tokens of each general-text document; chat and on-distribution sets are "
        f"scored on reply tokens only). Prompt seed {settings['seed']}."
    )
