"""`abliterate demo`: the whole job on the bundled toy refuser, offline, with its replies before and after.

The toy is built on first use (a minute or two of training on the CPU, shown as a progress bar by the CLI) and
cached; the run itself takes well under a minute. Its settings are abliterate/data/toy.toml (configs/toy.toml).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from abliterate.config import Config, load_config
from abliterate.pipeline import RunResult, run

# The demo's settings, shipped in the package; configs/toy.toml is a link to this file.
TOY_CONFIG = Path(__file__).parent / "data" / "toy.toml"


@dataclass
class DemoResult:
    """The demo's run and a few held-out prompts answered by the toy refuser before and after the edit."""

    run: RunResult
    replies: list[tuple[str, str, str]]  # (prompt, base reply, edited reply)


def demo_config() -> Config:
    """The settings `abliterate demo` runs with: the defaults, then abliterate/data/toy.toml."""
    return load_config(TOY_CONFIG)


def _replies(source: str, prompts: list[str], config: Config) -> list[str]:
    from abliterate.chat import format_instructions, stop_token_ids
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(source, config.model)
    texts = format_instructions(tokenizer, prompts, config.model)
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    replies = generate_transformers(model, tokenizer, texts, stop_ids, config.eval.max_new_tokens,
                                    config.eval.batch_size)
    return [reply.text for reply in replies]


def demo(out_dir: Path | None = None) -> DemoResult:
    """Build (or reuse) the toy refuser, run the whole job on it offline, and answer the held-out demo prompts."""
    import torch

    from abliterate.prompts import load_prompts
    from abliterate.toy import toy_refuser

    model_dir = toy_refuser()
    out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="abliterate-demo-"))
    config = demo_config()
    # The toy's matrices are tiny: more threads only add synchronisation (8x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(str(model_dir), out_dir, config)
        prompts = [prompt.text for prompt in load_prompts("builtin:toy_demo")]
        before = _replies(str(model_dir), prompts, config)
        after = _replies(str(result.out_dir), prompts, config)
    finally:
        torch.set_num_threads(threads)
    return DemoResult(run=result, replies=list(zip(prompts, before, after)))
