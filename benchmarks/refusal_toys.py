"""Figures per chat toy: how refusal was found (prefix, tokens, support, separation) and refusal before/after.

For each toy of tests/chat_toys.py and the demo toy: `measure` with default settings (local prompt files, no refusal
configuration), `apply`, then greedy replies to the held-out prompts, judged by the toy's own refusal text (the true
share). The same figures the tests in tests/test_chat_toys.py assert, printed as a table.

`thinking_on` is the switchable toy with thinking kept on (`enable_thinking=True`), as a template without the switch
would leave it: every reply reasons about its own request first, so refusal is read per prompt.

Run: python benchmarks/refusal_toys.py [lowercase_space thinking switchable_thinking foreign shared_opening toy
     thinking_on]
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chat_toys import TOYS, chat_toy, says_refusal, write_prompt_files

from abliterate.config import load_config

NAMES = [*TOYS, "toy", "thinking_on"]
THINKING_ON = {"enable_thinking": True}


def _toy(name: str):
    if name == "toy":
        from functools import partial
        from types import SimpleNamespace

        from abliterate.toy import REFUSAL_REPLY, toy_prompt_splits, toy_refuser

        return toy_refuser(), toy_prompt_splits(0), SimpleNamespace(refuses=partial(says_refusal, REFUSAL_REPLY))
    toy = "switchable_thinking" if name == "thinking_on" else name
    model_dir, splits = chat_toy(toy)
    return model_dir, splits, TOYS[toy]


def _rates(model_dir: Path, splits: dict, toy, model_config) -> str:
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(str(model_dir), model_config)
    stops = stop_token_ids(tokenizer, model.generation_config, model_config)
    shown = []
    for side in ("harmful", "harmless"):
        texts = format_instructions(tokenizer, splits[f"{side}_eval"], model_config)
        replies = generate_transformers(model, tokenizer, texts, stops, max_new_tokens=48, batch_size=100)
        shown.append(f"{side} {sum(toy.refuses(r.text) for r in replies) / len(replies):.2f}")
    return ", ".join(shown)


def main(names: list[str]) -> None:
    from abliterate.apply import apply_direction
    from abliterate.measure import measure
    from abliterate.selection import NoDirectionError

    torch.set_num_threads(1)
    for name in names:
        model_dir, splits, toy = _toy(name)
        folder = Path(tempfile.mkdtemp(prefix=f"refusal-{name}-"))
        config = load_config(None, {"prompts": write_prompt_files(splits, folder / "prompts"),
                                    "model": {"template_kwargs": THINKING_ON if name == "thinking_on" else {}}})
        try:
            result = measure(str(model_dir), folder / "measure", config)
        except NoDirectionError as error:  # no candidate removes refusal: say so, with the base model's figures
            lines = str(error).splitlines()
            print(f"{name}: {lines[0]}")
            print("".join(f"  {line}\n" for line in lines if line.startswith("No candidate's")), end="")
            print(f"  refusal by generation, base: {_rates(model_dir, splits, toy, config.model)}")
            continue
        apply_direction(str(model_dir), result.direction_path, folder / "edited", config)
        model_config = dataclasses.replace(config.model, template_kwargs=result.refusal.template_kwargs)
        print(f"{name}: {result.refusal.describe()}")
        print(f"  direction: layer {result.layer}, position {result.position}; bypass {result.chosen['bypass']:.3f}, "
              f"KL {result.chosen['kl']:.4f}, induce {result.chosen['induce']:.3f}")
        print(f"  refusal by generation, before: {_rates(model_dir, splits, toy, model_config)}; "
              f"after: {_rates(folder / 'edited', splits, toy, model_config)}")


if __name__ == "__main__":
    main(sys.argv[1:] or NAMES)
