"""Where each prompt's own reply reaches its decision: refusal read per prompt, for models that reason first.

A reasoning model whose template cannot switch thinking off opens every reply with its own thinking about the
request ("<think>\\nThe user asks how to make a fake ID. This is harmful.\\n</think>\\n\\nI'm sorry ..."). Harmful
and harmless replies first differ at the request's topic, which says nothing about refusing, and the decision
comes at a different place in every reply. So here the score is read per prompt: the base model's own greedy reply
is teacher-forced up to its first *decision marker*, a token that at least half of one side's replies hold and the
other side's far more rarely ("sorry" against "Sure"), and the refusal score is the probability of the refusing
side's markers there.

Markers are looked for in the answer, after the thinking block, when the replies close one: the answer is what a
user reads and what evaluation counts, and a model can reason "this is fine" and still refuse. Without a thinking
block they are looked for from the shared prefix on (a model that restates each request before refusing).

`refusal.find_refusal` turns to this when no first token after the shared prefix tells the sides apart, or when
that position lies inside a thinking block. Every prompt that is scored then needs its continuation: `decision_tails`
generates them with the base model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# A decision marker is held by at least this share of one side's replies ...
MARKER_SHARE = 0.5
# ... and by this many times fewer of the other side's (as refusal tokens must be; see parting.ENRICHMENT).
MARKER_ENRICHMENT = 4.0
DECISION_POSITION = "(each prompt's decision)"  # how the per-prompt decision position is labelled among candidates


@dataclass
class Markers:
    """Decision markers: tokens held by the refusing side's replies, and by the answering side's."""

    refusal: list[int]
    answer: list[int]

    @property
    def all(self) -> set[int]:
        return set(self.refusal) | set(self.answer)


@dataclass(frozen=True)
class Segments:
    """Where in a reply its decision is looked for: after the shared `prefix`, and after the last `closer` (the
    thinking block's closing tokens) when there is one."""

    prefix: tuple[int, ...]
    closer: tuple[int, ...] = ()

    def start(self, reply: Sequence[int]) -> int | None:
        """Where the reply's decision may begin; None for a reply without the prefix or a closed thinking block."""
        n = len(self.prefix)
        if tuple(reply[:n]) != self.prefix:
            return None
        if not self.closer:
            return n
        m = len(self.closer)
        ends = [i + m for i in range(n, len(reply) - m + 1) if tuple(reply[i:i + m]) == self.closer]
        return ends[-1] if ends else None

    def first_marker(self, reply: Sequence[int], markers: set[int]) -> int | None:
        """The index of the reply's first marker from its start on (None: no decision)."""
        start = self.start(reply)
        if start is None:
            return None
        return next((index for index in range(start, len(reply)) if reply[index] in markers), None)


def _shares(replies: list[list[int]], segments: Segments) -> dict[int, float]:
    """For every token, the share of the replies (those with a segment) that hold it in their segment."""
    starts = [(reply, segments.start(reply)) for reply in replies]
    held = [set(reply[start:]) for reply, start in starts if start is not None]
    counts = Counter(token for tokens in held for token in tokens)
    return {token: count / len(held) for token, count in counts.items()} if held else {}


def find_markers(harmful: list[list[int]], harmless: list[list[int]], segments: Segments) -> Markers:
    """The tokens most replies of one side hold in their segment and the other side's far more rarely."""
    refusing, answering = _shares(harmful, segments), _shares(harmless, segments)

    def markers(side: dict[int, float], other: dict[int, float]) -> list[int]:
        return sorted(token for token, share in side.items()
                      if share >= MARKER_SHARE and share >= MARKER_ENRICHMENT * other.get(token, 0.0))

    return Markers(markers(refusing, answering), markers(answering, refusing))


def decides(reply: list[int], segments: Segments, markers: Markers) -> bool:
    """Whether the reply's first decision marker is a refusing one."""
    index = segments.first_marker(reply, markers.all)
    return index is not None and reply[index] in markers.refusal


def refusing_share(replies: list[list[int]], segments: Segments, markers: Markers) -> float:
    """The share of the replies (with a segment) whose first marker is a refusing one."""
    with_segment = [reply for reply in replies if segments.start(reply) is not None]
    return sum(decides(reply, segments, markers) for reply in with_segment) / max(len(with_segment), 1)


def held_out_margin(harmful: list[list[int]], harmless: list[list[int]], segments: Segments) -> float:
    """Markers found on every other reply, tried on the rest (and the other way round): the mean of (share of
    held-out harmful replies whose first marker refuses) - (the same share of held-out harmless replies)."""
    margins = []
    for chosen, held in ((0, 1), (1, 0)):
        markers = find_markers(harmful[chosen::2], harmless[chosen::2], segments)
        if not markers.refusal or not markers.answer:
            return 0.0
        margins.append(refusing_share(harmful[held::2], segments, markers)
                       - refusing_share(harmless[held::2], segments, markers))
    return sum(margins) / len(margins)


def decision_tokens(harmful: list[list[int]], segments: Segments, markers: Markers) -> list[int]:
    """The refusing markers that come first in harmful replies (what the score reads), most frequent first."""
    firsts: Counter = Counter()
    for reply in harmful:
        if decides(reply, segments, markers):
            firsts[reply[segments.first_marker(reply, markers.all)]] += 1
    return sorted(firsts, key=lambda token: (-firsts[token], token))


def cut_at_decision(reply: list[int], segments: Segments, markers: set[int]) -> list[int] | None:
    """The reply after the shared prefix up to (not including) its first marker; None when it has no decision."""
    index = segments.first_marker(reply, markers)
    return None if index is None else list(reply[len(segments.prefix):index])


def answer_openings(tokenizer: Any, harmful: list[list[int]], segments: Segments, markers: Markers) -> list[str]:
    """How the answers after the thinking block open (`refusal.opening_of`) in the harmful replies that decide to
    refuse, most frequent first: how evaluation recognises this model's refusals. Without a thinking block there
    are none: a reply's first words would be its own restatement of the request."""
    from abliterate.openings import opening_of

    seen: Counter = Counter()
    for reply in harmful:
        start = segments.start(reply)
        if segments.closer and start is not None and decides(reply, segments, markers):
            opening = opening_of(tokenizer.decode(reply[start:], skip_special_tokens=True))
            if opening:
                seen[opening] += 1
    return sorted(seen, key=lambda text: (-seen[text], text))


def read_decisions(profile: Any, tokenizer: Any, prompt: str, harmful: list[list[int]],
                    harmless: list[list[int]]) -> bool:
    """Per-prompt decisions of a `refusal.RefusalProfile`: looked for in the answers after the thinking block when the
    replies close one, else from the shared prefix on. Fills `profile` and returns True when markers tell the
    sides apart on held-out replies."""
    from abliterate.openings import MAX_OPENINGS, inside_thinking
    from abliterate.parting import MIN_HELD_OUT_MARGIN

    prefix = tuple(profile.prefix_ids)
    end = profile.thinking_end
    closer = tuple(tokenizer(end, add_special_tokens=False)["input_ids"]) if end else ()
    tries = [(end, Segments(prefix, closer))] if closer else []
    for after, segments in [*tries, ("", Segments(prefix))]:
        markers = find_markers(harmful, harmless, segments)
        if not (markers.refusal and markers.answer) or \
                held_out_margin(harmful, harmless, segments) < MIN_HELD_OUT_MARGIN:
            continue
        refusing = [reply for reply in harmful if decides(reply, segments, markers)]
        profile.decision_after, profile.decision_ids = after, sorted(markers.all)
        profile.token_ids = decision_tokens(harmful, segments, markers)
        profile.n_refusals = len(refusing)
        profile.openings = answer_openings(tokenizer, harmful, segments, markers)[:MAX_OPENINGS]
        profile.inside_thinking = bool(refusing) and inside_thinking(prompt, tokenizer.decode(
            refusing[0][:segments.first_marker(refusing[0], markers.all)], skip_special_tokens=False), end)
        return True
    return False


def segments_of(tokenizer: Any, profile: Any) -> Segments:
    """The profile's segments: after its shared prefix, and after its thinking closer when decisions are read there."""
    closer = tokenizer(profile.decision_after, add_special_tokens=False)["input_ids"] if profile.decision_after else []
    return Segments(tuple(profile.prefix_ids), tuple(closer))


def decision_tails(model: Any, tokenizer: Any, texts: Sequence[str], profile: Any, model_config: Any,
                   measure_config: Any) -> dict[str, list[int]]:
    """Per prompt, its continuation: the base model's own greedy reply after the shared prefix up to its decision.
    Empty where the profile reads one shared position for every prompt (nothing to generate); otherwise only the
    prompts whose reply reaches a decision are in it (the others cannot be scored)."""
    from abliterate.chat import stop_token_ids
    from abliterate.generation import generate_transformers

    if profile is None or not profile.decision_ids:
        return {}
    stop_ids = stop_token_ids(tokenizer, model.generation_config, model_config)
    replies = generate_transformers(model, tokenizer, texts, stop_ids, measure_config.discovery_max_new_tokens,
                                    measure_config.batch_size)
    segments, markers = segments_of(tokenizer, profile), set(profile.decision_ids)
    tails = {text: cut for text, reply in zip(texts, replies)
             if (cut := cut_at_decision(reply.token_ids, segments, markers)) is not None}
    if len(tails) < len(set(texts)):
        log.info("%d of %d prompts reached no decision marker within %d new tokens (measure.discovery_max_new_tokens)"
                 " and are not scored.", len(set(texts)) - len(tails), len(set(texts)),
                 measure_config.discovery_max_new_tokens)
    return tails


def scored_with(texts: list[str], tails: dict[str, list[int]]) -> tuple[list[str], list[list[int]] | None]:
    """The texts that can be scored and their continuations for `activations.encode` (all texts and None when
    `tails` is empty: no per-prompt decisions)."""
    if not tails:
        return texts, None
    kept = [text for text in texts if text in tails]
    return kept, [tails[text] for text in kept]
