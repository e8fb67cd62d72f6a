"""Publishing a run's checkpoint at the top of its output folder, and keeping local paths out of what is published.

The apply step writes the edited checkpoint into `abliterate/apply/checkpoint/`. Publishing *moves* its files to the
top of the output (`config.json` last, so a folder that loads as a model is always complete), and its own provenance
files (the direction or edit that `abliteration.json` names) into `abliterate/`, where that record says they are;
unpublishing moves them back (`config.json` first). The weights therefore exist once: a plain `hf upload` of the
folder sends them once, and the disk holds one copy. The step's marker stays in `abliterate/apply/`.

Everything the run writes is later pushed, so `scrub_tree` replaces the local paths a run knows about (the output,
the model folder, local input files) in every text file of the provenance folder, and the working, home and
temporary directories in its records (not in completions, which are model text, nor in the checkpoint's own files:
a tokenizer's vocabulary may well hold "/tmp").
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from abliterate.files import write_atomic
from abliterate.hub import PROVENANCE_DIR

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
# Files the run writes as text (JSON, JSON lines, Markdown, TOML, CSV): the ones a local path can hide in.
TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".toml", ".csv", ".txt")
RECORD_SUFFIXES = (".json", ".md", ".toml", ".csv")  # the files abliterate writes about a run, not model text


def checkpoint_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint folder as apply wrote it, relative to it: the top-level ones, then those of its own
    provenance subfolder (the direction or edit abliteration.json names), which publish next to the run's records."""
    top = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and not p.name.startswith("."))
    provenance = checkpoint / PROVENANCE_DIR
    inner = sorted(f"{PROVENANCE_DIR}/{p.name}" for p in provenance.iterdir()
                   if p.is_file() and not p.name.startswith(".")) if provenance.is_dir() else []
    return top + inner


def unpublish(out_dir: Path, checkpoint: Path, names: list[str]) -> None:
    """Move a published checkpoint back into `checkpoint` (config.json first); the card is removed.

    Where `checkpoint` no longer exists (its step is gone) the published files are removed instead.
    """
    for name in sorted(set(names), key=lambda n: n != "config.json"):
        top = out_dir / name
        if not top.is_file():
            continue
        if name != CARD_NAME and checkpoint.is_dir():
            os.replace(top, checkpoint / name)
        else:
            top.unlink()


def publish(out_dir: Path, checkpoint: Path, card_text: str) -> list[str]:
    """Move the finished checkpoint's files to the top of `out_dir` and write the card; config.json goes last.

    When the checkpoint is already at the top (an earlier run published it) only the card is rewritten.
    """
    names = checkpoint_files(checkpoint) if (checkpoint / "config.json").is_file() else []
    for name in names:
        if name != "config.json":
            (out_dir / name).parent.mkdir(exist_ok=True)
            os.replace(checkpoint / name, out_dir / name)
    write_atomic(out_dir / CARD_NAME, card_text)
    if names:
        os.replace(checkpoint / "config.json", out_dir / "config.json")
    return sorted(set(names) | {CARD_NAME})


def replace_paths(text: str, replacements: dict[str, str]) -> str:
    """`text` with every local path in `replacements` replaced by its public name, longest first."""
    for local, public in sorted(replacements.items(), key=lambda item: -len(item[0])):
        if local and local not in ("/", ".", "~"):
            text = text.replace(local, public)
    return text


def private_paths(model: str, model_dir: Path, out_dir: Path, public_model: str,
                  local_inputs: list[str]) -> dict[str, str]:
    """The local paths a run knows about, mapped to what a published file may say instead.

    Paths inside the output become relative to it; the model becomes its public name; a local input file its name.
    """
    paths: dict[str, str] = {}
    for local in local_inputs:
        path = Path(local).expanduser()
        if local and path.exists():
            paths.update({local: path.name, str(path.resolve()): path.name})
    paths.update({str(model_dir): public_model, str(model_dir.resolve()): public_model,
                  str(Path(model).expanduser()): public_model, str(out_dir): "."})
    if Path(model).expanduser().exists():
        paths[model] = public_model
    return paths


def machine_paths() -> dict[str, str]:
    """The working, home and temporary directories: the last net for a path no step named (records only)."""
    return {os.getcwd(): ".", os.path.expanduser("~"): "~", tempfile.gettempdir(): "$TMPDIR"}


def scrub_tree(folder: Path, replacements: dict[str, str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """Replace local paths in every text file under `folder` whose suffix is in `suffixes`; return those changed."""
    changed = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in suffixes or path.name.startswith("."):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        clean = replace_paths(text, replacements)
        if clean != text:
            write_atomic(path, clean)
            changed.append(path)
    if changed:
        logger.debug("Replaced local paths in %d file(s) under %s.", len(changed), folder)
    return changed
