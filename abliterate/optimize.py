"""`optimize`: search a parameterized edit that removes refusal with less damage than the paper's, and record it.

The stages, in order:
1. measure (the paper's selection, `abliterate.measure`): candidates, harmless means and the paper's direction;
   an output folder that already holds them is reused, so a stopped search resumes where it was;
2. a multi-objective Optuna search (TPE; Optuna is the well-kept library the leading peer uses too) over
   `abliterate.edit_params.EditParams`, minimizing two forward-pass objectives on the validation prompts with the
   edit applied as hooks (exactly the checkpoint that would be written): the mean refusal probability
   sigmoid(refusal score) on harmful prompts, and the mean next-token KL(base || edited) on harmless prompts. The
   paper's edit and two variants of it are the first trials, so the front is never worse than the paper's point.
   Every finished trial is logged in the output folder, so a stopped search resumes;
3. confirmation by generation on the held-out prompts (`abliterate.confirm`) of the Pareto points with the lowest
   KL among those whose validation refusal is at most the target, and of the paper's edit;
4. the choice: the confirmed point with the least reply KL whose held-out refusal is at most the target (else the
   lowest refusal), or `optimize.trial`; it is written as edit.json, which `apply --direction edit.json` writes.

Written beside measure's files: optimize.json (every trial, the Pareto front, the confirmation, the choice,
timings and trials per second), pareto.png, edit.json + edit_directions.safetensors, trials.jsonl (the study).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from abliterate import progress
from abliterate.activations import encode, kl_divergence, refusal_score
from abliterate.config import Config, OptimizeConfig
from abliterate.edit_params import EDIT_FILE, EditParams, Kernel, hooked_edit, layer_directions, write_edit
from abliterate.errors import UserError
from abliterate.selection import ValidationSet, last_log_probs

log = logging.getLogger(__name__)

OPTIMIZE_FILE = "optimize.json"
PARETO_PLOT = "pareto.png"
TRIALS_LOG = "trials.jsonl"
STUDY_NAME = "abliterate"


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
    layer: int | None = None
    position: int | None = None
    token_text: str = ""
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Search:
    """Everything a trial needs: the model, the validation set and the measured tables."""

    model: Any
    val: ValidationSet
    refusal_ids: list[int]
    candidates: torch.Tensor  # [position, layer, d_model] float64
    harmless_mean: torch.Tensor  # [position, layer, d_model] float64
    config: OptimizeConfig
    replies: list[_Replies]  # harmless validation prompts + the base model's greedy replies, in batches


@dataclass
class _Replies:
    """One right-padded batch of prompt + base reply sequences, its scored positions and the base log-probs there.

    Built once, so a trial costs one forward pass and one log-softmax per batch (no per-row work).
    """

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    rows: torch.Tensor  # [tokens] row of every scored position
    columns: torch.Tensor  # [tokens] position predicting each reply token
    base: torch.Tensor  # [tokens, vocab] float32 base log-probs

    @classmethod
    def build(cls, model: Any, batch: list[Any], pad_id: int) -> _Replies:
        width = max(len(item.ids) for item in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, seq]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, seq]
        rows, columns = [], []
        for row, item in enumerate(batch):
            ids[row, : len(item.ids)] = torch.tensor(item.ids)
            mask[row, : len(item.ids)] = 1
            rows += [row] * len(item.positions)
            columns += list(item.positions)
        replies = cls(ids, mask, torch.tensor(rows), torch.tensor(columns), torch.empty(0))
        replies.base = replies.log_probs(model)
        return replies

    @torch.inference_mode()
    def log_probs(self, model: Any) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        logits = model(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       use_cache=False).logits  # [batch, seq, vocab]
        return torch.log_softmax(logits[self.rows.to(device), self.columns.to(device)].float(), dim=-1).cpu()


# ---- the search space ----

def suggest(trial: Any, n_layers: int, n_positions: int, config: OptimizeConfig) -> EditParams:
    """One point of the search space, drawn by an Optuna trial (the ranges are the peer's, widened to all layers)."""
    top = float(n_layers - 1)

    def kernel(name: str) -> Kernel:
        peak = trial.suggest_float(f"{name}.peak_weight", 0.5, config.max_weight)
        return Kernel(peak_weight=peak, peak_layer=trial.suggest_float(f"{name}.peak_layer", 0.0, top),
                      min_weight=peak * trial.suggest_float(f"{name}.min_fraction", 0.0, 1.0),
                      width=trial.suggest_float(f"{name}.width", 1.0, max(1.0, float(n_layers))))

    choices = {"per_layer": config.search_per_layer, "projected": config.search_projected,
               "preserve_norm": config.search_preserve_norm}
    flags = {name: trial.suggest_categorical(name, [False, True]) if allowed else False
             for name, allowed in choices.items()}
    return EditParams(position=trial.suggest_int("position", -n_positions, -1),
                      direction_index=trial.suggest_float("direction_index", 0.0, top),
                      mixer=kernel("mixer"), mlp=kernel("mlp"),
                      embed_weight=trial.suggest_float("embed_weight", 0.0, config.max_weight), **flags)


def seeded_trials(layer: int, position: int, n_layers: int, config: OptimizeConfig) -> list[dict[str, Any]]:
    """The paper's edit (every writer at weight 1, one direction) as trial values, and its two variants."""
    full = {"peak_weight": 1.0, "peak_layer": 0.0, "min_fraction": 1.0, "width": float(n_layers)}
    paper = {"position": position, "direction_index": float(layer), "embed_weight": 1.0,
             **{f"{kind}.{key}": value for kind in ("mixer", "mlp") for key, value in full.items()}}
    flags = [name for name, allowed in (("per_layer", config.search_per_layer), ("projected", config.search_projected),
                                        ("preserve_norm", config.search_preserve_norm)) if allowed]
    paper.update({name: False for name in flags})
    variants = [{**paper, name: True} for name in ("projected", "preserve_norm") if name in flags]
    return [paper, *variants]


# ---- objectives ----

@torch.inference_mode()
def objectives(search: _Search, params: EditParams) -> tuple[float, float, float]:
    """(mean harmful refusal probability, mean per-token harmless reply KL, share of harmful prompts refusing).

    The refusal probability is sigmoid(refusal score) at the last prompt position of the harmful validation prompts;
    the KL is KL(base || edited) at every position of the base model's own greedy replies to the harmless validation
    prompts (teacher-forced, so still forward passes only): the first reply token's distribution, which is the
    paper's KL, and every later one, which is what decides whether harmless replies stay the same.
    """
    directions = layer_directions(params, search.candidates, search.harmless_mean)
    with hooked_edit(search.model, params, directions):
        log_probs = last_log_probs(search.model, search.val.batches)  # [n_harmful, vocab]
        edited = [replies.log_probs(search.model) for replies in search.replies]  # each [tokens, vocab]
    scores = refusal_score(log_probs, search.refusal_ids)  # [n_harmful]
    per_token = torch.cat([kl_divergence(r.base, new) for r, new in zip(search.replies, edited)])  # [tokens]
    kl = float(per_token.mean())
    if not bool(torch.isfinite(scores).all()) or not math.isfinite(kl):
        return math.inf, math.inf, 1.0
    return float(torch.sigmoid(scores).mean()), kl, float((scores > 0).double().mean())


def _study(out_dir: Path, config: OptimizeConfig) -> Any:
    """An in-memory study holding every trial already logged in `out_dir` (so a stopped search resumes).

    Optuna's journal file fsyncs on every suggested value (about 1000 fsyncs for 60 trials of this search, 3.4 s on
    the development VM: as long as the search itself), so finished trials are logged one JSON line each instead
    (`TRIALS_LOG`, flushed, not fsynced) and replayed with Optuna's own `create_trial` on resume: a crash loses at
    most the trial in flight.
    """
    import optuna
    from optuna.distributions import json_to_distribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.n_startup_trials,
                                         multivariate=True)
    study = optuna.create_study(study_name=STUDY_NAME, sampler=sampler, directions=["minimize", "minimize"])
    log_path = out_dir / TRIALS_LOG
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash: that trial is simply run again
            continue
        study.add_trial(optuna.trial.create_trial(
            params=row["params"], values=row["values"], user_attrs=row["user_attrs"],
            distributions={name: json_to_distribution(text) for name, text in row["distributions"].items()}))
    return study


def _log_trial(out_dir: Path, trial: Any) -> None:
    """Append one finished trial to the study's log (see `_study`)."""
    from optuna.distributions import distribution_to_json

    row = {"number": trial.number, "params": trial.params, "values": trial.values, "user_attrs": trial.user_attrs,
           "distributions": {name: distribution_to_json(d) for name, d in trial.distributions.items()}}
    with (out_dir / TRIALS_LOG).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def search(study: Any, state: _Search, paper: tuple[int, int], n_layers: int, n_positions: int,
           out_dir: Path) -> float:
    """Run the trials the study still lacks; returns the seconds they took."""
    from optuna.trial import TrialState

    config = state.config
    if not study.trials:
        for values in seeded_trials(paper[0], paper[1], n_layers, config):
            study.enqueue_trial(values)
    done = len([t for t in study.trials if t.state == TrialState.COMPLETE])
    remaining = max(0, config.n_trials - done)
    start = time.perf_counter()
    for _ in progress.track(range(remaining), "optimizing the edit (trials)"):
        trial = study.ask()
        params = suggest(trial, n_layers, n_positions, config)
        refusal, kl, refusing = objectives(state, params)
        trial.set_user_attr("refusing_share", refusing)
        _log_trial(out_dir, study.tell(trial, [refusal, kl]))
    elapsed = time.perf_counter() - start
    if remaining:
        log.info("%d trials in %.1f s (%.1f trials/s).", remaining, elapsed, remaining / max(elapsed, 1e-9))
    return elapsed


def params_of(trial: Any, n_layers: int, n_positions: int, config: OptimizeConfig) -> EditParams:
    """The EditParams a finished trial stands for (its recorded values replayed through the search space)."""
    import optuna

    fixed = optuna.trial.FixedTrial(trial.params)
    return suggest(fixed, n_layers, n_positions, config)


# ---- choosing ----

def confirm_order(trials: list[Any], pareto: list[int], paper: int, config: OptimizeConfig) -> list[int]:
    """The trials to confirm: the lowest-KL Pareto points meeting the target on validation, then the paper's."""
    by_number = {t.number: t for t in trials}
    front = sorted((by_number[n] for n in pareto), key=lambda t: t.values[1])
    meeting = [t.number for t in front if t.user_attrs.get("refusing_share", 1.0) <= config.target_refusal]
    if not meeting:  # none meets the target on validation: confirm the least refusing points instead
        meeting = [t.number for t in sorted(front, key=lambda t: t.values[0])]
    chosen = meeting[: config.n_confirm]
    if config.trial >= 0 and config.trial not in chosen:
        if config.trial not in by_number:
            raise UserError(f"optimize.trial {config.trial} is not a finished trial (0..{len(trials) - 1}); see "
                            f"{OPTIMIZE_FILE} for the trials.")
        chosen.append(config.trial)
    return chosen + ([paper] if paper not in chosen else [])


def choose(confirmed: list[dict[str, Any]], config: OptimizeConfig) -> dict[str, Any]:
    """`optimize.trial` if set, else the least reply KL among those at or under the target refusal, else the least
    refusing (ties broken by KL)."""
    if config.trial >= 0:
        return next(c for c in confirmed if c["trial"] == config.trial)
    meeting = [c for c in confirmed if c["harmful_refusal"] <= config.target_refusal]
    if meeting:
        return min(meeting, key=lambda c: (c["reply_kl"], -c["identical_share"]))
    log.warning("No confirmed edit reaches harmful refusal <= %.2f held out; shipping the least refusing one.",
                config.target_refusal)
    return min(confirmed, key=lambda c: (c["harmful_refusal"], c["reply_kl"]))


def trial_rows(trials: list[Any], pareto: list[int]) -> list[dict[str, Any]]:
    """Every finished trial as JSON rows: its values, whether it is on the front, its raw parameters."""
    front = set(pareto)
    return [{"trial": t.number, "refusal": t.values[0], "kl": t.values[1],
             "refusing_share": t.user_attrs.get("refusing_share"), "pareto": t.number in front, "params": t.params}
            for t in trials if t.values is not None]


def write_outputs(out_dir: Path, payload: dict[str, Any], params: EditParams, directions: torch.Tensor) -> Path:
    """optimize.json, pareto.png and the chosen edit (edit.json + its directions)."""
    from abliterate.plots import plot_pareto

    meta = {"trial": payload["chosen"]["trial"], "confirmation": payload["chosen"], "model": payload["model"]}
    edit_path = write_edit(out_dir, params, directions, meta)
    (out_dir / OPTIMIZE_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    plot_pareto(payload["trials"], payload["chosen"]["trial"], payload["paper_trial"], out_dir / PARETO_PLOT,
                title=f"{payload['model']}: refusal vs KL")
    return edit_path


def default_edit_path(out_dir: Path) -> Path:
    return Path(out_dir) / EDIT_FILE


def encode_validation(tokenizer: Any, harmful: list[str], harmless: list[str], batch_size: int) -> Any:
    """Harmful and harmless validation texts in shared batches, and which rows are harmful."""
    texts = harmful + harmless
    is_harmful = torch.tensor([True] * len(harmful) + [False] * len(harmless))  # [n]
    return encode(tokenizer, texts, batch_size), is_harmful


# ---- the whole job ----

def optimize(source: str, out_dir: Path, config: Config) -> OptimizeResult:
    """Measure (or reuse the measurement in `out_dir`), search, confirm, choose and record the edit."""
    from safetensors.torch import load_file

    from abliterate.direction import DIRECTION_JSON, load_direction
    from abliterate.measure import CANDIDATES_FILE, measure
    from abliterate.model import load_model

    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not ((out_dir / CANDIDATES_FILE).is_file() and (out_dir / DIRECTION_JSON).is_file()):
        measure(source, out_dir, config)
    else:
        log.info("Reusing the measurement in %s (resuming).", out_dir)
    timings["measure_s"] = time.perf_counter() - start
    paper = load_direction(out_dir / DIRECTION_JSON)
    if paper.layer is None or paper.position is None:
        raise UserError("optimize starts from a measured direction with a layer and position; a reference direction "
                        "without them (measure.use_reference) cannot seed the search. Drop --use-reference.")
    tables = load_file(str(out_dir / CANDIDATES_FILE))
    start = time.perf_counter()
    model, tokenizer = load_model(source, config.model)
    state, held = _prepare(model, tokenizer, config, tables["candidates"], tables["harmless_mean"])
    timings["prepare_s"] = time.perf_counter() - start
    n_positions, n_layers, _ = state.candidates.shape
    study = _study(out_dir, config.optimize)
    timings["search_s"] = search(study, state, (paper.layer, paper.position), n_layers, n_positions, out_dir)
    trials = [t for t in study.trials if t.values is not None]
    pareto = sorted(t.number for t in study.best_trials)
    paper_trial = _paper_trial(trials, seeded_trials(paper.layer, paper.position, n_layers, config.optimize)[0])
    start = time.perf_counter()
    confirmed = []
    for number in progress.track(confirm_order(trials, pareto, paper_trial, config.optimize), "confirming edits"):
        confirmed.append({"trial": number, **_confirm_trial(state, tokenizer, held, study.trials[number])})
    chosen = choose(confirmed, config.optimize)
    timings["confirm_s"] = time.perf_counter() - start
    params = params_of(study.trials[chosen["trial"]], n_layers, n_positions, config.optimize)
    directions = layer_directions(params, state.candidates, state.harmless_mean)
    n_run = len(trials)
    payload = {"model": paper.meta.get("model", source), "objectives": ["harmful refusal probability (validation)",
               "harmless next-token KL (validation)"], "n_trials": n_run, "paper_trial": paper_trial,
               "pareto": pareto, "trials": trial_rows(trials, pareto), "confirmation": confirmed, "chosen": chosen,
               "chosen_params": params.to_dict(), "target_refusal": config.optimize.target_refusal,
               "timings_s": timings,
               "trials_per_s": (n_run / timings["search_s"]) if timings["search_s"] > 0 else None}
    edit_path = write_outputs(out_dir, payload, params, directions)
    return OptimizeResult(out_dir=out_dir, edit_path=edit_path, chosen_trial=chosen["trial"], paper_trial=paper_trial,
                          params=params.to_dict(), confirmation=confirmed, n_trials=n_run, timings_s=timings,
                          layer=paper.layer, position=paper.position, token_text=paper.meta.get("token_text", ""))


def _paper_trial(trials: list[Any], values: dict[str, Any]) -> int:
    """The number of the trial that ran the paper's edit (the first seeded one)."""
    for trial in trials:
        if all(trial.params.get(key) == value for key, value in values.items()):
            return trial.number
    return trials[0].number


def _confirm_trial(state: _Search, tokenizer: Any, held: Any, trial: Any) -> dict[str, Any]:
    from abliterate.confirm import confirm

    n_positions, n_layers, _ = state.candidates.shape
    params = params_of(trial, n_layers, n_positions, state.config)
    directions = layer_directions(params, state.candidates, state.harmless_mean)
    figures = confirm(state.model, tokenizer, lambda: hooked_edit(state.model, params, directions), held)
    return {**figures, "validation_refusal": trial.values[0], "validation_kl": trial.values[1],
            "validation_refusing_share": trial.user_attrs.get("refusing_share")}


def _prepare(model: Any, tokenizer: Any, config: Config, candidates: torch.Tensor,
             harmless_mean: torch.Tensor) -> tuple[_Search, Any]:
    """The validation set (filtered like measure's) with the base replies, and the held-out prompts."""
    from abliterate.chat import format_instructions, refusal_token_ids, stop_token_ids
    from abliterate.confirm import held_out
    from abliterate.generation import pad_token_id
    from abliterate.metrics import REFUSAL_SETS, batches
    from abliterate.prompts import prompt_sets

    sets = prompt_sets(config.prompts)
    refusal_ids = list(refusal_token_ids(tokenizer, config.measure.refusal_openings))
    harmful = format_instructions(tokenizer, [p.text for p in sets.harmful_val], config.model)
    harmless = format_instructions(tokenizer, [p.text for p in sets.harmless_val], config.model)
    size = config.measure.batch_size
    scores = refusal_score(last_log_probs(model, encode(tokenizer, harmful + harmless, size)), refusal_ids)  # [n]
    if config.measure.filter_prompts:  # as measure: harmful prompts the base refuses, harmless ones it answers
        n_harmful = len(harmful)
        harmful = [t for t, score in zip(harmful, scores[:n_harmful]) if score > 0]
        harmless = [t for t, score in zip(harmless, scores[n_harmful:]) if score < 0]
        if not harmful or not harmless:
            raise UserError("No validation prompt is left after the refusal filter; set measure.filter_prompts = "
                            "false or check the chat template (--chat-template).")
    harmful_batches, harmless_batches = encode(tokenizer, harmful, size), encode(tokenizer, harmless, size)
    val = ValidationSet(harmful_batches, harmless_batches, torch.ones(len(harmful), dtype=torch.bool),
                        last_log_probs(model, harmless_batches), torch.empty(0))
    stop_ids = list(stop_token_ids(tokenizer, model.generation_config))
    pad_id = pad_token_id(tokenizer, stop_ids)
    phrases, tokens, gen_size = REFUSAL_SETS[config.eval.refusal_set], config.optimize.confirm_tokens, config.eval.batch_size
    replies = held_out(model, tokenizer, [], harmless, stop_ids, pad_id, phrases, tokens, gen_size)
    reply_batches = [_Replies.build(model, list(batch), pad_id) for batch in batches(replies.scored, size)]
    state = _Search(model, val, refusal_ids, candidates.to(torch.float64), harmless_mean.to(torch.float64),
                    config.optimize, reply_batches)
    held = held_out(model, tokenizer, format_instructions(tokenizer, [p.text for p in sets.harmful_eval], config.model),
                    format_instructions(tokenizer, [p.text for p in sets.harmless_eval], config.model), stop_ids,
                    pad_id, phrases, tokens, gen_size)
    return state, held


# ---- as a step of `run`, and for the model card ----

def describe_edit(params: dict[str, Any], chosen: dict[str, Any], paper_trial: int, n_trials: int) -> str:
    """A Markdown paragraph for the model card: which edit shipped, with what parameters and figures."""
    p = EditParams.from_dict(params)
    direction = ("each layer's own candidate direction" if p.per_layer
                 else f"one direction at fractional layer index {p.direction_index:.3f}")
    kernels = "; ".join(f"{name}: weight {k.peak_weight:.3f} at layer {k.peak_layer:.2f}, falling to {k.min_weight:.3f} "
                        f"at distance {k.width:.2f}" for name, k in (("attention/mixer", p.mixer), ("MLP", p.mlp)))
    shipped = "the paper's single-direction edit" if chosen["trial"] == paper_trial else f"trial {chosen['trial']}"
    return (f"Shipped: an optimized edit ({shipped} of a {n_trials}-trial multi-objective search, `abliterate "
            f"optimize`), not the paper's full-strength edit everywhere. Direction: {direction}, position "
            f"{p.position}{', harmless-mean component removed (projected)' if p.projected else ''}. Ablation weights "
            f"per writer kind ({kernels}; embedding {p.embed_weight:.3f}). Every residual writer was edited "
            f"T <- T - w (T.u) u with u = r (normalize(g * r) behind a post-norm), a rank-one change per matrix"
            f"{'; then every d_model write vector was rescaled to its original length (norm-preserving)' if p.preserve_norm else ''}. "
            f"Held out, by generation ({chosen['max_new_tokens']} new tokens, greedy): harmful refusal "
            f"{chosen['harmful_refusal']:.2f}, harmless replies identical to the base model's "
            f"{chosen['identical_share']:.0%}, per-token KL over the base model's replies {chosen['reply_kl']:.4f}. "
            "The parameters are in abliterate/measure/edit.json.")


def optimize_work(model: str, config: Config) -> Any:
    """`run --optimize`'s first step: `optimize` in the step folder; returns what `run` and the card read."""
    def work(folder: Path) -> dict:
        found = optimize(model, folder, config)
        chosen = next(c for c in found.confirmation if c["trial"] == found.chosen_trial)
        scores = json.loads((folder / "scores.json").read_text())
        return {"direction": EDIT_FILE, "layer": found.layer, "position": found.position,
                "token_text": found.token_text, "used_reference": False,
                "n_prompts": {k: v for k, v in scores.get("prompt_counts", {}).items() if k.startswith("harm")},
                "optimized": describe_edit(found.params, chosen, found.paper_trial, found.n_trials)}
    return work
