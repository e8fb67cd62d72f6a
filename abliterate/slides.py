"""Refusals an answer slides back into: a second refusal reading for the search, after the opening answers share.

An edit that removes the refusal at the reply's first token can leave it to be decided again a few tokens later:
the edited reply opens as an answer ("Конечно! Вот как") and goes on refusing ("я не могу помочь с этим."). The
first-token score never sees that, so the search would take such an edit for a success that only generation shows
to fail. Where the base model's harmless replies share an opening, the harmful validation prompts are read a
second time with that opening teacher-forced. The score there is the probability mass on the tokens with which the
base model, forced to open as an answer, goes on refusing (its own greedy continuations, read by the refusal
matcher) and with which no harmless reply goes on. The search's refusal probability is then that the reply refuses
at its first token or, having opened as an answer, at the second reading (`either`). Still forward passes only.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.activations import (
    Batch,
    encode,
    forward_tail,
    in_text_order,
    refusal_score,
    score_positions,
)
from abliterate.generation import generate_ids
from abliterate.openings import is_wide
from abliterate.parting import shared_prefix
from abliterate.selection import tail_log_probs

log = logging.getLogger(__name__)

# The answer opening is the longest run of reply tokens at least this share of the harmless replies open with: what
# most answers say before they name the request, so an edited reply that opens as an answer most likely says it.
ANSWER_SHARE = 0.5
# How many of the base model's likeliest tokens after the opening are followed to see whether it goes on refusing:
# a slide through a less likely token weighs little in the score.
TRIED_TOKENS = 4
# How far each continuation is generated: a sliding token is a word of the refusal itself, so the refusal phrase
# that confirms it (six words at most, `abliterate.openings.MAX_PHRASE_WORDS`) follows within a few tokens.
CONTINUATION_TOKENS = 24


@dataclass
class SlideReading:
    """The answer opening teacher-forced after each harmful validation prompt, and the tokens that slide back into
    refusing there."""

    opening: list[int]  # reply tokens, from the first (any shared reply prefix included)
    token_ids: list[int]
    batches: list[Batch]  # the harmful validation prompts, each followed by `opening` (`Batch.rows`: text order)
    n_sliding: int  # harmful validation prompts whose greedy base continuation of the opening slides into refusing
    after_path: int  # opening tokens after those the first reading teacher-forces

    def scores(self, model: Any, first_ids: Sequence[int]) -> torch.Tensor:
        """The refusal score `[n]` at either reading, from one forward pass: the opening holds the tokens the first
        reading teacher-forces, so (the model being causal, and every row padded by the same amount as without the
        rest of the opening) its positions are read from the same pass as the second reading's."""
        first_positions = score_positions(first_ids)
        per_batch = []
        for batch in self.batches:  # scored batch by batch: a large vocabulary's logits are never all held at once
            logits = forward_tail(model, batch, self.after_path + first_positions)  # [batch, positions, vocab]
            per_batch.append(either(refusal_score(logits[:, :first_positions], first_ids),
                                    refusal_score(logits[:, -1], self.token_ids)).cpu())
        return in_text_order(self.batches, per_batch)

    def to_dict(self, tokenizer: Any) -> dict[str, Any]:
        return {"opening": tokenizer.decode(self.opening), "tokens": [tokenizer.decode([t]) for t in self.token_ids],
                "n_sliding": self.n_sliding, "n_prompts": sum(len(batch) for batch in self.batches)}


def either(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The refusal score (log-odds) that a reply refuses at either reading: 1 - P = (1 - P1)(1 - P2), where an edit
    that leaves the first reading refusing never reaches the second one, and one that opens as an answer does."""
    log_answers = torch.nn.functional.logsigmoid(-first.double()) + torch.nn.functional.logsigmoid(-second.double())
    return torch.log(-torch.expm1(log_answers)) - log_answers


def answer_opening(replies: list[list[int]], path: Sequence[int]) -> list[int]:
    """The run of reply tokens most harmless replies open with (`ANSWER_SHARE`), when it goes past `path` (the
    reply tokens the first reading teacher-forces) and stops short of every reply that holds it (the second reading
    is then inside an answer). Empty when the answers share no opening of their own."""
    opening = shared_prefix(replies, [], ANSWER_SHARE)
    holding = [reply for reply in replies if reply[:len(opening)] == opening]
    opening = opening[:min((len(reply) for reply in holding), default=1) - 1]
    return opening if len(opening) > len(path) and opening[:len(path)] == list(path) else []


def greedy_after(model: Any, batches: list[Batch], stop_ids: Sequence[int], pad_id: int,
                 max_new_tokens: int) -> list[list[int]]:
    """The base model's greedy continuation of every encoded row (its stop token cut), in text order."""
    ordered: dict[int, list[int]] = {}
    for batch in batches:
        rows = generate_ids(model, batch.input_ids, batch.attention_mask, stop_ids, pad_id, max_new_tokens)
        ordered.update((row, tokens) for row, (tokens, _) in zip(batch.rows, rows))
    return [ordered[row] for row in sorted(ordered)]


def answer_tokens(opening: list[int], harmless: list[list[int]]) -> set[int]:
    """The tokens the harmless replies that open with `opening` go on with."""
    return {reply[len(opening)] for reply in harmless if len(reply) > len(opening) and reply[:len(opening)] == opening}


def could_slide(tokenizer: Any, token: int, answers: set[int], wording: Sequence[str]) -> bool:
    """Whether a token after the opening can be one a reply slides back into refusing with: no harmless answer goes
    on with it, and it spells the refusal's own wording (`in_refusal_wording`; any token where none is known)."""
    return token not in answers and (not wording or in_refusal_wording(tokenizer.decode([token]), wording))


def sliding_tokens(tokenizer: Any, opening: list[int], continuations: list[list[int]], answers: set[int],
                   matcher: Any) -> tuple[list[int], int]:
    """The tokens that open the refusing continuations of the opening more often than answering ones and
    `could_slide`; and how many continuations refuse. `matcher` (`abliterate.metrics.RefusalMatcher`) reads a whole
    reply's text and knows the refusal's wording (its learned phrases and openings)."""
    refusing: Counter[int] = Counter()
    answering: Counter[int] = Counter()
    for continuation in continuations:
        if continuation:
            text = tokenizer.decode(opening + continuation, skip_special_tokens=True).strip()
            (refusing if matcher.is_refusal(text) else answering)[continuation[0]] += 1
    tokens = [t for t, n in refusing.most_common()
              if n > answering[t] and could_slide(tokenizer, t, answers, matcher.wording)]
    return tokens, sum(refusing.values())


def in_refusal_wording(token: str, wording: Sequence[str]) -> bool:
    """Whether a token's text starts a word of the model's own refusal wording (lower-case phrases and openings),
    or is punctuation or wide characters in it. The base model forced to open as an answer can also name the
    request and refuse only after it ("Вот как burn a" and then "Извините, ..."): an edited model that goes on with
    the request's word is answering, so that word is not read as refusing."""
    text = token.strip().lower()
    if not text:
        return False
    for phrase in wording:
        start = phrase.find(text)
        while start >= 0:
            if start == 0 or phrase[start - 1] == " " or not text[0].isalnum() or is_wide(text[0]):
                return True
            start = phrase.find(text, start + 1)
    return False


def slide_reading(model: Any, tokenizer: Any, harmful: list[str], harmless_replies: list[list[int]],
                  path: Sequence[int], matcher: Any, settings: dict[str, Any]) -> SlideReading | None:
    """The second reading for the harmful validation prompts `harmful` (chat-formatted), from the base model's
    harmless replies (token ids, from the first reply token); None where answers share no opening or the base model,
    forced to open as an answer, never goes on refusing. `settings`: batch_size, stop_ids, pad_id.

    Which tokens slide is read from the base model's greedy continuations after each of its `TRIED_TOKENS` likeliest
    tokens there, not only after its likeliest: an edited model can slide through a token the base model seldom
    picks first (a comma, then "я не могу").
    """
    opening = answer_opening(harmless_replies, path)
    if not opening:
        return None
    batches = encode(tokenizer, harmful, settings["batch_size"], opening)
    tried = tail_log_probs(model, batches, 1)[:, -1].topk(TRIED_TOKENS, dim=-1).indices.tolist()  # [n, k]
    # Only tokens that could slide are followed (most of a model's likeliest tokens there name the request).
    answers = answer_tokens(opening, harmless_replies)
    followed = [(row, token) for row, tokens in enumerate(tried) for token in tokens
                if token not in settings["stop_ids"] and could_slide(tokenizer, token, answers, matcher.wording)]
    if not followed:
        return None
    tries = encode(tokenizer, [harmful[row] for row, _ in followed], settings["batch_size"], opening,
                   [[token] for _, token in followed])
    continuations = [[token, *rest] for (_, token), rest in zip(followed, greedy_after(
        model, tries, settings["stop_ids"], settings["pad_id"], CONTINUATION_TOKENS))]
    tokens, _ = sliding_tokens(tokenizer, opening, continuations, answers, matcher)
    if not tokens:
        return None
    greedy = [c for (row, token), c in zip(followed, continuations) if token == tried[row][0]]
    _, n_sliding = sliding_tokens(tokenizer, opening, greedy, answers, matcher)
    reading = SlideReading(opening, tokens, batches, n_sliding, len(opening) - len(path))
    shown = reading.to_dict(tokenizer)
    log.info("The search also reads refusal after the opening answers share, %r: forced to open so, the base model "
             "goes on refusing after %d of %d harmful validation prompts (with %s).", shown["opening"], n_sliding,
             len(harmful), shown["tokens"][:5])
    return reading
