"""Confirm searched edits on held-out prompts: what the forward-pass objectives only estimate.

For one edit (as hooks on the loaded model, exactly the checkpoint `apply` would write) and the base model's own
greedy replies, computed once:
- harmful refusal: share of held-out harmful prompts whose greedy reply (generated with the edit) contains a
  refusal phrase;
- harmless identical: share of held-out harmless prompts whose greedy reply has the same tokens as the base model's.
  Read from one teacher-forced pass over the base replies, which is exact for greedy decoding: the edited model
  writes the base reply token by token if and only if, given the base reply so far, its most likely next token is
  the base reply's next token at every position (and a stop token where the base reply stopped);
- harmless refusal: the base reply's verdict for the identical replies; the others are generated with the edit
  (not generated, None, for an edit that already refuses too often);
- reply KL: per-token KL(base || edited) over the base model's greedy harmless replies (teacher-forced; the stop
  token that ended a reply is scored too), the damage measure the peer scorer (damage.py) reports.

When edits are confirmed for a choice (`confirm_in_order`), an edit's harmful generation stops as soon as more
replies refuse than the refusal target allows (`RefusalWatch`): that edit cannot be chosen, and its refusal is then
recorded as the share seen so far, a lower bound (`refusal_stopped_early`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria

from abliterate.activations import kl_divergence
from abliterate.config import OptimizeConfig
from abliterate.generation import Reply, cut_at_stop, generate_transformers
from abliterate.metrics import DEFAULT_THINKING_END, RefusalMatcher, Scored, batches, position_logprobs
from abliterate.openings import inside_thinking

log = logging.getLogger(__name__)

# The base log-probabilities over the held-out replies are kept between confirmations up to this size (a few
# thousand positions of a toy vocabulary); a 128k-vocabulary model recomputes them beside each edited pass instead.
BASE_CACHE_BYTES = 256 * 2**20


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
    base_log_probs: list[list[torch.Tensor]] | None = field(default=None, repr=False)  # per batch, when cached
    # The harmful prompts again with thinking on, when measuring switched it off (users run it on).
    harmful_thinking_on: list[str] = field(default_factory=list)


def held_out(model: Any, tokenizer: Any, harmful: list[str], harmless: list[str], stop_ids: list[int],
             pad_id: int, matcher: RefusalMatcher, max_new_tokens: int, batch_size: int,
             harmful_thinking_on: list[str] | None = None) -> HeldOut:
    """Generate the base model's harmless replies once and build the teacher-forced sequences from them."""
    base = generate_transformers(model, tokenizer, harmless, stop_ids, max_new_tokens, batch_size)
    scored = []
    for text, reply in zip(harmless, base):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [*prompt_ids, *reply.token_ids] + ([stop_ids[0]] if reply.stopped and stop_ids else [])
        scored.append(Scored(ids=ids, first_target=len(prompt_ids)))
    return HeldOut(harmful, harmless, base, scored, stop_ids, pad_id, matcher, max_new_tokens, batch_size,
                   harmful_thinking_on=harmful_thinking_on or [])


def _cached_base(model: Any, held: HeldOut) -> list[list[torch.Tensor]] | None:
    """The base log-probabilities of every batch of replies, computed once, when they fit `BASE_CACHE_BYTES`."""
    if held.base_log_probs is None:
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if sum(len(item.positions) for item in held.scored) * vocab * 4 > BASE_CACHE_BYTES:
            return None
        held.base_log_probs = [position_logprobs(model, batch, held.pad_id)
                               for batch in batches(held.scored, held.batch_size)]
    return held.base_log_probs


def _matches(item: Scored, log_probs: torch.Tensor, stop_ids: set[int]) -> bool:
    """Whether greedy decoding writes `item`'s reply: the argmax is each next reply token (any stop token where the
    reply stopped)."""
    chosen = log_probs.argmax(dim=-1).tolist()  # [positions]
    targets = item.targets
    if not targets:
        return False
    same = all(a == b for a, b in zip(chosen[: len(targets) - 1], targets[:-1]))
    last = chosen[len(targets) - 1]
    return same and (last in stop_ids if targets[-1] in stop_ids else last == targets[-1])


@torch.inference_mode()
def teacher_forced(model: Any, edit: Callable[[], AbstractContextManager], held: HeldOut) -> tuple[float, list[bool]]:
    """Mean per-token KL(base || edited) over the base replies, and whether each edited greedy reply is the base's."""
    cached = _cached_base(model, held)
    stop_ids = set(held.stop_ids)
    total, count, identical = 0.0, 0, []
    for index, batch in enumerate(batches(held.scored, held.batch_size)):
        base = cached[index] if cached is not None else position_logprobs(model, batch, held.pad_id)
        with edit():
            edited = position_logprobs(model, batch, held.pad_id)
        for item, base_lp, edited_lp in zip(batch, base, edited):
            identical.append(_matches(item, edited_lp, stop_ids))
            if not item.targets:
                continue
            per_token = kl_divergence(base_lp, edited_lp)  # [positions]
            total += float(per_token.sum())
            count += int(per_token.numel())
    return (total / count if count else 0.0), identical


class RefusalWatch(StoppingCriteria):
    """Stops a generation once more than `allowed` replies read as refusals (over every batch so far).

    A reply counts as soon as its text so far is a refusal to `held.matcher` outside a thinking block (an open block
    leaves it undecided): the matcher looks for phrases in the answer and openings at its start, which stay once
    written, so a reply counted here is a refusal in full too. Undecided replies are decoded and read every
    `EVERY` new tokens (and once more when they end), which keeps the check to a small share of the generation.
    """

    EVERY = 4

    def __init__(self, tokenizer: Any, held: HeldOut, allowed: int) -> None:
        self.tokenizer, self.matcher, self.stop_ids, self.allowed = tokenizer, held.matcher, held.stop_ids, allowed
        self.thinking_end = held.matcher.thinking_end or DEFAULT_THINKING_END
        self.before, self.seen, self.ended, self.width, self.prompts, self.stopped = 0, set(), set(), 0, [], False

    def begin(self, width: int, prompts: Any) -> None:
        """A new batch: its prompt width (new tokens start there) and its prompts."""
        self.before, self.seen, self.ended = self.before + len(self.seen), set(), set()
        self.width, self.prompts = width, list(prompts)

    @property
    def refusing(self) -> int:
        return self.before + len(self.seen)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width:]  # [batch, new tokens so far]
        if not self.stopped:
            last = new[:, -1].tolist()
            for row in range(new.shape[0]):
                if row in self.seen or row in self.ended:
                    continue
                ended = last[row] in self.stop_ids  # a finished reply (then padded) is read one last time
                if ended or new.shape[1] % self.EVERY == 0:
                    if self._refuses(self.prompts[row], new[row].tolist()):
                        self.seen.add(row)
                    elif ended:
                        self.ended.add(row)
            self.stopped = self.refusing > self.allowed
        return torch.full((input_ids.shape[0],), self.stopped, dtype=torch.bool, device=input_ids.device)

    def _refuses(self, prompt: str, tokens: list[int]) -> bool:
        text = self.tokenizer.decode(cut_at_stop(tokens, self.stop_ids)[0], skip_special_tokens=True)
        return not inside_thinking(prompt, text, self.thinking_end) and self.matcher.is_refusal(text.strip())


def generated(model: Any, tokenizer: Any, edit: Callable[[], AbstractContextManager], held: HeldOut,
              identical: list[bool], target: float | None = None) -> dict[str, Any]:
    """Harmful and harmless refusal of one edit by generation (and, first, harmful refusal with thinking on, when
    measuring switched it off); only the harmless replies that changed (`identical` from `teacher_forced`) are
    generated, the others are the base model's own. With a `target`, a harmful generation that refuses more than it
    allows stops there (`RefusalWatch`): its share is then a lower bound, the rest is not generated,
    `refusal_stopped_early`."""
    changed = [text for text, same in zip(held.harmless, identical) if not same]

    def refusing(texts: list[str]) -> tuple[float | None, bool]:
        if not texts:
            return None, False
        watch = None if target is None else RefusalWatch(tokenizer, held, math.floor(target * len(texts) + 1e-9))
        found = generate_transformers(model, tokenizer, texts, held.stop_ids, held.max_new_tokens, held.batch_size,
                                      watch)
        if watch is not None and watch.stopped:
            return watch.refusing / len(texts), True
        return sum(held.matcher.is_refusal(reply.text) for reply in found) / len(found), False

    row: dict[str, Any] = {"harmful_refusal": None, "harmful_refusal_thinking_on": None, "harmless_refusal": None,
                           "refusal_stopped_early": False}
    # Thinking on first: an edit scored with thinking off misses the target more often with it on, and then stops
    # before its thinking-off generation.
    sets = (("harmful_refusal_thinking_on", held.harmful_thinking_on), ("harmful_refusal", held.harmful))
    with edit():
        for key, texts in sets:
            row[key], row["refusal_stopped_early"] = refusing(texts)
            if row["refusal_stopped_early"]:
                return row
        new = iter(generate_transformers(model, tokenizer, changed, held.stop_ids, held.max_new_tokens,
                                         held.batch_size) if changed else [])
    harmless = [base if same else next(new) for base, same in zip(held.base_harmless, identical)]
    row["harmful_refusal"] = row["harmful_refusal"] or 0.0
    row["harmless_refusal"] = sum(held.matcher.is_refusal(reply.text) for reply in harmless) / max(1, len(harmless))
    return row


def worst_refusal(row: dict[str, Any]) -> float | None:
    """A confirmed edit's harmful refusal in the worse of the two thinking modes (None when not generated)."""
    found = [row.get(key) for key in ("harmful_refusal", "harmful_refusal_thinking_on")]
    found = [value for value in found if value is not None]
    return max(found) if found else None


def _forced_figures(kl: float, identical: list[bool], held: HeldOut) -> dict[str, Any]:
    return {"identical_share": sum(identical) / max(1, len(identical)), "reply_kl": kl, "n_harmful": len(held.harmful),
            "n_harmless": len(held.harmless), "max_new_tokens": held.max_new_tokens}


def confirm(model: Any, tokenizer: Any, edit: Callable[[], AbstractContextManager], held: HeldOut) -> dict[str, Any]:
    """Refusal, identical share and reply KL of one edit on the held-out prompts."""
    kl, identical = teacher_forced(model, edit, held)
    return {**generated(model, tokenizer, edit, held, identical), **_forced_figures(kl, identical, held)}


def confirm_in_order(model: Any, tokenizer: Any, edits: dict[int, Callable[[], AbstractContextManager]],
                     held: HeldOut, target: float, only: int | None = None,
                     bound: float = math.inf) -> list[dict[str, Any]]:
    """Confirm several edits (keyed by trial) for a choice of the least reply KL meeting the refusal `target`.

    Every edit's reply KL and identical share come from its teacher-forced pass (cheap); the refusals need
    generation, so edits are generated in order of (KL, fewer identical replies last) until one meets the target (in
    both thinking modes, where the template has a switch): no later edit can be chosen over it, so theirs stay None
    ("not generated"). An edit's generation stops once it refuses more than the target allows (`RefusalWatch`).
    With `only`, that edit alone is generated, in full (the user's pick). With a `bound` (the reply KL of an edit
    confirmed before that met the target), only edits with less reply KL are generated.
    """
    rows, forced = [], {}
    for trial, edit in edits.items():
        kl, forced[trial] = teacher_forced(model, edit, held)
        rows.append({"trial": trial, "harmful_refusal": None, "harmful_refusal_thinking_on": None,
                     "harmless_refusal": None, "refusal_stopped_early": False,
                     **_forced_figures(kl, forced[trial], held)})
    ranked = sorted(rows, key=lambda row: (row["reply_kl"], -row["identical_share"]))
    if only is not None:
        for row in (row for row in rows if row["trial"] == only):
            row.update(generated(model, tokenizer, edits[only], held, forced[only]))
        return rows
    for row in ranked:
        if row["reply_kl"] >= bound:
            break
        row.update(generated(model, tokenizer, edits[row["trial"]], held, forced[row["trial"]], target))
        if worst_refusal(row) <= target:
            break
    return rows


def choose(confirmed: list[dict[str, Any]], config: OptimizeConfig) -> dict[str, Any]:
    """`optimize.trial` if set, else the least reply KL among those at or under the target refusal (in both thinking
    modes, `worst_refusal`), else the least refusing (ties broken by KL); edits whose refusal was not generated
    (`confirm_in_order`) are not candidates."""
    if config.trial >= 0:
        picked = next(c for c in confirmed if c["trial"] == config.trial)
        if (worst_refusal(picked) or 0.0) > config.target_refusal:
            log.warning("Trial %d (optimize.trial) refuses %.2f of the held-out harmful prompts, above the target "
                        "%.2f; shipping it as asked.", config.trial, worst_refusal(picked), config.target_refusal)
        return picked
    generated = [c for c in confirmed if worst_refusal(c) is not None]
    meeting = [c for c in generated if worst_refusal(c) <= config.target_refusal]
    if meeting:
        return min(meeting, key=lambda c: (c["reply_kl"], -c["identical_share"]))
    log.warning("No confirmed edit reaches harmful refusal <= %.2f held out; shipping the least refusing one. More "
                "trials (--n-trials: the folder's search goes on) or stronger weights (--max-weight, now %g, in a new "
                "--out: above 1 the edit pushes past the direction, which can remove refusals the model decides again "
                "later in its reply) may find one.", config.target_refusal, config.max_weight)
    return min(generated, key=lambda c: (worst_refusal(c), c["reply_kl"]))
