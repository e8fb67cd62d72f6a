"""Where refusals part from answers in the base model's own replies, in tokens: the prefix every reply shares, the
tokens that open refusals after it (following an opening refusals share with answers where needed), and how well
tokens chosen on some replies tell the others apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from abliterate.openings import spelled

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


@dataclass(frozen=True)
class Parting:
    """Where refusals part from answers: the reply tokens teacher-forced first (the prefix, then any opening all
    refusals share with answers), the refusal tokens after them and, where some refusals open with a token answers
    open with too ("Je" of "Je ne peux pas" and "Je vais vous expliquer"), that token and the refusal tokens after
    it (-1 and none where there is no such token). No tokens: no parting was found."""

    path: list[int]
    tokens: list[int]
    shared: int = -1
    after_shared: list[int] = field(default_factory=list)


def choose_tokens(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], path: list[int],
                  phrases: Sequence[str], shared_too: bool = True) -> Parting:
    """The refusal tokens after `path` and (`shared_too`), where the harmful replies they miss open most often with a
    token that opens harmless replies too, that token with the refusal tokens after it: tokens `refusal_tokens`
    finds there that also pass `held_out_margin` among the replies opening with it (harmful replies that go on as
    the answers do, "Here is" beside "Here are", are no refusals)."""
    counts = count_openings(tokenizer, harmful, harmless, path, phrases)
    tokens = refusal_tokens(counts)
    shared = sorted((token for token, n in counts.harmful.items()
                     if token not in tokens and n >= MIN_UNCONFIRMED and counts.harmless.get(token, 0)),
                    key=lambda token: (-counts.harmful[token], token))
    if tokens and shared and shared_too:
        branch = path + shared[:1]
        after = refusal_tokens(count_openings(tokenizer, harmful, harmless, branch, phrases))
        if after and held_out_margin(tokenizer, harmful, harmless, branch, phrases, False) >= MIN_HELD_OUT_MARGIN:
            return Parting(list(path), tokens, shared[0], after)
    return Parting(list(path), tokens)


def refusal_path(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], prefix: list[int],
                 phrases: Sequence[str]) -> Parting:
    """Where refusals part from answers, from the shared prefix on.

    Mostly the first token after the prefix tells them apart, with a shared opening followed one token further
    where only some refusals open with it (`choose_tokens`). When refusals all open with a token that many answers
    open with too ("I can't ..." and "I'd be glad ..."), no first token is far more frequent after harmful prompts;
    then that opening is followed, a token at a time, to where refusals and the answers that share it part. Tokens
    must pass `held_out_margin` there, or none are returned.
    """
    path = list(prefix)
    for _ in range(MAX_BRANCH_TOKENS + 1):
        parting = choose_tokens(tokenizer, harmful, harmless, path, phrases)
        if parting.tokens and held_out_margin(tokenizer, harmful, harmless, path, phrases) >= MIN_HELD_OUT_MARGIN:
            return parting
        counts = count_openings(tokenizer, harmful, harmless, path, phrases)
        if not counts.harmful:
            break
        token, n_opened = max(counts.harmful.items(), key=lambda item: (item[1], -item[0]))
        if n_opened < PREFIX_SHARE * len(harmful):  # refusals do not share one opening: no path to follow
            break
        path.append(token)
    return Parting(list(prefix), [])


def configured_path(tokenizer: Any, openings: Sequence[str], harmful: list[list[int]], harmless: list[list[int]],
                    prefix: list[int]) -> Parting:
    """Where the user's refusal openings (measure.refusal_openings) part from answers, as the replies spell them.

    Their first tokens are the refusal tokens, unless all the openings begin with the same token and that token
    opens the base model's harmless replies too (under `ENRICHMENT` times as often as its harmful ones: "I can't"
    and "I cannot" against answers opening "I'd be glad"); then it is teacher-forced and their next tokens are
    scored, as for a discovered shared opening (up to `MAX_BRANCH_TOKENS` deep). Where only some openings begin
    with such a token ("Je ne peux pas" beside "Désolé", answers opening "Je vais"), it is their shared opening
    (`Parting.shared`). An opening that begins with the reply prefix itself is read after it. No tokens: score the
    openings' first tokens as they are (`chat.refusal_token_ids`).
    """
    sequences = [_after_prefix(tokenizer, text, harmful, prefix) for text in openings]
    stripped = any(seq != spelled(tokenizer, text, harmful, len(prefix)) for seq, text in zip(sequences, openings))
    path, depth = list(prefix), 0
    while depth < MAX_BRANCH_TOKENS:
        tokens = sorted({seq[depth] for seq in sequences if len(seq) > depth})
        if len(tokens) != 1 or any(len(seq) <= depth + 1 for seq in sequences):
            break
        if not _opens_answers(count_openings(tokenizer, harmful, harmless, path, ()), tokens[0]):
            break  # it tells refusals from answers already: score it here
        path.append(tokens[0])
        depth += 1
    tokens = sorted({seq[depth] for seq in sequences if len(seq) > depth})
    counts = count_openings(tokenizer, harmful, harmless, path, ())
    shared = [token for token in tokens if _opens_answers(counts, token)
              and any(len(seq) > depth + 1 for seq in sequences if seq[depth] == token)]
    if len(tokens) > 1 and len(shared) == 1:
        after = sorted({seq[depth + 1] for seq in sequences if len(seq) > depth + 1 and seq[depth] == shared[0]})
        return Parting(path, [token for token in tokens if token != shared[0]], shared[0], after)
    if depth == 0 and not stripped:
        return Parting(list(prefix), [])
    return Parting(path, tokens)


def _opens_answers(counts: OpeningCounts, token: int) -> bool:
    """Whether `token` opens harmless replies at least a quarter as often as harmful ones (`ENRICHMENT`)."""
    harmful_rate = counts.harmful.get(token, 0) / max(counts.n_harmful, 1)
    harmless_rate = counts.harmless.get(token, 0) / max(counts.n_harmless, 1)
    return harmless_rate > 0 and harmful_rate < ENRICHMENT * harmless_rate


def _after_prefix(tokenizer: Any, text: str, replies: list[list[int]], prefix: list[int]) -> list[int]:
    """An opening's tokens after the reply prefix: an opening that begins with the prefix every reply shares ("I
    can't" where every reply opens "I") loses it; any other is spelled as it would follow the prefix."""
    whole = spelled(tokenizer, text, replies, 0)
    if prefix and len(whole) > len(prefix) and whole[:len(prefix)] == prefix:
        return whole[len(prefix):]
    return spelled(tokenizer, text, replies, len(prefix))


def held_out_margin(tokenizer: Any, harmful: list[list[int]], harmless: list[list[int]], path: list[int],
                    phrases: Sequence[str], shared_too: bool = True) -> float:
    """Refusal tokens (and, `shared_too`, any shared opening) chosen on every other reply, tried on the rest (and the
    other way round): the mean of (share of held-out harmful replies they open) - (share of held-out harmless ones)."""
    margins = []
    for chosen, held in ((0, 1), (1, 0)):
        parting = choose_tokens(tokenizer, harmful[chosen::2], harmless[chosen::2], path, phrases, shared_too)
        margins.append(opened_share(harmful[held::2], parting) - opened_share(harmless[held::2], parting))
    return sum(margins) / len(margins)


def opened_share(replies: list[list[int]], parting: Parting) -> float:
    """The share of the replies that follow the parting's path whose next tokens open like its refusals."""
    n = len(parting.path)
    following = [reply for reply in replies if len(reply) > n and reply[:n] == parting.path]
    opened = sum(reply[n] in parting.tokens or (reply[n] == parting.shared and len(reply) > n + 1
                                               and reply[n + 1] in parting.after_shared) for reply in following)
    return opened / max(len(following), 1)

