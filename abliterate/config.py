"""The one typed, strict configuration of a job, loaded from TOML and overridden by CLI flags.

Every setting is a dataclass field with a default and a one-line `help`. `configs/default.toml` is the rendering
of these defaults (a test keeps them equal); other files in `configs/` are presets. Unknown keys are an error
naming the key and the nearest valid one, and cross-field checks run at load time, not halfway through a run.
This module imports nothing heavy: the CLI loads it for `--help`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.errors import UserError


def setting(default: Any, help: str) -> Any:
    """A config field with its one-line description (lists and dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    revision: str = setting("", "Hub revision (branch, tag or commit) of the model; empty for the default branch.")
    dtype: str = setting("auto", "Dtype to load the model in for measuring and evaluating: auto, float32, bfloat16, float16.")
    device_map: str = setting("auto", "accelerate device_map for loading (auto spreads a big model over GPUs and CPU).")
    max_memory: str = setting("", "Memory cap per device for loading, e.g. 0=20GiB,1=20GiB,cpu=64GiB; what fits nowhere is offloaded to offload_folder. Empty: all free memory.")
    offload_folder: str = setting("", "Folder for the weights offloaded to disk when the model does not fit; empty for a temporary folder.")
    trust_remote_code: bool = setting(False, "Run code shipped with the model repository. Off unless you trust it.")
    chat_template: str = setting("", "A Jinja chat template file to use instead of the tokenizer's own.")
    system_prompt: str = setting("", "System prompt put before every instruction; empty for none.")
    template_kwargs: dict = setting({}, "Extra keyword arguments for apply_chat_template, e.g. {enable_thinking = false}.")


@dataclass
class PromptsConfig:
    harmful_train: str = setting(
        "hf:walledai/AdvBench@0fdedd558a32c256cd8b458bf7f393b645cbf475:train#prompt",
        "Harmful prompts for fitting (train+val): a file, builtin:NAME or hf:owner/name[/config][@revision][:split][#column]; join several with ' + '.")
    harmful_val: str = setting(
        "", "Harmful prompts for validation (paper: HarmBench's validation set); empty to draw them from harmful_train.")
    harmless_train: str = setting(
        "hf:tatsu-lab/alpaca:train#instruction",
        "Harmless prompts for fitting (train+val); rows with a non-empty 'input' are dropped (paper: Alpaca).")
    harmful_eval: str = setting(
        "hf:JailbreakBench/JBB-Behaviors/behaviors@c19227d7c9c40307a0999365779c13cd1a5116d0:harmful#Goal",
        "Harmful prompts for evaluation (paper: JailbreakBench, with categories), kept disjoint from the fit.")
    harmless_eval: str = setting(
        "hf:tatsu-lab/alpaca:train#instruction",
        "Harmless prompts for evaluation (over-refusal), drawn apart from the harmless fit prompts.")
    column: str = setting("", "Instruction column in table-like files; empty to detect instruction/prompt/goal/Goal/Behavior.")
    n_train: int = setting(128, "Training prompts per side (paper: 128).")
    n_val: int = setting(32, "Validation prompts per side used to score candidates (paper: 32).")
    n_eval: int = setting(100, "Evaluation prompts per side (paper: 100).")
    seed: int = setting(42, "Seed for sampling prompts (paper: 42).")


@dataclass
class MeasureConfig:
    batch_size: int = setting(32, "Prompts per forward pass when collecting activations and scoring candidates.")
    filter_prompts: bool = setting(True, "Keep harmful prompts the base model refuses and harmless ones it does not (paper).")
    refusal_openings: list = setting(
        [], "Openings of refusals whose first tokens form the refusal score's token set; empty: found from the "
        "base model's own greedy replies (refusal.json).")
    n_discovery: int = setting(32, "Fit prompts per side whose greedy replies show the shared reply prefix and how the model refuses.")
    discovery_max_new_tokens: int = setting(128, "Tokens generated per reply for that (enough to pass a thinking block; a model that reasons per prompt is scored where its answer begins).")
    kl_max: float = setting(0.1, "Discard candidates whose ablation moves harmless next-token KL above this (paper: 0.1).")
    max_layer_fraction: float = setting(0.8, "Discard candidates from layers >= this fraction of the depth (paper: 0.8).")
    require_induce: bool = setting(True, "Discard candidates whose addition does not induce refusal on harmless prompts (paper).")
    score_all: bool = setting(False, "Compute the KL and induce scores of every candidate (full figure) instead of only where they can change the choice.")
    direction_file: str = setting("", "A reference direction file to compare every candidate with by cosine similarity.")
    use_reference: bool = setting(False, "Skip selection and use the reference direction from direction_file.")


@dataclass
class ApplyConfig:
    max_shard_size: str = setting("5GB", "Largest output shard, as transformers writes them (e.g. 5GB, 500MB).")


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as "5GB" (decimal, like transformers), "512MiB" or "1000000"."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"Invalid shard size '{text}'; pass --max-shard-size (apply.max_shard_size) like 5GB, "
                        "500MB or a byte count.")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_max_memory(text: str) -> dict[int | str, str]:
    """accelerate's max_memory from "0=20GiB,1=20GiB,cpu=64GiB" (GPU indices, cpu, or other device names)."""
    limits: dict[int | str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, size = (piece.strip() for piece in item.partition("="))
        if not device or not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", size, flags=re.IGNORECASE):
            raise UserError(f"Invalid --max-memory entry '{item}'; pass --max-memory (model.max_memory) as "
                            "DEVICE=SIZE pairs, e.g. 0=20GiB,1=20GiB,cpu=64GiB.")
        limits[int(device) if device.isdigit() else device] = size.replace(" ", "")
    return limits


@dataclass
class EvalConfig:
    max_new_tokens: int = setting(256, "Longest reply generated, long enough to see a late refusal (paper: 512).")
    batch_size: int = setting(16, "Prompts generated at once.")
    backend: str = setting("transformers", "Generation engine: transformers or vllm.")
    tensor_parallel_size: int = setting(1, "GPUs one vLLM engine splits the model over (vLLM's tensor_parallel_size); engines run one at a time.")
    judge: str = setting("auto", "Safety judge: auto (together when TOGETHER_API_KEY is set, else none), together, local:PATH (a guard model), or none.")
    judge_model: str = setting("meta-llama/Meta-Llama-Guard-3-8B", "Judge model on Together (paper: Llama Guard 2).")
    judge_format: str = setting("chat", "Judge prompt: chat (the service applies the guard's template) or paper (Llama Guard 2's prompt sent as one message, parsed as the paper did).")
    judge_min_words: int = setting(15, "Replies shorter than this many words count as safe (paper's rule); 0 turns it off.")
    judge_concurrency: int = setting(8, "Judge requests in flight at once.")
    judge_max_retries: int = setting(5, "Retries of a judge request after a rate limit (429), server error (5xx) or dropped connection (the together SDK's backoff, honouring Retry-After).")
    judge_timeout_s: float = setting(60.0, "Timeout of one judge request, in seconds.")
    refusal_set: str = setting("paper", "Refusal substrings: paper (the paper's 12 phrases) or extended (paper's plus common variants); the base model's own refusal openings and phrases (refusal.json) count too.")
    refusal_judge: str = setting("", "Refusal/compliance judge of harmful replies: together:MODEL, local:PATH, or empty for none.")
    actadd: bool = setting(False, "Also generate ActAdd completions on the base model: +r at its layer on harmless prompts, r ablated on harmful ones.")
    ce_text: str = setting("", "General text for CE loss: a .txt (blank-line separated), .jsonl with 'text', or hf:owner/name[:split][@revision]; empty to skip.")
    n_ce_docs: int = setting(64, "Documents of the general corpus used for CE loss.")
    ce_max_tokens: int = setting(256, "Tokens per document for CE loss (paper: 256).")
    ce_chat: str = setting("", "Alpaca-style pairs for reply-only CE loss: .jsonl/.json with instruction and output, or hf:owner/name[:split][@revision]; empty to skip.")
    n_ce_chat: int = setting(64, "Instruction/reply pairs used for the reply-only CE loss.")


@dataclass
class RunConfig:
    skip_eval: bool = setting(False, "Skip the evaluation step.")
    push: str = setting("", "Hub repository (owner/name) to push the finished output to; empty for no push.")
    optimize: bool = setting(False, "Ship an optimized edit (abliterate optimize) instead of the paper's single-direction edit.")


@dataclass
class OptimizeConfig:
    n_trials: int = setting(60, "Trials of the multi-objective search (the paper's edit and two variants are the first).")
    n_startup_trials: int = setting(16, "Random trials before the TPE sampler models the Pareto front.")
    seed: int = setting(0, "Seed of the search's sampler.")
    target_refusal: float = setting(0.05, "Harmful refusal rate (held out, by generation) the shipped edit must reach.")
    refine_share: float = setting(0.15, "Share of n_trials, the last ones, that shrink the gentlest feasible edits toward the refusal target.")
    n_confirm: int = setting(3, "Pareto points confirmed by generation on held-out prompts first (more of the front, this many at a time, while none meets the target; the paper's edit last).")
    confirm_tokens: int = setting(48, "New tokens per reply when confirming (greedy).")
    max_weight: float = setting(1.5, "Largest ablation weight the search may use (1 removes the direction exactly).")
    search_per_layer: bool = setting(True, "Let the search use each layer's own direction instead of one interpolated direction.")
    search_projected: bool = setting(True, "Let the search remove the harmless mean's component from the direction.")
    search_preserve_norm: bool = setting(True, "Let the search keep every write vector's length (norm-preserving edit).")
    trial: int = setting(-1, "Ship this trial number instead of the automatic choice; -1 chooses automatically.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)


def _nearest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(choices)}."


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a field's annotation; ints are accepted where floats are expected."""
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list, "dict": dict}[annotation]
    if isinstance(value, bool) and annotation in ("int", "float"):
        raise UserError(f"{where} must be a number, not {value!r}.")
    if not isinstance(value, expected):
        raise UserError(f"{where} must be of type {annotation}, got {value!r}.")
    return float(value) if annotation == "float" else value


def _apply_section(section: Any, values: dict, where: str) -> None:
    names = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        if key not in names:
            raise UserError(f"Unknown config key '{where}.{key}'.{_nearest(key, names)}")
        annotation = next(f.type for f in dataclasses.fields(section) if f.name == key)
        setattr(section, key, _coerce(value, annotation, f"{where}.{key}"))


def apply_values(config: Config, values: dict, source: str) -> Config:
    """Merge a nested dict (from TOML or flags) into `config`; unknown sections or keys are errors."""
    sections = [f.name for f in dataclasses.fields(config)]
    for name, section_values in values.items():
        if name not in sections:
            raise UserError(f"Unknown config section '[{name}]' in {source}.{_nearest(name, sections)}")
        if not isinstance(section_values, dict):
            raise UserError(f"'{name}' in {source} must be a [{name}] table.")
        _apply_section(getattr(config, name), section_values, name)
    return config


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the TOML file at `path`, then `overrides` ({section: {key: value}}); then validate."""
    config = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Config file {path} does not exist; pass an existing TOML file to --config.")
        try:
            values = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"Config file {path} is not valid TOML ({error}); fix the file or pass another to --config.")
        apply_values(config, values, str(path))
    if overrides:
        apply_values(config, overrides, "command-line flags")
    validate(config)
    return config


# What transformers takes as a device_map string (a strategy or one device), and "" or none for plain loading.
DEVICE_MAP = r"|none|auto|balanced|balanced_low_0|sequential|cpu|mps|(cuda|xpu|npu|hpu)(:\d+)?"


def validate(config: Config) -> None:
    """Cross-field checks, done once at load time."""
    p, m, e = config.prompts, config.measure, config.eval
    for name in ("n_train", "n_val", "n_eval"):
        if getattr(p, name) < 1:
            raise UserError(f"prompts.{name} must be at least 1, got {getattr(p, name)}.")
    if not 0 < m.max_layer_fraction <= 1:
        raise UserError(f"measure.max_layer_fraction must be in (0, 1], got {m.max_layer_fraction}.")
    if m.batch_size < 1:
        raise UserError(f"measure.batch_size must be at least 1, got {m.batch_size}.")
    if not m.kl_max > 0:
        raise UserError(f"measure.kl_max must be above 0 (the paper's is 0.1), got {m.kl_max}.")
    if m.n_discovery < 2 or m.discovery_max_new_tokens < 1:
        raise UserError("measure.n_discovery must be at least 2 and measure.discovery_max_new_tokens at least 1.")
    if m.use_reference and not m.direction_file:
        raise UserError("measure.use_reference needs a reference direction: set measure.direction_file (--direction-file).")
    if e.backend not in ("transformers", "vllm"):
        raise UserError(f"eval.backend must be 'transformers' or 'vllm', got '{e.backend}'.")
    if e.refusal_set not in ("paper", "extended"):
        raise UserError(f"eval.refusal_set must be 'paper' or 'extended', got '{e.refusal_set}'.")
    for name in ("max_new_tokens", "batch_size", "tensor_parallel_size", "judge_concurrency", "n_ce_docs", "ce_max_tokens",
                 "n_ce_chat"):
        if getattr(e, name) < 1:
            raise UserError(f"eval.{name} must be at least 1, got {getattr(e, name)}.")
    if not (e.judge in ("auto", "none", "together") or e.judge.startswith("local:")):
        raise UserError(f"eval.judge must be auto, together, local:PATH or none, got '{e.judge}'.")
    if e.judge_format not in ("chat", "paper"):
        raise UserError(f"eval.judge_format must be 'chat' or 'paper', got '{e.judge_format}'.")
    if e.refusal_judge and not e.refusal_judge.startswith(("together:", "local:")):
        raise UserError(f"eval.refusal_judge must be together:MODEL, local:PATH or empty, got '{e.refusal_judge}'; "
                        "fix --refusal-judge.")
    if not re.fullmatch(DEVICE_MAP, config.model.device_map):
        raise UserError(f"model.device_map must be auto, balanced, balanced_low_0, sequential, none or a device (cpu, "
                        f"cuda, cuda:0, mps), got '{config.model.device_map}'; fix --device-map.")
    if config.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"model.dtype must be auto, float32, bfloat16 or float16, got '{config.model.dtype}'.")
    parse_max_memory(config.model.max_memory)
    parse_size(config.apply.max_shard_size)  # a bad size fails now, not after an hour of measuring
    parse_max_memory(config.model.max_memory)
    o = config.optimize
    if o.n_trials < 1 or o.n_confirm < 1 or o.confirm_tokens < 1 or o.n_startup_trials < 0:
        raise UserError("optimize.n_trials, n_confirm and confirm_tokens must be at least 1 (n_startup_trials >= 0).")
    for name in ("target_refusal", "refine_share"):
        if not 0 <= getattr(o, name) <= 1:
            raise UserError(f"optimize.{name} must be in [0, 1], not {getattr(o, name)}.")
    if not o.max_weight > 0:
        raise UserError(f"optimize.max_weight must be above 0, not {o.max_weight}.")
    if o.trial < -1:
        raise UserError(f"optimize.trial {o.trial} is not a trial number; pass one from optimize.json (0, 1, ...) or "
                        "-1 to let the search choose.")


def to_dict(config: Config) -> dict:
    """The resolved config as plain data (for provenance files and hashing)."""
    return dataclasses.asdict(config)


def toml_value(value: Any) -> str:
    """One setting's value as TOML (the settings are booleans, numbers, strings, lists and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string, control characters escaped


def render_default_toml() -> str:
    """configs/default.toml: every field in order, each with its one-line description."""
    lines = ["# abliterate's default settings: every key, in order, with what it does.",
             "# Pass a file like this with --config; flags override it. Unknown keys are errors."]
    for section in dataclasses.fields(Config):
        lines += ["", f"[{section.name}]"]
        for f in dataclasses.fields(typing.cast(Any, section.default_factory)()):
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"{f.name} = {toml_value(getattr(section.default_factory(), f.name))}")
    return "\n".join(lines) + "\n"


def render_toml(config: Config) -> str:
    """The resolved config as a TOML file that `--config` accepts (every setting, defaults included)."""
    from abliterate import __version__

    lines = [f"# Resolved settings of an abliterate {__version__} run: pass this file to --config to repeat it."]
    for section, values in to_dict(config).items():
        lines += ["", f"[{section}]"] + [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
