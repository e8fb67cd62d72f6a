"""Loading a chat model and its tokenizer for measuring and evaluating (the in-memory side; edits go to disk).

`load_model(source, model_config, dtype)` resolves the source through `hub.resolve_model` (a local directory or a
Hub id), loads the tokenizer (left padding, a pad token, the `--chat-template FILE` override) and the model in eval
mode with the requested dtype; on a machine with a GPU accelerate's `device_map` spreads a large model over the GPUs
and the CPU. A model bigger than memory loads through accelerate too: `model.max_memory` caps each device (GPUs, CPU)
and what fits nowhere is offloaded to `model.offload_folder` (a temporary folder when unset) and read back layer by
layer during each forward pass; the log says how much was offloaded. Given `max_memory`, this also holds on a
CPU-only machine. `trust_remote_code` is only passed through from the config, never switched on here.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

from abliterate.config import parse_max_memory
from abliterate.errors import UserError

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def read_chat_template(path: str) -> str:
    """The text of a Jinja chat template file (the `--chat-template FILE` override)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"Chat template file {path} does not exist; pass an existing Jinja file to --chat-template.")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Chat template file {path} is unreadable ({error}); pass a UTF-8 Jinja file.") from error
    if not text.strip():
        raise UserError(f"Chat template file {path} is empty; pass a Jinja chat template to --chat-template.")
    return text


def load_tokenizer(model_dir: Path, model_config: Any) -> Any:
    """The checkpoint's tokenizer, ready for batched prompts: left padding, a pad token, the template override."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=model_config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"Could not load the tokenizer of {model_dir} ({error}); the checkpoint needs its "
                        "tokenizer files (tokenizer.json or a tokenizer model).") from error
    # The paper's positions count from the end of the prompt, so prompts are padded on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Padding is masked out, so any id works; EOS is the usual choice and keeps the vocabulary unchanged.
        if tokenizer.eos_token is None:
            raise UserError(f"The tokenizer of {model_dir} has neither a pad nor an EOS token; add a pad_token "
                            "to its tokenizer_config.json.")
        tokenizer.pad_token = tokenizer.eos_token
    if model_config.chat_template:
        tokenizer.chat_template = read_chat_template(model_config.chat_template)
    return tokenizer


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise UserError(f"Unknown dtype '{name}'; use one of {', '.join(DTYPES)} (--dtype / model.dtype).")
    return "auto" if name == "auto" else getattr(torch, name)


def _device_map(requested: str, max_memory: dict[int | str, str]) -> str | None:
    """accelerate's device_map only when there is an accelerator or a memory cap: plain loading is simpler on a CPU.

    With a memory cap the map is needed even on a CPU-only machine, since that is what offloads to disk.
    """
    import torch

    if requested in ("", "none"):
        return None
    if max_memory:
        return "auto" if requested == "cpu" else requested
    if requested == "cpu" or not torch.cuda.is_available():
        return None if requested in ("auto", "cpu") else requested
    return requested


def _offload_kwargs(model_config: Any) -> tuple[dict[str, Any], Path | None]:
    """device_map, max_memory and offload folder for from_pretrained, and the temporary folder made here (if any)."""
    max_memory = parse_max_memory(getattr(model_config, "max_memory", "") or "")
    device_map = _device_map(model_config.device_map, max_memory)
    if device_map is None:
        return {}, None
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory:
        kwargs["max_memory"] = max_memory
    folder = getattr(model_config, "offload_folder", "") or ""
    made = None if folder else Path(tempfile.mkdtemp(prefix="abliterate-offload-"))
    kwargs["offload_folder"] = str(Path(folder).expanduser() if folder else made)
    return kwargs, made


def _report_offload(model: Any, source: str, made: Path | None) -> None:
    """Say where a model that did not fit went; remove an unused temporary offload folder, or tie it to the model."""
    placement = Counter(str(device) for device in (getattr(model, "hf_device_map", None) or {}).values())
    # Beside an accelerator, modules on the CPU are offloaded too (they are moved to it for each pass).
    accelerated = any(device not in ("cpu", "disk") for device in placement)
    offloaded = {device: n for device, n in placement.items() if device == "disk" or (accelerated and device == "cpu")}
    if offloaded:
        logger.warning("%s does not fit in the memory given (model.max_memory, or the GPUs): %d of %d module groups "
                       "offloaded (%s); it runs, but slower, as each forward pass reads them back.", source,
                       sum(offloaded.values()), sum(placement.values()),
                       ", ".join(f"{n} to {device}" for device, n in sorted(offloaded.items())))
    if made is not None:
        if "disk" in offloaded:
            weakref.finalize(model, shutil.rmtree, made, True)
        else:
            shutil.rmtree(made, ignore_errors=True)


def input_device(model: Any) -> Any:
    """Where input ids must go: the embedding's execution device.

    That is the embedding weight's device, except when accelerate offloaded the embedding (its weight then sits on
    the meta device and a hook moves it to the execution device for each pass).
    """
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    if embedding.weight.device.type == "meta" and getattr(hook, "execution_device", None) is not None:
        import torch

        return torch.device(hook.execution_device)
    return embedding.weight.device


def load_model(source: str, model_config: Any, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `source` (local directory or Hub id at model_config.revision), model in eval mode.

    `dtype` overrides model_config.dtype (e.g. float32 for exact comparisons).
    """
    from transformers import AutoModelForCausalLM

    from abliterate.hub import resolve_model

    model_dir = resolve_model(source, getattr(model_config, "revision", ""))
    tokenizer = load_tokenizer(model_dir, model_config)
    # use_safetensors: never fall back to pickle weights, even if a folder holds both.
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype or model_config.dtype), "use_safetensors": True,
                              "trust_remote_code": model_config.trust_remote_code}
    offload, made = _offload_kwargs(model_config)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs, **offload)
    except ValueError as error:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise UserError(f"Could not load {source} as a causal language model ({error}). If it ships its own "
                        "code, set model.trust_remote_code (only for code you trust).") from error
    _report_offload(model, source, made)
    model.eval()
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s) from %s.", source, type(model).__name__, model_dir)
    return model, tokenizer
