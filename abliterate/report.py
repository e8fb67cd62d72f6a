"""The evaluation report: one JSON-able record, rendered as rows (for the CLI's rich table and the run summary) and as
a Markdown report that the model card embeds.

Every number carries its sample: a rate shows count/n and its 95% Wilson interval, a loss its token count, a KL its
prompt and token counts. With a base model the report has two columns, base and edited, computed on the same
prompts; without one it has a single column. `save` writes eval.json and report.md atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NONE = "–"


def format_rate(rate: dict[str, Any] | None) -> str:
    """'0.95 [0.89, 0.98] (95/100)', or '–' when there is nothing to count."""
    if not rate or rate.get("n", 0) == 0:
        return NONE if not rate else f"{NONE} (0 of {rate.get('n_prompts', 0)})"
    low, high = rate["ci95"]
    return f"{rate['rate']:.2f} [{low:.2f}, {high:.2f}] ({rate['count']}/{rate['n']})"


def format_mean(value: dict[str, Any] | None, unit: str = "prompts") -> str:
    if not value or value.get("mean") is None:
        return NONE
    return f"{value['mean']:+.2f} ({value['n']} {unit})"


def format_ce(value: dict[str, Any] | None) -> str:
    """'2.348 (ppl 10.46, 25,600 tokens)'."""
    if not value or value.get("loss") is None:
        return NONE
    return f"{value['loss']:.3f} (ppl {value['perplexity']:.2f}, {value['n_tokens']:,} tokens)"


def format_kl(value: float | None, n: int, unit: str) -> str:
    """KL in nats with four decimals (the paper's selection threshold is 0.1, typical edits are far below it)."""
    return NONE if value is None else f"{value:.4f} ({n} {unit})"


def _safety(section: dict[str, Any]) -> str:
    safety = section.get("safety")
    if not safety:
        return NONE
    text = format_rate(safety["unsafe"])
    return text + (f", {safety['n_errors']} judge errors" if safety["n_errors"] else "")


def _truncated(section: dict[str, Any]) -> str:
    generation = section["generation"]
    return f"{generation['n_truncated']}/{generation['n_replies']} (mean {generation['mean_reply_tokens']:.0f} tokens)"


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
        """[metric (with what it is counted on), value per column...] for every headline number."""
        n_harmful, n_harmless = self.data["n_prompts"]["harmful"], self.data["n_prompts"]["harmless"]
        phrases = self.data["settings"]["refusal_set"]
        metrics = [
            (f"Refusal rate, harmful ({phrases} substrings, {n_harmful} prompts)", lambda s: format_rate(s["refusal"])),
            (f"Over-refusal, harmless ({n_harmless} prompts)", lambda s: format_rate(s["over_refusal"])),
            (f"Unsafe replies, harmful ({self.data['settings']['judge']})", _safety),
            (f"Empty replies, harmful ({n_harmful} prompts)", lambda s: format_rate(s["refusal"]["empty"])),
            (f"Empty replies, harmless ({n_harmless} prompts)", lambda s: format_rate(s["over_refusal"]["empty"])),
            ("Refusal score, harmful (mean)", lambda s: format_mean(s["refusal_score"]["harmful"])),
            ("Refusal score, harmless (mean)", lambda s: format_mean(s["refusal_score"]["harmless"])),
            ("CE loss, general text", lambda s: format_ce(s["ce"].get("text"))),
            ("CE loss, chat replies (reply tokens)", lambda s: format_ce(s["ce"].get("chat"))),
            ("CE loss, on-distribution (base replies)", lambda s: format_ce(s["ce"].get("on_distribution"))),
            ("Replies cut at max_new_tokens", _truncated),
        ]
        rows = [[name] + [render(self._section(column)) for column in self.columns] for name, render in metrics]
        kl = self.data.get("kl")
        if kl:
            blank = [NONE] * (len(self.columns) - 1)
            rows.append(["KL(base ‖ edited), first reply token"] + blank + [format_kl(kl["first_token"], kl["n_prompts"], "prompts")])
            rows.append(["KL(base ‖ edited), over base replies"] + blank + [format_kl(kl["reply_tokens"], kl["n_tokens"], "tokens")])
        return rows

    def summary_rows(self) -> list[list[str]]:
        """(metric, base, edited) rows for the run summary: the headline metrics only."""
        keep = ("Refusal rate", "Over-refusal", "Unsafe", "CE loss, general", "KL(base ‖ edited), first")
        return [row for row in self.rows() if row[0].startswith(keep)]

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
        lines += ["", _settings_note(self.data["settings"])]
        return "\n".join(lines) + "\n"

    def save(self, out_dir: Path) -> tuple[Path, Path]:
        """Write eval.json and report.md into `out_dir`, each to a temporary file first."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = _write_atomic(out_dir / "eval.json", json.dumps(self.data, indent=2, ensure_ascii=False) + "\n")
        return json_path, _write_atomic(out_dir / "report.md", self.to_markdown())


def _table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"  # a bare | splits a row

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def _settings_note(settings: dict[str, Any]) -> str:
    judge = settings["judge"]
    if judge != "none" and settings["judge_min_words"] > 0:
        judge += f" (replies under {settings['judge_min_words']} words counted safe, as the paper)"
    return (
        f"Greedy decoding, up to {settings['max_new_tokens']} new tokens, stopping at EOS and the end-of-turn token "
        f"({settings['backend']}). A reply is a refusal when it contains any phrase of the `{settings['refusal_set']}` "
        f"set (case-insensitive); empty replies are counted apart and left out of the rates. Intervals are 95% "
        f"Wilson intervals. Safety judge: {judge}. CE loss is in nats per scored token (first "
        f"{settings['ce_max_tokens']} tokens of each general-text document; chat and on-distribution sets are "
        f"scored on reply tokens only). Prompt seed {settings['seed']}."
    )


def _write_atomic(path: Path, text: str) -> Path:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)
    return path
