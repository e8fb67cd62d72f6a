"""The whole job in one call: measure -> apply -> eval -> model card (-> push), resumable step by step.

Layout of `out_dir` (what `abliterate run MODEL --out DIR` leaves behind):

    config.json, model*.safetensors, tokenizer files, README.md   the edited checkpoint users load and push
    abliterate/run.json                provenance: resolved config, versions, seed, base model id and revision,
                                       the key of every step, the summary
    abliterate/config.toml             the resolved settings (the card's reproduce command passes this file)
    abliterate/measure/                direction.json/.safetensors, candidates, scores, plots (`measure`)
    abliterate/apply/checkpoint/       the edited checkpoint as `apply` wrote it (the top-level files are hard
                                       links to these, so it costs no extra disk; `push` leaves it out)
    abliterate/eval/                   completions, evaluation JSON and Markdown report (`evaluate`)

Each step runs in a hidden `.NAME.partial` folder that is renamed into place with a `step.json` holding a key:
a hash of the settings and inputs that step depends on. A rerun reuses a step whose key matches, so Ctrl-C at
any point followed by the same command finishes the job, and a changed setting reruns only what depends on it.
The checkpoint at the top is published last, `config.json` after everything else, so a folder that loads as a
model is always complete; before republishing a changed run, `config.json` is removed first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.config import Config, apply_values, to_dict, validate
from abliterate.errors import UserError

logger = logging.getLogger(__name__)

PROVENANCE_DIR = "abliterate"
STEP_FILE = "step.json"
RUN_FILE = "run.json"
_VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "accelerate", "tokenizers")
# The demo's settings; configs/toy.toml is the same thing as a file (tests/test_demo.py keeps them equal).
TOY_SETTINGS: dict[str, dict[str, Any]] = {
    "model": {"dtype": "float32", "device_map": "cpu"},
    "prompts": {"harmful_train": "builtin:toy_harmful_train", "harmless_train": "builtin:toy_harmless_train",
                "harmful_eval": "builtin:toy_harmful_eval", "harmless_eval": "builtin:toy_harmless_eval",
                "n_train": 128, "n_val": 32, "n_eval": 100},
    "measure": {"batch_size": 64},
    "eval": {"max_new_tokens": 24, "batch_size": 100, "judge": "none"},
}


@dataclass
class RunResult:
    """What `run` did: the chosen direction, the edit, the evaluation summary and where everything is."""

    out_dir: Path
    layer: int | None  # None when a supplied reference direction was used as it is
    position: int | None
    n_layers: int
    n_edited: int
    metrics: list[tuple[str, str, str]] = field(default_factory=list)  # (metric with prompt count, base, edited)
    report_path: Path | None = None  # the Markdown evaluation report; None when evaluation was skipped
    reused: list[str] = field(default_factory=list)  # steps taken from an earlier run with the same key
    pushed_url: str = ""
    refusal: dict = field(default_factory=dict)  # how the base model refuses (refusal.json of the measure step)


# ---- keys: what each step depends on ----

def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_dir(path: Path) -> str:
    """Cheap identity of a model folder: every file's name, size and modification time (weights are not read)."""
    entries = sorted((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return _hash(entries)


def _source_digest(source: str) -> str:
    """Identity of a prompt or text source: a local file's content, a builtin's bundled file, else the name itself."""
    if not source:
        return ""
    if source.startswith("builtin:"):
        data_dir = Path(__file__).parent / "data"
        return _hash([_file_digest(p) for p in sorted(data_dir.glob(source.split(":", 1)[1] + ".*"))])
    path = Path(source).expanduser()
    return _file_digest(path) if path.is_file() else source


def step_keys(config: Config, model_fingerprint: str) -> dict[str, str]:
    """The key of every step: a change to anything a step reads changes its key and every later one."""
    c = to_dict(config)
    prompts = {name: _source_digest(value) if isinstance(value, str) else value for name, value in c["prompts"].items()}
    measure = _hash(__version__, model_fingerprint, c["model"], prompts, c["measure"],
                    _source_digest(config.measure.direction_file))
    apply = _hash(measure, c["apply"], c["model"]["revision"])
    from abliterate.judge import resolved_judge

    # The judge that runs, not the setting: with `auto`, exporting TOGETHER_API_KEY later must rerun the evaluation.
    eval_inputs = [_source_digest(config.eval.ce_text), _source_digest(config.eval.ce_chat), resolved_judge(config.eval)]
    evaluation = "skipped" if config.run.skip_eval else _hash(apply, c["eval"], prompts, c["model"], eval_inputs)
    return {"measure": measure, "apply": apply, "eval": evaluation, "publish": _hash(apply, evaluation)}


# ---- steps: run in a partial folder, renamed into place with its key ----

def _finished(final: Path, key: str) -> dict | None:
    marker = final / STEP_FILE
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("key") == key else None


def run_step(prov: Path, name: str, key: str, force: bool, work: Callable[[Path], dict],
             reused: list[str]) -> dict:
    """Reuse `prov/name` if its key matches, else run `work(partial_dir) -> result` and move the folder in."""
    final = prov / name
    record = None if force else _finished(final, key)
    if record is not None:
        logger.info("Step %s: reusing the finished result in %s", name, final)
        reused.append(name)
        return record["result"]
    partial = prov / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    logger.info("Step %s: running", name)
    result = work(partial)
    (partial / STEP_FILE).write_text(json.dumps({"key": key, "result": result}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return result


def _measure_work(model: str, config: Config) -> Callable[[Path], dict]:
    def work(folder: Path) -> dict:
        from abliterate.measure import measure

        found = measure(model, folder, config)
        # With --use-reference and a direction file that names no layer, there is no layer or position to report.
        return {"direction": Path(found.direction_path).resolve().relative_to(folder.resolve()).as_posix(),
                "layer": found.layer, "position": found.position, "token_text": found.token_text,
                "used_reference": bool(found.used_reference),
                "refusal": found.refusal.to_dict() if found.refusal is not None else {},
                "n_prompts": {key: value for key, value in found.counts.items() if key.startswith("harm")}}
    return work


def _apply_work(model: str, direction_path: Path, config: Config) -> Callable[[Path], dict]:
    def work(folder: Path) -> dict:
        from abliterate.checkpoint import apply_direction

        record = apply_direction(model, direction_path, folder / "checkpoint", config)
        return {"n_layers": record["n_layers"], "model_type": record["model_type"], "n_edited": record["n_edited"],
                "edits_by_kind": dict(Counter(f"{edit['role']} ({edit['kind']})"
                                              for edit in record["edited_tensors"])),
                "untied": record["untied"] is not None}
    return work


def _eval_work(model: str, edited_dir: Path, config: Config) -> Callable[[Path], dict]:
    def work(folder: Path) -> dict:
        from abliterate.evaluation import evaluate

        # The measure folder sits beside this step's: its refusal.json and direction.json (for ActAdd) are read.
        report = evaluate(str(edited_dir), config, folder, base=model, measure_dir=folder.parent / "measure")
        report_path = folder / "report.md"
        if not report_path.is_file():
            report_path.write_text(report.to_markdown())
        return {"report": "report.md", "metrics": summary_rows(report)}
    return work


def summary_rows(report: Any) -> list[list[str]]:
    """(metric with its prompt count, base, edited) rows for the final summary table, from F's EvalReport."""
    rows = report.summary_rows() if hasattr(report, "summary_rows") else []
    return [[str(cell) for cell in row] for row in rows]


# ---- publishing the checkpoint at the top of out_dir ----

def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def _link(source: Path, target: Path) -> None:
    """Put `source` at `target` as a hard link (a copy where links are not possible), replacing it atomically."""
    temp = target.with_name(f".{target.name}.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        shutil.copy2(source, temp)
    os.replace(temp, target)


def _unpublish(out_dir: Path, names: list[str]) -> None:
    """Take down a published checkpoint, config.json first so the folder stops loading as a model at once."""
    for name in sorted(names, key=lambda n: n != "config.json"):
        (out_dir / name).unlink(missing_ok=True)


def _publish(out_dir: Path, checkpoint: Path, card_text: str) -> list[str]:
    """Link the finished checkpoint's files to the top of out_dir and write the card; config.json goes last."""
    names = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith("."))
    for name in names:
        if name not in ("config.json", "README.md"):
            _link(checkpoint / name, out_dir / name)
    _write_atomic(out_dir / "README.md", card_text)
    _link(checkpoint / "config.json", out_dir / "config.json")
    return sorted(set(names) | {"README.md"})


# ---- provenance ----

def _versions() -> dict[str, str]:
    found = {"abliterate": __version__, "python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def render_toml(config: Config) -> str:
    """The resolved config as a TOML file that `--config` accepts (every setting, defaults included)."""
    lines = [f"# Resolved settings of an abliterate {__version__} run: pass this file to --config to repeat it."]
    for section, values in to_dict(config).items():
        lines += ["", f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _is_local(model: str) -> bool:
    return Path(model).expanduser().exists()


def _resolved_revision(model_dir: Path) -> str:
    """The commit a Hub snapshot was downloaded at (its folder name in the cache), empty for a local folder."""
    parts = model_dir.resolve().parts
    return parts[-1] if len(parts) > 1 and parts[-2] == "snapshots" else ""


def reproduce_command(model: str, out_dir: Path) -> str:
    """The command that repeats this run from the published files, with no local path in it."""
    base = "BASE_MODEL_DIR" if _is_local(model) else model
    return f"abliterate run {base} --out {out_dir.name} --config abliterate/config.toml"


def _read_run(prov: Path) -> dict:
    path = prov / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a directory for --out.")
    is_run = (out_dir / PROVENANCE_DIR).is_dir()  # created first thing by run, so even a run stopped at once counts
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_run and not force:
        raise UserError(f"--out {out_dir} is not empty and holds no abliterate run to continue; choose another "
                        "--out or pass --force to write into it.")


def _card_text(model: str, model_dir: Path, out_dir: Path, config: Config, steps: dict[str, dict]) -> str:
    from abliterate.card import CardFacts, base_license, render_card

    prov = out_dir / PROVENANCE_DIR
    measured, applied, evaluated = steps["measure"], steps["apply"], steps.get("eval")
    facts = CardFacts(
        base_model="" if _is_local(model) else model,
        base_revision=config.model.revision or _resolved_revision(model_dir),
        license=base_license(model_dir, json.loads((model_dir / "config.json").read_text())),
        model_type=applied["model_type"], n_layers=applied["n_layers"],
        layer=measured["layer"], position=measured["position"],
        position_token=measured["token_text"], used_reference=measured.get("used_reference", False),
        n_prompts=measured.get("n_prompts", {}), edited_counts=applied["edits_by_kind"], untied=applied["untied"],
        refusal=measured.get("refusal", {}),
        eval_markdown=(prov / "eval" / evaluated["report"]).read_text() if evaluated else "",
        command=reproduce_command(model, out_dir), version=__version__, name=out_dir.name,
    )
    # Paths this run knows about get public names; any other absolute path is cut to its last part.
    replacements = {str(out_dir): ".", str(model_dir.resolve()): facts.base_model or "BASE_MODEL_DIR",
                    str(model_dir): facts.base_model or "BASE_MODEL_DIR"}
    if _is_local(model):
        replacements[model] = "BASE_MODEL_DIR"
    return render_card(facts, replacements)


def _provenance(model: str, model_dir: Path, config: Config, keys: dict[str, str]) -> dict:
    return {"tool": "abliterate", "version": __version__, "base_model": model,
            "base_revision": config.model.revision, "resolved_revision": _resolved_revision(model_dir),
            "seed": config.prompts.seed, "versions": _versions(), "config": to_dict(config), "steps": keys,
            "complete": False}


def run(model: str, out_dir: Path, config: Config, force: bool = False) -> RunResult:
    """measure -> apply -> eval (unless skipped) -> model card -> push (if asked), reusing finished steps.

    `force` reruns every step and lets `out_dir` be a non-empty folder that holds no earlier run.
    """
    from abliterate.hub import resolve_model

    out_dir = Path(out_dir).expanduser().resolve()
    _check_out_dir(out_dir, force)
    if not config.run.skip_eval:
        from abliterate.judge import check_judge
        from abliterate.refusal_judge import check_refusal_judge

        check_judge(config.eval)  # a missing judge key must fail now, not after measuring and applying
        check_refusal_judge(config.eval)
    model_dir = resolve_model(model, config.model.revision)
    if out_dir == model_dir.resolve() or model_dir.resolve() in out_dir.parents or out_dir in model_dir.resolve().parents:
        raise UserError(f"--out {out_dir} overlaps the input model {model_dir}; abliterate never writes into its "
                        "input. Choose another --out.")
    keys = step_keys(config, fingerprint_dir(model_dir))
    prov = out_dir / PROVENANCE_DIR
    previous = _read_run(prov)
    if force or previous.get("steps", {}).get("publish") != keys["publish"]:
        _unpublish(out_dir, previous.get("published_files", []))
    prov.mkdir(parents=True, exist_ok=True)
    record = {**_provenance(model, model_dir, config, keys), "published_files": previous.get("published_files", [])}
    _write_atomic(prov / RUN_FILE, json.dumps(record, indent=2))
    _write_atomic(prov / "config.toml", render_toml(config))
    reused: list[str] = []
    steps = {"measure": run_step(prov, "measure", keys["measure"], force, _measure_work(model, config), reused)}
    direction_path = prov / "measure" / steps["measure"]["direction"]
    steps["apply"] = run_step(prov, "apply", keys["apply"], force, _apply_work(model, direction_path, config), reused)
    checkpoint = prov / "apply" / "checkpoint"
    if not config.run.skip_eval:
        steps["eval"] = run_step(prov, "eval", keys["eval"], force, _eval_work(model, checkpoint, config), reused)
    else:  # an earlier run's report must not sit beside a card that claims no numbers
        shutil.rmtree(prov / "eval", ignore_errors=True)
    record["published_files"] = _publish(out_dir, checkpoint, _card_text(model, model_dir, out_dir, config, steps))
    result = RunResult(
        out_dir=out_dir, layer=steps["measure"]["layer"], position=steps["measure"]["position"],
        n_layers=steps["apply"]["n_layers"], n_edited=steps["apply"]["n_edited"],
        metrics=[tuple(row) for row in steps.get("eval", {}).get("metrics", [])],
        report_path=prov / "eval" / steps["eval"]["report"] if "eval" in steps else None, reused=reused,
        refusal=steps["measure"].get("refusal", {}),
    )
    _write_atomic(prov / RUN_FILE, json.dumps({**record, "complete": True, "summary": {
        "layer": result.layer, "position": result.position, "n_layers": result.n_layers,
        "n_edited": result.n_edited, "metrics": result.metrics}}, indent=2))
    if config.run.push:
        from abliterate.hub import push

        result.pushed_url = push(out_dir, config.run.push)
    return result


# ---- the demo ----

@dataclass
class DemoResult:
    """The demo's run and a few held-out prompts answered by the toy refuser before and after the edit."""

    run: RunResult
    replies: list[tuple[str, str, str]]  # (prompt, base reply, edited reply)


def demo_config() -> Config:
    """The settings `abliterate demo` runs with (TOY_SETTINGS over the defaults)."""
    config = apply_values(Config(), json.loads(json.dumps(TOY_SETTINGS)), "the demo settings")
    validate(config)
    return config


def _replies(source: str, prompts: list[str], config: Config) -> list[str]:
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(source, config.model)
    texts = format_instructions(tokenizer, prompts, config.model)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    replies = generate_transformers(model, tokenizer, texts, stop_ids, config.eval.max_new_tokens,
                                    config.eval.batch_size)
    return [reply.text for reply in replies]


def demo(out_dir: Path | None = None) -> DemoResult:
    """Build (or reuse) the toy refuser, run the whole job on it offline, and answer the held-out demo prompts."""
    import torch

    from abliterate.prompts import load_prompts
    from abliterate.toy import toy_refuser

    model_dir = toy_refuser()
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="abliterate-demo-"))
    config = demo_config()
    # The toy's matrices are tiny: more threads only add synchronisation (8x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(str(model_dir), out_dir, config)
        prompts = [prompt.text for prompt in load_prompts("builtin:toy_demo")]
        before = _replies(str(model_dir), prompts, config)
        after = _replies(str(result.out_dir), prompts, config)
    finally:
        torch.set_num_threads(threads)
    return DemoResult(run=result, replies=list(zip(prompts, before, after)))
