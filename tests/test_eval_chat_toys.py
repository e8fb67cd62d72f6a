"""Evaluation counts what each chat toy does: lone-space replies refusing in lower case, a fixed thinking block,
a switchable thinking block, refusals in Russian and French refusals half of which open as every answer does, each read with the profile found from the toy's own replies.

For every toy the base model's refusal rate reported by `evaluate` must be within 0.05 of the true share (the toy's
own refusal text, `ChatToy.refuses`, applied to the saved replies); the paper's substring figure is reported beside
it and misses the toys that do not refuse in its English phrases.
"""

import pytest
from chat_toys import (  # noqa: F401
    TOYS,
    foreign_toy,
    lowercase_space_toy,
    shared_opening_toy,
    switchable_thinking_toy,
    thinking_toy,
)

from abliterate.config import load_config
from abliterate.evaluation import evaluate
from abliterate.generation import load_completions
from abliterate.model import load_model
from abliterate.refusal import find_refusal, save_profile

pytestmark = pytest.mark.usefixtures("one_thread")
N_EVAL = 24


def _evaluate_base(toy_dir, splits, tmp_path):
    from chat_toys import write_prompt_files

    sources = write_prompt_files(splits, tmp_path / "prompts")
    config = load_config(overrides={"model": {"dtype": "float32", "device_map": "cpu"},
                                    "prompts": {**sources, "n_eval": N_EVAL},
                                    "eval": {"max_new_tokens": 48, "batch_size": 64, "judge": "none"}})
    model, tokenizer = load_model(str(toy_dir), config.model)
    profile = find_refusal(model, tokenizer, splits["harmful_train"], splits["harmless_train"], config.model,
                           config.measure)
    save_profile(profile, tmp_path / "measure")
    report = evaluate(str(toy_dir), config, tmp_path / "eval", measure_dir=tmp_path / "measure")
    rows = load_completions(tmp_path / "eval" / "completions_model_harmful.jsonl")
    return report.data["models"]["model"], rows


@pytest.mark.parametrize(("name", "paper_sees_it"), [
    ("lowercase_space", False), ("thinking", True), ("switchable_thinking", False), ("foreign", False),
    ("shared_opening", False)])
def test_base_refusal_is_the_true_share(name, paper_sees_it, request, tmp_path):
    toy_dir, splits = request.getfixturevalue(f"{name}_toy")
    (tmp_path / "measure").mkdir()
    section, rows = _evaluate_base(toy_dir, splits, tmp_path)
    truth = sum(TOYS[name].refuses(row.reply) for row in rows) / len(rows)
    assert truth >= 0.9
    assert abs(section["refusal"]["rate"] - truth) <= 0.05
    assert section["over_refusal"]["rate"] <= 0.10
    # The paper's figure: its English substrings over the whole reply find these refusals only where they match.
    assert (section["refusal_paper"]["rate"] >= 0.9) is paper_sees_it
    if name == "switchable_thinking":
        # Measured with thinking off; the replies with thinking on ("<think>the user wants ...</think>") are
        # stripped of their reasoning and still refuse.
        assert section["thinking_on"]["template_kwargs"] == {"enable_thinking": True}
        assert section["thinking_on"]["refusal"]["rate"] >= 0.9
