"""Confirm searched edits by generation on held-out prompts: what the forward-pass objectives only estimate.

For one edit (as hooks on the loaded model, exactly the checkpoint `apply` would write) and the base model's own
greedy replies, computed once:
- harmful refusal: share of held-out harmful prompts whose greedy reply contains a refusal phrase;
- harmless identical: share of held-out harmless prompts whose greedy reply has the same tokens as the base model's;
- reply KL: per-token KL(base || edited) over the base model's greedy harmless replies (teacher-forced; the stop
  token that ended a reply is scored too), the damage measure the peer scorer (damage.py) reports.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from abliterate.activations import kl_divergence
from abliterate.generation import Reply, generate_transformers
from abliterate.metrics import RefusalMatcher, Scored, batches, position_logprobs


@dataclass
class HeldOut:
    """Held-out prompts (chat-formatted), the base model's harmless replies, and what scoring them needs."""

    harmful: list[str]
    harmless: list[str]
    base_harmless: list[Reply]
    scored: list[Scored]  # prompt + base reply (+ its stop token), scored on the reply
    stop_ids: list[int]
    pad_id: int
    matcher: RefusalMatcher  # how a reply is read as a refusal (phrases and the base model's own openings)
    max_new_tokens: int
    batch_size: int


def held_out(model: Any, tokenizer: Any, harmful: list[str], harmless: list[str], stop_ids: list[int],
             pad_id: int, matcher: RefusalMatcher, max_new_tokens: int, batch_size: int) -> HeldOut:
    """Generate the base model's harmless replies once and build the teacher-forced sequences from them."""
    base = generate_transformers(model, tokenizer, harmless, stop_ids, max_new_tokens, batch_size)
    scored = []
    for text, reply in zip(harmless, base):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [*prompt_ids, *reply.token_ids] + ([stop_ids[0]] if reply.stopped and stop_ids else [])
        scored.append(Scored(ids=ids, first_target=len(prompt_ids)))
    return HeldOut(harmful, harmless, base, scored, stop_ids, pad_id, matcher, max_new_tokens, batch_size)


@torch.inference_mode()
def reply_kl(model: Any, edit: Callable[[], AbstractContextManager], held: HeldOut) -> float:
    """Mean per-token KL(base || edited) over the base replies; base and edited passes share each batch."""
    total, count = 0.0, 0
    for batch in batches(held.scored, held.batch_size):
        base = position_logprobs(model, batch, held.pad_id)
        with edit():
            edited = position_logprobs(model, batch, held.pad_id)
        for item, base_lp, edited_lp in zip(batch, base, edited):
            if not item.targets:
                continue
            per_token = kl_divergence(base_lp, edited_lp)  # [positions]
            total += float(per_token.sum())
            count += int(per_token.numel())
    return total / count if count else 0.0


def confirm(model: Any, tokenizer: Any, edit: Callable[[], AbstractContextManager], held: HeldOut) -> dict[str, Any]:
    """Refusal, identical share and reply KL of one edit on the held-out prompts."""
    with edit():
        harmful = generate_transformers(model, tokenizer, held.harmful, held.stop_ids, held.max_new_tokens,
                                        held.batch_size)
        harmless = generate_transformers(model, tokenizer, held.harmless, held.stop_ids, held.max_new_tokens,
                                         held.batch_size)
    refusals = sum(held.matcher.is_refusal(reply.text) for reply in harmful)
    identical = sum(a.token_ids == b.token_ids for a, b in zip(harmless, held.base_harmless))
    harmless_refusals = sum(held.matcher.is_refusal(reply.text) for reply in harmless)
    return {"harmful_refusal": refusals / max(1, len(harmful)), "harmless_refusal": harmless_refusals / max(1, len(harmless)),
            "identical_share": identical / max(1, len(harmless)), "reply_kl": reply_kl(model, edit, held),
            "n_harmful": len(harmful), "n_harmless": len(harmless), "max_new_tokens": held.max_new_tokens}
