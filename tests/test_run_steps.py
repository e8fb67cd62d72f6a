"""The pipeline's bookkeeping without a model: step keys, reuse, interruption, publishing order, resolved config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate import publish as publish_module
from abliterate.config import load_config
from abliterate.pipeline import render_toml, reproduce_command, run_step, step_keys
from abliterate.publish import publish, unpublish


def _keys(**overrides) -> dict[str, str]:
    return step_keys(load_config(overrides=overrides), model_fingerprint="model-a")


def test_a_setting_changes_its_step_and_every_later_one_only():
    base = _keys()
    assert _keys() == base
    changed = _keys(eval={"max_new_tokens": 7})
    assert changed["measure"] == base["measure"] and changed["apply"] == base["apply"]
    assert changed["eval"] != base["eval"] and changed["publish"] != base["publish"]
    changed = _keys(apply={"max_shard_size": "1MB"})
    assert changed["measure"] == base["measure"]
    assert all(changed[step] != base[step] for step in ("apply", "eval", "publish"))
    changed = _keys(prompts={"seed": 1})
    assert all(changed[step] != base[step] for step in base)
    other_model = step_keys(load_config(), model_fingerprint="model-b")
    assert all(other_model[step] != base[step] for step in base)
    assert _keys(run={"skip_eval": True})["eval"] == "skipped"


def test_a_local_prompt_file_is_keyed_on_its_content(tmp_path: Path):
    prompts = tmp_path / "harmful.txt"
    prompts.write_text("one\ntwo\n")
    first = _keys(prompts={"harmful_train": str(prompts)})
    prompts.write_text("one\nthree\n")
    assert _keys(prompts={"harmful_train": str(prompts)})["measure"] != first["measure"]


def test_run_step_reuses_a_finished_step_and_reruns_a_changed_one(tmp_path: Path):
    calls: list[str] = []

    def work(folder: Path) -> dict:
        calls.append(folder.name)
        (folder / "artifact.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    reused: list[str] = []
    assert run_step(tmp_path, "measure", "k1", False, work, reused) == {"n": 1}
    assert run_step(tmp_path, "measure", "k1", False, work, reused) == {"n": 1}
    assert reused == ["measure"] and len(calls) == 1
    assert run_step(tmp_path, "measure", "k2", False, work, reused) == {"n": 2}
    assert run_step(tmp_path, "measure", "k2", True, work, reused) == {"n": 3}
    assert (tmp_path / "measure" / "artifact.txt").read_text() == "3"
    assert calls == [".measure.partial"] * 3


def test_an_interrupted_step_leaves_the_last_finished_one_and_reruns(tmp_path: Path):
    def finished(folder: Path) -> dict:
        (folder / "artifact.txt").write_text("old")
        return {"ok": True}

    def interrupted(folder: Path) -> dict:
        (folder / "artifact.txt").write_text("half")
        raise KeyboardInterrupt

    run_step(tmp_path, "apply", "old-key", False, finished, [])
    with pytest.raises(KeyboardInterrupt):
        run_step(tmp_path, "apply", "new-key", False, interrupted, [])
    assert json.loads((tmp_path / "apply" / "step.json").read_text())["key"] == "old-key"
    reused: list[str] = []
    run_step(tmp_path, "apply", "new-key", False, finished, reused)
    assert reused == [] and not (tmp_path / ".apply.partial").exists()
    assert json.loads((tmp_path / "apply" / "step.json").read_text())["key"] == "new-key"


def test_publish_moves_every_file_config_last_and_unpublish_moves_them_back(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch):
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "out"
    (checkpoint / "abliterate").mkdir(parents=True)
    out.mkdir()
    for name, text in (("config.json", "{}"), ("model.safetensors", "weights"), ("tokenizer.json", "tok")):
        (checkpoint / name).write_text(text)
    (checkpoint / "abliterate" / "direction.json").write_text("{}")
    inode = (checkpoint / "model.safetensors").stat().st_ino
    order: list[str] = []
    real_replace = publish_module.os.replace
    monkeypatch.setattr(publish_module.os, "replace",
                        lambda source, target: (order.append(Path(target).name), real_replace(source, target)))
    published = publish(out, checkpoint, "our card")
    monkeypatch.undo()
    assert order[-1] == "config.json"
    assert published == ["README.md", "abliterate/direction.json", "config.json", "model.safetensors",
                         "tokenizer.json"]
    assert (out / "README.md").read_text() == "our card"
    # The direction abliteration.json names moves where that record says it is, beside the run's own records.
    assert (out / "abliterate" / "direction.json").read_text() == "{}"
    # Moved, not copied or linked: one copy of the weights, and the checkpoint folder keeps only an empty folder.
    assert (out / "model.safetensors").stat().st_ino == inode and (out / "model.safetensors").stat().st_nlink == 1
    assert [p.name for p in checkpoint.rglob("*")] == ["abliterate"]
    assert publish(out, checkpoint, "new card") == ["README.md"]  # already published: only the card is rewritten
    unpublish(out, checkpoint, published)
    assert [p for p in out.rglob("*") if p.is_file()] == []
    assert sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()) == [
        "abliterate/direction.json", "config.json", "model.safetensors", "tokenizer.json"]


def test_resolved_config_round_trips_and_the_command_has_no_local_path(tmp_path: Path):
    config = load_config(overrides={"eval": {"max_new_tokens": 9}, "measure": {"refusal_openings": ["I", "As"]},
                                    "model": {"template_kwargs": {"enable_thinking": False}}})
    path = tmp_path / "config.toml"
    path.write_text(render_toml(config))
    assert load_config(path) == config
    local = tmp_path / "base-model"
    local.mkdir()
    command = reproduce_command(str(local), tmp_path / "out-dir")
    assert command == "abliterate run BASE_MODEL_DIR --out out-dir --config abliterate/config.toml"
    assert reproduce_command("Qwen/Qwen2.5-0.5B-Instruct", Path("/x/qwen-abl")).startswith(
        "abliterate run Qwen/Qwen2.5-0.5B-Instruct --out qwen-abl")


def test_an_output_inside_the_input_model_is_refused_before_any_work(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from abliterate.errors import UserError
    from abliterate.pipeline import run

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(1)}, str(model / "model.safetensors"))
    with pytest.raises(UserError, match="overlaps the input model"):
        run(str(model), model / "out", load_config())
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_scrub_replaces_known_paths_everywhere_and_machine_paths_only_in_records(tmp_path: Path):
    import os
    import tempfile

    from abliterate.publish import RECORD_SUFFIXES, machine_paths, private_paths, scrub_tree

    out, model = tmp_path / "out", tmp_path / "models" / "my-base"
    (out / "abliterate" / "eval").mkdir(parents=True)
    model.mkdir(parents=True)
    home, temp = os.path.expanduser("~"), tempfile.gettempdir()
    record = out / "abliterate" / "eval" / "eval.json"
    record.write_text(json.dumps({"sources": {"base": str(model), "edited": str(out / "abliterate" / "x")},
                                  "ce_text": f"{home}/corpora/pile.txt", "cache": f"{temp}/cache"}))
    replies = out / "abliterate" / "eval" / "completions_edited_harmful.jsonl"
    replies.write_text(json.dumps({"reply": f"Save it to {temp}/notes.txt", "from": str(model)}) + "\n")
    known = private_paths(str(model), model, out, "my-base", [])
    scrub_tree(out / "abliterate", known)
    scrub_tree(out / "abliterate", machine_paths(), RECORD_SUFFIXES)
    assert json.loads(record.read_text()) == {"sources": {"base": "my-base", "edited": "./abliterate/x"},
                                              "ce_text": "~/corpora/pile.txt", "cache": "$TMPDIR/cache"}
    # Model text keeps what the model wrote; the paths the run knows are still replaced there.
    assert json.loads(replies.read_text()) == {"reply": f"Save it to {temp}/notes.txt", "from": "my-base"}


def test_run_warns_when_the_edit_left_refusal_where_it_was(tmp_path, caplog):
    import json as json_module
    import logging

    from abliterate.pipeline import _say_if_unchanged

    path = tmp_path / "eval.json"
    for edited, warned in ((1.0, True), (0.6, False)):
        caplog.clear()
        path.write_text(json_module.dumps({"models": {"base": {"refusal": {"rate": 1.0}},
                                                      "edited": {"refusal": {"rate": edited}}}}))
        with caplog.at_level(logging.WARNING):
            _say_if_unchanged(path)
        assert ("did not lower harmful refusal (1.00 -> 1.00)" in caplog.text) == warned
