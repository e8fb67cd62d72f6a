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
    spelled,
    thinking_end,
    thinking_switch,
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
            prefix = f"at the reply token{shared} after the opening {show(self.branch)} that refusals share with some answers,"
        thinking = (f"; measured with {', '.join(f'{k}={v}' for k, v in self.template_kwargs.items())}"
                    if self.template_kwargs else "")
        separation = "" if math.isnan(self.separation) else \
            f"; separation of harmful from harmless prompts, AUC {self.separation:.3f}"
        return (f"refusal scored {prefix} on the tokens {show(self.token_texts)} ({how}: "
                f"they {'decide' if self.decision_ids else 'open'} {self.n_refusals} of {self.n_harmful_replies} "
                f"harmful replies{separation}){thinking}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefusalProfile:
        """Reads a profile, ignoring keys a later version added (so an older reader keeps working)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def scoring_tokens(tokenizer: Any, profile: RefusalProfile | None,
                   configured: Sequence[str]) -> tuple[list[int], list[int]]:
    """The refusal tokens and the reply prefix teacher-forced before them: the profile's, else the configured
    openings, else common English openings (evaluating a model that was never measured)."""
    if profile is not None and profile.token_ids:
        return list(profile.token_ids), list(profile.prefix_ids)
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

# A reply token belongs to the shared prefix when at least this share of each side's replies has it there: a lone
# odd reply must not hide a prefix that every other reply has, but a token one side lacks is a decision, not a prefix.
PREFIX_SHARE = 0.9
# A refusal token is at least this many times more frequent after harmful prompts than after harmless ones.
ENRICHMENT = 4.0
# Told apart by frequency alone, a refusal token must open at least two harmful replies, so that one odd harmful
# reply does not make its first token a refusal token; one that a refusal phrase confirms needs one.
MIN_UNCONFIRMED = 2
# Tokens chosen on one half of the replies must open this much larger a share of the other half's harmful replies
# than of its harmless ones. Chosen after the fact, tokens always tell a sample's sides apart a little; on replies
# they were not chosen on, only real refusal tokens do (a model that refuses nothing gives a margin near 0).
MIN_HELD_OUT_MARGIN = 0.5
# How many tokens of an opening shared by refusals and answers are followed to where they part ("I", "'m" of
# "I'm sorry" and "I'm glad to help"); a deeper split is not a refusal opening.
MAX_BRANCH_TOKENS = 3


@dataclass
class OpeningCounts:
    """Per first reply token after the prefix: how many harmful and harmless replies open with it."""

    harmful: dict[int, int]
    harmless: dict[int, int]
    confirmed: dict[int, int]  # harmful replies opening with the token that a refusal phrase matches
    n_harmful: int
    n_harmless: int


def shared_prefix(harmful: list[list[int]], harmless: list[list[int]], share: float = PREFIX_SHARE) -> list[int]:
    """The longest run of reply tokens that at least `share` of each side's replies open with."""
    prefix: list[int] = []
    while True:
        n = len(prefix)
        following = [reply[n] for reply in harmful + harmless if len(reply) > n and reply[:n] == prefix]
        if not following:
            return prefix
        token = max(set(following), key=following.count)
        for side in (harmful, harmless):
            if sum(reply[:n + 1] == prefix + [token] for reply in side) < share * len(side):
                return prefix
        prefix.append(token)


def count_openings(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], prefix: list[int],
                   phrases: Sequence[str]) -> OpeningCounts:
    """How often each token opens the replies right after the prefix, per side (replies without the prefix skipped)."""
    from abliterate.metrics import is_refusal

    counts = OpeningCounts({}, {}, {}, 0, 0)
    n = len(prefix)
    for side, replies in (("harmful", harmful), ("harmless", harmless)):
        table = getattr(counts, side)
        for reply in replies:
            if len(reply) <= n or reply[:n] != prefix:
                continue
            setattr(counts, f"n_{side}", getattr(counts, f"n_{side}") + 1)
            table[reply[n]] = table.get(reply[n], 0) + 1
            if side == "harmful" and is_refusal(tokenizer.decode(reply[n:], skip_special_tokens=True), phrases):
                counts.confirmed[reply[n]] = counts.confirmed.get(reply[n], 0) + 1
    return counts


def refusal_tokens(counts: OpeningCounts) -> list[int]:
    """Tokens far more frequent after harmful prompts, confirmed by a refusal phrase or opening many replies.

    Most supported first: the order only decides how they are listed.
    """
    found = []
    for token, n_harmful in counts.harmful.items():
        harmful_rate = n_harmful / max(counts.n_harmful, 1)
        harmless_rate = counts.harmless.get(token, 0) / max(counts.n_harmless, 1)
        if harmful_rate < ENRICHMENT * harmless_rate:
            continue
        confirmed = 2 * counts.confirmed.get(token, 0) > n_harmful
        if confirmed or n_harmful >= MIN_UNCONFIRMED:
            found.append(token)
    return sorted(found, key=lambda token: (-counts.harmful[token], token))


def refusal_path(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], prefix: list[int],
                 phrases: Sequence[str]) -> tuple[list[int], list[int]]:
    """(path, refusal tokens): where refusals part from answers, from the shared prefix on.

    Mostly the first token after the prefix tells them apart. When refusals all open with a token that many answers
    open with too ("I can't ..." and "I'd be glad ..."), no first token is far more frequent after harmful prompts;
    then that opening is followed, a token at a time, to where refusals and the answers that share it part. Tokens
    must pass `held_out_margin` there, or none are returned.
    """
    path = list(prefix)
    for _ in range(MAX_BRANCH_TOKENS + 1):
        counts = count_openings(tokenizer, harmful, harmless, path, phrases)
        tokens = refusal_tokens(counts)
        if tokens and held_out_margin(tokenizer, harmful, harmless, path, phrases) >= MIN_HELD_OUT_MARGIN:
            return path, tokens
        if not counts.harmful:
            break
        token, n_opened = max(counts.harmful.items(), key=lambda item: (item[1], -item[0]))
        if n_opened < PREFIX_SHARE * len(harmful):  # refusals do not share one opening: no path to follow
            break
        path.append(token)
    return list(prefix), []


def configured_path(tokenizer: Any, openings: Sequence[str], harmful: list[list[int]], harmless: list[list[int]],
                    prefix: list[int]) -> tuple[list[int], list[int]]:
    """(path, refusal tokens) for the user's refusal openings (measure.refusal_openings), as the replies spell them.

    Their first tokens are the refusal tokens, unless all the openings begin with the same token and that token
    opens the base model's harmless replies too (under `ENRICHMENT` times as often as its harmful ones: "I can't"
    and "I cannot" against answers opening "I'd be glad"); then it is teacher-forced and their next tokens are
    scored, as for a discovered shared opening (up to `MAX_BRANCH_TOKENS` deep). An opening that begins with the
    reply prefix itself is read after it. Empty tokens: score the openings' first tokens as they are
    (`chat.refusal_token_ids`).
    """
    sequences = [_after_prefix(tokenizer, text, harmful, prefix) for text in openings]
    stripped = any(seq != spelled(tokenizer, text, harmful, len(prefix)) for seq, text in zip(sequences, openings))
    path, depth = list(prefix), 0
    while depth < MAX_BRANCH_TOKENS:
        tokens = sorted({seq[depth] for seq in sequences if len(seq) > depth})
        if len(tokens) != 1 or any(len(seq) <= depth + 1 for seq in sequences):
            break
        counts = count_openings(tokenizer, harmful, harmless, path, ())
        harmful_rate = counts.harmful.get(tokens[0], 0) / max(counts.n_harmful, 1)
        harmless_rate = counts.harmless.get(tokens[0], 0) / max(counts.n_harmless, 1)
        if harmful_rate >= ENRICHMENT * harmless_rate:  # it tells refusals from answers already: score it here
            break
        path.append(tokens[0])
        depth += 1
    if depth == 0 and not stripped:
        return list(prefix), []
    return path, sorted({seq[depth] for seq in sequences if len(seq) > depth})


def _after_prefix(tokenizer: Any, text: str, replies: list[list[int]], prefix: list[int]) -> list[int]:
    """An opening's tokens after the reply prefix: an opening that begins with the prefix every reply shares ("I
    can't" where every reply opens "I") loses it; any other is spelled as it would follow the prefix."""
    whole = spelled(tokenizer, text, replies, 0)
    if prefix and len(whole) > len(prefix) and whole[:len(prefix)] == prefix:
        return whole[len(prefix):]
    return spelled(tokenizer, text, replies, len(prefix))


def held_out_margin(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], prefix: list[int],
                    phrases: Sequence[str]) -> float:
    """Refusal tokens chosen on every other reply, tried on the rest (and the other way round): the mean of
    (share of held-out harmful replies they open) - (share of held-out harmless replies they open)."""
    margins = []
    for chosen, held in ((0, 1), (1, 0)):
        tokens = set(refusal_tokens(count_openings(tokenizer, harmful[chosen::2], harmless[chosen::2], prefix,
                                                   phrases)))
        held_out = count_openings(tokenizer, harmful[held::2], harmless[held::2], prefix, phrases)
        opened = [sum(table.get(t, 0) for t in tokens) / max(n, 1) for table, n in (
            (held_out.harmful, held_out.n_harmful), (held_out.harmless, held_out.n_harmless))]
        margins.append(opened[0] - opened[1])
    return sum(margins) / len(margins)


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
    profile.phrases = refusal_phrases(tokenizer, harmful_ids, harmless_ids, profile.thinking_end)
    counts = count_openings(tokenizer, harmful_ids, harmless_ids, profile.prefix_ids, EXTENDED_REFUSALS)
    if not profile.decision_ids:
        profile.n_refusals = sum(counts.harmful.get(token, 0) for token in profile.token_ids)
    profile.token_texts = [tokenizer.decode([token]) for token in profile.token_ids]
    return profile


def _configure(profile: RefusalProfile, tokenizer: Any, openings: Sequence[str], harmful: list[list[int]],
               harmless: list[list[int]]) -> None:
    """Fill `profile` from the user's refusal openings (`configured_path`)."""
    from abliterate.chat import refusal_token_ids

    prefix = list(profile.prefix_ids)
    path, token_ids = configured_path(tokenizer, openings, harmful, harmless, prefix)
    if token_ids:
        profile.token_ids, profile.prefix_ids = token_ids, path
        profile.branch = tokenizer.decode(path[len(prefix):], skip_special_tokens=False)
        log.info("Every refusal opening begins with %r, which opens the harmless replies too: it is teacher-forced "
                 "and the refusal score read after it.", profile.branch)
    else:
        profile.token_ids = refusal_token_ids(tokenizer, openings)
    profile.openings = [" ".join(text.split()).lower() for text in openings]


def _discover(profile: RefusalProfile, tokenizer: Any, prompt: str, harmful: list[list[int]],
              harmless: list[list[int]]) -> None:
    """Fill `profile` with where the replies part and the refusal tokens there: after the shared prefix (and any
    opening refusals share with answers), or, where that finds nothing or lies inside the thinking, at each reply's
    own decision point (`abliterate.decision`)."""
    from abliterate.decision import read_decisions
    from abliterate.metrics import EXTENDED_REFUSALS

    prefix = list(profile.prefix_ids)
    path, token_ids = refusal_path(tokenizer, harmful, harmless, prefix, EXTENDED_REFUSALS)
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
    if not profile.separation >= 0.9:
        log.warning("The refusal score separates harmful from harmless prompts poorly (AUC %.3f): the reply prefix "
                    "%r may end inside per-prompt reasoning; switch thinking off (model.template_kwargs) if the "
                    "template can.", profile.separation, profile.prefix)
