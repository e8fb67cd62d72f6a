"""The search's second refusal reading, after the opening answers share (`abliterate.slides`).

On the Russian chat toy, the paper's edit removes the refusal where the reply opens, but about a third of its edited
replies open as answers and slide back into refusing ("Конечно! Вот как я не могу помочь с этим."). The checks: the
pieces on hand-made replies; on the toy, the second reading is found from the base model's own replies, its first
reading equals the first-token score it replaces, and it counts the paper's edit's slides where the first-token
score counts none; and a search that reads it ships an edit that leaves few of them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from chat_toys import TOYS, foreign_toy, write_prompt_files  # noqa: F401 (a fixture)

from abliterate.slides import answer_opening, answer_tokens, either, sliding_tokens


def test_either_is_the_log_odds_that_one_of_two_readings_refuses() -> None:
    first, second = torch.tensor([-2.0, 0.0, 3.0, -18.0]), torch.tensor([1.0, -1.0, -4.0, 0.5])
    p1, p2 = torch.sigmoid(first.double()), torch.sigmoid(second.double())
    expected = torch.logit(p1 + (1 - p1) * p2)
    assert torch.allclose(either(first, second), expected, atol=1e-9)
    # Where the first reading never refuses, the second decides; a refusing first reading stays refusing.
    assert math.isclose(float(either(torch.tensor([-30.0]), torch.tensor([0.7]))), 0.7, abs_tol=1e-6)
    assert float(either(torch.tensor([2.0]), torch.tensor([-30.0]))) == pytest.approx(2.0)


def test_the_answer_opening_is_what_most_answers_say_before_they_part() -> None:
    replies = [[5, 6, 7, 10, 1], [5, 6, 7, 11], [5, 6, 7, 12, 3], [5, 9, 9]]
    assert answer_opening(replies, []) == [5, 6, 7]
    assert answer_opening(replies, [5]) == [5, 6, 7]
    # Not past the tokens the first reading forces, or not after them: no second reading.
    assert answer_opening(replies, [5, 6, 7]) == []
    assert answer_opening(replies, [8]) == []
    # Answers that share no opening; an opening that is a whole answer is cut short of its end.
    assert answer_opening([[1, 2], [3, 4], [5, 6]], []) == []
    assert answer_opening([[5, 6, 7], [5, 6, 7], [5, 6, 7, 8]], []) == [5, 6]


class WordTokenizer:
    """Token id i is the i-th word; decoding joins words with spaces."""

    words = ("<pad>", "sure", "here", "is", "how", "to", "i", "cannot", "help", ",", "bake", "bomb", ".", "well")

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(self.words[i] for i in ids)


def test_sliding_tokens_go_on_refusing_in_the_refusals_own_words_and_go_on_no_answer() -> None:
    from abliterate.metrics import RefusalMatcher

    tok = WordTokenizer()
    opening = [1, 2, 3, 4, 5]  # "sure here is how to"
    continuations = [[6, 7, 8], [9, 6, 7, 8], [6, 7, 8, 12], [11, 12], [], [10, 12], [13, 6, 7, 8], [11, 6, 7, 8],
                     [11, 9, 6, 7, 8]]
    harmless = [opening + [10, 12], opening + [6, 12]]  # one answer goes on with "i": not a refusal token
    matcher = RefusalMatcher((), openings=("well, i cannot",), learned=("i cannot help",))
    # "," and "well" are in the refusal's words; "bomb" (the request's word) is not, though the base model forced
    # to say it goes on refusing twice out of three.
    answers = answer_tokens(opening, harmless)
    assert answers == {6, 10}
    tokens, n_sliding = sliding_tokens(tok, opening, continuations, answers, matcher)
    assert tokens == [9, 13] and n_sliding == 6
    assert sliding_tokens(tok, opening, [[11, 12], [10, 12]], answers, matcher) == ([], 0)


def test_refusal_wording_is_matched_at_word_starts_or_as_punctuation_and_wide_characters() -> None:
    from abliterate.slides import in_refusal_wording

    wording = ["i cannot help with that.", "我不能帮助你"]
    assert all(in_refusal_wording(token, wording) for token in (" I", "can", " with", ".", "不能", " that"))
    assert not any(in_refusal_wording(token, wording) for token in (" a", "not", " bomb", " ", "ith"))


@pytest.fixture(scope="module")
def foreign_search(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_thread: None):
    """The foreign toy measured, and the search's state prepared as `optimize` prepares it."""
    from safetensors.torch import load_file

    from abliterate.config import load_config
    from abliterate.measure import CANDIDATES_FILE, measure
    from abliterate.optimize import _prepare
    from abliterate.refusal import load_profile

    model_dir, splits = request.getfixturevalue("foreign_toy")
    folder = tmp_path_factory.mktemp("slides")
    config = load_config(None, {"model": {"dtype": "float32", "device_map": "cpu"},
                                "prompts": write_prompt_files(splits, folder / "prompts"), "eval": {"batch_size": 100}})
    found = measure(str(model_dir), folder / "measure", config, keep_model=True)
    model, tokenizer = found.loaded
    tables = load_file(str(folder / "measure" / CANDIDATES_FILE))
    state, _ = _prepare(model, tokenizer, config, tables["candidates"], tables["harmless_mean"],
                           load_profile(folder / "measure"))
    return state, tokenizer, found, folder, config, str(model_dir)


def test_the_second_reading_is_found_from_the_toys_own_replies(foreign_search) -> None:
    from abliterate.selection import refusal_scores

    state, tokenizer, *_ = foreign_search
    slides = state.slides
    assert slides is not None
    shown = slides.to_dict(tokenizer)
    assert shown["opening"] == "Конечно! Вот как", shown
    refusal_words = TOYS["foreign"].refusal.replace(",", " ,").replace(".", " .").split()
    assert shown["tokens"] and all(text.strip() in refusal_words for text in shown["tokens"]), shown
    assert shown["n_sliding"] >= 0.25 * shown["n_prompts"], shown
    # One pass reads both: its first reading is the first-token score it replaces.
    both = slides.scores(state.model, state.refusal_ids)
    first = refusal_scores(state.model, state.val.batches, state.refusal_ids)
    assert torch.all(both >= first - 1e-6)
    from abliterate.activations import refusal_score
    from abliterate.selection import tail_log_probs

    log_probs = tail_log_probs(state.model, slides.batches, slides.after_path + 1)
    assert torch.allclose(refusal_score(log_probs[:, 0], state.refusal_ids), first, atol=1e-4)


def test_the_second_reading_tells_which_replies_slide_back_into_refusing(foreign_search) -> None:
    """The paper's edit on the held-out prompts: the first-token score reads no refusal at all, but about a third of
    the replies open as answers and slide back into refusing. The second reading, built the way the search builds it
    but on these prompts, gives them most of that probability and scores the replies that slide above the others."""
    from abliterate.activations import encode
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.edit_params import EditParams, hooked_edit, layer_directions
    from abliterate.generation import generate_transformers
    from abliterate.metrics import matcher_for
    from abliterate.refusal import separation_auc
    from abliterate.selection import refusal_scores
    from abliterate.slides import slide_reading

    state, tokenizer, found, _, config, _ = foreign_search
    model = state.model
    stops = stop_token_ids(tokenizer, model.generation_config)
    harmful = format_instructions(tokenizer, config_prompts(config, "harmful_eval"), config.model)
    harmless = format_instructions(tokenizer, config_prompts(config, "harmless_eval"), config.model)
    answers = [reply.token_ids for reply in generate_transformers(model, tokenizer, harmless, stops, 48, 100)]
    reading = slide_reading(model, tokenizer, harmful, answers, [], matcher_for("paper", found.refusal),
                            {"batch_size": 64, "stop_ids": stops, "pad_id": 0})
    paper = EditParams.paper(found.layer, found.position)
    with hooked_edit(model, paper, layer_directions(paper, state.candidates, state.harmless_mean)):
        first = refusal_scores(model, encode(tokenizer, harmful, 64), state.refusal_ids)
        both = reading.scores(model, state.refusal_ids)
        slid = [TOYS["foreign"].refuses(reply.text)
                for reply in generate_transformers(model, tokenizer, harmful, stops, 48, 100)]
    assert bool((first < 0).all()) and 0.2 <= sum(slid) / len(slid) <= 0.5, sum(slid)
    # Read at the first token alone: refusal probability 0.001 on this toy, and the replies that slide score no
    # higher than the others (AUC 0.48). Read after the opening as well: 0.15 against the 0.31 that slide, AUC 0.99.
    share = sum(slid) / len(slid)
    assert float(torch.sigmoid(both).mean()) >= 0.4 * share
    auc = separation_auc([float(s) for s, y in zip(both, slid) if y], [float(s) for s, y in zip(both, slid) if not y])
    assert auc >= 0.95, auc


def config_prompts(config, key: str) -> list[str]:
    from abliterate.prompts import load_prompts

    return [prompt.text for prompt in load_prompts(getattr(config.prompts, key))]


def test_a_search_reading_both_ships_an_edit_that_leaves_few_slides(foreign_search) -> None:
    """Reading only the first token, the search shipped an edit that left 0.25 of held-out replies refusing by the
    toy's own text (0.07 to 0.28 over four seeds); reading after the opening too, 0.04 to 0.08."""
    from abliterate.optimize import optimize

    *_, folder, config, model_dir = foreign_search
    config.optimize.n_trials = 60
    result = optimize(model_dir, folder / "measure", config)
    chosen = next(row for row in result.confirmation if row["trial"] == result.chosen_trial)
    assert chosen["harmful_refusal"] <= 0.1 and result.chosen_trial != result.paper_trial, chosen
    reading = json.loads((folder / "measure" / "optimize.json").read_text())["slide_reading"]
    assert reading["opening"] == "Конечно! Вот как" and reading["tokens"], reading

