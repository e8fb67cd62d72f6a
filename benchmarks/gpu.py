"""Benchmark the whole job on an 8B-shaped model on one GPU: measure, select, apply, generate, peak GPU memory.

Builds Llama 3 8B's architecture (32 layers, d_model 4096, 128k vocabulary, untied output layer) with random
bfloat16 weights made on the device, a small byte-level BPE tokenizer and chat template trained locally on the toy's
prompts (nothing is downloaded), saves it, and times on it, with the code a user runs:

- activation collection for 128 + 128 prompts, and selection over every candidate (all positions x all layers,
  all three scores) with 32 + 32 validation prompts: candidates per second and the ratio to the forward-pass floor
  (the same passes without hooks, as benchmarks/measure.py defines it);
- `apply` on the saved checkpoint beside a plain copy of it (GB/s of each, and the ratio);
- greedy generation throughput with transformers, and with vLLM when it is installed;
- peak GPU memory of each stage (torch's allocator; vLLM's engine runs in its own process and is not counted).

It prints one table and writes it as JSON. Target: under 8 minutes on one H100-class GPU (measure + select + apply
of the 8B shape in under 3). Random weights refuse nothing, so the prompt filters and the induce requirement are off:
the point is the cost per candidate, not the direction found.

`--tiny` runs the same code on a 2-layer model on the CPU in seconds (tests/test_benchmarks.py runs it, so the
script cannot rot).

Run: python benchmarks/gpu.py [--out gpu.json] [--work-dir DIR] [--keep]
     python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# Llama 3 8B (meta-llama/Meta-Llama-3-8B-Instruct's config.json) and a tiny model of the same family.
SHAPES = {
    "8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
           "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "tiny": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
}
# Prompts per side (train, validation), generation prompts and new tokens, floor repeats.
SIZES = {"8b": {"n_train": 128, "n_val": 32, "n_generate": 64, "new_tokens": 128, "repeats": 3},
         "tiny": {"n_train": 16, "n_val": 8, "n_generate": 4, "new_tokens": 8, "repeats": 1}}
GB = 10**9


def _bench_measure() -> Any:
    """benchmarks/measure.py as a module: its forward-pass floor is the one this benchmark reports against."""
    spec = importlib.util.spec_from_file_location("bench_measure", Path(__file__).with_name("measure.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_config(tiny: bool, device: str) -> Any:
    from abliterate.config import load_config

    sizes = SIZES["tiny" if tiny else "8b"]
    return load_config(overrides={
        "model": {"dtype": "bfloat16", "device_map": "cpu" if device == "cpu" else "auto"},
        "prompts": {"harmful_train": "builtin:toy_harmful_train", "harmless_train": "builtin:toy_harmless_train",
                    "harmful_eval": "builtin:toy_harmful_eval", "harmless_eval": "builtin:toy_harmless_eval",
                    "n_train": sizes["n_train"], "n_val": sizes["n_val"]},
        # Every candidate, every score: random weights would fail the paper's filters. They refuse nothing either,
        # so the refusal tokens are named instead of discovered from the replies.
        "measure": {"filter_prompts": False, "require_induce": False, "score_all": True, "kl_max": 1e9,
                    "max_layer_fraction": 1.0, "batch_size": 64, "refusal_openings": ["I"]},
    })


def build_model(path: Path, shape: dict[str, Any], device: str) -> dict[str, Any]:
    """Save a random bf16 Llama of `shape` made on `device`, with the toy's tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from abliterate.toy import ToySettings, _build_tokenizer, toy_prompt_splits

    corpus = [prompt for prompts in toy_prompt_splits().values() for prompt in prompts]
    tokenizer = _build_tokenizer(corpus, ToySettings())
    end_ids = tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])
    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=end_ids,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)  # the same random weights on every run
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path, max_shard_size="5GB")
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    _free()
    return {"n_params": n_params, "init_on_device_s": init_s, "save_s": time.perf_counter() - start}


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None


def time_measure(path: Path, work: Path, config: Any, repeats: int) -> dict[str, Any]:
    """measure (activations + selection of every candidate), then the forward-pass floor of that selection."""
    import math

    from abliterate.measure import measure

    _peak_reset()
    start = time.perf_counter()
    result = measure(str(path), work / "measure", config)
    total_s = time.perf_counter() - start
    peak = _peak_gb()
    _free()
    n_scored = sum(not math.isnan(s.bypass) for s in result.scores)
    n_induce = sum(not math.isnan(s.induce) for s in result.scores)
    floor = _bench_measure().floor_s(str(path), config, n_scored, n_induce, repeats)
    _free()
    scoring_s = result.timings_s["scoring_s"]
    return {"measure_s": total_s, **{f"measure_{k}": v for k, v in result.timings_s.items()},
            "n_candidates": len(result.scores), "n_scored": n_scored, "n_induce": n_induce,
            "candidates_per_s": len(result.scores) / scoring_s, "floor_s": floor["floor_s"],
            "selection_over_floor": scoring_s / floor["floor_s"], "measure_peak_gpu_gb": peak,
            "direction_path": str(result.direction_path)}


def time_apply(path: Path, direction: Path, work: Path, config: Any) -> dict[str, Any]:
    """A plain copy of the checkpoint, then `apply` of the direction to it; both from the page cache."""
    from abliterate.apply import apply_direction

    total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    os.sync()
    start = time.perf_counter()
    shutil.copytree(path, work / "copy")
    copy_s = time.perf_counter() - start
    shutil.rmtree(work / "copy")  # the disk holds the model, and one more copy of it at a time
    os.sync()
    start = time.perf_counter()
    record = apply_direction(str(path), direction, work / "edited", config)
    apply_s = time.perf_counter() - start
    return {"checkpoint_gb": total / GB, "copy_s": copy_s, "copy_gb_per_s": total / GB / copy_s,
            "apply_s": apply_s, "apply_gb_per_s": total / GB / apply_s, "apply_over_copy": apply_s / copy_s,
            "n_edited": record["n_edited"]}


def _generation_prompts(tokenizer: Any, config: Any, n: int) -> list[str]:
    from abliterate.chat import format_instructions
    from abliterate.prompts import prompt_sets

    sets = prompt_sets(config.prompts)
    return format_instructions(tokenizer, [p.text for p in sets.harmless_eval][:n], config.model)


def time_transformers(path: Path, config: Any, n_prompts: int, new_tokens: int) -> dict[str, Any]:
    """Greedy generation of `new_tokens` for `n_prompts` prompts in one batch with transformers."""
    from abliterate.generation import generate_transformers
    from abliterate.model import load_model

    model, tokenizer = load_model(str(path), config.model)
    texts = _generation_prompts(tokenizer, config, n_prompts)
    # A stop id one past the vocabulary: the model can never produce it, so every reply runs its full length (a
    # random model's greedy reply can land on any id inside it).
    never = [model.config.vocab_size]
    generate_transformers(model, tokenizer, texts[:1], never, 2, 1)  # warm-up
    _peak_reset()
    start = time.perf_counter()
    replies = generate_transformers(model, tokenizer, texts, never, new_tokens, len(texts))
    seconds = time.perf_counter() - start
    tokens = sum(len(reply.token_ids) for reply in replies)
    result = {"transformers_tokens": tokens, "transformers_s": seconds, "transformers_tokens_per_s": tokens / seconds,
              "generate_peak_gpu_gb": _peak_gb()}
    del model
    _free()
    return result


def time_vllm(path: Path, config: Any, n_prompts: int, new_tokens: int) -> dict[str, Any]:
    """The same generation with vLLM (engine start timed apart), or a note when vLLM is not installed."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return {"vllm": "not installed"}
    from abliterate.generation import _shut_down_vllm
    from abliterate.model import load_tokenizer

    tokenizer = load_tokenizer(path, config.model)
    prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
               for text in _generation_prompts(tokenizer, config, n_prompts)]
    start = time.perf_counter()
    engine = LLM(model=str(path), dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.85,
                 tensor_parallel_size=config.eval.tensor_parallel_size)
    start_s = time.perf_counter() - start
    try:
        settings = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = engine.generate(prompts, settings)
        seconds = time.perf_counter() - start
    finally:
        _shut_down_vllm(engine)
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"vllm_start_s": start_s, "vllm_tokens": tokens, "vllm_s": seconds, "vllm_tokens_per_s": tokens / seconds}


def table(figures: dict[str, Any]) -> str:
    """One row per figure, in the order measured."""
    rows = []
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        rows.append(f"| {key:<28} | {shown:>14} |")
    return "\n".join([f"| {'figure':<28} | {'value':>14} |", f"|{'-' * 30}|{'-' * 16}|", *rows])


def run(tiny: bool, work: Path) -> dict[str, Any]:
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    sizes = SIZES["tiny" if tiny else "8b"]
    config = job_config(tiny, device)
    figures: dict[str, Any] = {"shape": "tiny" if tiny else "llama-3-8b", "device": (
        torch.cuda.get_device_name() if device == "cuda" else "cpu"), "torch": torch.__version__}
    start = time.perf_counter()
    model_dir = work / "model"
    figures.update(build_model(model_dir, SHAPES["tiny" if tiny else "8b"], device))
    measured = time_measure(model_dir, work, config, sizes["repeats"])
    direction = Path(measured.pop("direction_path"))
    figures.update(measured)
    figures.update(time_apply(model_dir, direction, work, config))
    figures["measure_select_apply_s"] = figures["measure_s"] + figures["apply_s"]  # the job itself, no floor or copy
    figures.update(time_transformers(work / "edited", config, sizes["n_generate"], sizes["new_tokens"]))
    figures.update(time_vllm(work / "edited", config, sizes["n_generate"], sizes["new_tokens"]))
    figures["total_s"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A 2-layer model on the CPU: the same code in seconds.")
    parser.add_argument("--out", default="gpu_benchmark.json", help="Where to write the figures as JSON.")
    parser.add_argument("--work-dir", default="", help="Where to build the model and outputs (default: a temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the model and outputs afterwards.")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="abliterate-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = run(args.tiny, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(figures))
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
