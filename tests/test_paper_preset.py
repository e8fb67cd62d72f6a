"""configs/paper.toml is the paper as published: its sources (pinned, or saying why not), judge, CE sizes, ActAdd."""

import re
import tomllib
from pathlib import Path

from abliterate.config import load_config
from abliterate.prompts import load_prompts, prompt_sets

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper.toml"


def _comment_above(lines: list[str], index: int) -> str:
    block = []
    while index > 0 and lines[index - 1].startswith("#"):
        index -= 1
        block.append(lines[index])
    return " ".join(block)


def test_paper_preset_loads_with_the_papers_settings():
    config = load_config(PAPER)
    p, e = config.prompts, config.eval
    assert [source.split(":")[1].split("@")[0] for source in p.harmful_train.split(" + ")] == [
        "walledai/AdvBench", "walledai/MaliciousInstruct", "walledai/TDC23-RedTeaming"]
    assert "harmbench_behaviors_text_val" in p.harmful_val and "JailbreakBench" in p.harmful_eval
    assert (p.n_train, p.n_val, p.n_eval, p.seed) == (128, 32, 100, 42)
    assert (e.judge, e.judge_model, e.judge_format, e.judge_min_words) == ("together", "meta-llama/LlamaGuard-2-8b",
                                                                          "paper", 15)
    assert e.actadd and e.max_new_tokens == 512 and e.refusal_set == "paper"
    assert (e.n_ce_docs, e.ce_max_tokens) == (4096, 256) and "pile-uncopyrighted" in e.ce_text


def test_every_unpinned_source_says_why():
    lines = PAPER.read_text().splitlines()
    values = tomllib.loads(PAPER.read_text())
    assert values  # the file is valid TOML
    prompts = values["prompts"]
    for index, line in enumerate(lines):
        sources = re.findall(r"hf:[^ \"]+", line) if not line.startswith("#") else []
        if any("@" not in source for source in sources):
            assert "not verifiable offline" in _comment_above(lines, index), line
        # A local file (HarmBench's validation CSV) has no revision to pin: its comment says so too.
        key = line.split("=")[0].strip()
        if key in prompts and isinstance(prompts[key], str) and not prompts[key].startswith("hf:"):
            assert "Unpinned" in _comment_above(lines, index) and "verifiable offline" in _comment_above(lines, index)


def test_joined_sources_and_a_validation_set_of_its_own(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"harmful a{i}" for i in range(6)) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"harmful b{i}" for i in range(6)) + "\nharmful val0\n")
    (tmp_path / "val.txt").write_text("\n".join(f"harmful val{i}" for i in range(5)) + "\n")
    (tmp_path / "ok.txt").write_text("\n".join(f"harmless {i}" for i in range(40)) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(f"harmful eval {i}" for i in range(4)) + "\n")
    assert len(load_prompts(f"{tmp_path / 'a.txt'} + {tmp_path / 'b.txt'}")) == 13
    settings = {"prompts": {"harmful_train": f"{tmp_path / 'a.txt'} + {tmp_path / 'b.txt'}",
                            "harmful_val": str(tmp_path / "val.txt"), "harmless_train": str(tmp_path / "ok.txt"),
                            "harmful_eval": str(tmp_path / "eval.txt"), "harmless_eval": str(tmp_path / "ok.txt"),
                            "n_train": 10, "n_val": 3, "n_eval": 4}}
    sets = prompt_sets(load_config(overrides=settings).prompts)
    assert all(p.text.startswith("harmful val") for p in sets.harmful_val) and len(sets.harmful_val) == 3
    # The fit never draws a validation prompt ("harmful val0" is in b.txt too).
    assert all(not p.text.startswith("harmful val") for p in sets.harmful_train) and len(sets.harmful_train) == 10
