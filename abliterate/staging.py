"""Staging folders beside an output: made, locked while in use, moved into place, and swept up after a crash.

A writer builds its output in a hidden `.NAME.abliterate-tmp-XXXX/` beside `NAME` and renames it into place when
complete, so a reader never sees half an output. A SIGKILL (or a power cut) leaves that folder behind, holding
every shard finished so far: gigabytes that `ls` does not show. Each staging folder therefore holds an owner file
that its writer keeps locked (`flock`) for as long as it runs. The next write to the same output removes the
folders that are ours (they hold the owner file) and whose lock is free (their writer is gone), and leaves alone a
folder another process is filling right now.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from abliterate.files import umask

logger = logging.getLogger(__name__)

OWNER_FILE = ".abliterate-owner"
# The staging kinds abliterate leaves beside an output: a new output being written, an old one being replaced.
KINDS = ("abliterate-tmp", "abliterate-old")


@dataclass
class Staging:
    """A locked staging folder; `release` before renaming it into place."""

    path: Path
    lock: IO[str] | None

    def release(self) -> None:
        """Drop the owner file and its lock, so the folder can become (part of) the output."""
        if self.lock is not None:
            (self.path / OWNER_FILE).unlink(missing_ok=True)
            self.lock.close()  # closing the file releases the flock
            self.lock = None


def make_staging(out_dir: Path, kind: str = "abliterate-tmp") -> Staging:
    """A new staging folder `.OUT.KIND-XXXX` beside `out_dir`, with its owner file locked by this process."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-", dir=out_dir.parent))
    try:  # a Ctrl-C before the caller holds the folder must not leave it behind
        path.chmod(0o777 & ~umask())  # mkdtemp makes it private (0700); the output should be like any other folder
        lock = (path / OWNER_FILE).open("w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"abliterate staging folder of {out_dir.name}, pid {os.getpid()}\n")
        lock.flush()
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return Staging(path, lock)


def _in_use(owner: Path) -> bool:
    """True while the owner file's lock is held by a writer (this process's own open staging folders included)."""
    try:
        with owner.open("r") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:  # released a moment ago: its writer is renaming it into place
        return True


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove the staging folders of `out_dir` that an interrupted writer left behind; return what was removed."""
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    removed = []
    for kind in KINDS:
        for folder in sorted(parent.glob(f".{out_dir.name}.{kind}-*")):
            owner = folder / OWNER_FILE
            if not folder.is_dir() or not owner.is_file() or _in_use(owner):
                continue  # not ours, or still being written
            size = _size_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("Removed %s, left by an interrupted write to %s (%.1f MB).", folder.name, out_dir.name,
                           size / 1e6)
            removed.append(folder)
    return removed


def fresh_staging(out_dir: Path) -> Staging:
    """A locked staging folder beside `out_dir`, after sweeping the ones an interrupted writer left there."""
    remove_stale(out_dir)
    return make_staging(out_dir)


def replace_dir(staged: Path, out_dir: Path) -> None:
    """Swap the finished staging folder in for `out_dir`; an old output is moved aside first and removed last."""
    old = make_staging(out_dir, "abliterate-old").path if out_dir.exists() else None  # locked: never swept as stale
    try:
        if old is not None:
            out_dir.rename(old / out_dir.name)
        staged.rename(out_dir)
    except BaseException:  # a failed rename or a Ctrl-C between the two renames: put the old output back
        if old is not None and not out_dir.exists() and (old / out_dir.name).exists():
            (old / out_dir.name).rename(out_dir)
        raise
    finally:
        if old is not None and (out_dir.exists() or not (old / out_dir.name).exists()):  # never the only copy
            shutil.rmtree(old, ignore_errors=True)


def merge_into(staged: Path, out_dir: Path) -> None:
    """Move the finished files of a staging folder into `out_dir` (renamed whole when it does not exist yet)."""
    if not out_dir.exists():
        staged.rename(out_dir)
        return
    for path in staged.iterdir():
        os.replace(path, out_dir / path.name)
    staged.rmdir()
