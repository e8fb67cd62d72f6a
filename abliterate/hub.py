"""Talking to the Hugging Face Hub: find a model's files (download part) and publish results (push part).

`resolve_model(source, revision)` turns what the user typed (a local directory or a Hub id such as
`Qwen/Qwen2.5-0.5B-Instruct`) into a local directory holding safetensors weights, the config, the tokenizer and
the other small files. Downloads go through huggingface_hub's cache and never fetch pickle weights (`.bin`, `.pt`,
`.pth`): a checkpoint that only has those is refused, because loading pickles can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from abliterate.errors import UserError

logger = logging.getLogger(__name__)

# What a model download fetches: weights as safetensors, and every small file a checkpoint needs to load and chat.
ALLOW_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "*.model",
                  "*.tiktoken", "*.py", "*.md", "LICENSE*", "NOTICE*"]
# Mistral-format duplicates of the weights, original (non-HF) exports and weights in subfolders (ONNX, MLX, other
# components) are never loaded by transformers from the top level and would multiply the download for nothing.
IGNORE_PATTERNS = ["consolidated*", "original/*", "*/*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf",
                   "*.msgpack", "*.h5", "*.onnx*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# The folder of an output that holds how it was made (direction, scores, config, reports), beside the checkpoint.
PROVENANCE_DIR = "abliterate"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_unreachable(what: str, alternative: str) -> UserError | None:
    """Why `what` cannot come from the Hub right now (offline mode, or the Hub's name does not resolve), or None.

    huggingface_hub retries a failed request for about 25 seconds, with a warning each time, although no retry can
    fix a name that does not resolve; so the name is looked up once first and the failure is reported at once, with
    `alternative` (the local file to pass instead). In offline mode the Hub cache may still hold `what`, so that
    case is only reported by the caller once the cache lookup (which is immediate) has failed.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return UserError(f"{what} is not in the local Hub cache and HF_HUB_OFFLINE=1 keeps abliterate off the Hub; "
                         f"{alternative}.")
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as error:
        return UserError(f"{what} needs the Hub, but {host} cannot be resolved ({error}): no network? {alternative}, "
                         "or set HF_HUB_OFFLINE=1 to use what the Hub cache holds.")
    return None


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
    if not is_hub_id(source):
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


def public_model_name(source: str) -> str:
    """The model as the user named it, safe to publish: a Hub id as given, a local folder by its name only.

    Outputs get pushed; a full local path would leak the user's file layout (and often their user name).
    """
    path = Path(source).expanduser()
    return path.resolve().name if path.exists() else source


def is_hub_id(source: str) -> bool:
    """True when `source` names a Hub repository rather than a local path (existing or mistyped)."""
    path = Path(source).expanduser()
    return not (path.exists() or source.startswith((".", "/", "~")) or not _REPO_ID.match(source))


@contextmanager
def _hub_errors(repo_id: str, revision: str, action: str) -> Iterator[None]:
    """Turn every huggingface_hub failure into a UserError that names the fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its terms on the Hub, then log in with `hf auth login` "
                        "(or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise UserError(f"Model {repo_id} is neither a local directory nor a Hub repository you can access; check "
                        "the name, or log in with `hf auth login` for a private repository.") from None
    except RevisionNotFoundError:
        raise UserError(f"Revision '{revision}' does not exist in {repo_id}; fix --revision.") from None
    except NotASafetensorsRepoError:
        raise UserError(_NO_SAFETENSORS.format(repo_id=repo_id)) from None
    except LocalEntryNotFoundError:
        raise UserError(f"Model {where} is not a local directory, not in the Hub cache, and the Hub cannot be "
                        "reached (offline or HF_HUB_OFFLINE=1); connect, or pass a local directory.") from None
    except HfHubHTTPError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{action} {where} failed: {first_line}; check the name, --revision and your "
                        "connection.") from None


_NO_SAFETENSORS = ("{repo_id} has no .safetensors weights (only pickle weights, which abliterate does not load "
                   "because pickles can run code); use a repository with safetensors weights.")


def _download(repo_id: str, revision: str) -> Path:
    """snapshot_download with the small-files-only patterns, turning every Hub failure into a UserError."""
    from huggingface_hub import constants, snapshot_download

    logger.info("Resolving %s on the Hub (safetensors and small files only)", repo_id)
    alternative = "pass the model's local checkpoint directory instead"
    unreachable = None if constants.is_offline_mode() else hub_unreachable(f"Model {repo_id}", alternative)
    if unreachable is not None:
        raise unreachable
    with _hub_errors(repo_id, revision, "Downloading"):
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=ALLOW_PATTERNS,
                                      ignore_patterns=IGNORE_PATTERNS))
    if not any(path.glob("*.safetensors")) and (path / "config.json").is_file():
        raise UserError(_NO_SAFETENSORS.format(repo_id=repo_id))
    return path


def remote_tensor_infos(repo_id: str, revision: str = "") -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]] | None:
    """config.json and every tensor's (shape, dtype) of a Hub checkpoint, without downloading its weights.

    The safetensors headers are read with HTTP range requests, so `inspect` of a 70B model costs a few kilobytes.
    Returns None when the Hub cannot be asked (offline mode): the caller falls back to the local cache.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import OfflineModeIsEnabled, RemoteEntryNotFoundError

    unreachable = None if constants.is_offline_mode() else hub_unreachable(
        f"Model {repo_id}", "pass the model's local checkpoint directory instead")
    if unreachable is not None:
        raise unreachable
    try:
        with _hub_errors(repo_id, revision, "Reading"):
            try:
                config_path = hf_hub_download(repo_id, "config.json", revision=revision or None)
            except RemoteEntryNotFoundError:  # not its parent EntryNotFoundError: that includes 'offline'
                raise UserError(f"{repo_id} is not a model repository (no config.json); pass a model's Hub id.")
            metadata = HfApi().get_safetensors_metadata(repo_id, revision=revision or None)
    except OfflineModeIsEnabled:
        return None
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"config.json of {repo_id} is not readable JSON ({error}); pass another model.") from None
    infos = {name: (tuple(info.shape), info.dtype) for file in metadata.files_metadata.values()
             for name, info in file.tensors.items()}
    return config, infos


# ---- push: upload a finished output folder to the Hub ----
# Everything below belongs to `abliterate push` and the pipeline's `--push`; it never downloads anything.

# Names an interrupted writer leaves behind; a folder holding one is not finished and is never uploaded.
_LEFTOVER_SUFFIXES = (".tmp", ".part", ".partial", ".incomplete", ".lock")
_LEFTOVER_PREFIXES = (".tmp", "tmp.", ".partial", ".incomplete")
_LEFTOVER_MARKERS = (".abliterate-tmp-", ".abliterate-old-")  # `apply`'s staging folders
# The apply step's local state (its marker, and the checkpoint while a run has not published it) stays local; the
# rest of the provenance folder (config, direction, scores, plots, evaluation report) is uploaded with the model.
PUSH_IGNORE_PATTERNS = ("abliterate/apply/**", ".*", "**/.*")
# Above this size huggingface_hub 1.x needs `upload_large_folder` (resumable, many commits); 2.x does the
# same inside `upload_folder` and has no separate function.
LARGE_FOLDER_BYTES = 5 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _safetensors_names(path: Path) -> set[str]:
    """Tensor names in a safetensors file, after checking from its header that every tensor lies inside the file.

    Sizes only, no tensor data: a shard truncated by an interrupted copy is refused before it reaches the network.
    """
    from abliterate.shards import read_header

    try:
        tensors, _ = read_header(path)
    except UserError as error:
        reason = str(error).split(" is ", 1)[-1].split(";")[0]  # "truncated or corrupt (...)", without its advice
        raise UserError(f"{path.name} in {path.parent} is {reason}; rerun the job that wrote the folder.") from None
    return {tensor.name for tensor in tensors}


def _check_weights(folder: Path) -> None:
    """The weights are whole: the index (if any) names exactly the shards present, and the tensors they hold.

    Every `*.safetensors` at the top must be a weight shard: vLLM loads all of them when there is no index.
    """
    index_path = folder / "model.safetensors.index.json"
    shards_present = {p.name for p in folder.glob("*.safetensors")}
    indexed: dict[str, set[str]] = {}
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"{index_path} is not a valid safetensors index ({error}); rerun the job that wrote it.")
        for tensor_name, shard in weight_map.items():
            indexed.setdefault(shard, set()).add(tensor_name)
    elif "model.safetensors" not in shards_present:
        raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json; "
                        "push the --out folder of a finished `abliterate run` or `apply`.")
    missing = sorted(set(indexed) - shards_present)
    if missing:
        raise UserError(f"{folder} is incomplete: the index names shards that are missing ({', '.join(missing)}); "
                        "rerun the job that wrote it.")
    stray = sorted(shards_present - (set(indexed) or {"model.safetensors"}))
    if "direction.safetensors" in stray:  # where older abliterate versions wrote it
        raise UserError(f"{folder} has direction.safetensors beside the weights, where runtimes would load it as "
                        f"weights; move it and direction.json into {folder / PROVENANCE_DIR}, then push.")
    if stray:
        raise UserError(f"{folder} holds shards the index does not name ({', '.join(stray)}); remove them or "
                        "rerun the job that wrote the folder.")
    for shard in sorted(set(indexed) or {"model.safetensors"}):
        names = _safetensors_names(folder / shard)
        if indexed and names != indexed[shard]:
            raise UserError(f"{folder / shard} does not hold the tensors its index lists; rerun the job that wrote it.")


def check_output_complete(folder: Path) -> list[Path]:
    """Refuse a folder that is not a finished checkpoint; return the files that `push` would upload."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass the --out folder of a finished `abliterate run` or `apply`.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_dir())
    for path in files:
        name = path.name
        if name.endswith(_LEFTOVER_SUFFIXES) or name.startswith(_LEFTOVER_PREFIXES) or \
                any(marker in name for marker in _LEFTOVER_MARKERS):
            raise UserError(f"{folder} holds an unfinished write ({path.relative_to(folder)}); rerun the command "
                            "that was interrupted, then push.")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; push the --out folder of a finished `abliterate run` or `apply`.")
    if not (folder / "tokenizer_config.json").is_file() or not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise UserError(f"{folder} has no tokenizer (tokenizer_config.json plus tokenizer.json or a vocabulary); "
                        "a chat model cannot be used without one: rerun `abliterate run` or `apply` into a new --out.")
    _check_weights(folder)
    return [p for p in files if p.is_file()]


def _describe_hub_failure(error: BaseException, repo: str) -> str | None:
    """A one-line cause for a failed Hub call, or None if the failure is not the user's to fix."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set; unset it to push."
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            status = seen.response.status_code
            if status in (401, 403):
                return (f"the Hub refused the token ({status}): it needs write access to {repo}; log in with "
                        "`hf auth login` or set HF_TOKEN to a token with write permission.")
            return f"the Hub answered {status} ({seen.response.reason_phrase}); rerun `abliterate push` to retry."
        if type(seen).__name__ in ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError",
                                   "ReadError", "WriteError", "NetworkError", "TransportError") \
                or isinstance(seen, ConnectionError):
            return f"could not reach the Hub ({type(seen).__name__}); check the network and rerun `abliterate push`."
        seen = seen.__cause__ or seen.__context__
    return None


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UserError("No Hugging Face token found; run `hf auth login` or set HF_TOKEN to a token with write access.")
    return token


def push(folder: Path, repo: str, private: bool = False, revision: str = "", token: str | None = None,
         commit_message: str | None = None) -> str:
    """Upload a finished output folder to the Hub model repo `repo`; return the commit URL.

    The folder is checked before any request (see `check_output_complete`). The repo is created if needed
    (private if asked; an existing repo keeps its visibility), and `revision` names a branch that is created
    from the default branch if missing. Rerunning after a failure uploads only what the Hub does not have yet.
    The endpoint is read from HF_ENDPOINT at call time, so a test or a private Hub can stand in for huggingface.co.
    """
    from huggingface_hub import HfApi

    from abliterate import __version__

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"--repo must be owner/name, got '{repo}'.")
    files = check_output_complete(Path(folder))
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=_resolve_token(token))
    message = commit_message or f"Upload abliterated model with abliterate {__version__}"
    total_bytes = sum(p.stat().st_size for p in files)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        if total_bytes > LARGE_FOLDER_BYTES and hasattr(api, "upload_large_folder"):
            api.upload_large_folder(repo_id=repo, folder_path=folder, repo_type="model", revision=revision or None,
                                    ignore_patterns=list(PUSH_IGNORE_PATTERNS), private=private)
            return f"{api.endpoint}/{repo}/tree/{revision or 'main'}"
        info = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model", revision=revision or None,
                                 commit_message=message, ignore_patterns=list(PUSH_IGNORE_PATTERNS))
    except Exception as error:  # translated into a user message when it is the user's to fix
        reason = _describe_hub_failure(error, repo)
        if reason is None:
            raise
        raise UserError(f"Push to {repo} failed: {reason}") from error
    return str(info.commit_url)
