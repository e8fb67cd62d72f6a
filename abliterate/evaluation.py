"""`evaluate`: the evaluation suite of an abliterated model, alone or side by side with its base on the same prompts.

For each model: greedy replies to the harmful and harmless evaluation prompts (stopping at the real stop tokens),
the refusal rate by substring with per-category counts and 95% intervals, over-refusal on harmless prompts, the
refusal score at the first reply position, and the CE loss on up to three sets (general text, Alpaca-style replies,
and on-distribution: the BASE model's own replies to the harmless prompts, so an edit that changes how the model
answers ordinary requests shows up). With a base model, KL(base || edited) on the harmless prompts at the first reply
token and over the base replies' tokens. Then the safety judge on the harmful replies. Everything fails early: the
judge's key, the CE data and the prompt files are checked before the first token is generated.

Memory: models are loaded one at a time, except while the KL is computed, when base and edited are both loaded.
"""

from __future__ import annotations

import gc
import logging
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from abliterate import __version__
from abliterate.config import Config
from abliterate.corpora import CorpusSets, load_corpora
from abliterate.errors import UserError
from abliterate.generation import (
    Completion,
    Reply,
    generate_transformers,
    generate_vllm,
    pad_token_id,
    save_completions,
)
from abliterate.judge import check_judge, judge_name, judge_replies
from abliterate.metrics import REFUSAL_SETS, Rate, Scored, cross_entropy, kl_between, refusal_rates, refusal_score
from abliterate.report import EvalReport

log = logging.getLogger(__name__)

_VERSIONED = ("torch", "transformers", "accelerate", "together")


@dataclass
class _Run:
    """What one model produced: its report section, its completions and its harmless replies as scored sequences."""

    section: dict[str, Any]
    completions: dict[str, list[Completion]]
    harmless_replies: list[Scored]


def evaluate(model: str, config: Config, out_dir: Path | None = None, base: str | None = None) -> EvalReport:
    """Evaluate `model` (and `base` on the same prompts when given); write eval.json, report.md and completions."""
    check_judge(config.eval)  # before any generation: a missing key must not cost an hour of replies
    from abliterate.prompts import prompt_sets

    sets = prompt_sets(config.prompts)
    prompts = {"harmful": list(sets.harmful_eval), "harmless": list(sets.harmless_eval)}
    corpora = load_corpora(config.eval)
    sources = {"base": base, "edited": model} if base else {"model": model}
    runs: dict[str, _Run] = {}
    kl = None
    # vLLM takes most of the GPU, so its replies are all generated before any transformers model is loaded.
    early = {c: _vllm_replies(s, prompts, config) for c, s in sources.items() if s} if config.eval.backend == "vllm" else {}
    if base:
        base_model, base_tokenizer = _load(base, config)
        runs["base"] = _evaluate_one(base_model, base_tokenizer, prompts, corpora, config, None, early.get("base"))
        edited_model, edited_tokenizer = _load(model, config)
        _check_same_tokenizer(base_tokenizer, edited_tokenizer)
        pad_id = pad_token_id(base_tokenizer, _stop_ids(base_model.generation_config, base_tokenizer, config))
        kl = kl_between(base_model, edited_model, runs["base"].harmless_replies, pad_id, config.eval.batch_size)
        del base_model
        _release_memory()
        runs["edited"] = _evaluate_one(edited_model, edited_tokenizer, prompts, corpora, config,
                                       runs["base"].harmless_replies, early.get("edited"))
        del edited_model
        _release_memory()
    else:
        only_model, tokenizer = _load(model, config)
        runs["model"] = _evaluate_one(only_model, tokenizer, prompts, corpora, config, None, early.get("model"))
        del only_model
        _release_memory()
    if config.eval.judge != "none":
        _judge(runs, config)
    report = EvalReport(_record(sources, runs, kl, prompts, config))
    if out_dir is not None:
        for column, run in runs.items():
            for side, completions in run.completions.items():
                save_completions(Path(out_dir) / f"completions_{column}_{side}.jsonl", completions)
        report.save(Path(out_dir))
    return report


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


def _evaluate_one(model: Any, tokenizer: Any, prompts: dict[str, list[Any]], corpora: CorpusSets, config: Config,
                  on_distribution: list[Scored] | None, replies: list[Reply] | None) -> _Run:
    """Replies (unless already generated), refusal rates, refusal scores and CE losses of one loaded model.

    `on_distribution` is the base model's harmless replies (None: this model's own); `replies` come from vLLM.
    """
    from abliterate.chat import format_instructions, refusal_token_ids

    e = config.eval
    stop_ids = _stop_ids(model.generation_config, tokenizer, config)
    pad_id = pad_token_id(tokenizer, stop_ids)
    texts = {side: format_instructions(tokenizer, [p.text for p in items], config.model) for side, items in prompts.items()}
    if replies is None:
        replies = generate_transformers(model, tokenizer, texts["harmful"] + texts["harmless"], stop_ids,
                                        e.max_new_tokens, e.batch_size)
    by_side = {"harmful": replies[: len(texts["harmful"])], "harmless": replies[len(texts["harmful"]):]}
    phrases = REFUSAL_SETS[e.refusal_set]
    section: dict[str, Any] = {}
    for side, key in (("harmful", "refusal"), ("harmless", "over_refusal")):
        categories = [getattr(p, "category", "") or "" for p in prompts[side]]
        section[key] = refusal_rates([r.text for r in by_side[side]], categories, phrases)
    from abliterate.chat import COMMON_OPENINGS

    openings = config.measure.refusal_openings
    refusal_ids = list(refusal_token_ids(tokenizer, openings or list(COMMON_OPENINGS), warn=bool(openings)))
    prompt_ids = {side: [_encode(tokenizer, t) for t in texts[side]] for side in texts}
    section["refusal_score"] = {
        side: _mean_refusal_score(model, prompt_ids[side], refusal_ids, pad_id, e.batch_size) for side in texts
    }
    own = [Scored(ids + r.token_ids, len(ids)) for ids, r in zip(prompt_ids["harmless"], by_side["harmless"])]
    section["ce"] = _ce_losses(model, tokenizer, corpora, on_distribution or own, pad_id, config)
    section["ce"]["on_distribution"]["replies_from"] = "base" if on_distribution else "self"
    section["generation"] = {
        "n_replies": len(replies), "n_truncated": sum(not r.stopped for r in replies),
        "mean_reply_tokens": sum(len(r.token_ids) for r in replies) / max(1, len(replies)),
    }
    completions = {
        side: [Completion(p.text, getattr(p, "category", "") or "", r.text, len(r.token_ids), r.stopped)
               for p, r in zip(prompts[side], by_side[side])]
        for side in prompts
    }
    return _Run(section, completions, own)


def _vllm_replies(source: str, prompts: dict[str, list[Any]], config: Config) -> list[Reply]:
    """Harmful then harmless replies generated by vLLM from the checkpoint folder (model weights never loaded here)."""
    from transformers import GenerationConfig

    from abliterate.chat import format_instructions
    from abliterate.hub import resolve_model
    from abliterate.model import load_tokenizer

    path = resolve_model(source, config.model.revision)
    tokenizer = load_tokenizer(path, config.model)
    try:
        generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the model config's EOS is all there is
        generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    texts = [text for items in prompts.values()
             for text in format_instructions(tokenizer, [p.text for p in items], config.model)]
    return generate_vllm(path, tokenizer, texts, _stop_ids(generation_config, tokenizer, config), config.eval.max_new_tokens,
                         config.model.dtype, config.model.trust_remote_code)


def _mean_refusal_score(model: Any, prompt_ids: list[list[int]], refusal_ids: list[int], pad_id: int,
                        batch_size: int) -> dict[str, Any]:
    """Mean refusal score at the first reply position (the last prompt token), over the prompts."""
    from abliterate.metrics import batches, position_logprobs

    scores: list[float] = []
    sequences = [Scored(ids, len(ids)) for ids in prompt_ids]  # scores only the last position
    for batch in batches(sequences, batch_size):
        last = torch.stack([logprobs[0] for logprobs in position_logprobs(model, batch, pad_id)])  # [batch, vocab]
        scores.extend(refusal_score(last, refusal_ids).cpu().tolist())
    return {"mean": sum(scores) / len(scores) if scores else None, "n": len(scores)}


def _ce_losses(model: Any, tokenizer: Any, corpora: CorpusSets, on_distribution: list[Scored], pad_id: int,
               config: Config) -> dict[str, Any]:
    """CE loss on the general text, the chat replies (reply tokens only) and the on-distribution replies."""
    from abliterate.chat import format_instructions

    e = config.eval
    losses: dict[str, Any] = {}
    if corpora.texts:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        docs = [Scored((bos + _encode(tokenizer, text))[: e.ce_max_tokens], 1) for text in corpora.texts]
        losses["text"] = {**cross_entropy(model, docs, pad_id, e.batch_size, "CE loss, general text"),
                          "source": e.ce_text}
    if corpora.pairs:
        formatted = format_instructions(tokenizer, [instruction for instruction, _ in corpora.pairs], config.model)
        chat = []
        for prompt_text, (_, reply) in zip(formatted, corpora.pairs):
            prompt_ids = _encode(tokenizer, prompt_text)
            chat.append(Scored(prompt_ids + _encode(tokenizer, reply), len(prompt_ids)))
        losses["chat"] = {**cross_entropy(model, chat, pad_id, e.batch_size, "CE loss, chat replies"),
                          "source": e.ce_chat}
    losses["on_distribution"] = cross_entropy(model, on_distribution, pad_id, e.batch_size, "CE loss, on-distribution")
    return losses


def _judge(runs: dict[str, _Run], config: Config) -> None:
    """Safety verdicts on every model's harmful replies, in one pass so identical replies are judged once."""
    pairs = [(c.prompt, c.reply) for run in runs.values() for c in run.completions["harmful"]]
    verdicts = iter(judge_replies(pairs, config.eval))
    for run in runs.values():
        mine = [next(verdicts) for _ in run.completions["harmful"]]
        judged = [v for v in mine if v.unsafe is not None]
        run.section["safety"] = {
            "judge": judge_name(config.eval), "unsafe": Rate(sum(bool(v.unsafe) for v in judged), len(judged)).to_dict(),
            "n_errors": len(mine) - len(judged), "n_short": sum(v.source == "short" for v in mine),
        }
        for completion, verdict in zip(run.completions["harmful"], mine):
            completion.unsafe = verdict.unsafe


def _record(sources: dict[str, str | None], runs: dict[str, _Run], kl: dict[str, Any] | None,
            prompts: dict[str, list[Any]], config: Config) -> dict[str, Any]:
    """The JSON-able evaluation record, with the settings and versions behind every number."""
    e, p = config.eval, config.prompts
    labels = {"base": "Base", "edited": "Edited", "model": "Model"}
    versions = {"abliterate": __version__, "python": platform.python_version()}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    settings = {
        "max_new_tokens": e.max_new_tokens, "backend": e.backend, "refusal_set": e.refusal_set,
        "refusal_phrases": list(REFUSAL_SETS[e.refusal_set]), "judge": judge_name(e) if e.judge != "none" else "none",
        "judge_min_words": e.judge_min_words, "ce_max_tokens": e.ce_max_tokens, "seed": p.seed,
        "harmful_eval": p.harmful_eval, "harmless_eval": p.harmless_eval,
    }
    for run in runs.values():
        run.section.setdefault("safety", None)
    return {
        "columns": list(runs), "labels": {column: labels[column] for column in runs}, "sources": sources,
        "n_prompts": {side: len(items) for side, items in prompts.items()}, "settings": settings,
        "models": {column: run.section for column, run in runs.items()}, "kl": kl, "versions": versions,
    }
