"""Chat formatting: prompts through the model's own template, and the token ids the method needs from it.

Nothing here is written per model family. The end-of-instruction tokens (the paper's candidate positions) are found
by rendering the template around a sentinel instruction and reading the tokens that follow it; the end-of-turn token
by rendering a conversation with an assistant reply and reading what closes the reply; refusal tokens by tokenising
the configured refusal openings.
"""

from __future__ import annotations

import logging
from typing import Any

from abliterate.errors import UserError

logger = logging.getLogger(__name__)

# Two instructions whose last words differ, so the rendered prompts share exactly the template's suffix.
SENTINELS = ("Name a fruit", "Describe the weather")
# A reply text no template contains, to find what closes an assistant turn.
SENTINEL_REPLY = "Zqxv sentinel reply Zqxv"
# Common English refusal openings: the refusal score's tokens where no refusal profile has been measured.
COMMON_OPENINGS = ("I", "I'm", "I am", "As", "Sorry", "I cannot", "I can't", "Unfortunately")


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "The tokenizer has no chat template; pass one as a Jinja file with --chat-template FILE "
            "(model.chat_template in the config)."
        )


def _messages(instruction: str, system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": instruction}]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, model_config: Any) -> str:
    _require_template(tokenizer)
    kwargs = dict(getattr(model_config, "template_kwargs", None) or {})
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    except Exception as error:  # jinja raises its own types (TemplateError, TypeError from bad kwargs ...)
        if messages and messages[0]["role"] == "system":
            raise UserError(
                f"The chat template failed with a system prompt ({error}); this model may not support one: "
                "leave model.system_prompt (--system-prompt) empty."
            ) from error
        raise UserError(f"The chat template failed to render ({error}); fix it or pass --chat-template FILE.") from error


def format_instructions(tokenizer: Any, instructions: list[str], model_config: Any) -> list[str]:
    """Each instruction rendered as a user turn with the generation prompt, as text (tokenise without special tokens).

    The optional system prompt and template keyword arguments (e.g. `enable_thinking = false`) come from
    `model_config` (`system_prompt`, `template_kwargs`).
    """
    system_prompt = getattr(model_config, "system_prompt", "") or ""
    return [_render(tokenizer, _messages(text, system_prompt), True, model_config) for text in instructions]


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered template text: the template already holds its special tokens (BOS included)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_suffix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def end_of_instruction_ids(tokenizer: Any, model_config: Any) -> list[int]:
    """The tokens the template puts between the end of the instruction and the start of the reply.

    Found without knowing the family: the prompt is rendered for two instructions with different last words, and the
    ids the two share at the end are the template's suffix. A piece the tokenizer merges across the boundary (say
    the instruction's last word with a following space) differs between the two and is left out, so every returned
    token is the same for every prompt. The paper's candidate positions are the last `len(...)` positions of a
    left-padded prompt.
    """
    rendered = format_instructions(tokenizer, list(SENTINELS), model_config)
    first, second = (_encode(tokenizer, text) for text in rendered)
    n_suffix = _common_suffix_length(first, second)
    if n_suffix == 0:
        raise UserError(
            "The chat template puts no tokens between the instruction and the reply, so there are no "
            "end-of-instruction positions; pass a chat template with --chat-template FILE."
        )
    return first[len(first) - n_suffix:]


def _is_fragment(tokenizer: Any, tokens: list[int], first: int) -> bool:
    """Whether `first` is a single letter or byte cut from a longer word (the next token goes on with a letter)."""
    text = tokenizer.decode([first]).strip()
    rest = tokens[tokens.index(first) + 1:]
    follows = tokenizer.decode(rest[:1]) if rest else ""
    return "\ufffd" in text or (len(text) <= 1 and follows[:1].isalnum())


def refusal_token_ids(tokenizer: Any, openings: list[str], warn: bool = True) -> list[int]:
    """The first token of each refusal opening, with and without a leading space, deduplicated, in order.

    Byte-level tokenizers give "I" and " I" different ids and the reply may begin either way depending on the
    template, so both count; SentencePiece gives both the same piece, kept once. A bare leading "▁" piece is skipped
    for the word's own piece. A first token that is only a fragment of a longer word ("S" of "Sorry" on a small
    vocabulary) would count every reply opening with that letter as a refusal, so it is dropped with a warning
    (`warn=False`: silently, for a built-in list rather than the user's openings).
    """
    ids: list[int] = []
    fragments: list[tuple[int, str]] = []
    for opening in openings:
        for variant in (opening, " " + opening):
            tokens = _encode(tokenizer, variant)
            if not tokens:
                continue
            first = tokens[0]
            if not tokenizer.decode([first]).strip() and len(tokens) > 1:
                first = tokens[1]  # SentencePiece may emit a bare "▁" before the word
            if _is_fragment(tokenizer, tokens, first):
                fragments.append((first, f"{variant!r} -> {[tokenizer.decode([t]) for t in tokens[:4]]}"))
            elif first not in ids:
                ids.append(first)
    fragments = [text for first, text in fragments if first not in ids]  # kept anyway by another opening
    if fragments and warn:
        logger.warning("Refusal openings whose first token is a fragment of a word are left out of the refusal "
                       "tokens: %s.", "; ".join(fragments))
    if not ids:
        raise UserError("No refusal tokens: measure.refusal_openings is empty or every opening's first token is a "
                        "fragment of a word; list other openings, or leave it empty to find them from the model.")
    return ids


def end_of_turn_ids(tokenizer: Any, model_config: Any = None) -> list[int]:
    """The special token that closes an assistant turn (as a list: empty when there is none), read from a rendering.

    The conversation [user, assistant reply] is rendered; the first special token after the reply text (skipping
    whitespace) is the end of turn. Templates that end a turn with plain text give none.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": SENTINELS[0]}, {"role": "assistant", "content": SENTINEL_REPLY}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **dict(
            getattr(model_config, "template_kwargs", None) or {}))
    except (TemplateError, TypeError, ValueError) as error:  # a template may refuse this turn; EOS must do
        logger.warning("Could not render an assistant turn to find the end-of-turn token (%s).", error)
        return []
    after = text.rsplit(SENTINEL_REPLY, 1)[-1]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {index for index, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)}
    ids = []
    for token_id in _encode(tokenizer, after):
        if token_id in special or token_id in added:
            ids.append(token_id)
        elif tokenizer.decode([token_id]).strip():
            break  # plain text after the reply: the turn's end is over
    return ids[:1]


def stop_token_ids(tokenizer: Any, generation_config: Any = None, model_config: Any = None) -> list[int]:
    """Ids that end generation: generation_config's EOS (one or a list), the tokenizer's EOS, and the end of turn."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        if value is not None and value not in ids:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    for value in end_of_turn_ids(tokenizer, model_config):
        if value not in ids:
            ids.append(int(value))
    return ids
