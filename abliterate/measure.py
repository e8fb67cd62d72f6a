"""`measure`: find a chat model's refusal direction and write it, with the evidence, to a folder.

The stages, in order: load the model and its chat template; sample the fit prompts (the evaluation sets are not
loaded); read the base model's own greedy replies for how it refuses (refusal.py); collect mean activations at
every end-of-instruction position and layer input (harmful minus harmless = the candidates); score the candidates
on validation prompts and choose one (or take the reference direction with `use_reference`); write the artifacts:

    refusal.json             how the base model refuses: the shared reply prefix, the refusal tokens, the support
    candidates.safetensors   candidates [position, layer, d_model] and both means, float64
    scores.json              every candidate's scores and filter verdicts, prompt counts, seed, config, versions
    direction.json           the chosen unit direction, layer, position, its token text, scores, model and revision
    direction.safetensors    the same vector, exact float32 (`direction.save_direction`)
    scores.png               bypass, induce and KL against layer, one line per position (the paper's figure)
    reference_cosines.csv    with a reference direction: cosine of every candidate, and per position and layer the
    reference_cosines.png    mean cosine of single harmful activations and the cosine of their normalized mean

Everything is written to a temporary folder beside `out_dir` and moved in when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.activations import SideActivations, difference_of_means, encode, mean_activations
from abliterate.config import Config, to_dict
from abliterate.decision import DECISION_POSITION, decision_tails, scored_with
from abliterate.direction import (
    DIRECTION_JSON,
    DIRECTION_SAFETENSORS,
    Direction,
    load_direction,
    save_direction,
    save_safetensors,
)
from abliterate.errors import UserError
from abliterate.files import check_out_dir, versions
from abliterate.hub import public_model_name
from abliterate.reference import reference_choice, reference_summary, reference_tables, write_reference_csv
from abliterate.refusal import REFUSAL_JSON, RefusalProfile, find_refusal, log_profile, save_profile, separation_auc
from abliterate.selection import (
    CandidateScore,
    NoDirectionError,
    ValidationSet,
    check_kept,
    choose,
    encode_validation,
    layer_cutoff,
    score_candidates,
)
from abliterate.staging import fresh_staging, merge_into

log = logging.getLogger(__name__)

CANDIDATES_FILE = "candidates.safetensors"
SCORES_FILE = "scores.json"
SCORES_PLOT = "scores.png"
REFERENCE_CSV = "reference_cosines.csv"
REFERENCE_PLOT = "reference_cosines.png"
# Every name measure writes into its folder: a folder holding only these is an earlier measurement to replace.
OUTPUT_NAMES = (REFUSAL_JSON, CANDIDATES_FILE, SCORES_FILE, DIRECTION_JSON, DIRECTION_SAFETENSORS, SCORES_PLOT,
                REFERENCE_CSV, REFERENCE_PLOT)


@dataclass
class MeasureResult:
    """What `measure` found and where it wrote it."""

    out_dir: Path
    direction_path: Path
    layer: int | None
    position: int | None
    token_text: str
    scores: list[CandidateScore]
    chosen: dict[str, Any]  # bypass, kl, induce of the direction written (None where not computed)
    used_reference: bool = False
    reference: dict[str, Any] | None = None  # cosine summary when a reference direction was given
    counts: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    refusal: RefusalProfile | None = None  # how the base model refuses, as found (or configured)
    loaded: tuple[Any, Any] | None = field(default=None, repr=False)  # (model, tokenizer), when asked to keep them


@dataclass
class _Fit:
    """Everything measured on one model, before writing."""

    n_layers: int
    d_model: int
    eoi_ids: list[int]  # the candidate positions' tokens: end of instruction, then the shared reply prefix
    refusal_ids: Sequence[int]  # a `RefusalTokens`
    token_texts: dict[int, str]
    harmful: SideActivations
    harmless: SideActivations
    candidates: torch.Tensor  # [position, layer, d_model] float64
    counts: dict[str, int]
    profile: RefusalProfile
    baseline: dict[str, float] = field(default_factory=dict)  # mean refusal score without any edit, per side

    @property
    def n_positions(self) -> int:
        """Candidate positions: the end-of-instruction and prefix tokens, and each prompt's decision when read."""
        return int(self.candidates.shape[0])


def measure(source: str, out_dir: Path, config: Config, keep_model: bool = False) -> MeasureResult:
    """Measure the refusal direction of the model at `source` (local folder or Hub id) into `out_dir`; with
    `keep_model`, the loaded model and tokenizer are returned too (`loaded`), for a caller that goes on with them."""
    from abliterate.model import load_model
    from abliterate.optimize import OUTPUT_NAMES as OPTIMIZE_NAMES
    from abliterate.prompts import prompt_sets

    # --out, prompt files and the reference are checked before the model loads: a typo should not cost a 16 GB load.
    # A folder holding files neither measure nor optimize (which measures into its own) writes is refused.
    check_out_dir(Path(out_dir), force=False, own_names=OPTIMIZE_NAMES)
    sets = prompt_sets(config.prompts, fit_only=True)
    _load_reference(config, None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model(source, config.model)
    timings["load_s"] = time.perf_counter() - start
    reference = _load_reference(config, int(model.config.get_text_config().hidden_size))

    start = time.perf_counter()
    profile = find_refusal(model, tokenizer, [p.text for p in sets.harmful_train],
                           [p.text for p in sets.harmless_train], config.model, config.measure)
    # Measured as refusal was found (thinking off where the template can switch it off); recorded in the config.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                   template_kwargs=profile.template_kwargs))
    timings["discovery_s"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        fit = _fit(model, tokenizer, sets, config, reference, profile)
    except UserError as error:  # the prompt filter kept too few: say how refusal was read
        raise UserError(f"{error} (How refusal was read: {profile.describe()}.)") from None
    timings["activations_s"] = time.perf_counter() - start

    start = time.perf_counter()
    val = _validation_set(model, tokenizer, sets, config, fit)
    fit.baseline = {"bypass": float(val.base_scores[val.is_harmful].mean()),  # what ablating is compared with
                    "induce": float(val.base_scores[~val.is_harmful].mean())}  # what adding is compared with
    try:
        scores, chosen = _select(model, fit, val, config, reference)
    except NoDirectionError as error:
        _write_failure(Path(out_dir), public_model_name(source), config, fit, error.scores, reference)
        raise NoDirectionError(f"{error}\nEvery candidate's scores: {Path(out_dir) / SCORES_FILE} and "
                               f"{Path(out_dir) / SCORES_PLOT}.", error.scores) from None
    timings["scoring_s"] = time.perf_counter() - start

    start = time.perf_counter()
    result = _write(Path(out_dir), public_model_name(source), config, fit, scores, chosen, reference)
    timings["artifacts_s"] = time.perf_counter() - start
    result.timings_s = timings
    result.loaded = (model, tokenizer) if keep_model else None
    return result


# ---- stages ----

def _load_reference(config: Config, d_model: int | None) -> Direction | None:
    if not config.measure.direction_file:
        return None
    return load_direction(config.measure.direction_file, d_model=d_model)


def _fit(model: Any, tokenizer: Any, sets: Any, config: Config, reference: Direction | None,
         profile: RefusalProfile) -> _Fit:
    """Mean activations of both training sides (filtered by the base refusal score when asked) and the candidates.

    Every prompt is followed by the shared reply prefix, so the refusal score is read where refusals and answers
    part. The prefix's tokens are candidate positions like the end-of-instruction tokens: they are the same in
    every prompt, and a model whose replies all open with them may decide to refuse only there.
    """
    from abliterate.chat import end_of_instruction_ids, format_instructions

    eoi_ids = list(end_of_instruction_ids(tokenizer, config.model))
    if not eoi_ids:
        raise UserError("The chat template puts no tokens between the instruction and the reply, so there is no "
                        "end-of-instruction position to measure; pass a chat template with --chat-template.")
    refusal_ids, prefix_ids = profile.scoring()
    eoi_ids += prefix_ids
    # With per-prompt decisions, the position where each prompt's own reasoning decides is a candidate too (last).
    k = len(eoi_ids) + bool(profile.decision_ids)
    m = config.measure
    sides = {}
    # The per-prompt reference cosines are reported for harmful prompts only (where refusal is expected).
    reference_vector = None if reference is None else reference.vector
    for side, prompts, sign in (("harmful", sets.harmful_train, 1), ("harmless", sets.harmless_train, -1)):
        texts = format_instructions(tokenizer, [p.text for p in prompts], config.model)
        scored, tails = scored_with(texts, decision_tails(model, tokenizer, texts, profile, config.model, m))
        batches = encode(tokenizer, scored, m.batch_size, prefix_ids, tails)
        sides[side] = mean_activations(model, batches, k, refusal_ids, keep_sign=sign if m.filter_prompts else 0,
                                       reference=reference_vector if side == "harmful" else None,
                                       description=f"{side} activations")
        if m.filter_prompts or len(scored) < len(texts):
            check_kept(side, sides[side].n_kept, len(texts), "training")
    profile.separation = separation_auc(sides["harmful"].scores.tolist(), sides["harmless"].scores.tolist())
    log_profile(profile)
    candidates = difference_of_means(sides["harmful"].mean, sides["harmless"].mean)  # [position, layer, d_model]
    log.info("Candidates from %d harmful and %d harmless training prompts: %d positions x %d layers.",
             sides["harmful"].n_kept, sides["harmless"].n_kept, candidates.shape[0], candidates.shape[1])
    counts = {"harmful_train": len(sets.harmful_train), "harmless_train": len(sets.harmless_train),
              "harmful_train_kept": sides["harmful"].n_kept, "harmless_train_kept": sides["harmless"].n_kept}
    token_texts = {i - k: tokenizer.decode([token_id]) for i, token_id in enumerate(eoi_ids)}
    if profile.decision_ids:
        token_texts[-1] = DECISION_POSITION
    return _Fit(n_layers=int(candidates.shape[1]), d_model=int(candidates.shape[2]), eoi_ids=eoi_ids,
                refusal_ids=refusal_ids, token_texts=token_texts, harmful=sides["harmful"], harmless=sides["harmless"],
                candidates=candidates, counts={**counts, "refusal_token_ids": len(refusal_ids)}, profile=profile)


def _validation_set(model: Any, tokenizer: Any, sets: Any, config: Config, fit: _Fit) -> ValidationSet:
    """Validation prompts in shared batches with the base outputs cached; filtered like the training prompts."""
    from abliterate.chat import format_instructions

    harmful = format_instructions(tokenizer, [p.text for p in sets.harmful_val], config.model)
    harmless = format_instructions(tokenizer, [p.text for p in sets.harmless_val], config.model)
    fit.counts.update(harmful_val=len(harmful), harmless_val=len(harmless))
    # With per-prompt decisions, a prompt is scored after its own greedy reasoning (and only if it reaches one).
    tails = decision_tails(model, tokenizer, harmful + harmless, fit.profile, config.model, config.measure)
    if tails:
        harmful, harmless = scored_with(harmful, tails)[0], scored_with(harmless, tails)[0]
        check_kept("harmful", len(harmful), fit.counts["harmful_val"], "validation")
        check_kept("harmless", len(harmless), fit.counts["harmless_val"], "validation")

    def encoded(harmful: list[str], harmless: list[str]) -> ValidationSet:
        return encode_validation(model, tokenizer, harmful, harmless, config.measure.batch_size,
                                 fit.profile.scoring()[1], fit.refusal_ids, tails)

    val = encoded(harmful, harmless)
    if config.measure.filter_prompts:
        keep = torch.where(val.is_harmful, val.base_scores > 0, val.base_scores < 0)  # [n]
        texts = harmful + harmless
        kept_harmful = [t for t, k, h in zip(texts, keep, val.is_harmful) if k and h]
        kept_harmless = [t for t, k, h in zip(texts, keep, val.is_harmful) if k and not h]
        check_kept("harmful", len(kept_harmful), len(harmful), "validation")
        check_kept("harmless", len(kept_harmless), len(harmless), "validation")
        if len(kept_harmful) + len(kept_harmless) < len(texts):
            val = encoded(kept_harmful, kept_harmless)
        fit.counts.update(harmful_val_kept=len(kept_harmful), harmless_val_kept=len(kept_harmless))
    return val


def _select(model: Any, fit: _Fit, val: ValidationSet, config: Config,
            reference: Direction | None) -> tuple[list[CandidateScore], dict[str, Any]]:
    """Score the candidates and choose one, or score the reference direction when `use_reference` is set."""
    refusal_ids = fit.refusal_ids
    if config.measure.use_reference and reference is not None:
        return [], reference_choice(model, fit, val, reference)
    scores = score_candidates(model, fit.candidates, val, refusal_ids, config.measure)
    best = choose(scores)
    log.info("Chose layer %d, position %d: bypass %.3f, KL %.4f, induce %.3f.", best.layer, best.position,
             best.bypass, best.kl, best.induce)
    vector = fit.candidates[best.position + fit.n_positions, best.layer]  # [d_model] float64
    return scores, {"vector": vector, "layer": best.layer, "position": best.position, "bypass": best.bypass,
                    "kl": best.kl, "induce": best.induce, "norm": float(torch.linalg.vector_norm(vector))}


# ---- artifacts ----

def _provenance(source: str, config: Config) -> dict[str, Any]:
    return {"model": source, "revision": config.model.revision, "seed": config.prompts.seed,
            "versions": versions(), "config": to_dict(config)}


def _scores_payload(source: str, config: Config, fit: _Fit, scores: list[CandidateScore],
                    chosen: dict[str, Any] | None, reference: dict[str, Any] | None) -> dict[str, Any]:
    m = config.measure
    chosen_json = None if chosen is None else {key: value for key, value in chosen.items() if key != "vector"}
    return {**_provenance(source, config), "n_layers": fit.n_layers, "d_model": fit.d_model,
            "positions": {str(p): text for p, text in fit.token_texts.items()},
            "filters": {"kl_max": m.kl_max, "max_layer_fraction": m.max_layer_fraction,
                        "first_discarded_layer": layer_cutoff(fit.n_layers, m.max_layer_fraction),
                        "require_induce": m.require_induce, "filter_prompts": m.filter_prompts},
            "prompt_counts": fit.counts, "refusal": fit.profile.to_dict(), "chosen": chosen_json, "used_reference": m.use_reference,
            "reference": reference, "candidates": [s.to_dict() for s in scores]}


def _write_diagnostics(folder: Path, source: str, config: Config, fit: _Fit, scores: list[CandidateScore],
                       chosen: dict[str, Any] | None, reference: Direction | None) -> dict[str, Any] | None:
    """candidates.safetensors, scores.json, scores.png and the reference tables: everything but the direction."""
    from abliterate.plots import plot_cosine_heatmap, plot_scores

    save_safetensors(folder / CANDIDATES_FILE, {"candidates": fit.candidates.contiguous(),
                     "harmful_mean": fit.harmful.mean.contiguous(), "harmless_mean": fit.harmless.mean.contiguous()},
                     metadata={"positions": json.dumps(sorted(fit.token_texts)), "model": source})
    summary = None
    if reference is not None:
        tables = reference_tables(fit, reference)
        summary = reference_summary(tables, fit, chosen or {})
        write_reference_csv(folder / REFERENCE_CSV, tables, fit.n_positions)
        plot_cosine_heatmap(tables["candidate_cosine"], folder / REFERENCE_PLOT, token_texts=fit.token_texts)
    save_profile(fit.profile, folder)
    payload = _scores_payload(source, config, fit, scores, chosen, summary)
    (folder / SCORES_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    if scores:
        plot_scores(scores, folder / SCORES_PLOT, title=f"{source}: refusal direction candidates",
                    cutoff_layer=layer_cutoff(fit.n_layers, config.measure.max_layer_fraction),
                    token_texts=fit.token_texts, kl_max=config.measure.kl_max, baseline=fit.baseline)
    return summary


def _write_failure(out_dir: Path, source: str, config: Config, fit: _Fit, scores: list[CandidateScore],
                   reference: Direction | None) -> None:
    """When no candidate passes, still leave the scores and the figure: they show which filter to relax."""
    for stale in (DIRECTION_JSON, DIRECTION_SAFETENSORS):  # an older run's direction must not look like this one's
        (out_dir / stale).unlink(missing_ok=True)
    staging = fresh_staging(out_dir)
    try:
        _write_diagnostics(staging.path, source, config, fit, scores, None, reference)
        staging.release()
        merge_into(staging.path, out_dir)
    finally:
        staging.release()
        shutil.rmtree(staging.path, ignore_errors=True)


def _write(out_dir: Path, source: str, config: Config, fit: _Fit, scores: list[CandidateScore],
           chosen: dict[str, Any], reference: Direction | None) -> MeasureResult:
    staging = fresh_staging(out_dir)
    try:
        summary = _write_diagnostics(staging.path, source, config, fit, scores, chosen, reference)
        position = chosen["position"]
        token_text = fit.token_texts.get(position, "") if position is not None else ""
        meta = {"layer": chosen["layer"], "position": position, "token_text": token_text,
                "scores": {key: chosen[key] for key in ("bypass", "kl", "induce")},
                "candidate_norm": chosen["norm"], "n_layers": fit.n_layers, "model": source,
                "revision": config.model.revision, "seed": config.prompts.seed,
                "method": "reference direction" if config.measure.use_reference else "difference of means"}
        save_direction(staging.path, chosen["vector"], {key: value for key, value in meta.items() if value is not None})
        staging.release()
        merge_into(staging.path, out_dir)
    finally:
        staging.release()
        shutil.rmtree(staging.path, ignore_errors=True)
    chosen_scores = {key: chosen[key] for key in ("bypass", "kl", "induce")}
    return MeasureResult(out_dir=out_dir, direction_path=out_dir / DIRECTION_JSON, layer=chosen["layer"],
                         position=position, token_text=token_text, scores=scores, chosen=chosen_scores,
                         used_reference=config.measure.use_reference, reference=summary, counts=fit.counts,
                         refusal=fit.profile)
