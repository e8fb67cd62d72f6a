"""Talking to the Hugging Face Hub: find a model's files (download part) and publish results (push part).

`resolve_model(source, revision)` turns what the user typed (a local directory or a Hub id such as
`Qwen/Qwen2.5-0.5B-Instruct`) into a local directory holding safetensors weights, the config, the tokenizer and
the other small files. Downloads go through huggingface_hub's cache and never fetch pickle weights (`.bin`, `.pt`,
`.pth`): a checkpoint that only has those is refused, because loading pickles can run arbitrary code.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from abliterate.errors import UserError

logger = logging.getLogger(__name__)

# What a model download fetches: weights as safetensors, and every small file a checkpoint needs to load and chat.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "*.model",
                  "*.tiktoken", "*.py", "*.md", "LICENSE*", "NOTICE*"]
# Mistral-format duplicates of the weights and original (non-HF) exports would double the download for nothing.
IGNORE_PATTERNS = ["consolidated*", "original/*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(source: str, revision: str = "") -> Path:
    """Return a local directory with `source`'s safetensors checkpoint, downloading it from the Hub if needed.

    A path that exists (or looks like a path: absolute, `./`, `~`) is used as it is; anything else that looks
    like a Hub id is downloaded (or taken from the cache) at `revision` (empty: the default branch).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            logger.warning("Ignoring revision %s: %s is a local directory.", revision, source)
        return check_model_dir(path)
    looks_local = path.exists() or source.startswith((".", "/", "~")) or not _REPO_ID.match(source)
    if looks_local:
        if path.exists():
            raise UserError(f"Model {source} is a file, not a directory; pass the checkpoint's directory or a Hub id.")
        raise UserError(f"Model directory {source} does not exist; pass an existing directory or a Hub id "
                        "such as owner/name.")
    return check_model_dir(_download(source, revision))


def check_model_dir(path: Path) -> Path:
    """Refuse a directory that is not a safetensors checkpoint, naming what is missing."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json); pass the checkpoint's directory.")
    if any(path.glob("*.safetensors")):
        return path
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{path} only has pickle weights ({', '.join(pickles[:3])}); abliterate reads safetensors "
                        "only, because pickles can run code. Convert the checkpoint to safetensors first "
                        "(load it and save_pretrained) or use a repository that has .safetensors files.")
    raise UserError(f"{path} has no .safetensors weights; pass a directory or Hub id with a safetensors checkpoint.")


def _download(repo_id: str, revision: str) -> Path:
    """snapshot_download with the small-files-only patterns, turning every Hub failure into a UserError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}@{revision}" if revision else repo_id
    logger.info("Resolving %s on the Hub (safetensors and small files only)", where)
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its terms on the Hub, then log in with `hf auth login` "
                        "(or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise UserError(f"Model {repo_id} is neither a local directory nor a Hub repository you can access; check "
                        "the name, or log in with `hf auth login` for a private repository.") from None
    except RevisionNotFoundError:
        raise UserError(f"Revision '{revision}' does not exist in {repo_id}; fix --revision.") from None
    except LocalEntryNotFoundError:
        raise UserError(f"Model {where} is not a local directory, not in the Hub cache, and the Hub cannot be "
                        "reached (offline or HF_HUB_OFFLINE=1); connect, or pass a local directory.") from None
    except HfHubHTTPError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"Downloading {where} failed: {first_line}; check the name, --revision and your "
                        "connection.") from None
    path = Path(folder)
    if not any(path.glob("*.safetensors")) and (path / "config.json").is_file():
        raise UserError(f"{repo_id} has no .safetensors weights (only pickle weights, which abliterate does not "
                        "load because pickles can run code); use a repository with safetensors weights.")
    return path
