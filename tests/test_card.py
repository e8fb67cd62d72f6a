"""The model card: Hub metadata, what was edited, the evaluation and the command, and nothing local in it."""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from huggingface_hub.repocard import metadata_load

from abliterate.card import (
    CardFacts,
    base_license,
    eval_results,
    hub_dataset,
    install_command,
    render_card,
    scrub,
    write_card,
)

EVAL_MD = """| metric | base | edited |
|---|---|---|
| refusal rate, harmful (n=100) | 0.95 | 0.02 |
| refusal rate, harmless (n=100) | 0.01 | 0.00 |

Edited model: {out}/model, base: {home}/models/base, judge key tgp_v1_abcdefghijklmnopqrstuvwxyz0123
"""


def _facts(tmp_path: Path, **changes) -> CardFacts:
    facts = CardFacts(
        base_model="Qwen/Qwen2.5-0.5B-Instruct", model_type="qwen2", n_layers=24, layer=14, position=-2,
        edited_counts={"attention output": 24, "mlp output": 24, "embedding": 1},
        command="abliterate run Qwen/Qwen2.5-0.5B-Instruct --out Qwen2.5-0.5B-Instruct-abliterated "
                "--config abliterate/config.toml",
        version="0.1.0", license={"license": "apache-2.0"}, position_token="<|im_start|>",
        n_prompts={"harmful_train": 128, "harmless_train": 128}, untied=True,
        eval_markdown=EVAL_MD.format(out=tmp_path / "out", home=os.path.expanduser("~")),
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_front_matter_is_hub_metadata(tmp_path: Path):
    path = write_card(tmp_path, _facts(tmp_path))
    metadata = metadata_load(path)
    assert metadata["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers"
    assert "abliterated" in metadata["tags"]
    assert not list(tmp_path.glob(".*tmp"))


def test_body_states_the_edit_the_evaluation_and_the_command(tmp_path: Path):
    card = render_card(_facts(tmp_path))
    assert "input of layer 14 of 24 at position -2" in card
    assert "activations on 128 harmful and 128 harmless instructions" in card
    assert "| attention output | 24 |" in card and "| **total** | **49** |" in card
    assert "tie_word_embeddings: false" in card
    assert "| refusal rate, harmful (n=100) | 0.95 | 0.02 |" in card
    assert "abliterate run Qwen/Qwen2.5-0.5B-Instruct --out Qwen2.5-0.5B-Instruct-abliterated" in card
    assert "pip install abliterate==" not in card  # no such release to point at: see the install tests
    assert "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct" in card
    assert "(the token `<|im_start|>`)" in card


def test_a_newline_token_and_an_embedded_report_heading_read_well(tmp_path: Path):
    card = render_card(_facts(tmp_path, position_token="\n", eval_markdown="## Evaluation\n\n| a | b |\n"))
    assert "(the token `\\n`)" in card
    assert card.count("## Evaluation") == 1


def test_no_local_paths_user_names_or_tokens(tmp_path: Path):
    card = render_card(_facts(tmp_path), replacements={str(tmp_path / "out"): "."})
    assert str(tmp_path) not in card and "/tmp/" not in card
    assert os.path.expanduser("~") not in card
    assert f"/{getpass.getuser()}/" not in card and "/home/" not in card
    assert "tgp_v1_" not in card and "<redacted>" in card
    assert "Edited model: ./model, base: base" in card


def test_skipped_evaluation_claims_nothing(tmp_path: Path):
    card = render_card(_facts(tmp_path, eval_markdown=""))
    assert "Evaluation was skipped" in card and "refusal rate" not in card


def test_local_base_has_no_base_model_and_unknown_license(tmp_path: Path):
    card = render_card(_facts(tmp_path, base_model="", license={}))
    path = tmp_path / "README.md"
    path.write_text(card)
    metadata = metadata_load(path)
    assert "base_model" not in metadata and "license" not in metadata
    assert "A local qwen2 checkpoint" in card


def test_license_from_base_card_then_config(tmp_path: Path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: qwen\nlicense_link: LICENSE\n---\n# x\n")
    assert base_license(tmp_path, {}) == {"license": "other", "license_name": "qwen", "license_link": "LICENSE"}
    (tmp_path / "README.md").write_text("# no metadata\n")
    assert base_license(tmp_path, {"license": "mit"}) == {"license": "mit"}
    assert base_license(tmp_path, {}) == {}


def test_scrub_keeps_urls_and_fractions():
    text = "see https://huggingface.co/a/b and 3/4 of harmful/harmless, file /data/models/llama/config.json"
    assert scrub(text) == "see https://huggingface.co/a/b and 3/4 of harmful/harmless, file config.json"


def test_a_supplied_reference_direction_is_not_called_selected(tmp_path: Path):
    card = render_card(_facts(tmp_path, used_reference=True))
    assert "supplied as a reference direction file (`--use-reference`)" in card
    assert "its best-aligned candidate is layer 14, position -2" in card and "chosen among all" not in card


def test_hub_metadata_relation_datasets_and_model_index(tmp_path: Path):
    results = eval_results({"columns": ["base", "edited"], "models": {
        "base": {"refusal": {"rate": 0.95, "n": 100}},
        "edited": {"refusal": {"rate": 0.02, "n": 100}, "over_refusal": {"rate": 0.0, "n": 100}, "safety": None}}},
        "hf:JailbreakBench/JBB-Behaviors/behaviors@c19227d:harmful#Goal", "builtin:toy_harmless_eval")
    facts = _facts(tmp_path, datasets=[hub_dataset("hf:walledai/AdvBench@0fdedd5:train#prompt"),
                                       hub_dataset("hf:tatsu-lab/alpaca:train#instruction"), hub_dataset("builtin:x")],
                   eval_results=results, figure="abliterate/measure/scores.png")
    path = write_card(tmp_path, facts)
    metadata = metadata_load(path)
    assert metadata["base_model_relation"] == "finetune"
    assert metadata["datasets"] == ["tatsu-lab/alpaca", "walledai/AdvBench"]
    (entry,) = metadata["model-index"]
    metrics = {m["type"]: m["value"] for result in entry["results"] for m in result["metrics"]}
    assert metrics == {"refusal_rate": 0.02, "over_refusal_rate": 0.0}  # the edited model's, no judge: no unsafe
    datasets = {result["dataset"]["type"] for result in entry["results"]}
    assert datasets == {"JailbreakBench/JBB-Behaviors", "builtin:toy_harmless_eval"}
    assert "](abliterate/measure/scores.png)" in path.read_text()


def test_reproduce_block_points_at_the_installed_source(monkeypatch):
    from importlib import metadata

    class Installed:
        def __init__(self, direct_url):
            self.version, self.direct_url = "0.1.0", direct_url

        def read_text(self, name):
            return self.direct_url

    for direct_url, expected in [
        (None, "pip install abliterate==0.1.0"),  # from a package index
        ('{"url": "https://github.com/o/abliterate", "vcs_info": {"vcs": "git", "commit_id": "abc123"}}',
         "pip install git+https://github.com/o/abliterate@abc123"),
        ('{"url": "file:///home/me/abliterate", "dir_info": {"editable": true}}', ""),  # a local checkout
    ]:
        monkeypatch.setattr(metadata, "distribution", lambda name, d=direct_url: Installed(d))
        assert install_command() == expected
    card = render_card(CardFacts(base_model="", model_type="llama", n_layers=2, layer=1, position=-1,
                                 edited_counts={}, command="abliterate run M --out o", version="0.1.0"))
    assert "```bash\n# abliterate 0.1.0\nabliterate run M --out o\n```" in card
def test_the_card_says_how_refusal_was_found(tmp_path):
    from abliterate.refusal import RefusalProfile

    profile = RefusalProfile("discovered", "<think>\n\n</think>\n\n", [7], ["I"], ["i'm sorry, but"], {}, "</think>",
                             32, 32, 31, 0.994, [1, 2])
    card = render_card(_facts(tmp_path, refusal=profile.to_dict()))
    assert ("position -2 from the end of the prompt and the shared reply prefix (the token `<|im_start|>`)" in card)
    assert ('read the refusal scored after the shared reply prefix `"<think>\\n\\n</think>\\n\\n"` on the tokens `["I"]` '
            "(found from the base model's greedy replies: they open 31 of 32 harmful replies; separation of harmful "
            "from harmless prompts, AUC 0.994)." in card)
    assert "shared reply prefix" not in render_card(_facts(tmp_path))


def test_the_warning_says_what_the_evaluation_found(tmp_path):
    """A card never calls a model that still refuses as its base "less likely to refuse"."""
    from abliterate.card import refusal_change

    lowered = render_card(_facts(tmp_path, refusal_change=(1.0, 0.6)))
    assert "refuses harmful requests less often than its base (harmful refusal 1.00 -> 0.60" in lowered
    unchanged = render_card(_facts(tmp_path, refusal_change=(1.0, 1.0)))
    assert "did not lower harmful refusal in the evaluation below (1.00 -> 1.00)" in unchanged
    assert "less often" not in unchanged and "less likely" not in unchanged
    assert "(not evaluated here)" in render_card(_facts(tmp_path, refusal_change=None))
    data = {"models": {"base": {"refusal": {"rate": 1.0}}, "edited": {"refusal": {"rate": 0.25}}}}
    assert refusal_change(data) == (1.0, 0.25) and refusal_change({"models": {"edited": {}}}) is None
