"""How replies open: a thinking block (and whether the template can switch it off), the words a refusal opens with
(for matching replies in evaluation), and how a reply spells a configured opening in tokens.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

OPENING_WORDS = 3  # how many words of a refusal make its opening (for matching replies in evaluation)
# A first "word" in wide characters (Chinese, Japanese) or longer than this is a clause of a script written without
# spaces: its opening is cut at its first punctuation mark, or after 2 * OPENING_WORDS characters.
LONGEST_WORD = 20
PHRASE_WORDS = 4  # a learned refusal phrase: at least this many consecutive words (three match answers too often)
PHRASE_SHARE = 0.6  # ... and at least this share of a refusal sentence's words,
MAX_PHRASE_WORDS = 6  # ... but no more than this many (a long refusal still matches a slide that says part of it)
SENTENCE_ENDS = ".!?。！？"
MAX_PHRASES = 24  # the most frequent ones are kept (a few per refusal sentence)
MAX_OPENINGS = 20
# Template kwargs that switch a reasoning model's thinking off when False (Qwen3, GLM-4.5, Granite 3.x's "thinking").
THINKING_SWITCHES = ("enable_thinking", "thinking")
SWITCH_SENTINEL = "Name a fruit"  # the user message rendered to see whether the template switches thinking
THINKING_STARTS = ("<think>", "<thinking>", "<|begin_of_thought|>", "<|channel|>analysis", "<|START_THINKING|>")
THINKING_ENDS = ("</think>", "</thinking>", "<|end_of_thought|>", "<|channel|>final<|message|>", "<|END_THINKING|>")


def opening_of(text: str) -> str:
    """How a reply opens, for matching (lower case): its first OPENING_WORDS words, or in a script written without
    spaces its first clause or characters ("抱歉，我不能帮助你。" opens with "抱歉")."""
    words = text.split()[:OPENING_WORDS]
    first = words[0] if words else ""
    if len(first) > LONGEST_WORD or any(map(is_wide, first)):
        cut = next((i for i, char in enumerate(first) if i and unicodedata.category(char).startswith("P")), None)
        return first[:cut if cut is not None else 2 * OPENING_WORDS].lower()
    return " ".join(words).lower()


def refusal_openings(tokenizer: Any, harmful: list[list[int]], prefix: list[int], token_ids: list[int],
                     path: list[int] | None = None) -> list[str]:
    """The first words (lower case) after the shared `prefix` of the harmful replies that follow `path` (the prefix,
    then any shared opening) with a refusal token, most frequent first."""
    path = list(prefix) if path is None else path
    n = len(path)
    seen: dict[str, int] = {}
    for reply in harmful:
        if len(reply) > n and reply[:n] == path and reply[n] in token_ids:
            opening = opening_of(tokenizer.decode(reply[len(prefix):], skip_special_tokens=True))
            if opening:
                seen[opening] = seen.get(opening, 0) + 1
    return sorted(seen, key=lambda text: (-seen[text], text))[:MAX_OPENINGS]


def refusal_phrases(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], thinking_end: str = "",
                    first_sentence: bool = False) -> list[str]:
    """Word sequences (lower case) in at least a quarter of the base model's harmful answers (and two) and in none
    of its harmless ones, most frequent first: how this model words its refusals wherever they stand (after a
    reasoning line that decides, at the end of a reply that opened as an answer and slid back into refusing), in its
    own language, one sentence or several. Answers are read past any thinking block, as
    `abliterate.metrics.RefusalMatcher` reads them; in scripts written without spaces a wide character is half a word.

    A phrase is `PHRASE_WORDS` words. With `first_sentence` (refusals that open with words of their own) only each
    harmful answer's first sentence is read, since a closing line ("If you have any other questions, feel free to
    ask.") also ends answers, and a phrase covers `PHRASE_SHARE` of it (up to `MAX_PHRASE_WORDS`): a short window of a
    longer refusal can miss its refusing verb ("帮助你做这件事。", help you do this thing, ends degenerate answers)."""
    from collections import Counter

    from abliterate.metrics import strip_thinking

    def answer_words(reply: list[int]) -> list[str]:
        return phrase_words(strip_thinking(tokenizer.decode(reply, skip_special_tokens=True), thinking_end)[0])

    def grams(words: list[str]) -> set[str]:
        size = PHRASE_WORDS
        if first_sentence:
            words = first_words(words)
            size = min(MAX_PHRASE_WORDS, max(PHRASE_WORDS, math.ceil(PHRASE_SHARE * word_weight(words))))
        ends = [(start, phrase_end(words, start, size)) for start in range(len(words))]
        return {join_words(words[start:end]) for start, end in ends if end is not None}

    answered = [join_words(answer_words(reply)) for reply in harmless]
    counts = Counter(gram for reply in harmful for gram in grams(answer_words(reply)))
    kept = [gram for gram, n in counts.items()
            if n >= max(2, len(harmful) / 4) and not any(holds_phrase(text, gram) for text in answered)]
    return sorted(kept, key=lambda gram: (-counts[gram], gram))[:MAX_PHRASES]


def word_weight(words: Sequence[str]) -> float:
    """How many words `words` make, a wide character counting half of one (a Chinese word is about two)."""
    return sum(0.5 if is_wide(word[0]) else 1.0 for word in words)


def phrase_end(words: list[str], start: int, size: float = PHRASE_WORDS) -> int | None:
    """Where a phrase of `size` words starting at `words[start]` ends (`word_weight`); None when the text ends first."""
    for end in range(start + 1, len(words) + 1):
        if word_weight(words[start:end]) >= size:
            return end
    return None


def first_words(words: list[str]) -> list[str]:
    """The words up to the end of the first sentence long enough for a phrase ("I'm sorry. I can't help with
    that." reads on to "that.")."""
    for end, word in enumerate(words, 1):
        if word[-1] in SENTENCE_ENDS and word_weight(words[:end]) >= PHRASE_WORDS:
            return words[:end]
    return words


def holds_phrase(text: str, phrase: str) -> bool:
    """Whether `text` (as `join_words` writes it) holds `phrase` as whole words: "not provide instructions on" is
    not in "cannot provide instructions on" (a wide character needs no space beside it)."""
    start = text.find(phrase)
    while start >= 0:
        end = start + len(phrase)
        if (start == 0 or text[start - 1] == " " or is_wide(phrase[0])) and \
                (end == len(text) or text[end] == " " or is_wide(phrase[-1])):
            return True
        start = text.find(phrase, start + 1)
    return False


def is_wide(char: str) -> bool:
    """Whether a character is wide (Chinese, Japanese): such scripts write words without spaces between them."""
    return unicodedata.east_asian_width(char) in "WF"


def phrase_words(text: str) -> list[str]:
    """`text` in lower case as words: split at whitespace, and a run of wide characters (Chinese, Japanese) one word
    per character."""
    words: list[str] = []
    for word in text.lower().split():
        part = ""
        for char in word:
            if is_wide(char):
                words += [part] if part else []
                words.append(char)
                part = ""
            else:
                part += char
        words += [part] if part else []
    return words


def join_words(words: Sequence[str]) -> str:
    """Words back as text, as `abliterate.metrics` normalizes replies: a space between two words, none beside a wide
    character."""
    text = words[0] if words else ""
    for before, word in pairwise(words):
        text += word if is_wide(before[-1]) or is_wide(word[0]) else " " + word
    return text


def describe_openings(tokenizer: Any, replies: list[list[int]], n_shown: int = 2) -> str:
    """A couple of reply openings, quoted, for an error message."""
    texts = [tokenizer.decode(reply[:12], skip_special_tokens=False) for reply in replies[:n_shown]]
    return ", ".join(repr(text) for text in texts) or "(no replies)"


def spelled(tokenizer: Any, text: str, replies: list[list[int]], start: int) -> list[int]:
    """`text`'s token ids as the replies would write it at index `start`: with or without a leading space, whichever
    first token opens more of `replies` there (a SentencePiece bare "▁" before the word is dropped)."""
    variants = []
    for variant in (text, " " + text):
        tokens = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
        if len(tokens) > 1 and not tokenizer.decode(tokens[:1]).strip():
            tokens = tokens[1:]
        if tokens:
            variants.append(tokens)
    if not variants:
        return []
    opened = [reply[start] for reply in replies if len(reply) > start]
    return max(variants, key=lambda tokens: opened.count(tokens[0]))


def thinking_end(texts: Sequence[str]) -> str:
    """The first known closer of a thinking block that occurs in any of `texts` ("" when none does)."""
    return next((end for end in THINKING_ENDS if any(end in text for text in texts)), "")


def inside_thinking(prompt: str, prefix: str, end: str) -> bool:
    """Whether a thinking block is open where the score is read: the prompt's tail plus the prefix opened one last
    (and did not close it; with no closer seen in the replies, an opened block never closed within them)."""
    text = prompt + prefix
    opened = max(text.rfind(start) for start in THINKING_STARTS)
    return opened >= 0 and opened > (text.rfind(end) if end else -1)


def thinking_switch(tokenizer: Any, model_config: Any) -> dict[str, Any]:
    """{"enable_thinking": False} when the template renders differently with it and the user set no kwargs."""
    if getattr(model_config, "template_kwargs", None) or not getattr(tokenizer, "chat_template", None):
        return {}
    messages = [{"role": "user", "content": SWITCH_SENTINEL}]
    try:
        default = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=False)
    except Exception:  # noqa: BLE001 - a template that fails here fails again, with a clear message, when formatting
        return {}
    return {"enable_thinking": False} if default != off else {}


def thinking_switched_on(template_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The template kwargs with thinking on, when they switch it off (Qwen3's enable_thinking=False); else None."""
    off = [key for key in THINKING_SWITCHES if template_kwargs.get(key) is False]
    return {**template_kwargs, **dict.fromkeys(off, True)} if off else None
