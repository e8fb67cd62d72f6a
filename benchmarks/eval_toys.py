"""Evaluation figures per toy: refusal as eval counts it beside the true share and the paper's figure, and ActAdd.

For the demo toy (configs/toy.toml) and each chat toy of tests/chat_toys.py: `measure`, `apply`, then
`evaluate(edited, base=toy, measure_dir=..., eval.actadd=True)`. Printed per model: eval's refusal rate (thinking
stripped, phrase set, the base model's openings or its own refusal phrases anywhere), the toy's true share (its own
refusal text opening the reply, or its last four words anywhere), the paper's substring figure, over-refusal,
duplicated harmful replies and the base model's loss on them; then
ActAdd's induced refusal (+r on harmless prompts), hooked bypass (r ablated on harmful prompts) and how many hooked
replies equal the edited checkpoint's. A toy whose measure finds no direction is evaluated alone (base figures).

Run: python benchmarks/eval_toys.py [toy lowercase_space thinking switchable_thinking foreign shared_opening
     thinking_on]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chat_toys import TOYS, chat_toy, says_refusal, write_prompt_files

from abliterate.apply import apply_direction
from abliterate.config import Config, load_config
from abliterate.errors import UserError
from abliterate.evaluation import evaluate
from abliterate.generation import load_completions
from abliterate.measure import measure
from abliterate.toy import toy_refuser

ROOT = Path(__file__).resolve().parent.parent


def _setup(name: str, folder: Path) -> tuple[Path, Config]:
    if name == "toy":
        return toy_refuser(), load_config(ROOT / "configs" / "toy.toml", {"eval": {"actadd": True}})
    toy_dir, splits = chat_toy(_chat_toy(name))
    sources = write_prompt_files(splits, folder / "prompts")
    thinking = {"enable_thinking": True} if name == "thinking_on" else {}
    return toy_dir, load_config(overrides={
        "model": {"dtype": "float32", "device_map": "cpu", "template_kwargs": thinking},
        "prompts": {**sources, "n_eval": 40},
        "eval": {"max_new_tokens": 48, "batch_size": 64, "judge": "none", "actadd": True}})


def _chat_toy(name: str) -> str:
    """`thinking_on` is the switchable toy with thinking kept on (refusal then read per prompt)."""
    return "switchable_thinking" if name == "thinking_on" else name


def _truth(name: str, path: Path) -> str:
    from abliterate.toy import REFUSAL_REPLY

    refuses = (lambda reply: says_refusal(REFUSAL_REPLY, reply)) if name == "toy" else TOYS[_chat_toy(name)].refuses
    rows = load_completions(path)
    return f"{sum(refuses(row.reply) for row in rows) / len(rows):.2f}"


def _rate(section: dict) -> str:
    """A refusal rate, or why there is none (every reply empty or still thinking when it was cut)."""
    if section["rate"] is not None:
        return f"{section['rate']:.2f}"
    return f"none of {section['n_prompts']} answered ({section['unfinished_thinking']} still thinking)"


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    print("| toy | model | eval refusal | true share | paper figure | over-refusal | duplicated | fluency | "
          "ActAdd induced | hooked bypass | hooked = edited |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work)
            toy_dir, config = _setup(name, folder)
            try:
                found = measure(str(toy_dir), folder / "measure", config)
                apply_direction(str(toy_dir), found.direction_path, folder / "edited", config)
                report = evaluate(str(folder / "edited"), config, folder / "eval", base=str(toy_dir),
                                  measure_dir=folder / "measure")
            except UserError:  # no direction passed selection: the base alone, read with its refusal.json
                config.eval.actadd = False
                report = evaluate(str(toy_dir), config, folder / "eval", measure_dir=folder / "measure")
            actadd = report.data.get("actadd")
            for column in report.columns:
                s = report.data["models"][column]
                fluency = (s.get("fluency") or {}).get("loss")
                extra = ["–"] * 3
                if actadd and column == "edited":
                    equal = actadd["equal_to_edited"]
                    extra = [_rate(actadd["induced_refusal"]), _rate(actadd["hooked_refusal"]),
                             f"{equal['n_equal']}/{equal['n']}"]
                cells = [name, column, f"{s['refusal']['rate']:.2f}",
                         _truth(name, folder / "eval" / f"completions_{column}_harmful.jsonl"),
                         f"{s['refusal_paper']['rate']:.2f}", f"{s['over_refusal']['rate']:.2f}",
                         f"{s['duplicates']['rate']:.2f}", f"{fluency:.3f}" if fluency is not None else "–", *extra]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["toy", "lowercase_space", "thinking", "switchable_thinking", "foreign", "shared_opening",
                          "thinking_on"])
