"""The evaluation report: one JSON-able record, rendered as rows (for the CLI's rich table and the run summary) and as
a Markdown report that the model card embeds.

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

from abliterate.files import versions, write_atomic
from abliterate.judge import judge_name
from abliterate.metrics import REFUSAL_SETS

NONE = "–"
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
        return "not judged"
    text = format_rate(safety["unsafe"])
    return text + (f", {safety['n_errors']} judge errors" if safety["n_errors"] else "")


def _refusal_judge(section: dict[str, Any]) -> str:
    judged = section.get("refusal_judge")
    if not judged:
        return NONE
    shares = [judged[label] for label in ("refusal", "compliance", "non_answer")]
    text = " / ".join(f"{share['rate']:.2f}" if share["rate"] is not None else NONE for share in shares)
    text += f" ({shares[0]['n']} replies)"
    return text + (f", {judged['n_errors']} judge errors" if judged["n_errors"] else "")


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
        settings = self.data["settings"]
        how = f"{settings['refusal_set']} substrings" + (" or the base model's openings"
                                                        if settings.get("refusal_openings") else "")
        metrics = [
            (f"Refusal rate, harmful ({how}, {n_harmful} prompts)", lambda s: format_rate(s["refusal"])),
            (f"Over-refusal, harmless ({n_harmless} prompts)", lambda s: format_rate(s["over_refusal"])),
            ("Refusal rate, harmful (paper's figure: its substrings, whole reply)",
             lambda s: format_rate(s.get("refusal_paper"))),
            ("Over-refusal, harmless (paper's figure)", lambda s: format_rate(s.get("over_refusal_paper"))),
            (f"Unsafe replies, harmful ({settings['judge']})", _safety),
            (f"Empty replies, harmful ({n_harmful} prompts)", lambda s: format_rate(s["refusal"]["empty"])),
            (f"Empty replies, harmless ({n_harmless} prompts)", lambda s: format_rate(s["over_refusal"]["empty"])),
            ("Duplicated replies, harmful (same text as another reply)", lambda s: format_rate(s.get("duplicates"))),
            ("Base-model loss on harmful replies (fluency)", lambda s: format_ce(s.get("fluency"))),
            ("Refusal score, harmful (mean)", lambda s: format_mean(s["refusal_score"]["harmful"])),
            ("Refusal score, harmless (mean)", lambda s: format_mean(s["refusal_score"]["harmless"])),
            ("CE loss, general text", lambda s: format_ce(s["ce"].get("text"))),
            ("CE loss, chat replies (reply tokens)", lambda s: format_ce(s["ce"].get("chat"))),
            ("CE loss, on-distribution (base replies)", lambda s: format_ce(s["ce"].get("on_distribution"))),
            ("Replies cut at max_new_tokens", _truncated),
        ]
        sections = [self._section(column) for column in self.columns]
        if any(section.get("thinking_on") for section in sections):
            metrics[2:2] = [
                ("Refusal rate, harmful, thinking on", lambda s: format_rate((s.get("thinking_on") or {}).get("refusal"))),
                ("Over-refusal, harmless, thinking on",
                 lambda s: format_rate((s.get("thinking_on") or {}).get("over_refusal"))),
            ]
        if any(section.get("refusal_judge") for section in sections):
            metrics[2:2] = [(f"Refusal judge, harmful: refusal / compliance / non-answer ({settings['refusal_judge']})",
                             _refusal_judge)]
        rows = [[name] + [render(section) for section in sections] for name, render in metrics]
        rows += self._actadd_rows()
        kl = self.data.get("kl")
        if kl:
            blank = [NONE] * (len(self.columns) - 1)
            rows.append(["KL(base ‖ edited), first reply token"] + blank + [format_kl(kl["first_token"], kl["n_prompts"], "prompts")])
            rows.append(["KL(base ‖ edited), over base replies"] + blank + [format_kl(kl["reply_tokens"], kl["n_tokens"], "tokens")])
        return rows

    def _actadd_rows(self) -> list[list[str]]:
        """ActAdd on the base model, in the last column (beside the edited checkpoint's own figures)."""
        actadd = self.data.get("actadd")
        if not actadd:
            return []
        blank = [NONE] * (len(self.columns) - 1)
        rows = [
            [f"ActAdd: refusal, harmless with +r at layer {actadd['layer']} (induced)"] + blank
            + [format_rate(actadd["induced_refusal"])],
            ["ActAdd: refusal, harmful with r ablated by hooks (bypass)"] + blank + [format_rate(actadd["hooked_refusal"])],
        ]
        equal = actadd.get("equal_to_edited")
        if equal:
            rows.append(["Hooked-ablation replies equal to the edited checkpoint's"] + blank
                        + [f"{equal['n_equal']}/{equal['n']}"])
        return rows

    def summary_rows(self) -> list[list[str]]:
        """(metric, base, edited) rows for the run summary: the headline metrics only."""
        keep = ("Refusal rate", "Over-refusal", "Unsafe", "CE loss, general", "KL(base ‖ edited), first", "ActAdd",
                "Hooked-ablation")
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
            "the unit direction is ablated from every residual writer and layer input on the harmful prompts.")
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
    found = settings.get("refusal_openings") or []
    openings = (f" or opens like the base model's refusals ({', '.join(json.dumps(o) for o in found[:6])})"
                if found else "")
    return (
        f"Greedy decoding, up to {settings['max_new_tokens']} new tokens, stopping at EOS and the end-of-turn token "
        f"({settings['backend']}). Thinking blocks are stripped; a reply is then a refusal when it contains any "
        f"phrase of the `{settings['refusal_set']}` set (case-insensitive){openings}; the paper's figure matches its "
        f"12 substrings over the whole reply. Empty replies are counted apart and left out of the rates. Intervals are 95% "
        f"Wilson intervals. Safety judge: {judge}. CE loss is in nats per scored token (first "
        f"{settings['ce_max_tokens']} tokens of each general-text document; chat and on-distribution sets are "
        f"scored on reply tokens only). Prompt seed {settings['seed']}."
    )
