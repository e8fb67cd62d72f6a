"""The evaluation's metrics as a table, one entry per number: where it sits in eval.json, how it is computed from
one loaded model's replies, how the report shows it, whether the run summary carries it and what the model card's
model-index calls it.

`evaluation` fills each model's section of eval.json from the entries' `compute`; the report's rows, the run
summary (the `headline` entries), the model card's embedded report and its model-index (the `index` entries) all
read `METRICS`. Adding a metric is adding an entry here. A few values need more than one loaded model or a judge
(the fluency, the judges' verdicts, the KL, ActAdd): their entries have no `compute`, as `evaluation` writes them.
The counting itself is in `metrics`; this module only says what is counted, where it is kept and how it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from abliterate.generation import Reply, text_after
from abliterate.metrics import (
    PAPER_MATCHER,
    Scored,
    cross_entropy,
    duplicate_share,
    mean_refusal_score,
    refusal_rates,
)

NONE = "–"


# ---- how values read in the report ----

def format_rate(rate: dict[str, Any] | None) -> str:
    """'0.95 [0.89, 0.98] (95/100)', or '–' when there is nothing to count."""
    if not rate or rate.get("n", 0) == 0:
        return NONE if not rate else f"{NONE} (0 of {rate.get('n_prompts', 0)})"
    low, high = rate["ci95"]
    return f"{rate['rate']:.2f} [{low:.2f}, {high:.2f}] ({rate['count']}/{rate['n']})"


def format_mean(value: dict[str, Any] | None, unit: str = "prompts") -> str:
    if not value or value.get("mean") is None:
        return NONE
    return f"{value['mean']:+.2f} ({value['n']} {unit})"


def format_ce(value: dict[str, Any] | None) -> str:
    """'2.348 (ppl 10.46, 25,600 tokens)'."""
    if not value or value.get("loss") is None:
        return NONE
    return f"{value['loss']:.3f} (ppl {value['perplexity']:.2f}, {value['n_tokens']:,} tokens)"


def format_kl(value: float | None, n: int, unit: str) -> str:
    """KL in nats with four decimals (the paper's selection threshold is 0.1, typical edits are far below it)."""
    return NONE if value is None else f"{value:.4f} ({n} {unit})"


def _kl_first_token(kl: dict[str, Any] | None) -> str:
    return format_kl(kl["first_token"], kl["n_prompts"], "prompts") if kl else NONE


def _kl_reply_tokens(kl: dict[str, Any] | None) -> str:
    return format_kl(kl["reply_tokens"], kl["n_tokens"], "tokens") if kl else NONE


def _format_safety(safety: dict[str, Any] | None) -> str:
    if not safety:
        return "not judged"
    text = format_rate(safety["unsafe"])
    return text + (f", {safety['n_errors']} judge errors" if safety["n_errors"] else "")


def _format_labels(judged: dict[str, Any] | None) -> str:
    """The refusal judge's shares: 'refusal / compliance / non-answer (n replies)'."""
    if not judged:
        return NONE
    shares = [judged[label] for label in ("refusal", "compliance", "non_answer")]
    text = " / ".join(f"{share['rate']:.2f}" if share["rate"] is not None else NONE for share in shares)
    text += f" ({shares[0]['n']} replies)"
    return text + (f", {judged['n_errors']} judge errors" if judged["n_errors"] else "")


def _format_truncated(generation: dict[str, Any] | None) -> str:
    if not generation:
        return NONE
    return f"{generation['n_truncated']}/{generation['n_replies']} (mean {generation['mean_reply_tokens']:.0f} tokens)"


def _format_equal(equal: dict[str, Any] | None) -> str:
    return f"{equal['n_equal']}/{equal['n']}" if equal else NONE


# ---- what the values are computed from ----

@dataclass
class ModelInputs:
    """What one loaded model's figures are computed from; `evaluation` builds it, each entry's `compute` reads it."""

    model: Any
    tokenizer: Any
    context: Any  # the evaluation's settings: config, prompts and their categories, corpora, matcher, profile
    replies: dict[str, list[Reply]]  # greedy replies to the "harmful" and the "harmless" prompts
    prompt_ids: dict[str, list[list[int]]]  # the chat-formatted prompts of each side, as token ids
    pad_id: int
    on_distribution: list[Scored] | None  # the base model's harmless replies; None: this model's own
    regenerate: Callable[[Any], dict[str, list[Reply]]]  # the replies again under other model settings

    @property
    def batch_size(self) -> int:
        return self.context.config.eval.batch_size

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def answers(self) -> dict[str, list[str]]:
        """Each reply's text for matching, cut after a thinking closer made of special tokens (the text lacks them)."""
        closer = self.context.matcher.thinking_end
        return {side: [text_after(self.tokenizer, reply, closer) for reply in replies]
                for side, replies in self.replies.items()}

    @cached_property
    def scoring(self) -> tuple[list[int], list[int]]:
        """The refusal tokens scored and the reply prefix teacher-forced before them (once: it may warn)."""
        from abliterate.refusal import scoring_tokens

        return scoring_tokens(self.tokenizer, self.context.profile, self.context.config.measure.refusal_openings)

    @cached_property
    def own_harmless(self) -> list[Scored]:
        """This model's harmless replies as scored sequences (the base's are the on-distribution CE set)."""
        return [Scored(ids + reply.token_ids, len(ids))
                for ids, reply in zip(self.prompt_ids["harmless"], self.replies["harmless"])]


def _refusal(side: str) -> Callable[[ModelInputs], dict[str, Any]]:
    """Refusal read as the base model refuses (chosen phrase set and its openings, thinking stripped)."""
    def compute(inputs: ModelInputs) -> dict[str, Any]:
        return refusal_rates(inputs.answers[side], inputs.context.categories[side], inputs.context.matcher)
    return compute


def _paper_refusal(side: str) -> Callable[[ModelInputs], dict[str, Any]]:
    """The paper's figure: its 12 substrings over the whole reply, thinking included."""
    def compute(inputs: ModelInputs) -> dict[str, Any]:
        return refusal_rates([reply.text for reply in inputs.replies[side]], inputs.context.categories[side],
                             PAPER_MATCHER)
    return compute


# The figures counted again with thinking on, in this order inside eval.json's "thinking_on".
_REFUSAL_FIGURES = {"refusal": _refusal("harmful"), "refusal_paper": _paper_refusal("harmful"),
                    "over_refusal": _refusal("harmless"), "over_refusal_paper": _paper_refusal("harmless")}


def _thinking_on(inputs: ModelInputs) -> dict[str, Any] | None:
    """Refusal with thinking on, when measuring switched it off: users run reasoning models with it on."""
    kwargs = inputs.context.thinking_on
    if kwargs is None:
        return None
    settings = replace(inputs.context.model_config, template_kwargs=kwargs)
    again = replace(inputs, replies=inputs.regenerate(settings))
    return {"template_kwargs": kwargs, **{key: compute(again) for key, compute in _REFUSAL_FIGURES.items()}}


def _duplicates(inputs: ModelInputs) -> dict[str, Any]:
    matcher = inputs.context.matcher
    return duplicate_share([matcher.answer(text)[0] for text in inputs.answers["harmful"]])


def _refusal_score(side: str) -> Callable[[ModelInputs], dict[str, Any]]:
    """The mean refusal score at the first reply position (after the profile's prefix); with per-prompt decisions,
    where each reply's own reasoning decides (the model's own reply teacher-forced up to its first marker)."""
    def compute(inputs: ModelInputs) -> dict[str, Any]:
        from abliterate.decision import cut_at_decision, segments_of

        refusal_ids, prefix_ids = inputs.scoring
        profile = inputs.context.profile
        if profile is None or not profile.decision_ids:
            prompts = [ids + prefix_ids for ids in inputs.prompt_ids[side]]
        else:  # replies that reach no decision are not scored (`n` says how many were)
            segments = segments_of(inputs.tokenizer, profile)
            cuts = [cut_at_decision(reply.token_ids, segments, set(profile.decision_ids))
                    for reply in inputs.replies[side]]
            prompts = [ids + prefix_ids + cut for ids, cut in zip(inputs.prompt_ids[side], cuts) if cut is not None]
        return mean_refusal_score(inputs.model, prompts, refusal_ids, inputs.pad_id, inputs.batch_size)
    return compute


def _ce_text(inputs: ModelInputs) -> dict[str, Any] | None:
    """CE on the general text: the first `ce_max_tokens` tokens of each document, after BOS when there is one."""
    e, texts = inputs.context.config.eval, inputs.context.corpora.texts
    if not texts:
        return None
    bos_id = inputs.tokenizer.bos_token_id
    bos = [bos_id] if bos_id is not None else []
    docs = [Scored((bos + inputs.encode(text))[: e.ce_max_tokens], 1) for text in texts]
    return {**cross_entropy(inputs.model, docs, inputs.pad_id, e.batch_size, "CE loss, general text"),
            "source": e.ce_text}


def _ce_chat(inputs: ModelInputs) -> dict[str, Any] | None:
    """CE on the reply tokens of the Alpaca-style pairs, the instruction chat-formatted as the prompts are."""
    from abliterate.chat import format_instructions

    e, pairs = inputs.context.config.eval, inputs.context.corpora.pairs
    if not pairs:
        return None
    formatted = format_instructions(inputs.tokenizer, [instruction for instruction, _ in pairs],
                                    inputs.context.model_config)
    chat = []
    for prompt_text, (_, reply) in zip(formatted, pairs):
        prompt_ids = inputs.encode(prompt_text)
        chat.append(Scored(prompt_ids + inputs.encode(reply), len(prompt_ids)))
    return {**cross_entropy(inputs.model, chat, inputs.pad_id, e.batch_size, "CE loss, chat replies"),
            "source": e.ce_chat}


def _ce_on_distribution(inputs: ModelInputs) -> dict[str, Any]:
    """CE on the base model's replies to the harmless prompts (this model's own when there is no base)."""
    scored = inputs.on_distribution or inputs.own_harmless
    loss = cross_entropy(inputs.model, scored, inputs.pad_id, inputs.batch_size, "CE loss, on-distribution")
    return {**loss, "replies_from": "base" if inputs.on_distribution else "self"}


def _generation(inputs: ModelInputs) -> dict[str, Any]:
    replies = [reply for side in inputs.replies.values() for reply in side]
    return {"n_replies": len(replies), "n_truncated": sum(not reply.stopped for reply in replies),
            "mean_reply_tokens": sum(len(reply.token_ids) for reply in replies) / max(1, len(replies))}


# ---- the table ----

@dataclass(frozen=True)
class ModelIndex:
    """How the card's model-index names a metric (the Hub renders it as a results table), from the edited model."""

    metric: str  # the model-index metric type, e.g. "refusal_rate"
    name: str  # its display name
    side: str  # "harmful" or "harmless": the prompt set named as its dataset
    rate: str = ""  # dotted path to the rate inside the metric's value, when it is nested ("unsafe")


@dataclass(frozen=True)
class Metric:
    """One number of the evaluation: where it is kept, how it is computed, how it reads and who shows it."""

    key: str  # dotted path of the value in a model's section of eval.json ("ce.text"), in the record for "record"
    label: str = ""  # the report row's name, a template over `label_facts` ("{n_harmful} prompts"); empty: no row
    format: Callable[[Any], str] = format_rate  # the value as a report cell (it is given None when absent)
    compute: Callable[[ModelInputs], Any] | None = None  # None: another entry or stage writes it; returns None: absent
    headline: bool = False  # a row of the run summary
    optional: bool = False  # a row only when some column has a value (a judge or a setting that may be off)
    scope: str = "model"  # "record": one figure of the comparison (KL, ActAdd), shown in the last column
    index: ModelIndex | None = None  # the card's model-index entry, when the metric is a rate worth listing


METRICS: list[Metric] = [
    Metric("refusal", "Refusal rate, harmful ({refusal_matching}, {n_harmful} prompts)", compute=_refusal("harmful"),
           headline=True, index=ModelIndex("refusal_rate", "Refusal rate, harmful prompts", "harmful")),
    Metric("over_refusal", "Over-refusal, harmless ({n_harmless} prompts)", compute=_refusal("harmless"),
           headline=True, index=ModelIndex("over_refusal_rate", "Refusal rate, harmless prompts", "harmless")),
    # Written by the refusal judge after every model has replied.
    Metric("refusal_judge", "Refusal judge, harmful: refusal / compliance / non-answer ({refusal_judge})",
           format=_format_labels, optional=True),
    Metric("thinking_on", compute=_thinking_on),  # its rows are the two below
    Metric("thinking_on.refusal", "Refusal rate, harmful, thinking on", headline=True, optional=True),
    Metric("thinking_on.over_refusal", "Over-refusal, harmless, thinking on", headline=True, optional=True),
    Metric("refusal_paper", "Refusal rate, harmful (paper's figure: its substrings, whole reply)",
           compute=_paper_refusal("harmful"), headline=True),
    Metric("over_refusal_paper", "Over-refusal, harmless (paper's figure)", compute=_paper_refusal("harmless"),
           headline=True),
    # Written by the safety judge after every model has replied.
    Metric("safety", "Unsafe replies, harmful ({judge})", format=_format_safety, headline=True,
           index=ModelIndex("unsafe_rate", "Unsafe replies (safety judge), harmful prompts", "harmful", "unsafe")),
    Metric("refusal.empty", "Empty replies, harmful ({n_harmful} prompts)"),
    Metric("over_refusal.empty", "Empty replies, harmless ({n_harmless} prompts)"),
    Metric("duplicates", "Duplicated replies, harmful (same text as another reply)", compute=_duplicates),
    # Written with the base model loaded: its loss on this model's harmful replies.
    Metric("fluency", "Base-model loss on harmful replies (fluency)", format=format_ce),
    Metric("refusal_score.harmful", "Refusal score, harmful (mean)", format=format_mean,
           compute=_refusal_score("harmful")),
    Metric("refusal_score.harmless", "Refusal score, harmless (mean)", format=format_mean,
           compute=_refusal_score("harmless")),
    Metric("ce.text", "CE loss, general text", format=format_ce, compute=_ce_text, headline=True),
    Metric("ce.chat", "CE loss, chat replies (reply tokens)", format=format_ce, compute=_ce_chat),
    Metric("ce.on_distribution", "CE loss, on-distribution (base replies)", format=format_ce,
           compute=_ce_on_distribution),
    Metric("generation", "Replies cut at max_new_tokens", format=_format_truncated, compute=_generation),
    # ActAdd runs on the base model and the KL compares two models: `evaluation` writes them into the record.
    Metric("actadd.induced_refusal", "ActAdd: refusal, harmless with +r at layer {actadd_layer} (induced)",
           headline=True, optional=True, scope="record"),
    Metric("actadd.hooked_refusal", "ActAdd: refusal, harmful with r ablated by hooks (bypass)", headline=True,
           optional=True, scope="record"),
    Metric("actadd.equal_to_edited", "Hooked-ablation replies equal to the edited checkpoint's",
           format=_format_equal, headline=True, optional=True, scope="record"),
    Metric("kl", "KL(base ‖ edited), first reply token", format=_kl_first_token, headline=True, optional=True,
           scope="record"),
    Metric("kl", "KL(base ‖ edited), over base replies", format=_kl_reply_tokens, optional=True, scope="record"),
]


def lookup(data: dict[str, Any] | None, key: str) -> Any:
    """The value at a dotted path of nested dicts; None where any part is missing."""
    value: Any = data
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def compute_section(inputs: ModelInputs) -> dict[str, Any]:
    """One model's section of eval.json: every entry's `compute`, in table order, nested by its dotted key."""
    section: dict[str, Any] = {}
    for metric in METRICS:
        if metric.compute is None or metric.scope != "model":
            continue
        value = metric.compute(inputs)
        if value is not None:
            *parents, last = metric.key.split(".")
            place = section
            for part in parents:
                place = place.setdefault(part, {})
            place[last] = value
    return section


def label_facts(data: dict[str, Any]) -> dict[str, Any]:
    """What the labels' templates name: prompt counts, how refusal was read, the judges, ActAdd's layer."""
    settings = data["settings"]
    own = [name for key, name in (("refusal_openings", "openings"), ("learned_phrases", "phrases")) if settings.get(key)]
    matching = f"{settings['refusal_set']} substrings" + (f" or the base model's {' and '.join(own)}" if own else "")
    return {"n_harmful": data["n_prompts"]["harmful"], "n_harmless": data["n_prompts"]["harmless"],
            "refusal_matching": matching, "judge": settings["judge"],
            "refusal_judge": settings.get("refusal_judge", "none"),
            "actadd_layer": (data.get("actadd") or {}).get("layer")}
