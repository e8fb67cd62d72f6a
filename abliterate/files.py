"""What every output is made of: files written atomically, output folders checked before use, versions recorded.

Each command writes its files here and nowhere else by hand, so a reader never sees half a file, an `--out` is
refused with the same words by every command, and every provenance record names the same packages.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Collection
from importlib import metadata
from pathlib import Path

from abliterate import __version__
from abliterate.errors import UserError

# The packages whose versions decide the numbers a run writes; recorded in every provenance file.
VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "accelerate", "tokenizers",
                      "together")


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then rename it: a reader never sees half a file.

    The temporary name is unique, so two writers of one path never write into each other's file; it ends in `.tmp`,
    which is how an unfinished write is recognised in a folder about to be pushed.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it private (0600); outputs are like any other file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def check_out_dir(out_dir: Path, force: bool, *, model_dir: Path | None = None,
                  resume_marker: str | None = None, own_names: Collection[str] = ()) -> Path:
    """Refuse an `--out` that is a file, overlaps the input model, or is non-empty without `--force`; return it.

    With `model_dir` the paths are resolved and an output inside (or around) the input is refused: abliterate never
    writes into its input. With `resume_marker`, a non-empty folder holding that subfolder is an earlier run of the same
    command to continue, not a folder to refuse. With `own_names`, a folder holding nothing but those names (and
    hidden ones) is an earlier output of the same command, to replace or continue.
    """
    if model_dir is not None:
        out_dir, model_dir = out_dir.expanduser().resolve(), model_dir.resolve()
        if out_dir == model_dir or model_dir in out_dir.parents:
            raise UserError(f"--out {out_dir} is inside the input model {model_dir}; abliterate never writes into "
                            "its input. Choose another --out.")
        if out_dir in model_dir.parents:
            raise UserError(f"--out {out_dir} contains the input model {model_dir}; choose another --out.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; choose a directory for --out.")
    if not out_dir.is_dir() or force or not any(out_dir.iterdir()):
        return out_dir
    if own_names:
        foreign = sorted(entry.name for entry in out_dir.iterdir()
                         if entry.name not in own_names and not entry.name.startswith("."))
        if foreign:
            raise UserError(f"--out {out_dir} holds files this command does not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder for --out.")
        return out_dir
    if resume_marker is None:
        raise UserError(f"--out {out_dir} is not empty; pass --force to replace it or choose another --out.")
    if not (out_dir / resume_marker).is_dir():
        raise UserError(f"--out {out_dir} is not empty and holds no abliterate run to continue; choose another "
                        "--out or pass --force to write into it.")
    return out_dir


def versions() -> dict[str, str]:
    """abliterate's, Python's and every versioned package's version, for provenance records."""
    found = {"abliterate": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
