"""Loading a chat model and its tokenizer for measuring and evaluating (the in-memory side; edits go to disk).

`load_model(source, model_config, dtype)` resolves the source through `hub.resolve_model` (a local directory or a
Hub id), loads the tokenizer (left padding, a pad token, the `--chat-template FILE` override) and the model in eval
mode with the requested dtype; on a machine with a GPU accelerate's `device_map` spreads a large model over the GPUs
and the CPU. `trust_remote_code` is only passed through from the config, never switched on here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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


def _device_map(requested: str) -> str | None:
    """accelerate's device_map only when there is an accelerator: on a CPU-only machine plain loading is simpler."""
    import torch

    if requested in ("", "none"):
        return None
    if requested == "cpu" or not torch.cuda.is_available():
        return None if requested in ("auto", "cpu") else requested
    return requested


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
    device_map = _device_map(model_config.device_map)
    max_memory, offload = getattr(model_config, "max_memory", ""), getattr(model_config, "offload_folder", "")
    if max_memory or offload:  # a memory budget or disk offload needs accelerate's placement, even on a CPU
        from abliterate.config import parse_max_memory

        device_map = device_map or model_config.device_map or "auto"
        kwargs.update({"max_memory": parse_max_memory(max_memory) or None, "offload_folder": offload or None})
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except ValueError as error:
        raise UserError(f"Could not load {source} as a causal language model ({error}). If it ships its own "
                        "code, set model.trust_remote_code (only for code you trust).") from error
    model.eval()
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s) from %s.", source, type(model).__name__, model_dir)
    return model, tokenizer
