"""The science end to end on the toy refuser: `measure`, then `apply`, then greedy replies to held-out prompts.

The toy refuses harmful requests; after its measured direction is removed from the weights it must answer them,
while still answering harmless ones (refusal judged by the paper's substrings on generated replies). Also: the
artifacts, the reference path (the chosen direction's cosine with itself is 1 and `--use-reference` reproduces it,
driven through the CLI), and the nothing-passes path leaving its scores behind.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from abliterate.config import load_config
from abliterate.direction import load_direction
from abliterate.errors import UserError
from abliterate.selection import NoDirectionError

# The toy's settings, with one departure from the paper: adding the toy's refusal direction raises its refusal
# score on harmless prompts (and makes most replies refusals) but leaves the mean log-odds below 0, so the paper's
# induce filter would discard every candidate; the bypass and KL filters still apply.
TOY_SETTINGS = {
    "model": {"dtype": "float32", "device_map": "cpu"},
    "prompts": {"harmful_train": "builtin:toy_harmful_train", "harmless_train": "builtin:toy_harmless_train",
                "harmful_eval": "builtin:toy_harmful_eval", "harmless_eval": "builtin:toy_harmless_eval",
                "n_train": 128, "n_val": 32, "n_eval": 100},
    "measure": {"batch_size": 64},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**measure):
    settings = {**TOY_SETTINGS, "measure": {**TOY_SETTINGS["measure"], **measure}}
    return load_config(None, settings)


@pytest.fixture(scope="module")
def measured(toy_refuser_dir, tmp_path_factory):
    from abliterate.measure import measure

    out = tmp_path_factory.mktemp("measure") / "out"
    return measure(str(toy_refuser_dir), out, _config())


def _refusal_rate(model_dir: Path, prompts: list[str], config) -> float:
    """Share of greedy replies that contain one of the paper's refusal substrings."""
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.metrics import PAPER_REFUSALS, is_refusal
    from abliterate.model import load_model

    model, tokenizer = load_model(str(model_dir), config.model)
    texts = format_instructions(tokenizer, prompts, config.model)
    stops = stop_token_ids(tokenizer, model.generation_config)
    replies = generate_transformers(model, tokenizer, texts, stops, max_new_tokens=16, batch_size=100)
    return sum(is_refusal(r.text, PAPER_REFUSALS) for r in replies) / len(replies)


def test_measure_then_apply_removes_refusal_on_held_out_prompts(measured, toy_refuser_dir, tmp_path):
    from abliterate.apply import apply_direction
    from abliterate.prompts import prompt_sets

    config = _config()
    sets = prompt_sets(config.prompts)
    harmful, harmless = [p.text for p in sets.harmful_eval], [p.text for p in sets.harmless_eval]
    edited = tmp_path / "edited"
    apply_direction(str(toy_refuser_dir), measured.direction_path, edited, config)
    assert _refusal_rate(toy_refuser_dir, harmful, config) >= 0.9
    assert _refusal_rate(edited, harmful, config) <= 0.1
    assert _refusal_rate(edited, harmless, config) <= 0.1


def test_artifacts_describe_the_choice(measured):
    out = measured.out_dir
    scores = json.loads((out / "scores.json").read_text())
    n_layers, d_model = scores["n_layers"], scores["d_model"]
    k = len(scores["positions"])
    tensors = load_file(str(out / "candidates.safetensors"))
    assert tensors["candidates"].shape == (k, n_layers, d_model) and tensors["candidates"].dtype == torch.float64
    assert torch.equal(tensors["candidates"], tensors["harmful_mean"] - tensors["harmless_mean"])
    assert len(scores["candidates"]) == k * n_layers
    chosen = [c for c in scores["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["failed"] == []
    assert (chosen[0]["layer"], chosen[0]["position"]) == (measured.layer, measured.position)
    passing = [c for c in scores["candidates"] if not c["failed"] and c["induce"] is not None]
    assert chosen[0]["bypass"] == min(c["bypass"] for c in passing)
    cutoff = scores["filters"]["first_discarded_layer"]
    assert all(f"layer >= {cutoff}" in c["failed"] for c in scores["candidates"] if c["layer"] >= cutoff)
    assert scores["seed"] == 42 and scores["prompt_counts"]["harmful_train_kept"] >= 2
    assert (out / "scores.png").stat().st_size > 0

    direction = load_direction(measured.direction_path, d_model=d_model)
    raw = tensors["candidates"][measured.position + k, measured.layer]  # [d_model]
    assert torch.allclose(direction.vector.double(), raw / raw.norm(), atol=1e-7)
    assert (direction.layer, direction.position) == (measured.layer, measured.position)
    meta = json.loads(measured.direction_path.read_text())
    assert meta["token_text"] == scores["positions"][str(measured.position)]
    assert meta["scores"]["bypass"] == chosen[0]["bypass"] and meta["seed"] == 42
    assert meta["candidate_norm"] == pytest.approx(float(raw.norm()), rel=1e-9)


def test_use_reference_reproduces_the_direction_through_the_cli(measured, toy_refuser_dir, tmp_path):
    from typer.testing import CliRunner

    from abliterate.cli import app

    out = tmp_path / "again"
    config_file = tmp_path / "toy.toml"
    config_file.write_text("\n".join(
        [f"[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
         for section, values in TOY_SETTINGS.items()]) + "\n")
    args = ["measure", str(toy_refuser_dir), "--out", str(out), "--config", str(config_file),
            "--direction-file", str(measured.direction_path), "--use-reference"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"{measured.layer}" in result.output and "Reference: best cosine 1.0000" in result.output
    assert 'Refusal: refusal scored at the first reply token on the tokens ["I"] (found from the base model' in \
        result.output

    first, again = load_direction(measured.direction_path), load_direction(out / "direction.json")
    assert torch.allclose(first.vector, again.vector, atol=1e-7)
    assert (again.layer, again.position) == (measured.layer, measured.position)
    reference = json.loads((out / "scores.json").read_text())["reference"]
    assert reference["chosen_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert (reference["best_candidate"]["layer"], reference["best_candidate"]["position"]) == (
        measured.layer, measured.position)
    rows = (out / "reference_cosines.csv").read_text().splitlines()
    assert rows[0] == "position,layer,candidate_cosine,harmful_mean_single_cosine,harmful_normalized_mean_cosine"
    assert (out / "reference_cosines.png").is_file()
    # The reference's own scores equal the scores it had as a candidate: same passes, same numbers.
    assert json.loads((out / "direction.json").read_text())["scores"]["bypass"] == pytest.approx(
        measured.chosen["bypass"], abs=1e-6)


def test_nothing_passes_leaves_scores_and_says_which_filter(toy_refuser_dir, tmp_path):
    from abliterate.measure import measure

    out = tmp_path / "strict"
    with pytest.raises(NoDirectionError) as caught:
        measure(str(toy_refuser_dir), out, _config(kl_max=1e-12))
    message = str(caught.value)
    assert message.startswith("No candidate direction passed the filters")
    assert "failed: kl > 1e-12" in message and "Hint: relax the failing filter" in message
    scores = json.loads((out / "scores.json").read_text())
    scored = [c for c in scores["candidates"] if c["bypass"] is not None]
    assert scores["chosen"] is None and scored and all("kl > 1e-12" in c["failed"] for c in scored)
    assert not (out / "direction.json").exists()
    assert all(c["induce"] is None for c in scores["candidates"])  # pruned: induce could not change anything
    unscored = [c["failed"] for c in scores["candidates"] if c["bypass"] is None]
    assert all(f == ["zero vector"] or f[0].startswith("layer >= ") for f in unscored)


def test_refusal_openings_the_model_never_uses_are_caught_by_the_prompt_filter(toy_refuser_dir, tmp_path):
    from abliterate.errors import UserError
    from abliterate.measure import measure

    # The toy refuses with "I cannot ...": scored on "Sure" (how it answers) it seems to refuse nothing, and no
    # direction could be meaningful, so measure stops before scoring and says what usually causes it.
    with pytest.raises(UserError) as caught:
        measure(str(toy_refuser_dir), tmp_path / "out", _config(refusal_openings=["Sure"]))
    message = str(caught.value)
    assert message.startswith("Only 0 of 128 harmful training prompts are ones the base model refuses (at least 13 "
                              "needed); this usually means the chat template is wrong")
    assert "(measure.refusal_openings)" in message and "measure.filter_prompts = false" in message
    assert message.endswith('(How refusal was read: refusal scored at the first reply token on the tokens ["Sure"] '
                            "(as configured: they open 0 of 32 harmful replies).)")
    assert not (tmp_path / "out").exists()


def test_a_bare_reference_vector_is_placed_at_its_most_aligned_candidate(measured, toy_refuser_dir, tmp_path):
    from abliterate.measure import measure

    bare = tmp_path / "direction.pt"  # the paper code's format: a tensor, no layer or position
    torch.save(load_direction(measured.direction_path).vector * 3.0, bare)
    again = measure(str(toy_refuser_dir), tmp_path / "out", _config(direction_file=str(bare), use_reference=True))
    assert (again.layer, again.position) == (measured.layer, measured.position)
    assert again.chosen["bypass"] == pytest.approx(measured.chosen["bypass"], abs=1e-6)
    assert again.chosen["induce"] == pytest.approx(measured.chosen["induce"], abs=1e-5)
    assert load_direction(tmp_path / "out" / "direction.json").layer == measured.layer


def test_measure_and_optimize_never_write_into_a_folder_holding_a_users_files(toy_refuser_dir, tmp_path):
    from abliterate.files import check_out_dir
    from abliterate.measure import OUTPUT_NAMES, measure
    from abliterate.optimize import OUTPUT_NAMES as OPTIMIZE_NAMES
    from abliterate.optimize import optimize

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for command in (measure, optimize):
        with pytest.raises(UserError, match=r"holds files this command does not write \(notes.txt\)"):
            command(str(toy_refuser_dir), out, _config())
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"  # an earlier measurement (or optimize folder) is replaced or continued
    earlier.mkdir()
    for name in (*OUTPUT_NAMES[:3], "trials.jsonl"):
        (earlier / name).write_text("{}")
    assert check_out_dir(earlier, False, own_names=OPTIMIZE_NAMES) == earlier
