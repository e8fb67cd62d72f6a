"""The model card (README.md) written beside an abliterated checkpoint, ready for the Hub.

It carries Hub metadata front matter (base_model with base_model_relation, license carried from the base model's
card, the Hub datasets of the prompt sets, tags, library_name, and a model-index with the evaluation results, which
the Hub renders as a results table), embeds the candidate scores figure, says what was done (method, the chosen
layer and position, how many tensors of each kind were edited, whether the output layer was untied), embeds the
evaluation report (base vs edited, with prompt counts) and gives the command that reproduces the checkpoint, with
the install command of the source abliterate came from when there is a public one. A card is published, so it
never contains a local path, a user name or a token: every absolute path is scrubbed before the card is written.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate import metric_table
from abliterate.decision import DECISION_POSITION
from abliterate.files import write_atomic

logger = logging.getLogger(__name__)

TAGS = ("abliterated", "uncensored", "refusal-direction", "abliterate")
# An absolute POSIX path not inside a URL (a URL's path follows "//host", so a preceding ':' '/' or word
# character rules it out), and the token formats of the Hub and of Together.
# Not after "<": "</think>" and "</s>" are closing tokens, not paths.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~<-])(?:~/|/)(?:[\w.+@-]+/)*[\w.+@-]+/?")
_TOKEN = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|tgp_v1_[A-Za-z0-9_-]{20,}|[0-9a-f]{64})\b")


@dataclass
class CardFacts:
    """What the card states; the pipeline fills it from the run's artifacts."""

    base_model: str  # Hub id of the base model; empty when it is a local checkpoint
    model_type: str
    n_layers: int
    layer: int | None  # the layer whose input the direction was read at; None for a supplied reference direction
    position: int | None  # counted from the end of the prompt (-1 = last token)
    edited_counts: dict[str, int]  # kind of residual writer -> number of tensors edited
    command: str  # the command that reproduces the checkpoint, free of local paths
    version: str  # abliterate's version
    base_revision: str = ""
    license: dict[str, str] = field(default_factory=dict)  # license (and license_name/link) of the base
    position_token: str = ""  # text of the token at `position`, when known
    n_prompts: dict[str, int] = field(default_factory=dict)  # e.g. harmful_train -> 128
    untied: bool = False  # the tied output layer was written out with the original embedding
    eval_markdown: str = ""  # the evaluation report (empty when evaluation was skipped)
    name: str = ""  # title of the card; defaults to the base model's name plus "-abliterated"
    used_reference: bool = False  # the direction came from a file (--use-reference), not from selection
    optimized_edit: str = ""  # with `run --optimize`: which edit shipped and its parameters (Markdown)
    datasets: list[str] = field(default_factory=list)  # Hub ids of the prompt sets (hf: sources only)
    eval_results: list[dict] = field(default_factory=list)  # see `eval_results`: one per model-index metric
    figure: str = ""  # path of the candidate scores figure relative to the card, when there is one
    install: str = ""  # the command that installs this abliterate (empty: no public source to point at)
    refusal: dict = field(default_factory=dict)  # how the base model refuses (refusal.json), empty when unknown
    refusal_change: tuple[float, float] | None = None  # harmful refusal of the base and the edited model, evaluated


def refusal_change(data: dict) -> tuple[float, float] | None:
    """(base, edited) harmful refusal rates from eval.json, None where it lacks either."""
    models = data.get("models", {})
    rates = [((models.get(column) or {}).get("refusal") or {}).get("rate") for column in ("base", "edited")]
    return (float(rates[0]), float(rates[1])) if all(isinstance(r, (int, float)) for r in rates) else None


def _warning(change: tuple[float, float] | None) -> str:
    """The card's warning, as the evaluation found it: a model the edit left refusing is not called less likely to."""
    if change is None:
        return ("**Warning**: this model was edited to refuse harmful requests less often than its base (not "
                "evaluated here). Use it for research and apply your own safeguards.")
    base, edited = change
    if edited >= base:
        return (f"**Note**: the edit did not lower harmful refusal in the evaluation below ({base:.2f} -> "
                f"{edited:.2f}), as far as that evaluation reads refusals. Use it for research and apply your own "
                "safeguards.")
    return (f"**Warning**: this model refuses harmful requests less often than its base (harmful refusal {base:.2f} "
            f"-> {edited:.2f} in the evaluation below). Use it for research and apply your own safeguards.")


def hub_dataset(source: str) -> str:
    """The Hub dataset id of a prompt source (`hf:owner/name[/config][@rev][:split][#column]`), else empty."""
    if not source.startswith("hf:"):
        return ""
    name = re.split(r"[@:#]", source[3:], maxsplit=1)[0]
    return "/".join(name.split("/")[:2])


def eval_results(data: dict, harmful_source: str, harmless_source: str) -> list[dict]:
    """The edited model's rates from eval.json as model-index entries: one per metric-table entry with an `index`."""
    column = "edited" if "edited" in data.get("models", {}) else (data.get("columns") or [""])[-1]
    section = data.get("models", {}).get(column) or {}
    sources = {"harmful": harmful_source, "harmless": harmless_source}
    results = []
    for metric in metric_table.METRICS:
        if metric.index is None:
            continue
        value = metric_table.lookup(section, ".".join(filter(None, (metric.key, metric.index.rate))))
        if isinstance(value, dict) and isinstance(value.get("rate"), (int, float)):
            source = sources[metric.index.side]
            results.append({"metric": metric.index.metric, "name": metric.index.name,
                            "value": round(float(value["rate"]), 4), "dataset": hub_dataset(source) or source,
                            "n": value.get("n")})
    return results


def install_command() -> str:
    """How to install the abliterate that is running: its VCS URL and commit, or its release from an index.

    A local checkout or archive has no public source, so it gets no command (the card then shows the run only).
    """
    from importlib import metadata

    try:
        distribution = metadata.distribution("abliterate")
    except metadata.PackageNotFoundError:
        return ""
    direct = distribution.read_text("direct_url.json")
    if not direct:
        return f"pip install abliterate=={distribution.version}"  # installed from a package index
    info = json.loads(direct)
    url, commit = str(info.get("url", "")), (info.get("vcs_info") or {}).get("commit_id")
    return f"pip install git+{url}@{commit}" if commit and url.startswith(("https://", "ssh://")) else ""


def base_license(model_dir: Path, config: dict) -> dict[str, str]:
    """The base model's license from its card's front matter (or its config); empty when unknown."""
    from huggingface_hub.repocard import metadata_load

    found: dict[str, str] = {}
    readme = model_dir / "README.md"
    if readme.is_file():
        try:
            metadata = metadata_load(readme) or {}
        except Exception as error:  # noqa: BLE001 - a broken base card only costs us the license line
            logger.warning("Could not read the base model card's metadata (%s); license left unknown.", error)
            metadata = {}
        found = {key: str(metadata[key]) for key in ("license", "license_name", "license_link") if metadata.get(key)}
    if not found and isinstance(config.get("license"), str):
        found = {"license": config["license"]}
    return found


def scrub(text: str, replacements: dict[str, str] | None = None) -> str:
    """Remove local paths and tokens: known paths become their public names, any other absolute path its last part."""
    home = os.path.expanduser("~")
    for local, public in sorted({**(replacements or {}), home: "~"}.items(), key=lambda item: -len(item[0])):
        if local and local not in ("/", "~"):
            text = text.replace(local, public)
    text = _TOKEN.sub("<redacted>", text)
    return _ABSOLUTE_PATH.sub(lambda match: Path(match.group(0).rstrip("/")).name or "<local path>", text)


def _front_matter(facts: CardFacts, name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type="text-generation", task_name="Refusal", dataset_type=result["dataset"],
                          dataset_name=result["dataset"], metric_type=result["metric"], metric_name=result["name"],
                          metric_value=result["value"]) for result in facts.eval_results]
    # The weights are the base model's, edited: the Hub's model tree lists the output as a fine-tune of its base.
    relation = {"base_model_relation": "finetune"} if facts.base_model else {}
    data = ModelCardData(
        base_model=facts.base_model or None,
        **relation,
        datasets=sorted(set(filter(None, facts.datasets))) or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        model_name=name if results else None,
        eval_results=results or None,
        **facts.license,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _what_was_done(facts: CardFacts) -> list[str]:
    # json.dumps shows a newline or tab token as \n or \t instead of breaking the line.
    token = f" (the token `{json.dumps(facts.position_token)[1:-1]}`)" if facts.position_token else ""
    if facts.position_token == DECISION_POSITION:
        token = " (where each prompt's own reply, teacher-forced, reaches its decision)"
    counts = facts.n_prompts
    fitted = (f"{counts['harmful_train']} harmful and {counts['harmless_train']} harmless instructions"
              if "harmful_train" in counts and "harmless_train" in counts else "harmful and harmless instructions")
    found = ("The refusal direction r was found as in Arditi et al. 2024, *Refusal in Language Models Is Mediated "
             "by a Single Direction* (arXiv:2406.11717): the difference between the mean residual-stream activations "
             f"on {fitted}, read at the input of layer {facts.layer} of "
             f"{facts.n_layers} at position {facts.position} from the end of the prompt"
             f"{' and the shared reply prefix' if facts.refusal.get('prefix') else ''}{token}, chosen among all "
             "layers and positions by how well ablating it bypasses refusal while keeping harmless next-token "
             "distributions close (KL).")
    if facts.layer is None or facts.used_reference:
        where = f" (its best-aligned candidate is layer {facts.layer}, position {facts.position})" \
            if facts.layer is not None else ""
        found = ("The refusal direction r was supplied as a reference direction file (`--use-reference`), not "
                 f"selected on this model{where}, following Arditi et al. 2024 (arXiv:2406.11717); the model has "
                 f"{facts.n_layers} layers.")
    if facts.refusal:
        from abliterate.refusal import RefusalProfile

        found += (" Bypass, induce and the prompt filter read the "
                  f"{RefusalProfile.from_dict(facts.refusal).describe(markdown=True)}.")
    lines = [
        "## What was done",
        "",
        found,
        "",
        facts.optimized_edit or
        ("r was then removed from the weights: every tensor that writes into the residual stream was projected "
         "off r (W <- W - r r^T W, biases likewise), computed in float32 and stored in the original dtype. "
         "Every other tensor is bit-identical to the base model."),
        "",
        "| edited tensors | count |",
        "|---|---:|",
    ]
    lines += [f"| {kind} | {count} |" for kind, count in sorted(facts.edited_counts.items())]
    lines.append(f"| **total** | **{sum(facts.edited_counts.values())}** |")
    if facts.untied:
        lines += ["", ("The base model ties its output layer to the embedding; the output layer is written out "
                       "explicitly with the original weights (`tie_word_embeddings: false`), so only the input side "
                       "changed.")]
    return lines + [""]


def describe_edit(params: dict[str, Any], chosen: dict[str, Any], paper_trial: int, n_trials: int) -> str:
    """A Markdown paragraph for the model card: which optimized edit shipped, with what parameters and figures."""
    from abliterate.edit_params import EditParams

    p = EditParams.from_dict(params)
    direction = ("each layer's own candidate direction" if p.per_layer
                 else f"one direction at fractional layer index {p.direction_index:.3f}")
    kernels = "; ".join(f"{name}: weight {k.peak_weight:.3f} at layer {k.peak_layer:.2f}, falling to {k.min_weight:.3f} "
                        f"at distance {k.width:.2f}" for name, k in (("attention/mixer", p.mixer), ("MLP", p.mlp)))
    shipped = "the paper's single-direction edit" if chosen["trial"] == paper_trial else f"trial {chosen['trial']}"
    on = chosen.get("harmful_refusal_thinking_on")
    thinking_on = "" if on is None else f" ({on:.2f} with thinking on)"
    return (f"Shipped: an optimized edit ({shipped} of a {n_trials}-trial multi-objective search, `abliterate "
            f"optimize`), not the paper's full-strength edit everywhere. Direction: {direction}, position "
            f"{p.position}{', harmless-mean component removed (projected)' if p.projected else ''}. Ablation weights "
            f"per writer kind ({kernels}; embedding {p.embed_weight:.3f}). Every residual writer was edited "
            f"T <- T - w (T.u) u with u = r (normalize(g * r) behind a post-norm), a rank-one change per matrix"
            f"{'; then every d_model write vector was rescaled to its original length (norm-preserving)' if p.preserve_norm else ''}. "
            f"Held out, by generation ({chosen['max_new_tokens']} new tokens, greedy): harmful refusal "
            f"{chosen['harmful_refusal']:.2f}{thinking_on}, harmless replies identical to the base model's "
            f"{chosen['identical_share']:.0%}, per-token KL over the base model's replies {chosen['reply_kl']:.4f}. "
            "The parameters are in abliterate/measure/edit.json.")


def render_card(facts: CardFacts, replacements: dict[str, str] | None = None) -> str:
    """The full README.md text, scrubbed of local paths (`replacements` maps known paths to public names)."""
    base = facts.base_model or f"A local {facts.model_type} checkpoint"
    name = facts.name or (facts.base_model.split("/")[-1] if facts.base_model else facts.model_type) + "-abliterated"
    link = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model else base
    at = f" at revision `{facts.base_revision}`" if facts.base_revision else ""
    evaluation = facts.eval_markdown.strip() or ("Evaluation was skipped for this checkpoint (`--skip-eval`): "
                                                 "no refusal, safety or quality figures are claimed.")
    body = [
        f"# {name}",
        "",
        (f"{link}{at} with its refusal direction removed from the weights (\"abliteration\"), made with "
         f"abliterate {facts.version}. It loads like the base model "
         "with `AutoModelForCausalLM.from_pretrained` and needs no custom code."),
        "",
        _warning(facts.refusal_change),
        "",
        *_what_was_done(facts),
        *([(f"![Refusal score with the direction ablated and added, and KL, for every candidate layer and position "
              f"(the chosen one starred)]({facts.figure})"), ""] if facts.figure else []),
        *([] if evaluation.startswith("## Evaluation") else ["## Evaluation", ""]),
        evaluation,
        "",
        "## Reproduce",
        "",
        ("The resolved settings of this run are in `abliterate/config.toml` in this repository; "
         "the direction, candidate scores, plots and replies are beside it."),
        "",
        "```bash",
        *([facts.install] if facts.install else [f"# abliterate {facts.version}"]),
        facts.command,
        "```",
        "",
    ]
    return scrub(_front_matter(facts, name) + "\n" + "\n".join(body), replacements)


def write_card(out_dir: Path, facts: CardFacts, replacements: dict[str, str] | None = None) -> Path:
    """Write README.md into `out_dir` atomically (a temp file moved into place) and return its path."""
    return write_atomic(Path(out_dir) / "README.md", render_card(facts, replacements))
