"""Hidden staging folders after a crash: a rerun of `apply` removes the ones a killed writer left (and says so),
and leaves alone one that another process is still filling and one that is not abliterate's."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from apply_models import save_checkpoint, tiny_llama

from abliterate import staging
from abliterate.apply import apply_direction
from abliterate.config import load_config
from abliterate.direction import save_direction
from abliterate.staging import OWNER_FILE, make_staging, replace_dir

HOLDER = """
import sys, time
from pathlib import Path
from abliterate.staging import make_staging
staging = make_staging(Path(sys.argv[1]))
(staging.path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 4096)  # a finished shard
print(staging.path, flush=True)
time.sleep(120)
"""


def _writer(out: Path) -> tuple[subprocess.Popen, Path]:
    """A process that stages an output for `out` and then hangs (as a writer in the middle of a shard does)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_rerun_removes_what_a_killed_apply_left_and_keeps_what_is_in_use(tmp_path: Path, caplog):
    model = save_checkpoint(tiny_llama(torch.float32, n_layers=1), tmp_path / "model")
    direction = save_direction(tmp_path / "direction", torch.randn(32), {})
    out = tmp_path / "edited"
    killed, stale = _writer(out)
    killed.send_signal(signal.SIGKILL)  # no cleanup runs: the folder stays, hidden
    killed.wait()
    running, busy = _writer(out)
    foreign = tmp_path / ".edited.abliterate-tmp-notours"
    foreign.mkdir()  # same pattern, no owner file: not ours to remove
    try:
        assert stale.is_dir() and (stale / OWNER_FILE).is_file()
        with caplog.at_level(logging.WARNING, logger="abliterate.staging"):
            apply_direction(str(model), direction, out, load_config())
        assert not stale.exists() and busy.is_dir() and foreign.is_dir()
        assert f"Removed {stale.name}, left by an interrupted write to edited" in caplog.text
        assert busy.name not in caplog.text
        assert not (out / OWNER_FILE).exists()  # the finished output carries no staging marker
    finally:
        running.kill()
        running.wait()


def test_a_ctrl_c_while_the_staging_folder_is_being_made_leaves_nothing(tmp_path: Path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(staging.fcntl, "flock", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_staging(tmp_path / "edited")
    assert list(tmp_path.iterdir()) == []


def test_a_ctrl_c_between_the_two_renames_puts_the_old_output_back(tmp_path: Path, monkeypatch):
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text("old")
    new = make_staging(out)
    (new.path / "config.json").write_text("new")
    new.release()
    real_rename = Path.rename

    def rename(self: Path, target):
        if self == new.path:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new.path, out)
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, new.path.name])  # no old copy left aside
