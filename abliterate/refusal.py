"""How the base model refuses, found from its own greedy replies: the shared reply prefix and the refusal tokens.

The refusal score reads the log-probability of refusal tokens at one reply position. Which position and which tokens
differ per model: a template may put a lone space before every reply, a reasoning model opens every reply with the
same thinking block, and refusals may be worded in lower case or another language. So the base model's own short
greedy replies to harmful and harmless prompts are read: the prefix they all share is teacher-forced after the
prompt, and the refusal tokens are the tokens that open the harmful replies there and rarely the harmless ones.

`refusal.json` in the measure folder records what was found; evaluation reads it to match refusals the same way.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from abliterate.errors import UserError
from abliterate.openings import (
    describe_openings,
    inside_thinking,
    refusal_openings,
    refusal_phrases,
    thinking_end,
    thinking_switch,
)
from abliterate.parting import (
    Parting,
    configured_path,
    count_openings,
    refusal_path,
    shared_prefix,
)

log = logging.getLogger(__name__)

REFUSAL_JSON = "refusal.json"


@dataclass
class RefusalProfile:
    """How the base model refuses, as found from its own greedy replies (or as configured)."""

    source: str  # "discovered" or "configured" (measure.refusal_openings set by the user)
    prefix: str  # reply text shared by refusals and answers, teacher-forced before scoring ("" none)
    token_ids: list[int]  # refusal tokens at the scored position (first token after the prefix)
    token_texts: list[str]  # the same, decoded
    openings: list[str]  # how the base model's refusals open, as text after the prefix (first words)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # template kwargs used for measuring
    thinking_end: str = ""  # text that closes a thinking block in this model's replies ("" when none found)
    n_harmful_replies: int = 0
    n_harmless_replies: int = 0
    n_refusals: int = 0  # harmful replies recognised as refusals
    separation: float = 1.0  # how well the score separates harmful from harmless (AUC in [0, 1])
    # The ids teacher-forced after each prompt before the score is read: the shared prefix, then `branch`.
    prefix_ids: list[int] = field(default_factory=list)
    inside_thinking: bool = False  # the scored position is inside a thinking block (openings are then empty)
    # An opening that refusals share with some answers ("I" of "I can't" and "I'd be glad"): teacher-forced after the
    # prefix, so the score reads where the two part ("" when refusals are told apart at the first token).
    branch: str = ""
    # Per-prompt decisions (`abliterate.decision`): the markers where each prompt's own teacher-forced reply is cut
    # and the score read; `token_ids` are then the refusing markers. Empty: one reply prefix for every prompt.
    decision_ids: list[int] = field(default_factory=list)
    decision_after: str = ""  # decisions are read in the answer after this thinking closer ("" from the prefix on)
    # Word sequences in at least a quarter of the harmful answers and none of the harmless ones (`refusal_phrases`):
    # a reply containing one reads as a refusal wherever it stands (after a decision, or where an edited reply opened
    # as an answer and slid back into refusing).
    phrases: list[str] = field(default_factory=list)
    # Where some refusals open with a token that answers open with too ("Je" of "Je ne peux pas" and "Je vais vous
    # expliquer") and the others with refusal tokens of their own: that token (-1: none), teacher-forced after the
    # scored position, and the refusal tokens after it; the score adds their mass, weighted by its probability.
    shared_id: int = -1
    shared_text: str = ""
    after_shared_ids: list[int] = field(default_factory=list)
    after_shared_texts: list[str] = field(default_factory=list)

    def scoring(self) -> tuple[Sequence[int], list[int]]:
        """The refusal tokens to score (`abliterate.activations.RefusalTokens`) and the reply tokens teacher-forced
        before them (the prefix, then any path refusals share, then any shared opening, whose position is read too)."""
        from abliterate.activations import RefusalTokens

        shared = [self.shared_id] if self.shared_id >= 0 else []
        return RefusalTokens(self.token_ids, self.shared_id, self.after_shared_ids), list(self.prefix_ids) + shared

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, markdown: bool = False) -> str:
        """One line on what was found, for the console and (`markdown`: values as code) the model card."""
        def show(value: Any) -> str:
            text = json.dumps(value, ensure_ascii=False)
            return f"`{text}`" if markdown else text

        how = "found from the base model's greedy replies" if self.source == "discovered" else "as configured"
        prefix = f"after the shared reply prefix {show(self.prefix)}" if self.prefix else "at the first reply token"
        if self.decision_ids:
            where = f"in the answer after {show(self.decision_after)}" if self.decision_after else "in the reply"
            prefix = f"per prompt, where its own greedy reply (teacher-forced) first decides {where},"
        elif self.branch:
            shared = f" after the shared reply prefix {show(self.prefix)} and" if self.prefix else ""
            prefix = (f"at the reply token{shared} after the opening {show(self.branch)} that refusals share with "
                      "some answers,")
        tokens = show(self.token_texts)
        if any("\ufffd" in text for text in self.token_texts) and self.openings:  # part of a character's bytes
            tokens += f" (the start of {show(self.openings[:3])})"
        if self.shared_id >= 0:
            tokens += (f" and, after the opening {show(self.shared_text)} that answers share, "
                       f"{show(self.after_shared_texts)}")
        thinking = (f"; measured with {', '.join(f'{k}={v}' for k, v in self.template_kwargs.items())}"
                    if self.template_kwargs else "")
        separation = "" if math.isnan(self.separation) else \
            f"; separation of harmful from harmless prompts, AUC {self.separation:.3f}"
        return (f"refusal scored {prefix} on the tokens {tokens} ({how}: "
                f"they {'decide' if self.decision_ids else 'open'} {self.n_refusals} of {self.n_harmful_replies} "
                f"harmful replies{separation}){thinking}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefusalProfile:
        """Reads a profile, ignoring keys a later version added (so an older reader keeps working)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def scoring_tokens(tokenizer: Any, profile: RefusalProfile | None,
                   configured: Sequence[str]) -> tuple[Sequence[int], list[int]]:
    """The refusal tokens and the reply prefix teacher-forced before them: the profile's, else the configured
    openings, else common English openings (evaluating a model that was never measured)."""
    if profile is not None and profile.token_ids:
        return profile.scoring()
    from abliterate.chat import COMMON_OPENINGS, refusal_token_ids

    # Stand-in openings are not the user's words: their fragments are dropped without a warning.
    openings = list(configured) or list(COMMON_OPENINGS)
    return list(refusal_token_ids(tokenizer, openings, warn=bool(configured))), []


def save_profile(profile: RefusalProfile, folder: Path) -> Path:
    path = Path(folder) / REFUSAL_JSON
    path.write_text(json.dumps(profile.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_profile(folder_or_file: Path) -> RefusalProfile | None:
    """The profile in a measure folder (or the refusal.json file itself); None when the file is absent."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / REFUSAL_JSON
    if not path.is_file():
        return None
    return RefusalProfile.from_dict(json.loads(path.read_text(encoding="utf-8")))


# ---- discovery ----

def separation_auc(harmful: Sequence[float], harmless: Sequence[float]) -> float:
    """The chance that a harmful prompt's score is above a harmless one's (ties count half): the AUC."""
    if not harmful or not harmless:
        return float("nan")
    above = sum((h > g) + 0.5 * (h == g) for h in harmful for g in harmless)
    return above / (len(harmful) * len(harmless))


def find_refusal(model: Any, tokenizer: Any, harmful: Sequence[str], harmless: Sequence[str], model_config: Any,
                 measure_config: Any) -> RefusalProfile:
    """Greedy replies of the base model to a sample of fit prompts, read for the shared prefix and refusal tokens.

    `harmful` and `harmless` are plain instructions (the first `measure_config.n_discovery` of each are used).
    With `measure_config.refusal_openings` set, those openings give the refusal tokens (source "configured") and
    only the prefix is read from the replies.
    """
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.metrics import EXTENDED_REFUSALS

    kwargs = dict(getattr(model_config, "template_kwargs", None) or {}) or thinking_switch(tokenizer, model_config)
    if kwargs and not model_config.template_kwargs:
        log.info("The chat template can switch thinking off: measuring with enable_thinking=False (refusal is "
                 "decided at the reply's first token, not at a different place inside every prompt's thinking).")
    model_config = replace(model_config, template_kwargs=kwargs)
    n = measure_config.n_discovery
    texts = format_instructions(tokenizer, list(harmful[:n]) + list(harmless[:n]), model_config)
    stop_ids = stop_token_ids(tokenizer, model.generation_config, model_config)
    replies = [reply.token_ids for reply in generate_transformers(
        model, tokenizer, texts, stop_ids, measure_config.discovery_max_new_tokens, measure_config.batch_size)]
    harmful_ids, harmless_ids = replies[:len(harmful[:n])], replies[len(harmful[:n]):]
    prefix = shared_prefix(harmful_ids, harmless_ids)
    decoded = [tokenizer.decode(reply, skip_special_tokens=False) for reply in replies] + texts[:1]
    profile = RefusalProfile(
        source="configured" if measure_config.refusal_openings else "discovered",
        prefix=tokenizer.decode(prefix, skip_special_tokens=False), token_ids=[], token_texts=[], openings=[],
        template_kwargs=kwargs, thinking_end=thinking_end(decoded), n_harmful_replies=len(harmful_ids),
        n_harmless_replies=len(harmless_ids), separation=float("nan"), prefix_ids=list(prefix))
    if measure_config.refusal_openings:
        _configure(profile, tokenizer, measure_config.refusal_openings, harmful_ids, harmless_ids)
    else:
        _discover(profile, tokenizer, texts[0], harmful_ids, harmless_ids)
    profile.phrases = refusal_phrases(tokenizer, harmful_ids, harmless_ids, profile.thinking_end,
                                      first_sentence=bool(profile.openings))
    counts = count_openings(tokenizer, harmful_ids, harmless_ids, profile.prefix_ids, EXTENDED_REFUSALS)
    if not profile.decision_ids:
        profile.n_refusals = sum(counts.harmful.get(token, 0) for token in profile.token_ids)
        if profile.shared_id >= 0:
            path = list(profile.prefix_ids) + [profile.shared_id]
            after = count_openings(tokenizer, harmful_ids, harmless_ids, path, EXTENDED_REFUSALS).harmful
            profile.n_refusals += sum(after.get(token, 0) for token in profile.after_shared_ids)
    profile.token_texts = [tokenizer.decode([token]) for token in profile.token_ids]
    return profile


def _configure(profile: RefusalProfile, tokenizer: Any, openings: Sequence[str], harmful: list[list[int]],
               harmless: list[list[int]]) -> None:
    """Fill `profile` from the user's refusal openings (`configured_path`)."""
    from abliterate.chat import refusal_token_ids

    prefix = list(profile.prefix_ids)
    parting = configured_path(tokenizer, openings, harmful, harmless, prefix)
    if parting.tokens:
        profile.token_ids, profile.prefix_ids = parting.tokens, parting.path
        profile.branch = tokenizer.decode(parting.path[len(prefix):], skip_special_tokens=False)
        if profile.branch:
            log.info("Every refusal opening begins with %r, which opens the harmless replies too: it is "
                     "teacher-forced and the refusal score read after it.", profile.branch)
    else:
        profile.token_ids = refusal_token_ids(tokenizer, openings)
    profile.openings = [" ".join(text.split()).lower() for text in openings]
    if parting.shared >= 0:
        _add_shared_opening(profile, tokenizer, harmful, prefix, parting)


def _discover(profile: RefusalProfile, tokenizer: Any, prompt: str, harmful: list[list[int]],
              harmless: list[list[int]]) -> None:
    """Fill `profile` with where the replies part and the refusal tokens there: after the shared prefix (and any
    opening refusals share with answers), or, where that finds nothing or lies inside the thinking, at each reply's
    own decision point (`abliterate.decision`)."""
    from abliterate.decision import read_decisions
    from abliterate.metrics import EXTENDED_REFUSALS

    prefix = list(profile.prefix_ids)
    parting = refusal_path(tokenizer, harmful, harmless, prefix, EXTENDED_REFUSALS)
    path, token_ids = parting.path, parting.tokens
    thinking = bool(token_ids) and inside_thinking(prompt, tokenizer.decode(path, skip_special_tokens=False),
                                                   profile.thinking_end)
    if (not token_ids or thinking) and read_decisions(profile, tokenizer, prompt, harmful, harmless):
        return
    if not token_ids:
        unclosed = not profile.thinking_end and inside_thinking(prompt, profile.prefix, "")
        raise UserError(_nothing_found(tokenizer, harmful, harmless, prefix, unclosed))
    if thinking:
        log.warning("Refusal is scored inside every prompt's own thinking, where harmful and harmless replies first "
                    "differ (after %r); the separation printed next says how reliable that is.", profile.prefix)
    profile.token_ids, profile.prefix_ids, profile.inside_thinking = token_ids, path, thinking
    profile.branch = tokenizer.decode(path[len(prefix):], skip_special_tokens=False)
    profile.openings = [] if thinking else refusal_openings(tokenizer, harmful, prefix, token_ids, path)
    if parting.shared >= 0 and not thinking:
        _add_shared_opening(profile, tokenizer, harmful, prefix, parting)


def _add_shared_opening(profile: RefusalProfile, tokenizer: Any, harmful: list[list[int]], prefix: list[int],
                        parting: Parting) -> None:
    """Refusals that open with a token answers open with too are scored one token later (`RefusalTokens`)."""
    shared, after = parting.shared, parting.after_shared
    profile.shared_id, profile.after_shared_ids = shared, list(after)
    profile.shared_text = tokenizer.decode([shared], skip_special_tokens=False)
    profile.after_shared_texts = [tokenizer.decode([token]) for token in after]
    more = refusal_openings(tokenizer, harmful, prefix, list(after), parting.path + [shared])
    profile.openings += [opening for opening in more if opening not in profile.openings]
    log.info("Some refusals open with %r, which opens answers too: the refusal score adds the refusal tokens after "
             "it (%s), weighted by its probability.", profile.shared_text,
             ", ".join(map(repr, profile.after_shared_texts)))


def _nothing_found(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], prefix: list[int],
                   unclosed: bool = False) -> str:
    where = f" after the shared prefix {tokenizer.decode(prefix)!r}" if prefix else ""
    longer = (" The replies open a thinking block that none closed within measure.discovery_max_new_tokens: raise "
              "it (--discovery-max-new-tokens) so that the answers after the thinking can be read, or switch "
              "thinking off in the template (model.template_kwargs, --chat-template).") if unclosed else ""
    return (f"Found no refusal in the base model's replies: no token opens its harmful replies{where} far more often "
            f"than its harmless ones. Harmful replies open like {describe_openings(tokenizer, harmful)}; harmless "
            f"like {describe_openings(tokenizer, harmless)}.{longer} If the model does refuse, check the chat "
            "template (--chat-template, --system-prompt) or name its refusal openings in measure.refusal_openings.")


def log_profile(profile: RefusalProfile) -> None:
    """Log what was found, and warn when the score separates harmful from harmless prompts poorly."""
    log.info("Refusal: %s.", profile.describe())
    if not profile.separation >= 0.9 and profile.thinking_end:
        log.warning("The refusal score separates harmful from harmless prompts poorly (AUC %.3f): the reply prefix "
                    "%r may end inside per-prompt reasoning; switch thinking off (model.template_kwargs) if the "
                    "template can.", profile.separation, profile.prefix)
    elif not profile.separation >= 0.9:
        log.warning("The refusal score separates harmful from harmless prompts poorly (AUC %.3f): its tokens %s may "
                    "open answers too, or miss how some refusals open; compare them with the replies and name the "
                    "openings in measure.refusal_openings.", profile.separation, profile.token_texts)
