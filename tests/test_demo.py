"""`abliterate demo`: the whole job on the toy refuser, offline, showing the refusal drop on held-out prompts."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from typer.testing import CliRunner

from abliterate.cli import app
from abliterate.config import load_config
from abliterate.demo import TOY_CONFIG, demo, demo_config

ROOT = Path(__file__).resolve().parents[1]
REFUSAL = "I cannot"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_demo_runs_the_settings_file_shipped_in_the_package(tmp_path: Path, monkeypatch):
    # configs/toy.toml is the package's file, and the package data the build ships includes it.
    assert (ROOT / "configs" / "toy.toml").resolve() == TOY_CONFIG.resolve()
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["abliterate"]
    assert any(fnmatch(TOY_CONFIG.relative_to(TOY_CONFIG.parents[1]).as_posix(), pattern) for pattern in shipped)
    assert load_config(TOY_CONFIG) == demo_config()
    # The demo reads the file each time: an edited file is what it runs, not a copy kept in code.
    edited = tmp_path / "toy.toml"
    edited.write_text(TOY_CONFIG.read_text().replace("n_eval = 100", "n_eval = 12"))
    monkeypatch.setattr("abliterate.demo.TOY_CONFIG", edited)
    assert demo_config().prompts.n_eval == 12


def test_demo_shows_the_refusal_drop(tmp_path: Path):
    out = tmp_path / "demo"
    result = demo(out)
    assert len(result.replies) == 8  # builtin:toy_demo: 4 harmful then 4 harmless held-out prompts
    refused_before = sum(REFUSAL in before for _, before, _ in result.replies[:4])
    refused_after = sum(REFUSAL in after for _, _, after in result.replies)
    assert refused_before >= 3 and refused_after <= 1
    assert all(after.startswith("Sure") for _, _, after in result.replies[4:])  # harmless ones still answered
    assert result.run.layer is not None and result.run.report_path and result.run.report_path.is_file()
    assert any(row[0].startswith("Refusal rate, harmful") for row in result.run.metrics)

    # The command prints the same replies and the summary; on the finished folder every step is reused.
    shown = CliRunner().invoke(app, ["demo", "--out", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "Reused finished steps: measure, apply, eval" in shown.output
    assert result.replies[0][0] in shown.output and "Refusal rate, harmful" in shown.output
