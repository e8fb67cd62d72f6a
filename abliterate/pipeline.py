"""The whole job in one call: measure -> apply -> eval -> model card (-> push), resumable step by step.

Layout of `out_dir` (what `abliterate run MODEL --out DIR` leaves behind):

    config.json, model*.safetensors, tokenizer files, README.md   the edited checkpoint users load and push
    abliteration.json                  what apply edited, tensor by tensor
    abliterate/direction.json/.safetensors   the direction apply wrote (and edit.json + its directions for an
                                       optimized edit), where abliteration.json says
    abliterate/run.json                provenance: resolved config, versions, seed, base model id and revision,
                                       the key of every step, the summary
    abliterate/config.toml             the resolved settings (the card's reproduce command passes this file)
    abliterate/measure/                direction.json/.safetensors, candidates, scores, plots (`measure`)
    abliterate/apply/step.json         the apply step's marker; apply writes the checkpoint into apply/checkpoint/
                                       and publishing moves it to the top (see abliterate.publish): one copy
    abliterate/eval/                   completions, evaluation JSON and Markdown report (`evaluate`)

Each step runs in a hidden `.NAME.partial` folder that is renamed into place with a `step.json` holding a key:
a hash of the settings and inputs that step depends on. A rerun reuses a step whose key matches, so Ctrl-C at
any point followed by the same command finishes the job, and a changed setting reruns only what depends on it.
The checkpoint at the top is published last, `config.json` after everything else, so a folder that loads as a
model is always complete; before republishing a changed run, the checkpoint moves back (`config.json` first).
Every text file is scrubbed of local paths before publishing (see `publish.scrub_tree`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate import __version__
from abliterate.config import Config, render_toml, to_dict
from abliterate.errors import UserError
from abliterate.files import check_out_dir, versions, write_atomic
from abliterate.hub import PROVENANCE_DIR, public_model_name
from abliterate.publish import (
    RECORD_SUFFIXES,
    checkpoint_files,
    machine_paths,
    private_paths,
    publish,
    scrub_tree,
    unpublish,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # inside abliterate/apply/: the edited checkpoint until it is published
STEP_FILE = "step.json"
RUN_FILE = "run.json"


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
    shipped: str = ""  # the optimized edit that shipped instead of the direction at (layer, position), when one did


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
                    _source_digest(config.measure.direction_file), *([c["optimize"]] if config.run.optimize else []))
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
             reused: list[str], intact: Callable[[dict], bool] = lambda result: True) -> dict:
    """Reuse `prov/name` if its key matches (and `intact(result)`), else run `work(partial_dir) -> result` and move
    the folder in."""
    final = prov / name
    record = None if force else _finished(final, key)
    if record is not None and not intact(record["result"]):
        logger.warning("Step %s: its finished result is incomplete (files removed?); running it again", name)
        record = None
    if record is not None:
        logger.info("Step %s: reusing the finished result in %s", name, final)
        reused.append(name)
        return record["result"]
    partial = prov / f".{name}.partial"
    if partial.exists():
        logger.warning("Step %s: removing what an interrupted run left in %s", name, partial)
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
        from abliterate.apply import apply_direction

        record = apply_direction(model, direction_path, folder / CHECKPOINT_DIR, config)
        return {"files": checkpoint_files(folder / CHECKPOINT_DIR), "n_layers": record["n_layers"],
                "model_type": record["model_type"], "n_edited": record["n_edited"],
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


def _say_if_unchanged(eval_json: Path) -> None:
    """Warn when the evaluation found the edited model refusing harmful prompts no less than its base."""
    from abliterate.card import refusal_change

    change = refusal_change(json.loads(eval_json.read_text())) if eval_json.is_file() else None
    if change is not None and change[1] >= change[0]:
        logger.warning("The edit did not lower harmful refusal (%.2f -> %.2f): the refusal score may miss how this "
                       "model refuses (see measure/refusal.json; set measure.refusal_openings), or try --optimize.",
                       *change)


def summary_rows(report: Any) -> list[list[str]]:
    """(metric with its prompt count, base, edited) rows for the final summary table, from an EvalReport."""
    rows = report.summary_rows() if hasattr(report, "summary_rows") else []
    return [[str(cell) for cell in row] for row in rows]


# ---- provenance ----

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


def _card_text(model: str, model_dir: Path, out_dir: Path, config: Config, steps: dict[str, dict]) -> str:
    from abliterate.card import (
        CardFacts,
        base_license,
        eval_results,
        hub_dataset,
        install_command,
        refusal_change,
        render_card,
    )

    prov = out_dir / PROVENANCE_DIR
    measured, applied, evaluated = steps["measure"], steps["apply"], steps.get("eval")
    p = config.prompts
    figure = prov / "measure" / "scores.png"
    data = json.loads((prov / "eval" / "eval.json").read_text()) \
        if evaluated and (prov / "eval" / "eval.json").is_file() else {}
    results = eval_results(data, p.harmful_eval, p.harmless_eval) if data else []
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
        optimized_edit=measured.get("optimized", ""),
        datasets=[hub_dataset(source) for source in (p.harmful_train, p.harmless_train, p.harmful_eval,
                                                      p.harmless_eval) if hub_dataset(source)],
        eval_results=results, install=install_command(), refusal_change=refusal_change(data),
        figure=figure.relative_to(out_dir).as_posix() if figure.is_file() else "",
    )
    # Paths this run knows about get public names; any other absolute path is cut to its last part.
    replacements = {str(out_dir): ".", str(model_dir.resolve()): facts.base_model or "BASE_MODEL_DIR",
                    str(model_dir): facts.base_model or "BASE_MODEL_DIR"}
    if _is_local(model):
        replacements[model] = "BASE_MODEL_DIR"
    return render_card(facts, replacements)


def _provenance(model: str, model_dir: Path, config: Config, keys: dict[str, str]) -> dict:
    return {"tool": "abliterate", "version": __version__, "base_model": public_model_name(model),
            "base_revision": config.model.revision, "resolved_revision": _resolved_revision(model_dir),
            "seed": config.prompts.seed, "versions": versions(), "config": to_dict(config), "steps": keys,
            "complete": False}


def _published(out_dir: Path, previous: dict, key: str, force: bool) -> list[str]:
    """The files an earlier run published, if it published this very result; else take them down first."""
    record = previous.get("published") or {}
    checkpoint = out_dir / PROVENANCE_DIR / "apply" / CHECKPOINT_DIR
    if not force and record.get("key") == key:
        return list(record.get("files", []))
    marker = _finished(out_dir / PROVENANCE_DIR / "apply", previous.get("steps", {}).get("apply", ""))
    names = set(record.get("files", []) or previous.get("published_files", []))
    names |= set(marker["result"].get("files", [])) if marker else set()  # a publish stopped half way
    unpublish(out_dir, checkpoint, sorted(names))
    return []


def _start(model: str, model_dir: Path, out_dir: Path, config: Config, keys: dict[str, str],
           force: bool) -> tuple[dict, list[str]]:
    """Create the provenance folder, take down a stale checkpoint, write the settings; return (record, published)."""
    prov = out_dir / PROVENANCE_DIR
    previous = _read_run(prov)
    published = _published(out_dir, previous, keys["publish"], force)
    prov.mkdir(parents=True, exist_ok=True)
    record = {**_provenance(model, model_dir, config, keys), "published": previous["published"] if published else None}
    write_atomic(prov / RUN_FILE, json.dumps(record, indent=2))
    write_atomic(prov / "config.toml", render_toml(config))
    return record, published


def _scrub(model: str, model_dir: Path, out_dir: Path, config: Config) -> None:
    """Local paths out of the provenance folder before anything is published."""
    prov = out_dir / PROVENANCE_DIR
    inputs = [value for section in to_dict(config).values() for value in section.values() if isinstance(value, str)]
    known = private_paths(model, model_dir, out_dir, public_model_name(model), inputs)
    scrub_tree(prov, {**known, str(prov / "apply" / CHECKPOINT_DIR): "."})  # evaluated there, published at "."
    scrub_tree(prov, machine_paths(), RECORD_SUFFIXES)


def run(model: str, out_dir: Path, config: Config, force: bool = False) -> RunResult:
    """measure -> apply -> eval (unless skipped) -> model card -> push (if asked), reusing finished steps.

    `force` reruns every step and lets `out_dir` be a non-empty folder that holds no earlier run.
    """
    from abliterate.evaluation import check_ready
    from abliterate.hub import resolve_model

    out_dir = Path(out_dir).expanduser().resolve()
    check_out_dir(out_dir, force, resume_marker=PROVENANCE_DIR)
    check_ready(config)
    model_dir = resolve_model(model, config.model.revision)
    if out_dir == model_dir.resolve() or model_dir.resolve() in out_dir.parents or out_dir in model_dir.resolve().parents:
        raise UserError(f"--out {out_dir} overlaps the input model {model_dir}; abliterate never writes into its "
                        "input. Choose another --out.")
    keys = step_keys(config, fingerprint_dir(model_dir))
    prov = out_dir / PROVENANCE_DIR
    record, published = _start(model, model_dir, out_dir, config, keys, force)
    reused: list[str] = []
    if config.run.optimize:
        from abliterate.optimize import optimize_work

        first = optimize_work(model, config)
    else:
        first = _measure_work(model, config)
    steps = {"measure": run_step(prov, "measure", keys["measure"], force, first, reused)}
    direction_path = prov / "measure" / steps["measure"]["direction"]
    checkpoint = prov / "apply" / CHECKPOINT_DIR
    where = out_dir if published else checkpoint
    steps["apply"] = run_step(prov, "apply", keys["apply"], force, _apply_work(model, direction_path, config), reused,
                              intact=lambda result: all((where / name).is_file() for name in result.get("files", [""])))
    edited = checkpoint if (checkpoint / "config.json").is_file() else out_dir
    if not config.run.skip_eval:
        steps["eval"] = run_step(prov, "eval", keys["eval"], force, _eval_work(model, edited, config), reused)
        _say_if_unchanged(prov / "eval" / "eval.json")
    else:  # an earlier run's report must not sit beside a card that claims no numbers
        shutil.rmtree(prov / "eval", ignore_errors=True)
    _scrub(model, model_dir, out_dir, config)
    card = _card_text(model, model_dir, out_dir, config, steps)
    files = sorted(set(publish(out_dir, checkpoint, card)) | set(published))
    result = RunResult(
        out_dir=out_dir, layer=steps["measure"]["layer"], position=steps["measure"]["position"],
        n_layers=steps["apply"]["n_layers"], n_edited=steps["apply"]["n_edited"],
        metrics=[tuple(row) for row in steps.get("eval", {}).get("metrics", [])],
        report_path=prov / "eval" / steps["eval"]["report"] if "eval" in steps else None, reused=reused,
        refusal=steps["measure"].get("refusal", {}), shipped=steps["measure"].get("shipped", ""),
    )
    write_atomic(prov / RUN_FILE, json.dumps({**record, "published": {"key": keys["publish"], "files": files},
                                              "complete": True, "summary": {
        "layer": result.layer, "position": result.position, "n_layers": result.n_layers,
        "n_edited": result.n_edited, "metrics": result.metrics}}, indent=2))
    if config.run.push:
        from abliterate.hub import push

        result.pushed_url = push(out_dir, config.run.push)
    return result


def finished_steps(out_dir: Path) -> list[str]:
    """The steps of the run in `out_dir` that are finished for its current settings, in order (for Ctrl-C)."""
    prov = Path(out_dir) / PROVENANCE_DIR
    keys = _read_run(prov).get("steps", {})
    return [name for name in ("measure", "apply", "eval") if keys.get(name) and _finished(prov / name, keys[name])]
