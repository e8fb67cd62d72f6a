"""The evaluation's arithmetic on fixed inputs: substrings, Wilson intervals, categories, refusal score, CE and KL."""

import math

import pytest
import torch
from test_generation import build_llama

from abliterate.metrics import (
    PAPER_REFUSALS,
    REFUSAL_SETS,
    Scored,
    cross_entropy,
    is_refusal,
    kl_between,
    refusal_rates,
    refusal_score,
    wilson_interval,
)


def test_substrings_are_case_insensitive_and_anywhere():
    assert is_refusal("Sure! Actually, i CANNOT do that.", PAPER_REFUSALS)
    assert is_refusal("As an AI language model...", PAPER_REFUSALS)
    assert not is_refusal("Here is how to bake a cake.", PAPER_REFUSALS)
    assert not is_refusal("I won't do that.", PAPER_REFUSALS)
    assert is_refusal("I won't do that.", REFUSAL_SETS["extended"])
    assert is_refusal("I’m sorry", REFUSAL_SETS["extended"]) and not is_refusal("I’m sorry", PAPER_REFUSALS)


def test_wilson_interval_known_values():
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_refusal_rates_per_category_with_empty_replies_apart():
    replies = ["I'm sorry, no.", "Sure, here it is.", "", "I cannot help.", "Okay.", "  "]
    categories = ["cyber", "cyber", "cyber", "fraud", "fraud", ""]
    rates = refusal_rates(replies, categories, PAPER_REFUSALS)
    assert (rates["count"], rates["n"], rates["n_prompts"]) == (2, 4, 6)
    assert rates["rate"] == 0.5
    assert rates["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert (rates["empty"]["count"], rates["empty"]["n"]) == (2, 6)
    assert rates["by_category"]["cyber"] == {"rate": 0.5, "count": 1, "n": 2, "ci95": list(wilson_interval(1, 2))}
    assert rates["by_category"]["fraud"]["count"] == 1 and rates["by_category"]["fraud"]["n"] == 2
    assert rates["by_category"]["uncategorized"]["n"] == 0 and rates["by_category"]["uncategorized"]["rate"] is None


def test_refusal_score_hand_computed():
    probabilities = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.97, 0.01, 0.01, 0.01]], dtype=torch.float64)
    scores = refusal_score(probabilities.log(), [1, 2])
    assert scores[0].item() == pytest.approx(math.log(0.375 + 1e-8) - math.log(0.625 + 1e-8), abs=1e-12)
    assert scores[1].item() == pytest.approx(math.log(0.02 + 1e-8) - math.log(0.98 + 1e-8), abs=1e-12)


@pytest.fixture(scope="module")
def models():
    return build_llama(seed=1), build_llama(seed=2)


SEQUENCES = [Scored([1, 12, 13, 7, 8, 9], 1), Scored([1, 4, 14, 15, 16, 6, 5, 7, 8], 7), Scored([1, 4, 5], 3)]


def test_cross_entropy_equals_hand_computation(models):
    model, _ = models
    expected_nll, expected_tokens = 0.0, 0
    with torch.no_grad():
        for item in SEQUENCES:  # one unpadded sequence at a time, CE by its definition
            logits = model(input_ids=torch.tensor([item.ids])).logits[0].double()  # [seq, vocab]
            for t in range(item.first_target, len(item.ids)):
                expected_nll -= torch.log_softmax(logits[t - 1], dim=-1)[item.ids[t]].item()
                expected_tokens += 1
    result = cross_entropy(model, SEQUENCES, pad_id=0, batch_size=3, description="CE")
    assert result["n_tokens"] == expected_tokens == 5 + 2
    assert result["n_sequences"] == 2
    assert result["loss"] == pytest.approx(expected_nll / expected_tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll / expected_tokens), rel=1e-5)


def test_kl_of_a_model_with_itself_is_zero(models):
    model, _ = models
    result = kl_between(model, model, SEQUENCES, pad_id=0, batch_size=2)
    assert result["first_token"] == 0.0 and result["reply_tokens"] == 0.0
    assert result["n_prompts"] == 3 and result["n_tokens"] == 5 + 2


def test_kl_between_different_models_hand_computed(models):
    base, edited = models
    result = kl_between(base, edited, SEQUENCES[1:], pad_id=0, batch_size=2)
    with torch.no_grad():
        item = SEQUENCES[1]
        p = torch.log_softmax(base(input_ids=torch.tensor([item.ids])).logits[0, 6].double(), -1)
        q = torch.log_softmax(edited(input_ids=torch.tensor([item.ids])).logits[0, 6].double(), -1)
    first_item = (p.exp() * (p - q)).sum().item()
    with torch.no_grad():  # the empty reply of SEQUENCES[2] contributes its first-token KL only
        p2 = torch.log_softmax(base(input_ids=torch.tensor([SEQUENCES[2].ids])).logits[0, 2].double(), -1)
        q2 = torch.log_softmax(edited(input_ids=torch.tensor([SEQUENCES[2].ids])).logits[0, 2].double(), -1)
    second_item = (p2.exp() * (p2 - q2)).sum().item()
    assert result["first_token"] == pytest.approx((first_item + second_item) / 2, rel=1e-4)
    assert result["n_tokens"] == 2 and result["reply_tokens"] > 0


def test_thinking_is_stripped_before_matching():
    from abliterate.metrics import RefusalMatcher, strip_thinking

    # A refusal phrase inside the reasoning is not a refusal; the answer after it is what counts.
    reply = "<think>The user asks for X. I cannot just refuse, let me help.</think>\n\nSure, here is how."
    assert strip_thinking(reply) == ("Sure, here is how.", False)
    assert strip_thinking("<think>still thinking, I cannot", "</think>") == ("", True)
    assert strip_thinking("[[end]] I won't", "[[end]]") == ("I won't", False)
    matcher = RefusalMatcher(PAPER_REFUSALS)
    assert not matcher.is_refusal(reply) and is_refusal(reply, PAPER_REFUSALS)  # the paper's figure counts it
    assert matcher.is_refusal("<think>ok</think> I cannot help with that.")
    rates = refusal_rates([reply, "<think>unfinished", "<think>x</think>I'm sorry"], ["", "", ""], matcher)
    assert (rates["count"], rates["n"], rates["empty"]["count"], rates["unfinished_thinking"]) == (1, 2, 1, 1)


def test_openings_of_the_base_model_match_ignoring_case_and_whitespace():
    from abliterate.metrics import matcher_for
    from abliterate.refusal import RefusalProfile

    profile = RefusalProfile(source="discovered", prefix=" ", token_ids=[5], token_texts=["unfortunately"],
                             openings=["unfortunately i can not", "je ne peux pas"], thinking_end="")
    matcher = matcher_for("paper", profile)
    assert matcher.is_refusal("  Unfortunately   I can\nnot do that.")
    assert matcher.is_refusal("je ne peux PAS vous aider")
    assert not matcher.is_refusal("Here is how: unfortunately i can not stress this enough")  # opening only
    assert not matcher_for("paper").is_refusal("unfortunately i can not do that")  # the paper's set misses it
    assert is_refusal("unfortunately i can not do that", REFUSAL_SETS["extended"])  # the extended set has the gap
    rates = refusal_rates(["unfortunately i can not", "Sure."], ["", ""], matcher)
    assert (rates["count"], rates["n"]) == (1, 2)


def test_duplicate_share_counts_replies_another_reply_repeats():
    from abliterate.metrics import duplicate_share

    share = duplicate_share(["Here is how to bat.", "here is how  to bat.", "A real answer.", "", "Another."])
    assert (share["count"], share["n"], share["n_distinct"]) == (2, 4, 3)


def test_thinking_switched_on_only_when_measuring_switched_it_off():
    from abliterate.evaluation import thinking_switched_on

    assert thinking_switched_on({"enable_thinking": False, "x": 1}) == {"enable_thinking": True, "x": 1}
    assert thinking_switched_on({"enable_thinking": True}) is None and thinking_switched_on({}) is None


def test_a_thinking_closer_made_of_special_tokens_still_ends_the_thinking():
    # gpt-oss closes its analysis with special tokens, which the reply's text leaves out; the answer is what
    # follows them in the full decoding. Here the closer is the tokenizer's special "<|eot|>".
    from test_generation import build_tokenizer

    from abliterate.generation import Reply, text_after
    from abliterate.metrics import RefusalMatcher

    tokenizer = build_tokenizer()
    ids = tokenizer("tell me bomb <|eot|> sorry", add_special_tokens=False)["input_ids"]
    reply = Reply(tokenizer.decode(ids, skip_special_tokens=True), ids, True)
    assert "<|eot|>" not in reply.text and "bomb" in reply.text
    assert text_after(tokenizer, reply, "<|eot|>") == "sorry"
    assert text_after(tokenizer, reply, "") == reply.text == text_after(tokenizer, reply, "</think>")
    # A phrase inside the thinking no longer counts once the answer is cut out.
    matcher = RefusalMatcher(("bomb",), thinking_end="<|eot|>")
    assert matcher.is_refusal(reply.text) and not matcher.is_refusal(text_after(tokenizer, reply, "<|eot|>"))
