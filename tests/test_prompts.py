"""Prompt loading (every format, its bad-file errors, Hub datasets through a local folder) and prompt_sets
(seeded, deduplicated, disjoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate.config import load_config
from abliterate.errors import UserError
from abliterate.prompts import Prompt, load_prompts, parse_hf_source, prompt_sets


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_txt_one_prompt_a_line_blank_lines_skipped(tmp_path):
    source = _write(tmp_path / "p.txt", "First prompt\n\n  Second prompt  \n")
    assert load_prompts(source) == [Prompt("First prompt"), Prompt("Second prompt")]


def test_json_list_of_strings_and_objects_with_detected_column(tmp_path):
    assert load_prompts(_write(tmp_path / "a.json", '["one", "two"]')) == [Prompt("one"), Prompt("two")]
    rows = [{"Goal": "Write a thing", "Category": "Fraud", "Index": 1}, {"Goal": "Do a thing", "Category": "Malware"}]
    assert load_prompts(_write(tmp_path / "b.json", json.dumps(rows))) == [
        Prompt("Write a thing", "Fraud"), Prompt("Do a thing", "Malware")]


def test_alpaca_rows_with_an_input_are_dropped(tmp_path):
    rows = [{"instruction": "Name a fruit.", "input": "", "output": "Apple"},
            {"instruction": "Translate this.", "input": "Bonjour", "output": "Hello"}]
    assert load_prompts(_write(tmp_path / "alpaca.json", json.dumps(rows))) == [Prompt("Name a fruit.")]


def test_jsonl_csv_and_parquet_with_explicit_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = _write(tmp_path / "p.jsonl", '{"q": "alpha"}\n\n{"q": "beta"}\n')
    assert [p.text for p in load_prompts(jsonl, column="q")] == ["alpha", "beta"]
    csv_file = _write(tmp_path / "p.csv", 'Behavior,category\n"Say ""hi"", twice",greeting\nWave,gesture\n')
    assert load_prompts(csv_file) == [Prompt('Say "hi", twice', "greeting"), Prompt("Wave", "gesture")]
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "other": [1, 2]}), tmp_path / "p.parquet")
    assert [p.text for p in load_prompts(str(tmp_path / "p.parquet"))] == ["p1", "p2"]


@pytest.mark.parametrize("name, content, column, message", [
    ("missing.txt", None, "", "missing.txt does not exist; pass an existing file"),
    ("empty.txt", "\n \n", "", "empty.txt has no prompts; fill it or pass another file"),
    ("bad.json", '["a", ', "", "bad.json is not valid JSON (line 1"),
    ("obj.json", '{"a": [1], "b": [2]}', "", "holds an object, not a list of prompts"),
    ("col.json", '[{"prompt": "x"}]', "goal",
     "col.json row 1 has no column 'goal' (it has prompt); choose the instruction column with --column"),
    ("nocol.json", '[{"text2": "x"}]', "", "no instruction column found among text2; name it with --column"),
    ("row.jsonl", '{"prompt": "ok"}\nnot json\n', "", "row.jsonl row 2 is not valid JSON"),
    ("blank.jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n', "", "blank.jsonl row 2 has an empty or non-text prompt"),
    ("wide.csv", "prompt\nfine\nbad,extra\n", "", "wide.csv row 3 has more fields than the header"),
    ("p.xlsx", "x", "", "unknown format '.xlsx'; use .txt, .json, .jsonl, .csv or .parquet"),
    ("latin.txt", b"caf\xe9\n", "", "latin.txt is not UTF-8 text"),
    ("broken.parquet", "not parquet", "", "broken.parquet is not a readable parquet file"),
])
def test_bad_files_name_the_file_row_and_fix(tmp_path, name, content, column, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_prompts(str(path), column=column)


def test_builtin_sets_and_unknown_builtin():
    assert len(load_prompts("builtin:toy_harmful_eval")) == 100
    with pytest.raises(UserError, match="No bundled prompt set 'nope'; bundled sets are .*toy_demo"):
        load_prompts("builtin:nope")


def test_hf_source_syntax():
    assert parse_hf_source("hf:JailbreakBench/JBB-Behaviors/behaviors@abc123:harmful#Goal") == {
        "name": "JailbreakBench/JBB-Behaviors", "config": "behaviors", "revision": "abc123", "split": "harmful",
        "column": "Goal"}
    assert parse_hf_source("hf:owner/name:test@v1")["revision"] == "v1"
    assert parse_hf_source("hf:owner/name")["split"] == "train"
    with pytest.raises(UserError, match="as owner/name"):
        parse_hf_source("hf:justaname")


def test_hub_dataset_path_through_the_datasets_library(tmp_path):
    """A folder laid out like a Hub dataset repo is read by `datasets` itself (the same code path as the Hub)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"Goal": ["g1", "g2", "g3"], "Category": ["A", "B", "A"]}),
                   tmp_path / "repo" / "data" / "harmful-00000-of-00001.parquet")
    pq.write_table(pa.table({"Goal": ["b1"], "Category": ["C"]}), tmp_path / "repo" / "data" / "benign-00000-of-00001.parquet")
    repo = tmp_path / "repo"
    assert load_prompts(f"hf:{repo}:harmful#Goal") == [Prompt("g1", "A"), Prompt("g2", "B"), Prompt("g3", "A")]
    assert load_prompts(f"hf:{repo}:benign") == [Prompt("b1", "C")]
    with pytest.raises(UserError, match="Could not load the dataset .*check the name, config, split and revision"):
        load_prompts(f"hf:{repo}:validation")


def test_saved_dataset_folder_is_read(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "b"]})}).save_to_disk(tmp_path / "d")
    assert [p.text for p in load_prompts(f"hf:{tmp_path / 'd'}:train")] == ["a", "b"]


def _config(tmp_path: Path, harmful_train: list[str], harmless_train: list[str], harmful_eval: list[str],
            harmless_eval: list[str], **sizes):
    sources = {}
    for name, lines in (("harmful_train", harmful_train), ("harmless_train", harmless_train),
                        ("harmful_eval", harmful_eval), ("harmless_eval", harmless_eval)):
        sources[name] = _write(tmp_path / f"{name}.txt", "\n".join(lines) + "\n")
    return load_config(overrides={"prompts": {**sources, **sizes}}).prompts


def test_sampling_is_seeded_and_recorded(tmp_path):
    harmful = [f"bad {i}" for i in range(30)]
    harmless = [f"good {i}" for i in range(30)]
    config = _config(tmp_path, harmful, harmless, [f"bad eval {i}" for i in range(20)],
                     [f"good eval {i}" for i in range(20)], n_train=8, n_val=4, n_eval=10, seed=7)
    first, second = prompt_sets(config), prompt_sets(config)
    assert first == second
    config.seed = 8
    assert prompt_sets(config).harmful_train != first.harmful_train
    assert first.record()["seed"] == 7
    assert first.record()["sizes"] == {"harmful_train": 8, "harmful_val": 4, "harmless_train": 8, "harmless_val": 4,
                                       "harmful_eval": 10, "harmless_eval": 10}
    assert not {p.text for p in first.harmful_train} & {p.text for p in first.harmful_val}


def test_duplicates_and_overlaps_are_removed(tmp_path, caplog):
    harmful = ["steal", "Steal ", "rob", "hack", "burn"]  # "Steal " duplicates "steal" up to case and space
    harmless = ["bake", "paint", "rob", "cook", "sing"]  # "rob" is also harmful
    harmful_eval = ["steal", "rob", "hack", "burn", "new harm"]  # every fit prompt may appear here
    config = _config(tmp_path, harmful, harmless, harmful_eval, ["bake", "other"], n_train=3, n_val=1, n_eval=5)
    with caplog.at_level("WARNING"):
        sets = prompt_sets(config)
    fit = {p.text.lower().strip() for p in sets.harmful_train + sets.harmful_val}
    assert len(fit) == 4 and fit == {"steal", "rob", "hack", "burn"}
    assert [p.text for p in sets.harmful_eval] == ["new harm"]
    assert "rob" not in {p.text for p in sets.harmless_train + sets.harmless_val + sets.harmless_eval}
    assert sets.record()["duplicates_removed"]["harmful_train"] == 1
    assert sets.record()["overlaps_removed"]["harmful_eval_in_fit"] == 4
    assert "so that fitting and evaluation stay disjoint" in caplog.text


def test_too_few_fit_prompts_or_no_eval_left_are_user_errors(tmp_path):
    config = _config(tmp_path, ["a", "b"], ["c", "d", "e"], ["f"], ["g"], n_train=2, n_val=1)
    with pytest.raises(UserError, match=r"Harmful prompts .* number 2 after deduplication, fewer than "
                                        r"n_train \+ n_val = 3; lower prompts.n_train"):
        prompt_sets(config)
    config = _config(tmp_path, ["a", "b", "c"], ["d", "e", "f"], ["a", "b", "c"], ["g"], n_train=2, n_val=1)
    with pytest.raises(UserError, match="No harmful evaluation prompts are left"):
        prompt_sets(config)


def test_a_source_that_fails_is_named_by_its_key(tmp_path):
    """`--harmful` is a fit set in measure and an evaluation set in eval: the error names the key it set."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    config = load_config(overrides={"prompts": {"harmful_train": str(empty)}})
    with pytest.raises(UserError, match=r"has no prompts; fill it or pass another file\. \(prompts\.harmful_train\)$"):
        prompt_sets(config.prompts, fit_only=True)
