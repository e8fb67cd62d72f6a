"""Greedy replies to chat-formatted prompts, stopping at the model's real stop tokens.

The paper's code stopped only at EOS and ran past Llama 3's end-of-turn token on 95 of 100 replies, so every
generation here stops at the generation config's EOS *and* the chat template's end-of-turn token
(`chat.stop_token_ids`). Prompts are batched with left padding so the last prompt token sits at the same position in
every row. Two backends: transformers (default, works with an accelerate `device_map`) and vLLM when installed and
asked for. Replies come back without the stop token, with the reply's token ids (the on-distribution CE loss and the
KL over the base model's reply are teacher-forced on them) and whether the reply stopped or hit `max_new_tokens`.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from abliterate import progress
from abliterate.errors import UserError
from abliterate.files import write_atomic

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """One generated reply: text without the stop token, its token ids, and whether a stop token ended it."""

    text: str
    token_ids: list[int]
    stopped: bool


@dataclass
class Completion:
    """One line of completions.jsonl: the instruction, its category and the model's reply."""

    prompt: str
    category: str
    reply: str
    n_tokens: int
    stopped: bool
    unsafe: bool | None = None  # the safety judge's verdict on harmful prompts; None when not judged
    judged: str | None = None  # the refusal judge's label (refusal, compliance, non-answer); None when not judged


def text_after(tokenizer: Any, reply: Reply, closer: str) -> str:
    """The reply's text after the last `closer` when the closer is made of special tokens (gpt-oss's
    `<|channel|>final<|message|>`), which `Reply.text` leaves out; `Reply.text` itself otherwise."""
    if not closer or closer in reply.text:
        return reply.text
    full = tokenizer.decode(reply.token_ids, skip_special_tokens=False)
    if closer not in full:
        return reply.text
    tail = full.rsplit(closer, 1)[1]
    for special in getattr(tokenizer, "all_special_tokens", []):
        tail = tail.replace(special, "")
    return tail.strip()


def input_device(model: Any) -> torch.device:
    """Where input ids must go: the embedding's execution device (see `abliterate.model.input_device`)."""
    from abliterate.model import input_device as embedding_device

    return embedding_device(model)


def pad_token_id(tokenizer: Any, stop_ids: Sequence[int]) -> int:
    """The pad id for batching; tokenizers without one pad with their first stop token (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if not stop_ids:
        raise UserError("The tokenizer has no pad, EOS or end-of-turn token; set model.chat_template to a template with one.")
    return int(stop_ids[0])


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """Token ids up to (not including) the first stop token, and whether one was found."""
    stops = {int(i) for i in stop_ids}
    for index, token in enumerate(token_ids):
        if int(token) in stops:
            return [int(t) for t in token_ids[:index]], True
    return [int(t) for t in token_ids], False


def _length_order(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Indices of `texts` longest first, so each batch pads little; results are put back in the input order."""
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    return sorted(range(len(texts)), key=lambda i: -lengths[i])


@torch.inference_mode()
def generate_ids(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop_ids: Sequence[int],
                 pad_id: int, max_new_tokens: int, stopping: Any | None = None) -> list[tuple[list[int], bool]]:
    """Greedy continuations of one left-padded batch of token ids: per row, its new tokens up to (not including) the
    first stop token, and whether one was found (`stopping`: see `generate_transformers`)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = input_device(model)
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids), pad_token_id=pad_id
    )
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            generation_config=settings,
                            stopping_criteria=StoppingCriteriaList([stopping]) if stopping is not None else None)
    return [cut_at_stop(row, stop_ids) for row in output[:, input_ids.shape[1]:].tolist()]  # [batch, new]


def generate_batch(model: Any, tokenizer: Any, texts: Sequence[str], stop_ids: Sequence[int], max_new_tokens: int,
                   stopping: Any | None = None) -> list[Reply]:
    """Greedy replies for one left-padded batch of already chat-formatted prompts (`stopping`: see
    `generate_transformers`)."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    if stopping is not None:
        stopping.begin(batch["input_ids"].shape[1], texts)
    return [Reply(tokenizer.decode(token_ids, skip_special_tokens=True).strip(), token_ids, stopped)
            for token_ids, stopped in generate_ids(model, batch["input_ids"], batch["attention_mask"], stop_ids,
                                                   pad_token_id(tokenizer, stop_ids), max_new_tokens, stopping)]


def generate_transformers(
    model: Any, tokenizer: Any, texts: Sequence[str], stop_ids: Sequence[int], max_new_tokens: int, batch_size: int,
    stopping: Any | None = None,
) -> list[Reply]:
    """Greedy replies to every prompt, in batches, in the order given.

    `stopping` (optional) is a transformers StoppingCriteria that is also told where each batch's new tokens begin
    (`begin(prompt_width, texts)`) and says when it `stopped` the generation (as `abliterate.confirm.RefusalWatch`
    does): then the later batches are skipped and only the replies finished so far are returned, in order.
    """
    order = _length_order(tokenizer, texts)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    replies: list[Reply | None] = [None] * len(texts)
    for indices in progress.track(batches, "Generating replies"):
        found = generate_batch(model, tokenizer, [texts[i] for i in indices], stop_ids, max_new_tokens, stopping)
        if stopping is not None and stopping.stopped:
            break
        for index, reply in zip(indices, found):
            replies[index] = reply
    return [reply for reply in replies if reply is not None]


def check_backend(backend: str) -> None:
    """Fail before any work when the vLLM backend is asked for and vLLM cannot be imported."""
    if backend != "vllm":
        return
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise UserError(f"--backend vllm needs vLLM ({error}); install it with `pip install abliterate[vllm]` or use "
                        "--backend transformers.") from None


def generate_vllm(
    model_dir: str | Path, tokenizer: Any, texts: Sequence[str], stop_ids: Sequence[int], max_new_tokens: int,
    dtype: str = "auto", trust_remote_code: bool = False, tensor_parallel_size: int = 1,
) -> list[Reply]:
    """Greedy replies with vLLM (the engine users run at scale), the model split over `tensor_parallel_size` GPUs.

    The engine is shut down and its GPU memory released before returning, so the next engine (the other model of
    a side-by-side evaluation) or a transformers model gets the whole GPUs: one engine at a time.
    """
    check_backend("vllm")
    from vllm import LLM, SamplingParams

    engine = LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                 tensor_parallel_size=tensor_parallel_size)
    try:
        # Token ids, not text: vLLM would add a second BOS to a prompt that the chat template already starts with one.
        prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]} for text in texts]
        settings = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=list(stop_ids))
        outputs = engine.generate(prompts, settings)
    finally:
        _shut_down_vllm(engine)
    replies = []
    for output in outputs:
        token_ids, stopped = cut_at_stop(list(output.outputs[0].token_ids), stop_ids)
        stopped = stopped or output.outputs[0].finish_reason == "stop"
        replies.append(Reply(tokenizer.decode(token_ids, skip_special_tokens=True).strip(), token_ids, stopped))
    return replies


def _shut_down_vllm(engine: Any) -> None:
    """Stop a vLLM engine's workers and free its GPU memory (dropping the object alone leaves both behind)."""
    core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
    if hasattr(core, "shutdown"):
        core.shutdown()
    del engine
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except (ImportError, AssertionError, RuntimeError):  # older or newer vLLM: the engine shutdown above must do
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_completions(path: Path, completions: Sequence[Completion]) -> Path:
    """Write completions as JSONL (one object per line), to a temporary file first, then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in completions))


def load_completions(path: Path) -> list[Completion]:
    """Read a completions.jsonl written by `save_completions`."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Completion(**json.loads(line)) for line in lines if line.strip()]
