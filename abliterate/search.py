"""The search behind `optimize`: the parameter space, the two forward-pass objectives, and a resumable study.

A trial is an `abliterate.edit_params.EditParams` drawn by Optuna's multi-objective TPE sampler (Optuna is the
well-kept library the leading peer uses too). Its objectives are computed on the validation prompts with the edit as
hooks, exactly the checkpoint `apply` would write: the mean refusal probability sigmoid(refusal score) on harmful
prompts and the per-token KL(base || edited) over the base model's greedy replies to harmless prompts. The paper's
edit and two variants of it are enqueued first; the last trials (`optimize.refine_share`) shrink the gentlest
feasible edits along their own weight scale toward the refusal target instead of sampling (`refinement`). Finished
trials are logged in the output folder and replayed on a rerun (`load_study`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate import progress
from abliterate.activations import kl_divergence
from abliterate.config import OptimizeConfig
from abliterate.edit_params import EditParams, Kernel, hooked_edit, layer_directions
from abliterate.selection import ValidationSet, refusal_scores
from abliterate.slides import SlideReading

log = logging.getLogger(__name__)

TRIALS_LOG = "trials.jsonl"
STUDY_NAME = "abliterate"


@dataclass
class SearchState:
    """Everything a trial needs: the model, the validation set and the measured tables."""

    model: Any
    val: ValidationSet
    refusal_ids: Sequence[int]  # a `RefusalTokens` where refusals and answers share an opening
    candidates: torch.Tensor  # [position, layer, d_model] float64
    harmless_mean: torch.Tensor  # [position, layer, d_model] float64
    config: OptimizeConfig
    replies: list[ReplySet]  # harmless validation prompts + the base model's greedy replies, in batches
    slides: SlideReading | None = None  # the second refusal reading, after the opening answers share


@dataclass
class ReplySet:
    """One right-padded batch of prompt + base reply sequences, its scored positions and the base log-probs there.

    Built once, so a trial costs one forward pass and one log-softmax per batch (no per-row work).
    """

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    rows: torch.Tensor  # [tokens] row of every scored position
    columns: torch.Tensor  # [tokens] position predicting each reply token
    targets: torch.Tensor  # [tokens] the base reply's token there (-1: an empty reply, never identical)
    stop_last: torch.Tensor  # [tokens] bool: the reply's stop token, which any stop token matches
    stop_ids: torch.Tensor  # [n_stop]
    base: torch.Tensor  # [tokens, vocab] float32 base log-probs

    @classmethod
    def build(cls, model: Any, batch: list[Any], pad_id: int, stop_ids: list[int]) -> ReplySet:
        width = max(len(item.ids) for item in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [batch, seq]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, seq]
        rows, columns, targets, stop_last = [], [], [], []
        for row, item in enumerate(batch):
            ids[row, : len(item.ids)] = torch.tensor(item.ids)
            mask[row, : len(item.ids)] = 1
            rows += [row] * len(item.positions)
            columns += list(item.positions)
            reply = item.targets or [-1]  # one position per reply token (the first token's for an empty reply)
            targets += reply
            stop_last += [False] * (len(reply) - 1) + [reply[-1] in stop_ids]
        replies = cls(ids, mask, torch.tensor(rows), torch.tensor(columns), torch.tensor(targets),
                      torch.tensor(stop_last), torch.tensor(stop_ids, dtype=torch.long), torch.empty(0))
        replies.base = replies.log_probs(model)
        return replies

    @torch.inference_mode()
    def log_probs(self, model: Any) -> torch.Tensor:
        device = model.get_input_embeddings().weight.device
        logits = model(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       use_cache=False).logits  # [batch, seq, vocab]
        return torch.log_softmax(logits[self.rows.to(device), self.columns.to(device)].float(), dim=-1).cpu()

    def identical(self, log_probs: torch.Tensor) -> torch.Tensor:
        """[batch] bool: whether greedy decoding with these log-probs writes each base reply (as
        `abliterate.confirm.teacher_forced` reads it: the argmax is every reply token, any stop token at its end)."""
        chosen = log_probs.argmax(dim=-1)  # [tokens]
        same = (chosen == self.targets) | (self.stop_last & torch.isin(chosen, self.stop_ids))  # [tokens]
        missed = torch.zeros(self.input_ids.shape[0]).index_add_(0, self.rows, (~same).float())  # [batch]
        return missed == 0


# ---- the search space ----

def suggest(trial: Any, n_layers: int, n_positions: int, config: OptimizeConfig) -> EditParams:
    """One point of the search space, drawn by an Optuna trial (the peer's ranges, widened to all layers and to peak
    weights from 0, so a refinement's shrunk weights stay in range and a writer kind may be left alone)."""
    top = float(n_layers - 1)

    def kernel(name: str) -> Kernel:
        peak = trial.suggest_float(f"{name}.peak_weight", 0.0, config.max_weight)
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


def searched_positions(candidates: list[dict[str, Any]], paper_position: int, n_positions: int) -> int:
    """How many of the last measured positions the search draws from: back to the earliest position where ablating
    one of its candidates turned the harmful validation prompts' mean refusal score negative in measure's scoring
    (`candidates` are scores.json's rows), and at least back to the paper's position. Positions before it never
    removed refusal at full strength, so the search would only spend trials on them; all positions when none did.
    """
    useful = [int(row["position"]) for row in candidates if row.get("bypass") is not None and row["bypass"] < 0]
    if not useful:
        return n_positions
    return min(n_positions, -min(*useful, paper_position))


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
def objectives(search: SearchState, params: EditParams,
               always_kl: bool = False) -> tuple[float, float, float, float | None]:
    """(mean harmful refusal probability, mean per-token harmless reply KL, share of harmful prompts refusing, share
    of harmless replies greedy decoding keeps identical (None where the KL pass is skipped)).

    The refusal probability is sigmoid(refusal score) at the last prompt position of the harmful validation prompts,
    or, where answers share an opening, that the reply refuses there or after that opening (`abliterate.slides`);
    the KL is KL(base || edited) at every position of the base model's own greedy replies to the harmless validation
    prompts (teacher-forced, so still forward passes only): the first reply token's distribution, which is the
    paper's KL, and every later one, which is what decides whether harmless replies stay the same. An infeasible
    edit (its refusing share above the target) gets no KL pass unless `always_kl`: the sampler orders infeasible
    trials by their violation alone, so the KL would be computed for nothing; it is recorded as infinite.
    """
    directions = layer_directions(params, search.candidates, search.harmless_mean)
    with hooked_edit(search.model, params, directions):
        scores = (refusal_scores(search.model, search.val.batches, search.refusal_ids) if search.slides is None
                  else search.slides.scores(search.model, search.refusal_ids))  # [n_harmful]
        if not bool(torch.isfinite(scores).all()):
            return math.inf, math.inf, 1.0, None
        refusing = float((scores > 0).double().mean())
        if refusing > search.config.target_refusal and not always_kl:
            return float(torch.sigmoid(scores).mean()), math.inf, refusing, None
        edited = [replies.log_probs(search.model) for replies in search.replies]  # each [tokens, vocab]
    per_token = torch.cat([kl_divergence(r.base, new) for r, new in zip(search.replies, edited)])  # [tokens]
    kl = float(per_token.mean())
    identical = float(torch.cat([r.identical(new) for r, new in zip(search.replies, edited)]).double().mean())
    return float(torch.sigmoid(scores).mean()), (kl if math.isfinite(kl) else math.inf), refusing, identical


def violation(refusing_share: float, refusal: float, target: float) -> float:
    """The trial's constraint: at most 0 when its refusing share meets the target; above it, the excess plus the
    mean refusal probability, so infeasible trials are ordered by how far they are from shipping."""
    excess = refusing_share - target
    return excess if excess <= 0 else excess + refusal


def pareto_front(trials: list[Any]) -> list[int]:
    """The numbers of the trials no other trial dominates on both objectives, feasible or not (trials without a KL,
    see `objectives`, are left out)."""
    def dominates(a: Any, b: Any) -> bool:
        return all(x <= y for x, y in zip(a.values, b.values)) and a.values != b.values

    scored = [t for t in trials if all(map(math.isfinite, t.values))]
    return sorted(t.number for t in scored if not any(dominates(other, t) for other in scored))


def load_study(out_dir: Path, config: OptimizeConfig) -> Any:
    """An in-memory study holding every trial already logged in `out_dir` (so a stopped search resumes).

    Optuna's journal file fsyncs on every suggested value (about 1000 fsyncs for 60 trials of this search, 3.4 s on
    the development VM: as long as the search itself), so finished trials are logged one JSON line each instead
    (`TRIALS_LOG`, flushed, not fsynced) and replayed with Optuna's own `create_trial` on resume: a crash loses at
    most the trial in flight. The constraints are recomputed from the logged values with the current target (which
    may change between runs without invalidating the trials).
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
        refusing = row["user_attrs"].get("refusing_share", 1.0)
        values = [math.inf if value is None else value for value in row["values"]]  # None: not computed
        study.add_trial(optuna.trial.create_trial(
            params=row["params"], values=values, user_attrs=row["user_attrs"],
            constraints={"refusal": violation(refusing, values[0], config.target_refusal)},
            distributions={name: json_to_distribution(text) for name, text in row["distributions"].items()}))
    return study


def log_trial(out_dir: Path, trial: Any) -> None:
    """Append one finished trial to the study's log (see `load_study`)."""
    from optuna.distributions import distribution_to_json

    row = {"number": trial.number, "params": trial.params, "values": [finite(v) for v in trial.values],
           "user_attrs": trial.user_attrs,
           "distributions": {name: distribution_to_json(d) for name, d in trial.distributions.items()}}
    with (out_dir / TRIALS_LOG).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def search(study: Any, state: SearchState, seeds: list[dict[str, Any]], n_layers: int, n_positions: int,
           out_dir: Path) -> float:
    """Run the trials the study still lacks, `seeds` (trial values) first; returns the seconds they took."""
    from optuna.trial import TrialState

    config = state.config
    if not study.get_trials(deepcopy=False):  # (`study.trials` would deep-copy every trial)
        for values in seeds:
            study.enqueue_trial(values)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    remaining = max(0, config.n_trials - done)
    _say_other_target(study.get_trials(deepcopy=False), config.target_refusal)
    if done > config.n_trials:
        log.warning("The folder already holds %d trials (more than optimize.n_trials = %d); all of them are used, "
                    "none is dropped.", done, config.n_trials)
    start = time.perf_counter()
    for number in progress.track(range(done, done + remaining), "optimizing the edit (trials)"):
        refining = number >= config.n_trials - refine_trials(config)
        step = refinement(study.get_trials(deepcopy=False), config) if refining else None
        if step is not None:
            study.enqueue_trial(step.values, user_attrs={"refines": step.parent, "scale": step.scale,
                                                         "target": config.target_refusal})
        with _seeds_outside_ranges():
            trial = study.ask()
            params = suggest(trial, n_layers, n_positions, config)
        # The seeded edits (the paper's and its variants) always get their KL: the plot and the record show them.
        refusal, kl, refusing, identical = objectives(state, params, always_kl=trial.number < len(seeds))
        trial.set_user_attr("refusing_share", refusing)
        trial.set_user_attr("identical_share", identical)
        trial.set_constraint("refusal", violation(refusing, refusal, config.target_refusal))
        log_trial(out_dir, study.tell(trial, [refusal, kl]))
    elapsed = time.perf_counter() - start
    if remaining:
        log.info("%d trials in %.1f s (%.1f trials/s).", remaining, elapsed, remaining / max(elapsed, 1e-9))
    return elapsed


def refine_trials(config: OptimizeConfig) -> int:
    """How many of the last trials refine (`refinement`) instead of sampling."""
    return round(config.n_trials * config.refine_share)


def _say_other_target(trials: list[Any], target: float) -> None:
    """Say so when the folder's refining trials shrank edits toward another refusal target than this run's (the
    target is not part of the search key: the trials stay valid, their feasibility is read at the new target)."""
    earlier = sorted({t.user_attrs["target"] for t in trials if "target" in t.user_attrs} - {target})
    if earlier:
        log.warning("The refining trials in this folder shrank edits toward refusal target %s; they are read at %s "
                    "now. More trials (--n-trials) refine toward %s.", ", ".join(map(str, earlier)), target, target)


@dataclass
class Refinement:
    """A trial that scales every ablation weight of a feasible trial (`parent`) by `scale`."""

    parent: int
    scale: float
    values: dict[str, Any]


REFINE_FIRST_SCALE = 0.8  # the first shrink of a feasible edit; a failed one is retried halfway back to 1
REFINE_CLOSEST = 0.96  # a scale closer to 1 than this would change the KL too little to spend a trial on
WEIGHT_PARAMS = ("mixer.peak_weight", "mlp.peak_weight", "embed_weight")  # what a refinement scales


def refinement(trials: list[Any], config: OptimizeConfig) -> Refinement | None:
    """The next step of the search's last trials: shrink a feasible edit toward the refusal target.

    The KL of an edit falls with its strength (about as its square) while the refusal rises, so the gentlest version
    of an edit that still meets the target sits on the feasibility boundary along its own weight scale, where the
    sampler rarely lands. A bisection along that one scale: a feasible trial's weights (both kernels' peaks, hence
    their minima, and the embedding's) times 0.8; when every shrink of it so far was infeasible, halfway from the
    largest of them back to 1. A feasible shrink is a feasible trial in its own right and is shrunk in turn. The
    parent is the lowest-KL feasible trial that can still be shrunk; decided from the finished trials alone (their
    `refines` and `scale` attributes), so a resumed search goes on the same way. None when no feasible trial can be.
    """
    done = [t for t in trials if t.values is not None]
    feasible = sorted((t for t in done if math.isfinite(t.values[1])
                       and t.user_attrs.get("refusing_share", 1.0) <= config.target_refusal), key=lambda t: t.values[1])
    numbers = {t.number for t in feasible}
    for parent in feasible:
        children = [t for t in done if t.user_attrs.get("refines") == parent.number]
        if any(t.number in numbers for t in children):  # already shrunk: its feasible child stands for it
            continue
        scale = (1 + max(t.user_attrs["scale"] for t in children)) / 2 if children else REFINE_FIRST_SCALE
        values = dict(parent.params)
        for name in WEIGHT_PARAMS:
            values[name] = values[name] * scale
        # A seeded edit above optimize.max_weight (the paper's weight 1) stays a seed: shrinks stay in the ranges.
        if scale <= REFINE_CLOSEST and all(values[name] <= config.max_weight for name in WEIGHT_PARAMS):
            return Refinement(parent.number, scale, values)
    return None


def params_of(trial: Any, n_layers: int, n_positions: int, config: OptimizeConfig) -> EditParams:
    """The EditParams a finished trial stands for (its recorded values replayed through the search space)."""
    import optuna

    fixed = optuna.trial.FixedTrial(trial.params)
    with _seeds_outside_ranges():
        return suggest(fixed, n_layers, n_positions, config)


@contextmanager
def _seeds_outside_ranges() -> Iterator[None]:
    """Quiet Optuna's warning about a fixed value outside its range: the seeded paper's edit (weight 1) is, by
    design, when optimize.max_weight is below 1 (it is the point the search must not do worse than)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(Fixed parameter|The value) .* out of")
        yield


def finite(value: float) -> float | None:
    """A JSON-safe objective value: None where it was not computed (or not finite)."""
    return value if math.isfinite(value) else None


def trial_rows(trials: list[Any], pareto: list[int]) -> list[dict[str, Any]]:
    """Every finished trial as JSON rows: its values, whether it is on the front, its raw parameters."""
    front = set(pareto)
    return [{"trial": t.number, "refusal": finite(t.values[0]), "kl": finite(t.values[1]),
             "refusing_share": t.user_attrs.get("refusing_share"),
             "identical_share": t.user_attrs.get("identical_share"),
             "pareto": t.number in front, "params": t.params}
            for t in trials if t.values is not None]
