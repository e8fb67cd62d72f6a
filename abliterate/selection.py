"""Choosing the refusal direction among the candidates: the paper's three scores, its filters, and a fast search.

For every candidate r (one per end-of-instruction position and layer):
- bypass: mean refusal score on harmful validation prompts with r ablated at every layer (lower is better);
- KL: mean KL(base || ablated) of the harmless validation prompts' next-token distribution (at the scored
  position and at each position that predicts a token of a teacher-forced reply prefix);
- induce: mean refusal score on harmless validation prompts with the raw r added at its own layer's input.
Candidates from the last layers, with KL above the limit, with induce < 0 or with any NaN are discarded
(MeasureConfig), and the lowest bypass that passes is chosen.

Only the last positions' logits matter, so every pass runs the output layer on those positions alone and the base
logits are computed once. The search is pruned without changing its result: candidates from discarded layers are
not scored, every other candidate's bypass is (harmful prompts only), and the KL and induce passes visit them in
order of bypass; once one passes every filter no candidate with a higher bypass can be chosen, so their KL and
induce scores are not needed (`MeasureConfig.score_all` scores everything, for the full figure).
When nothing passes, `NoDirectionError` lists the best candidates, the filter each failed and a hint, instead of
the paper code's bare assert.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from abliterate import progress
from abliterate.activations import (
    Batch,
    encode,
    forward_last,
    forward_tail,
    in_text_order,
    kl_divergence,
    refusal_score,
    score_positions,
)
from abliterate.config import MeasureConfig
from abliterate.errors import UserError
from abliterate.hooks import ablate_direction, add_direction

log = logging.getLogger(__name__)

# A side of the prompt filter must keep at least this many prompts (and this share of them) to go on.
MIN_KEPT_PROMPTS = 2
MIN_KEPT_FRACTION = 0.1
INDUCE_NOT_SCORED = "induce not scored (a lower bypass passed first)"
KL_NOT_SCORED = "KL and induce not scored (a lower bypass passed first)"
WRONG_TEMPLATE_HINT = ("this usually means the chat template is wrong (check --chat-template and --system-prompt) "
                       "or the refusal openings do not match how this model refuses (measure.refusal_openings)")


@dataclass
class CandidateScore:
    """The scores of one candidate direction and the filters it failed (empty when it passes)."""

    position: int  # counted from the end of the prompt: -1 is the last token
    layer: int
    bypass: float
    kl: float
    induce: float = math.nan  # NaN when the induce pass was pruned (it could not change the choice)
    failed: list[str] = field(default_factory=list)
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for key in ("bypass", "kl", "induce"):
            values[key] = None if math.isnan(values[key]) else values[key]  # JSON has no NaN
        return values


def layer_cutoff(n_layers: int, max_layer_fraction: float) -> int:
    """The first discarded layer: int(fraction * n_layers), as the paper (layers 0..cutoff-1 are kept)."""
    return int(max_layer_fraction * n_layers)


def failed_filters(score: CandidateScore, n_layers: int, config: MeasureConfig, induce_known: bool = True) -> list[str]:
    """The names of the filters `score` fails; the induce filter is only judged once induce is known."""
    failed = []
    values = [score.bypass, score.kl] + ([score.induce] if induce_known else [])
    if any(math.isnan(value) for value in values):
        failed.append("nan score")
    cutoff = layer_cutoff(n_layers, config.max_layer_fraction)
    if score.layer >= cutoff:
        failed.append(f"layer >= {cutoff}")
    if score.kl > config.kl_max:
        failed.append(f"kl > {config.kl_max:g}")
    if induce_known and config.require_induce and score.induce < 0:
        failed.append("induce < 0")
    return failed


class NoDirectionError(UserError):
    """Every candidate failed a filter; the message lists the best ones and what to try."""

    def __init__(self, message: str, scores: list[CandidateScore]) -> None:
        super().__init__(message)
        self.scores = scores


def nothing_passes_message(scores: list[CandidateScore], n_shown: int = 5) -> str:
    """A readable refusal to choose: the lowest-bypass candidates, the filter each failed, and a hint."""
    ranked = sorted(scores, key=lambda s: (math.isnan(s.bypass), s.bypass))[:n_shown]
    n_scored = sum(not math.isnan(s.bypass) for s in scores)
    lines = [(f"No candidate direction passed the filters ({n_scored} of {len(scores)} scored; the others are "
              "from discarded layers or zero). Best by bypass score:")]
    for s in ranked:
        lines.append(f"  pos {s.position:>3} layer {s.layer:>3}: bypass {s.bypass:.3f} kl {s.kl:.4f} "
                     f"induce {s.induce:.3f}  failed: {', '.join(s.failed) or 'none'}")
    scored = [s.bypass for s in scores if not math.isnan(s.bypass)]
    if scored and min(scored) > 0:
        lines.append(f"No candidate's ablation takes the harmful refusal score below 0 (best {min(scored):.3f}): "
                     "relaxing a filter would ship an edit that leaves refusal in place; this model's refusal is "
                     "not carried by one direction read before its reply.")
    lines.append("Hint: relax the failing filter (measure.kl_max, measure.max_layer_fraction, "
                 "measure.require_induce) or check the chat template (--chat-template); "
                 "--direction-file with --use-reference skips selection.")
    return "\n".join(lines)


def check_kept(side: str, n_kept: int, n_total: int, split: str) -> None:
    """Refuse to go on when the refusal-score filter left too few prompts on one side."""
    needed = max(MIN_KEPT_PROMPTS, math.ceil(MIN_KEPT_FRACTION * n_total))
    if n_kept < needed:
        wanted = "refuses" if side == "harmful" else "does not refuse"
        raise UserError(f"Only {n_kept} of {n_total} {side} {split} prompts are ones the base model {wanted} "
                        f"(at least {needed} needed); {WRONG_TEMPLATE_HINT}. "
                        "To keep every prompt, set measure.filter_prompts = false.")


# ---- the validation prompts and their cached base logits ----

@dataclass
class ValidationSet:
    """Harmful and harmless validation prompts in shared batches, with the base model's cached outputs."""

    batches: list[Batch]  # harmful and harmless rows mixed: the base pass, and one pass for a reference direction
    harmless_batches: list[Batch]  # harmless rows only, for the induce pass
    is_harmful: torch.Tensor  # [n] bool, per text of `batches`
    base_log_probs: torch.Tensor  # [n_harmless, kl_positions, vocab] float32, harmless rows in text order
    base_scores: torch.Tensor  # [n] float64 refusal score of every validation text without any edit
    # The KL is taken over the next-token distributions of the last `kl_positions` positions: the scored position
    # and, with a teacher-forced reply prefix, every position that predicts a prefix token. An edit that keeps the
    # scored position's distribution but stops the model from opening its reply with the prefix is not harmless.
    kl_positions: int = 1
    harmful_batches: list[Batch] = field(default_factory=list)  # harmful rows only, for the bypass pass


@torch.inference_mode()
def last_log_probs(model: Any, batches: list[Batch], description: str = "") -> torch.Tensor:
    """Last-position log-probabilities `[n, vocab]` (float32, CPU) of every text, in text order."""
    items = progress.track(batches, description) if description else batches
    per_batch = [torch.log_softmax(forward_last(model, b).float(), dim=-1).cpu() for b in items]
    return in_text_order(batches, per_batch)


@torch.inference_mode()
def tail_log_probs(model: Any, batches: list[Batch], n_positions: int, description: str = "") -> torch.Tensor:
    """Log-probabilities of the last `n_positions` positions `[n, n_positions, vocab]` (float32, CPU), text order."""
    items = progress.track(batches, description) if description else batches
    per_batch = [torch.log_softmax(forward_tail(model, b, n_positions).float(), dim=-1).cpu() for b in items]
    return in_text_order(batches, per_batch)


def refusal_scores(model: Any, batches: list[Batch], refusal_ids: Sequence[int]) -> torch.Tensor:
    """The refusal score `[n]` of every text, in text order, read at the positions `refusal_ids` needs (the last,
    and the one before it where refusals and answers share an opening)."""
    return refusal_score(tail_log_probs(model, batches, score_positions(refusal_ids)), refusal_ids)


def build_validation_set(model: Any, batches: list[Batch], harmless_batches: list[Batch], is_harmful: torch.Tensor,
                         refusal_ids: Sequence[int], kl_positions: int = 1,
                         harmful_batches: list[Batch] | None = None) -> ValidationSet:
    """Run the base model once over the validation prompts and cache what every candidate is compared with."""
    log_probs = tail_log_probs(model, batches, kl_positions, "base validation pass")  # [n, kl_positions, vocab]
    base_scores = refusal_score(log_probs, refusal_ids)  # [n]
    return ValidationSet(batches, harmless_batches, is_harmful, log_probs[~is_harmful], base_scores, kl_positions,
                         harmful_batches or [])


def encode_validation(model: Any, tokenizer: Any, harmful: list[str], harmless: list[str], batch_size: int,
                      prefix_ids: Sequence[int], refusal_ids: Sequence[int],
                      tails: dict[str, list[int]] | None = None) -> ValidationSet:
    """The validation set of chat-formatted texts, each followed by the shared reply prefix and, with `tails`
    (per-prompt decisions), by its own continuation; the KL reads the prefix's positions too."""
    texts = harmful + harmless
    is_harmful = torch.tensor([True] * len(harmful) + [False] * len(harmless))  # [n]

    def batches(chosen: list[str]) -> list[Batch]:
        return encode(tokenizer, chosen, batch_size, prefix_ids, [tails[t] for t in chosen] if tails else None)

    return build_validation_set(model, batches(texts), batches(harmless), is_harmful, refusal_ids,
                                kl_positions=len(prefix_ids) + 1, harmful_batches=batches(harmful))


# ---- scoring ----

def bypass_score(model: Any, direction: torch.Tensor, val: ValidationSet, refusal_ids: Sequence[int]) -> float:
    """Mean harmful refusal score with `direction` ablated everywhere."""
    with ablate_direction(model, direction):
        if val.harmful_batches:
            scores = refusal_scores(model, val.harmful_batches, refusal_ids)  # [n_harmful]
        else:  # a set built without harmful-only batches: the harmful rows of the shared ones
            scores = refusal_scores(model, val.batches, refusal_ids)[val.is_harmful]  # [n_harmful]
    return float(scores.mean())


def ablated_kl(model: Any, direction: torch.Tensor, val: ValidationSet) -> float:
    """Mean harmless KL(base || ablated) over the KL positions, with `direction` ablated everywhere."""
    with ablate_direction(model, direction):
        log_probs = tail_log_probs(model, val.harmless_batches, val.kl_positions)  # [n_harmless, kl_positions, vocab]
    return float(kl_divergence(val.base_log_probs, log_probs).mean())  # over rows and positions


def bypass_and_kl(model: Any, direction: torch.Tensor, val: ValidationSet,
                  refusal_ids: Sequence[int]) -> tuple[float, float]:
    """Mean harmful refusal score and mean harmless KL(base || ablated) with `direction` ablated everywhere."""
    with ablate_direction(model, direction):
        log_probs = tail_log_probs(model, val.batches, val.kl_positions)  # [n, kl_positions, vocab]
    bypass = refusal_score(log_probs[val.is_harmful], refusal_ids).mean()
    kl = kl_divergence(val.base_log_probs, log_probs[~val.is_harmful]).mean()  # over rows and positions
    return float(bypass), float(kl)


def induce_score(model: Any, vector: torch.Tensor, layer: int, val: ValidationSet,
                 refusal_ids: Sequence[int]) -> float:
    """Mean harmless refusal score with the raw `vector` added at `layer`'s input."""
    with add_direction(model, vector, layer):
        return float(refusal_scores(model, val.harmless_batches, refusal_ids).mean())


def score_candidates(model: Any, candidates: torch.Tensor, val: ValidationSet, refusal_ids: Sequence[int],
                     config: MeasureConfig) -> list[CandidateScore]:
    """Bypass for every candidate `[position, layer, d_model]`, then KL and induce in bypass order until one passes."""
    n_positions, n_layers, _ = candidates.shape
    cutoff = layer_cutoff(n_layers, config.max_layer_fraction)
    scores = [CandidateScore(position=p - n_positions, layer=layer, bypass=math.nan, kl=math.nan,
                             failed=[f"layer >= {cutoff}"])
              for p in range(n_positions) for layer in range(n_layers)]

    def vector(score: CandidateScore) -> torch.Tensor:
        return candidates[score.position + n_positions, score.layer]  # [d_model]

    # Candidates from discarded layers can never be chosen: they are only scored for the full figure.
    wanted = [s for s in scores if s.layer < cutoff or config.score_all]
    for score in progress.track(wanted, "scoring candidates (bypass)"):
        if not bool(vector(score).any()):
            # Every prompt has the same tokens at these positions, so the embeddings (layer 0's input) agree exactly.
            score.failed = ["zero vector"]
            continue
        score.bypass = bypass_score(model, vector(score), val, refusal_ids)
        score.failed = []
    # A zero vector cannot be ablated; with score_all its induce (adding nothing) is still drawn, as the baseline.
    pending = sorted((s for s in wanted if s.failed != ["zero vector"] or config.score_all),
                     key=lambda s: (math.isnan(s.bypass), s.bypass))
    found = False
    for score in progress.track(pending, "scoring candidates (KL, induce)"):
        if found and not config.score_all:
            break
        zero = score.failed == ["zero vector"]
        if not zero:
            score.kl = ablated_kl(model, vector(score), val)
            score.failed = failed_filters(score, n_layers, config, induce_known=False)
            if score.failed and not config.score_all:
                continue
        score.induce = induce_score(model, vector(score), score.layer, val, refusal_ids)
        score.failed = score.failed if zero else failed_filters(score, n_layers, config)
        found = found or not score.failed
    for score in scores:
        if math.isnan(score.kl) and not score.failed:
            score.failed = [KL_NOT_SCORED]
        elif not score.failed and math.isnan(score.induce):
            # Pruned: a candidate with a lower bypass already passed. An empty list would read as a pass.
            score.failed = [INDUCE_NOT_SCORED]
    n_scored = sum(not math.isnan(s.bypass) for s in scores)
    n_kl, n_induced = (sum(not math.isnan(getattr(s, key)) for s in scores) for key in ("kl", "induce"))
    log.info("Scored %d of %d candidates; KL computed for %d, induce for %d.", n_scored, len(scores), n_kl, n_induced)
    return scores


def choose(scores: list[CandidateScore]) -> CandidateScore:
    """The passing candidate with the lowest bypass score, marked `chosen`; NoDirectionError when none passes."""
    passing = [s for s in scores if not s.failed and not math.isnan(s.induce)]  # pruned ones are marked failed
    if not passing:
        raise NoDirectionError(nothing_passes_message(scores), scores)
    best = min(passing, key=lambda s: s.bypass)
    best.chosen = True
    if not best.bypass < 0:
        _warn_refusal_stays(best, scores)
    return best


def _warn_refusal_stays(best: CandidateScore, scores: list[CandidateScore]) -> None:
    """Ablating the chosen direction leaves the mean harmful refusal score positive: the paper's filters can exclude
    every candidate whose ablation removes refusal. Say so, with the best such candidate and the filter it failed."""
    working = sorted((s for s in scores if s.bypass < 0), key=lambda s: s.bypass)
    found = (f"The lowest bypass, {working[0].bypass:.3f} at layer {working[0].layer}, position "
             f"{working[0].position}, failed: {', '.join(working[0].failed)}." if working
             else "No candidate's ablation turns it negative.")
    log.warning("Ablating the chosen direction leaves the harmful prompts' mean refusal score at %.3f (above 0): the "
                "edit is unlikely to remove refusal. %s Try `abliterate optimize` (weights per layer), or relax "
                "measure.kl_max or measure.max_layer_fraction.", best.bypass, found)
