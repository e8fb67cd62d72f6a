"""The figures `measure` writes, read back from matplotlib: labelled axes, the no-edit baseline, token labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from abliterate import plots
from abliterate.selection import CandidateScore


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures as they are saved (the functions close them afterwards)."""
    figures: list = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    return figures


def _scores() -> list[CandidateScore]:
    scores = [CandidateScore(position=p, layer=layer, bypass=-1.0 - layer, kl=0.01 * layer, induce=0.5)
              for p in (-2, -1) for layer in range(4)]
    scores[5].chosen = True
    return scores


def test_scores_figure_has_y_labels_and_the_base_model_baseline(tmp_path: Path, drawn: list):
    path = plots.plot_scores(_scores(), tmp_path / "scores.png", title="toy-model: refusal direction candidates",
                             token_texts={-2: "<|end|>", -1: "\n"}, kl_max=0.1,
                             baseline={"bypass": 3.25, "induce": -2.5})
    assert path.stat().st_size > 0
    (figure,) = drawn
    axes = figure.axes
    assert all(axis.get_ylabel() for axis in axes) and all(axis.get_xlabel() == "layer" for axis in axes)
    for axis, expected in zip(axes, (3.25, -2.5, 0.0)):
        baselines = [line for line in axis.get_lines() if line.get_label() == "no edit (base model)"]
        assert len(baselines) == 1 and list(baselines[0].get_ydata()) == [expected, expected]
    legend = [text.get_text() for text in axes[0].get_legend().get_texts()]
    assert "pos -2 '<|end|>'" in legend and "pos -1 '\\n'" in legend and "no edit (base model)" in legend
    assert figure._suptitle.get_text() == "toy-model: refusal direction candidates"


def test_cosine_heatmap_labels_tokens_and_its_colour_bar(tmp_path: Path, drawn: list):
    plots.plot_cosine_heatmap(torch.zeros(2, 4), tmp_path / "cosines.png", token_texts={-2: "<|end|>", -1: "\n"})
    (figure,) = drawn
    heatmap, bar = figure.axes
    assert [label.get_text() for label in heatmap.get_yticklabels()] == ["-2 '<|end|>'", "-1 '\\n'"]
    assert heatmap.get_ylabel() and bar.get_ylabel() == "cosine similarity with the reference"


def test_measure_names_the_model_publicly_in_its_files_and_figure_title(toy_refuser_dir: Path, tmp_path: Path,
                                                                        drawn: list, one_thread):
    import json

    from safetensors import safe_open

    from abliterate.config import load_config
    from abliterate.measure import measure

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "measured"
    measure(str(toy_refuser_dir), out, load_config(root / "configs" / "toy.toml"))
    assert drawn[0]._suptitle.get_text() == f"{toy_refuser_dir.name}: refusal direction candidates"
    assert json.loads((out / "scores.json").read_text())["model"] == toy_refuser_dir.name
    assert json.loads((out / "direction.json").read_text())["model"] == toy_refuser_dir.name
    for name in ("candidates.safetensors", "direction.safetensors"):
        with safe_open(str(out / name), framework="pt") as handle:
            assert str(toy_refuser_dir) not in json.dumps(handle.metadata())
    baselines = [line for line in drawn[0].axes[0].get_lines() if line.get_label() == "no edit (base model)"]
    assert baselines and baselines[0].get_ydata()[0] > 0  # the toy refuses its harmful prompts without an edit


def test_pareto_figure_marks_the_front_the_chosen_and_the_papers_edit(tmp_path: Path, drawn: list):
    trials = [{"trial": 0, "refusal": 0.02, "kl": 0.004, "pareto": True},  # the paper's edit
              {"trial": 1, "refusal": 0.03, "kl": 0.0005, "pareto": True},
              {"trial": 2, "refusal": 0.60, "kl": 0.0001, "pareto": True},
              {"trial": 3, "refusal": 0.50, "kl": 0.01, "pareto": False},
              {"trial": 4, "refusal": float("nan"), "kl": 0.01, "pareto": False},
              {"trial": 5, "refusal": 0.9, "kl": None, "pareto": False}]  # kept refusing: KL not computed
    path = plots.plot_pareto(trials, chosen=1, paper=0, path=tmp_path / "pareto.png", title="toy-model: refusal vs KL")
    assert path.stat().st_size > 0
    (figure,) = drawn
    (axis,) = figure.axes
    assert axis.get_xlabel().startswith("per-token KL") and axis.get_ylabel().startswith("refusal probability")
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels == ["trial (1 more kept refusing: no KL computed)", "Pareto front", "paper's edit (trial 0)",
                      "chosen (trial 1)"]
    (front,) = [line for line in axis.get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [0.0001, 0.0005, 0.004]  # joined in order of KL, trial 3 is not on it
    marked = {c.get_label(): c.get_offsets().tolist() for c in axis.collections}
    assert marked["paper's edit (trial 0)"] == [[0.004, 0.02]] and marked["chosen (trial 1)"] == [[0.0005, 0.03]]
    assert len(marked[labels[0]]) == 4  # the trials without a finite refusal or a KL are left out
