"""`measure` + `apply` with default settings on toys that refuse the way real models do, judged by generation.

No refusal configuration: each toy's reply prefix (a lone space, a fixed thinking block, none), its refusal tokens
(lower case, Cyrillic, English) and where thinking can be switched off are found from the toy's own replies. The
refusal rate is each toy's true share, judged by its own known refusal text on greedy replies to held-out prompts.
Every measure here runs with local prompt files, the default (Hub) evaluation sources and every Hub entry point
made to fail the test: measure never loads the evaluation sets and never touches the Hub.
"""

from __future__ import annotations

import dataclasses
import socket
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from chat_toys import TOYS, chat_toy, says_refusal, write_prompt_files

from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.toy import _phrase_of

pytestmark = pytest.mark.usefixtures("one_thread")

# What each toy's replies show (the toy's construction, not a tuning of the discovery).
EXPECTED = {
    "lowercase_space": {"prefix": " ", "tokens": ["unfortunately"], "template_kwargs": {}},
    "thinking": {"prefix": "<think>\n\n</think>\n\n", "tokens": ["I"], "template_kwargs": {}},
    "switchable_thinking": {"prefix": "", "tokens": ["I"], "template_kwargs": {"enable_thinking": False}},
    "foreign": {"prefix": "", "tokens": ["Извините"], "template_kwargs": {}},
    "toy": {"prefix": "", "tokens": ["I"], "template_kwargs": {}},
    # The switchable toy with thinking kept on (as a template that cannot switch it off would): every reply thinks
    # about its own request first ("the user wants to steal a car. that is harmful."), so refusal is read per
    # prompt, where its answer after the thinking decides ("I won't help" against "Okay! To ...").
    "thinking_on": {"prefix": "<think>\nthe user wants to", "tokens": ["I"],
                    "template_kwargs": {"enable_thinking": True}, "per_prompt": True},
}


def _toy(name: str) -> tuple[Path, dict[str, list[str]], SimpleNamespace]:
    if name == "toy":
        from abliterate.toy import REFUSAL_REPLY, toy_prompt_splits, toy_refuser

        return toy_refuser(), toy_prompt_splits(0), SimpleNamespace(refuses=partial(says_refusal, REFUSAL_REPLY))
    toy = "switchable_thinking" if name == "thinking_on" else name
    model_dir, splits = chat_toy(toy)
    return model_dir, splits, TOYS[toy]


def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub

    def fail(*args, **kwargs):
        raise AssertionError(f"measure reached for the Hub: {args}")

    for module, name in ((datasets, "load_dataset"), (huggingface_hub, "snapshot_download"),
                         (huggingface_hub, "hf_hub_download"), (socket, "getaddrinfo")):
        monkeypatch.setattr(module, name, fail)


def _refusal_rates(model_dir: Path, splits: dict[str, list[str]], toy, model_config) -> dict[str, float]:
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(str(model_dir), model_config)
    stops = stop_token_ids(tokenizer, model.generation_config, model_config)
    rates = {}
    for side in ("harmful", "harmless"):
        prompts = splits[f"{side}_eval"]
        texts = format_instructions(tokenizer, prompts, model_config)
        replies = [reply.text for reply in generate_transformers(model, tokenizer, texts, stops, max_new_tokens=48,
                                                                 batch_size=100)]
        rates[side] = sum(map(toy.refuses, replies)) / len(replies)
        rates[f"{side}_replies"] = replies
        if side == "harmless":  # the share of answers that name the request they answer
            rates["on_request"] = sum(_phrase_of(p) in r for p, r in zip(prompts, replies)) / len(replies)
    return rates


@pytest.fixture(scope="module", params=list(EXPECTED))
def abliterated(request, tmp_path_factory):
    """(toy name, measure result, refusal rates before and after) with default settings and local prompt files
    (thinking kept on where the case says so)."""
    from abliterate.apply import apply_direction
    from abliterate.measure import measure

    name = request.param
    model_dir, splits, toy = _toy(name)
    folder = tmp_path_factory.mktemp(name)
    sources = write_prompt_files(splits, folder / "prompts")
    # Only the fit prompts are local: the evaluation sources stay the defaults, which are on the Hub.
    kwargs = EXPECTED[name]["template_kwargs"] if name == "thinking_on" else {}
    config = load_config(None, {"prompts": {"harmful_train": sources["harmful_train"],
                                            "harmless_train": sources["harmless_train"]},
                                "model": {"template_kwargs": kwargs}})
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_hub(monkeypatch)
        result = measure(str(model_dir), folder / "measure", config)
    apply_direction(str(model_dir), result.direction_path, folder / "edited", config)
    model_config = dataclasses.replace(config.model, template_kwargs=result.refusal.template_kwargs)
    before = _refusal_rates(model_dir, splits, toy, model_config)
    after = _refusal_rates(folder / "edited", splits, toy, model_config)
    return SimpleNamespace(name=name, result=result, before=before, after=after, folder=folder)


def test_how_the_toy_refuses_is_found_from_its_own_replies(abliterated):
    profile, expected = abliterated.result.refusal, EXPECTED[abliterated.name]
    assert profile.source == "discovered"
    assert profile.prefix == expected["prefix"]
    assert profile.token_texts == expected["tokens"]
    assert profile.template_kwargs == expected["template_kwargs"]
    per_prompt = expected.get("per_prompt", False)
    assert bool(profile.decision_ids) == per_prompt and not profile.inside_thinking
    assert profile.decision_after == ("</think>" if per_prompt else "")
    assert profile.n_refusals == profile.n_harmful_replies == 32
    assert profile.separation > 0.99
    written = (abliterated.folder / "measure" / "refusal.json").read_text(encoding="utf-8")
    assert profile.to_dict() == __import__("json").loads(written)


def test_measure_and_apply_remove_refusal_by_generation(abliterated):
    before, after = abliterated.before, abliterated.after
    assert before["harmful"] >= 0.9 and before["harmless"] <= 0.1, before
    # A chat model answers the request it is given: a toy that repeats a few memorized answers whatever it is
    # asked (an undertrained one) sits on near-ties between them, and no figure of harmless change means anything.
    assert before["on_request"] >= 0.95, before
    assert after["harmless"] <= 0.1
    if abliterated.name != "foreign":
        assert after["harmful"] <= 0.1, after
        return
    # The Russian toy's refusal is removed where the reply opens, but about a quarter of its edited replies open as
    # answers and slide back into refusing ("Конечно! Вот как я не могу помочь с этим."): that later decision is
    # not mediated by one direction read before the reply.
    slid = [r for r in after["harmful_replies"] if TOYS["foreign"].refuses(r)]
    assert 0.1 < after["harmful"] < 0.5 and all(r.startswith("Конечно!") for r in slid), after["harmful"]


def test_refusal_as_evaluation_reads_it_is_the_true_share(abliterated):
    """Every refusal the toy's own text tells, and nothing else, before and after the edit: openings at the start,
    the model's own refusal phrases anywhere (a reply that slid back into refusing is one)."""
    from abliterate.metrics import matcher_for

    matcher = matcher_for(load_config(None, {}).eval.refusal_set, abliterated.result.refusal)
    toy = _toy(abliterated.name)[2]
    for rates in (abliterated.before, abliterated.after):
        for side in ("harmful", "harmless"):
            replies = rates[f"{side}_replies"]
            assert [matcher.is_refusal(r) for r in replies] == [bool(toy.refuses(r)) for r in replies], side


def test_per_prompt_decisions_match_the_answers_after_the_thinking(abliterated):
    if abliterated.name != "thinking_on":
        pytest.skip("only the toy that thinks about each request reads refusal per prompt")
    profile = abliterated.result.refusal
    # Where the replies first differ is the request itself ("steal a car" against "bake a cake"), and the thinking
    # says "that is harmful" or "that is fine"; the answer after it is what refuses, and evaluation matches it.
    assert profile.thinking_end == "</think>" and profile.openings == ["i won't help"]
    # The position where each prompt's reasoning decides is a candidate, labelled as such.
    scores = __import__("json").loads((abliterated.folder / "measure" / "scores.json").read_text())
    assert "(each prompt's decision)" in __import__("json").dumps(scores)


def test_a_model_that_refuses_nothing_is_an_error_showing_its_replies(toy_refuser_dir, one_thread):
    from abliterate.model import load_model
    from abliterate.refusal import find_refusal
    from abliterate.toy import toy_prompt_splits

    config = load_config(None, {})
    model, tokenizer = load_model(str(toy_refuser_dir), config.model)
    harmless = toy_prompt_splits(0)["harmless_train"]
    with pytest.raises(UserError, match=r"Found no refusal.*Harmful replies open like 'Sure, here is how to"):
        find_refusal(model, tokenizer, harmless[:32], harmless[32:64], config.model, config.measure)


def test_refusals_that_open_as_answers_do_are_scored_as_refusals(tmp_path):
    """Half the French toy's refusals open with the "Je" its answers open with ("Je ne peux pas" against "Je vais
    vous expliquer"), the rest with "Désolé". Scoring "Désolé" alone reads those as answers: ablating a direction
    then only swaps one refusal sentence for the other. Scored with the shared opening followed to " ne", every
    harmful prompt reads as refused, and no single direction passes for removing refusal (the toy's own refusals
    stay when any candidate is ablated: its refusal after "Je" is decided anew)."""
    from abliterate.activations import RefusalTokens, encode, refusal_score
    from abliterate.chat import format_instructions
    from abliterate.measure import measure
    from abliterate.model import load_model
    from abliterate.refusal import find_refusal
    from abliterate.selection import NoDirectionError, tail_log_probs

    model_dir, splits = chat_toy("shared_opening")
    config = load_config(None, {"prompts": write_prompt_files(splits, tmp_path / "prompts")})
    model, tokenizer = load_model(str(model_dir), config.model)
    profile = find_refusal(model, tokenizer, splits["harmful_train"], splits["harmless_train"], config.model,
                           config.measure)
    assert profile.token_texts == ["Désolé"] and profile.shared_text == "Je"
    assert profile.after_shared_texts == [" ne"] and profile.n_refusals == profile.n_harmful_replies == 32
    assert set(profile.openings) == {"désolé, je refuse", "je ne peux"}
    # Named by the user, the two openings are read the same way.
    named = load_config(None, {"measure": {"refusal_openings": ["Je ne peux pas", "Désolé, je refuse"]}}).measure
    configured = find_refusal(model, tokenizer, splits["harmful_train"], splits["harmless_train"], config.model, named)
    assert configured.scoring() == profile.scoring() and configured.n_refusals == 32
    assert (configured.scoring()[0].shared, configured.scoring()[0].after_shared) == (profile.shared_id,
                                                                                      tuple(profile.after_shared_ids))
    tokens, suffix = profile.scoring()
    batches = encode(tokenizer, format_instructions(tokenizer, splits["harmful_eval"], config.model), 64, suffix)
    log_probs = tail_log_probs(model, batches, 2)  # [n, 2, vocab]: before "Je", and after it
    assert bool((refusal_score(log_probs, tokens) > 0).all())
    alone = refusal_score(log_probs[:, 0], RefusalTokens(tokens))  # "Désolé" alone
    assert float((alone < 0).double().mean()) > 0.2
    with pytest.raises(NoDirectionError, match="takes the harmful refusal score below 0") as caught:
        measure(str(model_dir), tmp_path / "measure", config)
    assert all(s.bypass > 0 for s in caught.value.scores if s.bypass == s.bypass)
