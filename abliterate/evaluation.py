"""`evaluate`: the evaluation suite of an abliterated model, alone or side by side with its base on the same prompts.

For each model: greedy replies to the harmful and harmless evaluation prompts (stopping at the real stop tokens),
read as the base model refuses (`refusal.json` from the measure folder: thinking stripped, the chosen phrase set or
the model's own refusal openings) with the paper's substring figure beside, per category with 95% intervals;
over-refusal on harmless prompts; the share of duplicated harmful replies; the refusal score at the profile's
scored position; the CE loss on up to three sets (general text, Alpaca-style replies, and on-distribution: the BASE
model's own replies to the harmless prompts). When measuring switched thinking off, refusal again with thinking on.
With a base model: KL(base || edited) on the harmless prompts, the base model's loss on each model's harmful replies
(fluency), and with `eval.actadd` the paper's ActAdd completions on the base (+r on harmless, r ablated by hooks on
harmful, compared reply for reply with the edited checkpoint). Then the safety judge and the optional refusal judge.
Everything fails early: the judges' keys, the measure folder, the CE data and the prompt files are checked before
the first token is generated. The figures one loaded model gives are the entries of `metric_table.METRICS`, each
computed there from the replies and the model (`compute_section`); this module loads models, generates and writes
the figures that need two models or a judge.

Memory: models are loaded one at a time. For the KL the base's log-probabilities are recorded before it is
released; for the fluency of the edited replies the base is loaded once more after the edited model is released,
unless ActAdd's hooked replies (scored while the base was loaded) turned out to be exactly the edited replies.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from abliterate.actadd import (
    ActAddDirection,
    actadd_replies,
    actadd_section,
    compare_with_edited,
    load_actadd_direction,
)
from abliterate.config import Config, ModelConfig
from abliterate.corpora import CorpusSets, load_corpora
from abliterate.errors import UserError
from abliterate.generation import (
    Completion,
    Reply,
    check_backend,
    generate_transformers,
    generate_vllm,
    pad_token_id,
    save_completions,
)
from abliterate.hub import is_hub_id, resolve_model
from abliterate.judge import check_judge, judge_completions, resolved_judge
from abliterate.metric_table import ModelInputs, compute_section
from abliterate.metrics import (
    RefusalMatcher,
    Scored,
    cross_entropy,
    kl_to_record,
    matcher_for,
    record_logprobs,
)
from abliterate.openings import thinking_switched_on
from abliterate.refusal import RefusalProfile, load_profile
from abliterate.refusal_judge import check_refusal_judge, label_completions
from abliterate.report import EvalReport, eval_record

log = logging.getLogger(__name__)

@dataclass
class _Run:
    """What one model produced: its report section, its completions and its replies (harmless as scored sequences)."""

    section: dict[str, Any]
    completions: dict[str, list[Completion]]
    harmless_replies: list[Scored]
    replies: dict[str, list[Reply]] = field(default_factory=dict)


@dataclass
class _Context:
    """What every model is evaluated with: the prompts, how replies are read and what the measure folder gave."""

    prompts: dict[str, list[Any]]
    corpora: CorpusSets
    config: Config
    model_config: ModelConfig  # the model settings with the template kwargs used for measuring
    matcher: RefusalMatcher
    profile: RefusalProfile | None
    thinking_on: dict[str, Any] | None  # template kwargs with thinking on, when measuring switched it off
    direction: ActAddDirection | None  # set when ActAdd completions are asked for

    @property
    def categories(self) -> dict[str, list[str]]:
        return {side: [getattr(p, "category", "") or "" for p in items] for side, items in self.prompts.items()}


def evaluate(model: str, config: Config, out_dir: Path | None = None, base: str | None = None,
             measure_dir: Path | None = None) -> EvalReport:
    """Evaluate `model` (and `base` on the same prompts when given); write eval.json, report.md and completions.

    `measure_dir` is the folder `measure` wrote: its refusal.json says how the base model refuses (matched in the
    replies, its refusal tokens scored) and its direction.json is what ActAdd adds and ablates (`eval.actadd`).
    """
    sources = {"base": base, "edited": model} if base else {"model": model}
    _check_inputs(config, sources)
    context = _context(config, measure_dir)
    runs: dict[str, _Run] = {}
    kl, actadd, actadd_run = None, None, None
    # vLLM takes most of the GPU, so its replies are all generated before any transformers model is loaded.
    early = {c: _vllm_replies(s, context) for c, s in sources.items() if s} if config.eval.backend == "vllm" else {}
    first_model, first_tokenizer = _load(base or model, config)
    first = "base" if base else "model"
    runs[first] = _evaluate_one(first_model, first_tokenizer, context, None, early.get(first))
    if context.direction is not None:
        actadd, actadd_run = _actadd(first_model, first_tokenizer, context)
        hooked = actadd_run.replies["harmful"]
        # The hooked replies should be the edited checkpoint's: scored now, they spare loading the base again.
        hooked_fluency = _fluency(first_model, first_tokenizer, context, hooked) if base else None
    if base:
        runs["base"].section["fluency"] = _fluency(first_model, first_tokenizer, context, runs["base"].replies["harmful"])
        pad_id = pad_token_id(first_tokenizer, _stop_ids(first_model.generation_config, first_tokenizer, config))
        base_record = record_logprobs(first_model, runs["base"].harmless_replies, pad_id, config.eval.batch_size)
        del first_model  # before the edited model loads: a model that barely fits must never be held twice
        _release_memory()
        edited_model, edited_tokenizer = _load(model, config)
        _check_same_tokenizer(first_tokenizer, edited_tokenizer)
        kl = kl_to_record(base_record, edited_model, runs["base"].harmless_replies, pad_id, config.eval.batch_size)
        runs["edited"] = _evaluate_one(edited_model, edited_tokenizer, context, runs["base"].harmless_replies,
                                       early.get("edited"))
        del edited_model
        _release_memory()
        edited_harmful = runs["edited"].replies["harmful"]
        if actadd is not None:
            prompts = [p.text for p in context.prompts["harmful"]]
            actadd["equal_to_edited"] = compare_with_edited(prompts, hooked, edited_harmful)
        same = actadd is not None and actadd["equal_to_edited"]["n_equal"] == len(edited_harmful)
        runs["edited"].section["fluency"] = hooked_fluency if same else _base_fluency(base, context, edited_harmful)
    else:
        del first_model
    _release_memory()
    _judge_all(runs, context)
    report = EvalReport(eval_record(sources, runs, kl, actadd, context))
    if out_dir is not None:
        # The ActAdd replies are saved beside the models' (completions_actadd_*.jsonl) for reading, not judged.
        saved = {**runs, "actadd": actadd_run} if actadd_run is not None else runs
        for column, run in saved.items():
            for side, completions in run.completions.items():
                save_completions(Path(out_dir) / f"completions_{column}_{side}.jsonl", completions)
        report.save(Path(out_dir))
    return report


def _check_inputs(config: Config, sources: dict[str, str]) -> None:
    """What would fail after an hour of replies fails now: a missing judge key, vLLM, ActAdd without the base model,
    a mistyped local model folder."""
    _check_services(config)
    if config.eval.actadd and "base" not in sources:
        raise UserError("eval.actadd adds and ablates the direction on the base model and compares the result with "
                        "the edited checkpoint: pass the base model with --base, or drop --actadd.")
    for source in sources.values():
        if not is_hub_id(source):
            resolve_model(source)


def _check_services(config: Config) -> None:
    """The judges' keys and the generation backend (vLLM installed) that the evaluation will call."""
    check_judge(config.eval)
    check_refusal_judge(config.eval)
    check_backend(config.eval.backend)


def _judge_all(runs: dict[str, _Run], context: _Context) -> None:
    """The safety judge and the refusal judge on every model's harmful replies (each in one pass)."""
    e = context.config.eval
    harmful = {column: run.completions["harmful"] for column, run in runs.items()}
    if resolved_judge(e) != "none":
        for column, section in judge_completions(harmful, e).items():
            runs[column].section["safety"] = section
    if e.refusal_judge:
        for column, section in label_completions(harmful, e, lambda reply: context.matcher.answer(reply)[0]).items():
            runs[column].section["refusal_judge"] = section


def _context(config: Config, measure_dir: Path | None) -> _Context:
    """The prompts, the refusal matcher and the measure folder's profile and direction, all checked up front."""
    from abliterate.prompts import prompt_sets

    measure_dir = _measure_folder(measure_dir)
    profile = load_profile(measure_dir) if measure_dir else None
    if profile is None:
        log.warning("No refusal.json (--measure): refusals are read by the %s phrase set alone, which misses a model "
                    "that refuses in other words or another language; pass the folder `abliterate measure` wrote to "
                    "read the model's own refusals too.", config.eval.refusal_set)
    direction = None
    if config.eval.actadd:
        if not measure_dir:
            raise UserError("eval.actadd needs the measured direction: pass the measure folder with --measure DIR.")
        direction = load_actadd_direction(Path(measure_dir))
    measured_kwargs = dict(profile.template_kwargs) if profile else {}
    model_config = replace(config.model, template_kwargs={**measured_kwargs, **config.model.template_kwargs})
    sets = prompt_sets(config.prompts)
    return _Context(
        prompts={"harmful": list(sets.harmful_eval), "harmless": list(sets.harmless_eval)},
        corpora=load_corpora(config.eval), config=config, model_config=model_config,
        matcher=matcher_for(config.eval.refusal_set, profile), profile=profile,
        thinking_on=thinking_switched_on(model_config.template_kwargs), direction=direction,
    )


def _measure_folder(measure_dir: Path | None) -> Path | None:
    """The measure folder `--measure` names: the folder itself, or the one inside a run's output
    (OUT/abliterate/measure); a folder holding neither refusal.json nor direction.json is refused."""
    from abliterate.direction import DIRECTION_JSON
    from abliterate.refusal import REFUSAL_JSON

    if not measure_dir:
        return None
    path = Path(measure_dir)
    if not path.is_dir():
        raise UserError(f"Measure folder {path} does not exist; pass the folder `abliterate measure` wrote to "
                        "--measure.")
    for folder in (path, path / "measure", path / "abliterate" / "measure"):
        if (folder / REFUSAL_JSON).is_file() or (folder / DIRECTION_JSON).is_file():
            return folder
    raise UserError(f"--measure {path} holds no refusal.json or direction.json; pass the folder `abliterate measure` "
                    "wrote (for a run's output, OUT/abliterate/measure).")


def _load(source: str, config: Config) -> tuple[Any, Any]:
    from abliterate.model import load_model

    return load_model(source, config.model)


def _release_memory() -> None:
    """Return a dropped model's memory before the next one loads (callers `del` their reference first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop_ids(generation_config: Any, tokenizer: Any, config: Config) -> list[int]:
    from abliterate.chat import stop_token_ids

    return list(stop_token_ids(tokenizer, generation_config, config.model))


def _check_same_tokenizer(base_tokenizer: Any, edited_tokenizer: Any) -> None:
    """KL and on-distribution CE compare token by token, so both models must share one vocabulary."""
    if base_tokenizer.get_vocab() != edited_tokenizer.get_vocab():
        raise UserError("--base and MODEL have different tokenizers, so their replies cannot be compared token by token; "
                        "pass the model the edit was made from as --base.")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _texts(tokenizer: Any, context: _Context, model_config: ModelConfig | None = None) -> dict[str, list[str]]:
    from abliterate.chat import format_instructions

    settings = model_config or context.model_config
    return {side: format_instructions(tokenizer, [p.text for p in items], settings)
            for side, items in context.prompts.items()}


def _generate(model: Any, tokenizer: Any, context: _Context, model_config: ModelConfig | None = None) -> list[Reply]:
    """Greedy replies to the harmful then the harmless prompts."""
    e = context.config.eval
    texts = _texts(tokenizer, context, model_config)
    stop_ids = _stop_ids(model.generation_config, tokenizer, context.config)
    return generate_transformers(model, tokenizer, texts["harmful"] + texts["harmless"], stop_ids, e.max_new_tokens,
                                 e.batch_size)


def _split(replies: list[Reply], context: _Context) -> dict[str, list[Reply]]:
    n_harmful = len(context.prompts["harmful"])
    return {"harmful": replies[:n_harmful], "harmless": replies[n_harmful:]}


def _evaluate_one(model: Any, tokenizer: Any, context: _Context, on_distribution: list[Scored] | None,
                  replies: list[Reply] | None) -> _Run:
    """Replies (unless already generated) and every figure of the metric table that one loaded model gives.

    `on_distribution` is the base model's harmless replies (None: this model's own); `replies` were generated before.
    """
    pad_id = pad_token_id(tokenizer, _stop_ids(model.generation_config, tokenizer, context.config))
    texts = _texts(tokenizer, context)
    if replies is None:
        replies = _generate(model, tokenizer, context)
    by_side = _split(replies, context)
    inputs = ModelInputs(
        model, tokenizer, context, by_side, {side: [_encode(tokenizer, t) for t in texts[side]] for side in texts},
        pad_id, on_distribution,
        regenerate=lambda settings: _split(_generate(model, tokenizer, context, settings), context),
    )
    section = compute_section(inputs)
    return _Run(section, _completions(context, by_side), inputs.own_harmless, by_side)


def _completions(context: _Context, by_side: dict[str, list[Reply]]) -> dict[str, list[Completion]]:
    """Each side's replies as completions.jsonl lines, beside their prompts and categories."""
    return {
        side: [Completion(p.text, getattr(p, "category", "") or "", r.text, len(r.token_ids), r.stopped)
               for p, r in zip(context.prompts[side], by_side[side])]
        for side in by_side
    }


def _fluency(base_model: Any, tokenizer: Any, context: _Context, harmful: list[Reply]) -> dict[str, Any]:
    """The base model's mean per-token loss on a model's harmful replies: high when they are not fluent."""
    e = context.config.eval
    pad_id = pad_token_id(tokenizer, _stop_ids(base_model.generation_config, tokenizer, context.config))
    prompt_ids = [_encode(tokenizer, text) for text in _texts(tokenizer, context)["harmful"]]
    scored = [Scored(ids + r.token_ids, len(ids)) for ids, r in zip(prompt_ids, harmful)]
    return cross_entropy(base_model, scored, pad_id, e.batch_size, "Base-model loss on harmful replies")


def _base_fluency(base: str, context: _Context, harmful: list[Reply]) -> dict[str, Any]:
    """The fluency of another model's replies, with the base loaded again (never beside the other model)."""
    base_model, base_tokenizer = _load(base, context.config)
    fluency = _fluency(base_model, base_tokenizer, context, harmful)
    del base_model
    _release_memory()
    return fluency


def _actadd(model: Any, tokenizer: Any, context: _Context) -> tuple[dict[str, Any], _Run]:
    """ActAdd completions on the base model: the figures, and the replies (the hooked harmful ones are compared
    with the edit's)."""
    assert context.direction is not None  # evaluate() calls this only with a direction
    e = context.config.eval
    stop_ids = _stop_ids(model.generation_config, tokenizer, context.config)
    replies = actadd_replies(model, tokenizer, _texts(tokenizer, context), context.direction, stop_ids,
                             e.max_new_tokens, e.batch_size)
    section = actadd_section(replies, context.categories, context.matcher, context.direction)
    return section, _Run(section, _completions(context, replies), [], replies)


def _vllm_replies(source: str, context: _Context) -> list[Reply]:
    """Harmful then harmless replies generated by vLLM from the checkpoint folder (model weights never loaded here)."""
    from transformers import GenerationConfig

    from abliterate.hub import resolve_model
    from abliterate.model import load_tokenizer

    config = context.config
    path = resolve_model(source, config.model.revision)
    tokenizer = load_tokenizer(path, config.model)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model config's EOS is all there is
        generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    texts = [text for side in _texts(tokenizer, context).values() for text in side]
    return generate_vllm(path, tokenizer, texts, _stop_ids(generation_config, tokenizer, config), config.eval.max_new_tokens,
                         config.model.dtype, config.model.trust_remote_code, config.eval.tensor_parallel_size)


def check_ready(config: Config) -> None:
    """What evaluation needs (a judge's key, vLLM, its local prompt files) must fail now, not after measuring and
    applying."""
    from abliterate.prompts import load_prompts

    if config.run.skip_eval:
        return
    _check_services(config)
    # A local evaluation file that is missing, empty or unreadable fails now; a Hub set is read when evaluating
    # (measuring needs no network for it).
    for source in (config.prompts.harmful_eval, config.prompts.harmless_eval):
        if not source.startswith(("hf:", "builtin:")):
            load_prompts(source, config.prompts.column)
