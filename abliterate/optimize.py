"""`optimize`: search a parameterized edit that removes refusal with less damage than the paper's, and record it.

The stages, in order:
1. measure (the paper's selection, `abliterate.measure`): candidates, harmless means and the paper's direction;
   an output folder that already holds them is reused, so a stopped search resumes where it was;
2. the search (`abliterate.search`): multi-objective Optuna TPE over `abliterate.edit_params.EditParams`,
   minimizing the harmful refusal probability and the harmless per-token reply KL on the validation prompts with
   the edit as hooks (exactly the checkpoint that would be written); the paper's edit and two variants of it are
   the first trials, so the front is never worse than the paper's point; the last trials shrink the gentlest
   feasible edits toward the refusal target. Finished trials are logged in the output folder, so a stopped search
   resumes;
3. confirmation on the held-out prompts (`abliterate.confirm`) of the lowest-KL points of the feasible front (the
   trials whose validation refusing share is at most the target), more of the front while none of them meets the
   target, and the paper's edit last: each edit's reply KL and identical share from one teacher-forced pass, its
   refusal by generation (stopped once it refuses too often), in order of KL until one meets the target;
4. the choice: the confirmed point with the least reply KL whose held-out refusal is at most the target (else the
   lowest refusal), or `optimize.trial`; it is written as edit.json, which `apply --direction edit.json` writes.

Written beside measure's files: optimize.json (every trial, the Pareto front, the confirmation, the choice,
timings and trials per second), pareto.png, edit.json + edit_directions.safetensors, trials.jsonl (the study).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate.activations import encode
from abliterate.config import Config, OptimizeConfig
from abliterate.decision import decision_tails, scored_with
from abliterate.edit_params import EDIT_FILE, EDIT_VECTORS, EditParams, hooked_edit, layer_directions, write_edit
from abliterate.errors import UserError
from abliterate.files import check_out_dir, write_atomic
from abliterate.measure import OUTPUT_NAMES as MEASURE_NAMES
from abliterate.refusal import RefusalProfile, load_profile, scoring_tokens
from abliterate.search import (
    TRIALS_LOG,
    ReplySet,
    SearchState,
    finite,
    load_study,
    params_of,
    pareto_front,
    search,
    searched_positions,
    seeded_trials,
    trial_rows,
)
from abliterate.selection import ValidationSet, last_log_probs, refusal_scores

log = logging.getLogger(__name__)

OPTIMIZE_FILE = "optimize.json"
PARETO_PLOT = "pareto.png"
SEARCH_KEY_FILE = "search_key.json"  # what the measurement and the trials in a folder were made with
# Every name optimize writes into its folder (the measurement's too): a folder holding only these is one to continue.
OUTPUT_NAMES = (*MEASURE_NAMES, OPTIMIZE_FILE, PARETO_PLOT, SEARCH_KEY_FILE, TRIALS_LOG, EDIT_FILE, EDIT_VECTORS)


@dataclass
class OptimizeResult:
    """What `optimize` chose and where it wrote it."""

    out_dir: Path
    edit_path: Path
    chosen_trial: int
    paper_trial: int
    params: dict[str, Any]
    confirmation: list[dict[str, Any]]
    n_trials: int
    timings_s: dict[str, float] = field(default_factory=dict)
    trials_per_s: float | None = None  # of the trials this call ran (None when it only replayed earlier ones)
    layer: int | None = None
    position: int | None = None
    token_text: str = ""
    counts: dict[str, int] = field(default_factory=dict)


# ---- choosing ----

def confirm_order(trials: list[Any], feasible: list[int], paper: int,
                  config: OptimizeConfig) -> tuple[list[int], list[int]]:
    """The trials to confirm first: the lowest-KL points of the feasible front (refusing share at most the target on
    validation), else the least refusing trials, and `optimize.trial`. And the reserve: the rest of the feasible
    front in order of KL, confirmed only when none of the first meets the target held out. The paper's edit is in
    neither: it is always confirmed, last (`_confirm_trials`)."""
    by_number = {t.number: t for t in trials}
    if feasible:
        ranked = sorted((by_number[n] for n in feasible), key=lambda t: t.values[1])
    else:  # none meets the target on validation: confirm the least refusing edits instead
        ranked = sorted(trials, key=lambda t: (t.values[0], t.values[1]))
    ranked = [t.number for t in ranked if t.number != paper]
    first = ranked[: config.n_confirm]
    if config.trial >= 0 and config.trial not in first and config.trial != paper:
        if config.trial not in by_number:
            raise UserError(f"optimize.trial {config.trial} is not a finished trial (0..{len(trials) - 1}); see "
                            f"{OPTIMIZE_FILE} for the trials.")
        first.append(config.trial)
    return first, [n for n in ranked[config.n_confirm:] if n not in first] if feasible else []


def write_outputs(out_dir: Path, payload: dict[str, Any], params: EditParams, directions: torch.Tensor) -> Path:
    """optimize.json, pareto.png and the chosen edit (edit.json + its directions)."""
    from abliterate.plots import plot_pareto

    meta = {"trial": payload["chosen"]["trial"], "confirmation": payload["chosen"], "model": payload["model"]}
    edit_path = write_edit(out_dir, params, directions, meta)
    (out_dir / OPTIMIZE_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    plot_pareto(payload["trials"], payload["chosen"]["trial"], payload["paper_trial"], out_dir / PARETO_PLOT,
                title=f"{Path(str(payload['model'])).name}: refusal vs KL")
    return edit_path


# ---- the whole job ----

def optimize(source: str, out_dir: Path, config: Config) -> OptimizeResult:
    """Measure (or reuse the measurement in `out_dir`), search, confirm, choose and record the edit."""
    from abliterate.confirm import choose
    from abliterate.measure import SCORES_FILE
    from abliterate.model import load_model

    out_dir = check_out_dir(Path(out_dir), force=False, own_names=OUTPUT_NAMES)  # before any work
    timings: dict[str, float] = {}
    start = time.perf_counter()
    paper, tables, profile, config, loaded = _measured(source, out_dir, config)
    timings["measure_s"] = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = loaded or load_model(source, config.model)
    state, held = _prepare(model, tokenizer, config, tables["candidates"], tables["harmless_mean"], profile)
    timings["prepare_s"] = time.perf_counter() - start
    n_positions, n_layers, _ = state.candidates.shape
    scores = json.loads((out_dir / SCORES_FILE).read_text())
    n_positions = searched_positions(scores["candidates"], paper.position, n_positions)
    study = load_study(out_dir, config.optimize)
    # get_trials(deepcopy=False) throughout: `study.trials` deep-copies every trial on each access (0.9 s a search).
    n_before = len(study.get_trials(deepcopy=False))  # replayed trials are not part of this run's speed
    seeds = seeded_trials(paper.layer, paper.position, n_layers, config.optimize)
    timings["search_s"] = search(study, state, seeds, n_layers, n_positions, out_dir)
    every = study.get_trials(deepcopy=False)
    n_new = len(every) - n_before
    trials = [t for t in every if t.values is not None]
    pareto = pareto_front(trials)
    feasible = sorted(t.number for t in study.best_trials)  # the front of the trials meeting the target
    paper_trial = _paper_trial(trials, seeds[0])
    start = time.perf_counter()
    first, reserve = confirm_order(trials, feasible, paper_trial, config.optimize)
    confirmed = _confirm_trials(state, tokenizer, held, [every[n] for n in first], [every[n] for n in reserve],
                                every[paper_trial])
    chosen = choose(confirmed, config.optimize)
    timings["confirm_s"] = time.perf_counter() - start
    params = params_of(every[chosen["trial"]], n_layers, n_positions, config.optimize)
    directions = layer_directions(params, state.candidates, state.harmless_mean)
    payload = {"model": paper.meta.get("model", source), "objectives": ["harmful refusal probability (validation)",
               "harmless per-token KL over the base replies (validation)"], "n_trials": len(trials),
               "paper_trial": paper_trial, "pareto": pareto, "feasible_front": feasible,
               "trials": trial_rows(trials, pareto), "confirmation": confirmed, "chosen": chosen,
               "slide_reading": state.slides.to_dict(tokenizer) if state.slides is not None else None,
               "chosen_params": params.to_dict(), "target_refusal": config.optimize.target_refusal,
               "timings_s": timings, "trials_this_run": n_new,
               "trials_per_s": n_new / timings["search_s"] if n_new else None}
    edit_path = write_outputs(out_dir, payload, params, directions)
    return OptimizeResult(out_dir=out_dir, edit_path=edit_path, chosen_trial=chosen["trial"], paper_trial=paper_trial,
                          params=params.to_dict(), confirmation=confirmed, n_trials=len(trials), timings_s=timings,
                          trials_per_s=payload["trials_per_s"],
                          layer=paper.layer, position=paper.position, token_text=paper.meta.get("token_text", ""))


def _measured(source: str, out_dir: Path, config: Config) -> tuple[Any, dict[str, torch.Tensor], Any, Config, Any]:
    """The paper's direction, measure's tables and refusal profile (measured now, or reused from `out_dir` when a
    stopped search resumes), the config with the template settings measure used, and the (model, tokenizer) measure
    loaded (None when reused: loading happens once either way)."""
    from safetensors.torch import load_file

    from abliterate.direction import DIRECTION_JSON, load_direction
    from abliterate.measure import CANDIDATES_FILE, measure

    key = _check_search_key(out_dir, source, config)
    loaded = None
    if not ((out_dir / CANDIDATES_FILE).is_file() and (out_dir / DIRECTION_JSON).is_file()):
        loaded = measure(source, out_dir, config, keep_model=True).loaded
    else:
        log.info("Reusing the measurement in %s (resuming).", out_dir)
    write_atomic(out_dir / SEARCH_KEY_FILE, json.dumps({"key": key}) + "\n")
    paper = load_direction(out_dir / DIRECTION_JSON)
    if paper.layer is None or paper.position is None:
        raise UserError("optimize starts from a measured direction with a layer and position; a reference direction "
                        "without them (measure.use_reference) cannot seed the search. Drop --use-reference.")
    profile = load_profile(out_dir)  # how measure read refusal: the search and its confirmation read it the same way
    if profile is not None and profile.template_kwargs:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                       template_kwargs=profile.template_kwargs))
    return paper, load_file(str(out_dir / CANDIDATES_FILE)), profile, config, loaded


# How the trials' objectives are read, part of the search key: trials scored another way are not resumed.
OBJECTIVES = "refusal at the first reply token and after the answers' opening; per-token reply KL"
# Settings that only extend the search, pick from it or confirm it: a finished search stays valid when they change.
NOT_IN_SEARCH_KEY = {"optimize": ("n_trials", "trial", "n_confirm", "target_refusal"),
                     "prompts": ("harmful_eval", "harmless_eval", "n_eval")}


def search_key(source: str, config: Config) -> str:
    """A hash of everything the measurement and the trials depend on: the model, its loading, the fit prompts, the
    measure settings, the search space and how the objectives are read (`OBJECTIVES`)."""
    import hashlib

    from abliterate.config import to_dict

    settings = to_dict(config)
    kept = {section: {key: value for key, value in settings[section].items()
                      if key not in NOT_IN_SEARCH_KEY.get(section, ())}
            for section in ("model", "prompts", "measure", "optimize")}
    return hashlib.sha256(json.dumps([source, kept, OBJECTIVES], sort_keys=True).encode()).hexdigest()[:16]


def _check_search_key(out_dir: Path, source: str, config: Config) -> str:
    """The folder's search key; a folder that holds a search made with other settings is refused, never resumed."""
    key = search_key(source, config)
    path = out_dir / SEARCH_KEY_FILE
    if path.is_file() and json.loads(path.read_text()).get("key") != key:
        raise UserError(f"{out_dir} holds a search made with another model or other settings (model, prompts, "
                        "measure or search space) or by an earlier version of the search; resuming it would mix the "
                        f"two. Pass another --out, or delete {out_dir} to start again.")
    return key


def _paper_trial(trials: list[Any], values: dict[str, Any]) -> int:
    """The number of the trial that ran the paper's edit (the first seeded one)."""
    for trial in trials:
        if all(trial.params.get(key) == value for key, value in values.items()):
            return trial.number
    return trials[0].number


def _confirm_trials(state: SearchState, tokenizer: Any, held: Any, trials: list[Any], reserve: list[Any],
                    paper: Any) -> list[dict[str, Any]]:
    """The held-out figures of the edits to confirm (`abliterate.confirm.confirm_in_order`), beside their validation
    ones: `trials` (the lowest-KL front points, and `optimize.trial`) first; then, while no edit among them meets the
    target held out, the `reserve` (the rest of the front), `optimize.n_confirm` at a time: the lowest-KL points are
    the closest to the refusal boundary, so the likeliest to miss it held out, and a gentler edit than the paper's
    is usually further down the front. The paper's edit (`paper`, a trial) comes last, generated only when nothing
    met the target with less reply KL than its own. When nothing meets it at all, the least refusing edit ships:
    edits whose generation stopped early (a lower bound) are then generated in full, so it is compared on whole
    figures.
    """
    from abliterate.confirm import confirm, confirm_in_order

    n_positions, n_layers, _ = state.candidates.shape
    config, by_number = state.config, {t.number: t for t in [*trials, *reserve, paper]}

    def edit_of(trial: Any) -> Any:
        params = params_of(trial, n_layers, n_positions, config)
        directions = layer_directions(params, state.candidates, state.harmless_mean)
        return lambda: hooked_edit(state.model, params, directions)

    def confirmed(group: list[Any], bound: float = math.inf) -> list[dict[str, Any]]:
        rows = confirm_in_order(state.model, tokenizer, {t.number: edit_of(t) for t in group}, held,
                                config.target_refusal, config.trial if config.trial >= 0 else None, bound)
        for row, trial in zip(rows, group):
            refusal, kl = map(finite, trial.values)  # None: not computed
            row.update({"validation_refusal": refusal, "validation_kl": kl,
                        "validation_refusing_share": trial.user_attrs.get("refusing_share"),
                        "validation_identical_share": trial.user_attrs.get("identical_share")})
        return rows

    rows = confirmed(trials)
    while reserve and config.trial < 0 and not _met(rows, config):
        rows += confirmed(reserve[: config.n_confirm])
        reserve = reserve[config.n_confirm:]
    rows += confirmed([paper], min((row["reply_kl"] for row in _met(rows, config)), default=math.inf))
    if not _met(rows, config):
        for row in rows:
            if row["refusal_stopped_early"]:
                row.update(confirm(state.model, tokenizer, edit_of(by_number[row["trial"]]), held))
    return rows


def _met(rows: list[dict[str, Any]], config: OptimizeConfig) -> list[dict[str, Any]]:
    """The confirmed rows whose held-out refusal (in both thinking modes) is at most the target."""
    from abliterate.confirm import worst_refusal

    return [row for row in rows if (worst_refusal(row) if worst_refusal(row) is not None else math.inf)
            <= config.target_refusal]


def _prepare(model: Any, tokenizer: Any, config: Config, candidates: torch.Tensor, harmless_mean: torch.Tensor,
             profile: RefusalProfile | None) -> tuple[SearchState, Any]:
    """The validation set (filtered like measure's) with the base replies, and the held-out prompts."""
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.confirm import held_out
    from abliterate.generation import pad_token_id
    from abliterate.metrics import batches, matcher_for
    from abliterate.prompts import prompt_sets
    from abliterate.slides import slide_reading

    sets = prompt_sets(config.prompts)
    refusal_ids, prefix_ids = scoring_tokens(tokenizer, profile, config.measure.refusal_openings)
    harmful = format_instructions(tokenizer, [p.text for p in sets.harmful_val], config.model)
    harmless = format_instructions(tokenizer, [p.text for p in sets.harmless_val], config.model)
    size = config.measure.batch_size
    # With per-prompt decisions, each prompt is scored after its own reasoning (as measure scored it).
    tails = decision_tails(model, tokenizer, harmful + harmless, profile, config.model, config.measure)
    harmful, harmless = scored_with(harmful, tails)[0], scored_with(harmless, tails)[0]

    def encoded(texts: list[str]) -> list[Any]:
        scored, continuations = scored_with(texts, tails)
        return encode(tokenizer, scored, size, prefix_ids, continuations)

    scores = refusal_scores(model, encoded(harmful + harmless), refusal_ids)  # [n]
    harmful_scores = scores[:len(harmful)]  # [n_harmful] base refusal scores
    if config.measure.filter_prompts:  # as measure: harmful prompts the base refuses, harmless ones it answers
        harmless = [t for t, score in zip(harmless, scores[len(harmful):]) if score < 0]
        harmful = [t for t, score in zip(harmful, harmful_scores) if score > 0]
        harmful_scores = harmful_scores[harmful_scores > 0]
        if not harmful or not harmless:
            raise UserError("No validation prompt is left after the refusal filter; set measure.filter_prompts = "
                            "false or check the chat template (--chat-template).")
    harmful_batches, harmless_batches = encoded(harmful), encoded(harmless)
    # `batches` holds the harmful rows only: the harmless side is scored on whole replies (`abliterate.search`).
    val = ValidationSet(harmful_batches, harmless_batches, torch.ones(len(harmful), dtype=torch.bool),
                        last_log_probs(model, harmless_batches), harmful_scores)
    stop_ids = list(stop_token_ids(tokenizer, model.generation_config, config.model))
    pad_id = pad_token_id(tokenizer, stop_ids)
    matcher = matcher_for(config.eval.refusal_set, profile)
    tokens, gen_size = config.optimize.confirm_tokens, config.eval.batch_size
    replies = held_out(model, tokenizer, [], harmless, stop_ids, pad_id, matcher, tokens, gen_size)
    reply_batches = [ReplySet.build(model, list(batch), pad_id, stop_ids) for batch in batches(replies.scored, size)]
    # Per-prompt decisions are read inside each prompt's own reasoning: there is no one answer opening to force.
    slides = None if tails else slide_reading(
        model, tokenizer, harmful, [reply.token_ids for reply in replies.base_harmless], prefix_ids, matcher,
        {"batch_size": size, "stop_ids": stop_ids, "pad_id": pad_id})
    state = SearchState(model, val, refusal_ids, candidates.to(torch.float64), harmless_mean.to(torch.float64),
                        config.optimize, reply_batches, slides)
    return state, _held_out_eval(model, tokenizer, config, sets, (stop_ids, pad_id), matcher)


def _held_out_eval(model: Any, tokenizer: Any, config: Config, sets: Any, stops: tuple[list[int], int],
                   matcher: Any) -> Any:
    """The held-out prompts the confirmation generates on, with the base model's harmless replies."""
    from abliterate.chat import format_instructions
    from abliterate.confirm import held_out
    from abliterate.openings import thinking_switched_on

    harmful_eval = [p.text for p in sets.harmful_eval]
    thinking = thinking_switched_on(config.model.template_kwargs)  # users run a switchable model with thinking on
    return held_out(model, tokenizer, format_instructions(tokenizer, harmful_eval, config.model),
                    format_instructions(tokenizer, [p.text for p in sets.harmless_eval], config.model), *stops,
                    matcher, config.optimize.confirm_tokens, config.eval.batch_size, thinking and format_instructions(
                        tokenizer, harmful_eval, dataclasses.replace(config.model, template_kwargs=thinking)))


# ---- as a step of `run`, and for the model card ----

def shipped_edit(params: dict[str, Any], trial: int, paper_trial: int) -> str:
    """One line for `run`'s summary: which optimized edit shipped, its direction and position."""
    p = EditParams.from_dict(params)
    direction = "each layer's own direction" if p.per_layer else f"direction at layer index {p.direction_index:.2f}"
    name = "the paper's edit" if trial == paper_trial else f"trial {trial}"
    return f"optimized edit ({name}): {direction}, position {p.position}"


def optimize_work(model: str, config: Config) -> Any:
    """`run --optimize`'s first step; returns what `run` and the card read.

    `run` gives each step a fresh folder, so the search itself runs in a working folder beside it that is named by
    everything the trials depend on (not the trial count or `optimize.trial`): an interrupted `run --optimize`
    resumes its search, and a changed setting starts a new one.
    """
    def work(folder: Path) -> dict:
        import shutil

        from abliterate.card import describe_edit

        scratch = folder.parent / f".optimize-{search_key(model, config)}"
        scratch.mkdir(exist_ok=True)
        found = optimize(model, scratch, config)
        shutil.copytree(scratch, folder, dirs_exist_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)
        chosen = next(c for c in found.confirmation if c["trial"] == found.chosen_trial)
        scores = json.loads((folder / "scores.json").read_text())
        return {"direction": EDIT_FILE, "layer": found.layer, "position": found.position,
                "token_text": found.token_text, "used_reference": False,
                "n_prompts": {k: v for k, v in scores.get("prompt_counts", {}).items() if k.startswith("harm")},
                "optimized": describe_edit(found.params, chosen, found.paper_trial, found.n_trials),
                "shipped": shipped_edit(found.params, found.chosen_trial, found.paper_trial)}
    return work
