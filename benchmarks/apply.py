"""Benchmark `abliterate apply` against a plain copy of the same checkpoint: wall time and peak memory.

Builds a random Llama-shaped checkpoint of about 2 GB in bfloat16 (Llama 3's 128k vocabulary, tied embeddings, so
the largest tensor is the 0.5 GB embedding and `apply` also writes an untied lm_head), saved in several shards.
Then, each in its own fresh subprocess: a plain `shutil.copytree` of the same files to the same disk, and
`apply_direction`. Each child reports its own peak RSS (getrusage), so the figures do not mix.

Targets (issue 2): apply's peak RSS under 2 x largest tensor + 0.5 GB, and wall time under 3 x the copy.

Run: python benchmarks/apply.py [--work-dir DIR] [--layers 16] [--keep]

Measured 2026-11-27 on the shared 2-core development VM (load average about 8, so times are pessimistic):
1.97 GB in 4 shards, largest tensor 0.525 GB; plain copy 6.9 s, peak RSS 0.015 GB; apply 44.0 s, peak RSS
0.875 GB (0.232 GB of it is python + torch imported). Memory target met (limit 1.551 GB); time 6.4 x the copy,
over the 3 x target: a profile puts 31 of the 45 s in the float64 projection (weights.project_out), the rest in
reading, writing and copying.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 10**9

_CHILD_COPY = """
import resource, shutil, sys, time
start = time.perf_counter()
shutil.copytree(sys.argv[1], sys.argv[2])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

_CHILD_APPLY = """
import resource, sys, time
from pathlib import Path
from abliterate.checkpoint import apply_direction
from abliterate.config import load_config
start = time.perf_counter()
apply_direction(sys.argv[1], Path(sys.argv[3]), Path(sys.argv[2]), load_config())
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

_CHILD_IMPORT = """
import resource
import abliterate.checkpoint
print(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def build_checkpoint(path: Path, n_layers: int, max_shard_size: str) -> int:
    """Write a random bf16 Llama checkpoint tensor by tensor (never the whole model in memory); return the
    largest tensor's size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=n_layers,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True, dtype="bfloat16")
    path.mkdir(parents=True)
    config.save_pretrained(path)
    d, inter, kv = 2048, 5632, 4 * 128
    shapes = {"model.embed_tokens.weight": (128256, d), "model.norm.weight": (d,)}
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        shapes.update({prefix + "self_attn.q_proj.weight": (d, d), prefix + "self_attn.k_proj.weight": (kv, d),
                       prefix + "self_attn.v_proj.weight": (kv, d), prefix + "self_attn.o_proj.weight": (d, d),
                       prefix + "mlp.gate_proj.weight": (inter, d), prefix + "mlp.up_proj.weight": (inter, d),
                       prefix + "mlp.down_proj.weight": (d, inter), prefix + "input_layernorm.weight": (d,),
                       prefix + "post_attention_layernorm.weight": (d,)})
    from abliterate.checkpoint import parse_size

    limit, shards, current, size = parse_size(max_shard_size), [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name], size = shape, size + nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, shard in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for name, shape in shard.items()}
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
        del tensors
    total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return max(2 * int(torch.tensor(s).prod()) for s in shapes.values())


def run_child(code: str, *args: str) -> tuple[float, int]:
    """Run `code` in a fresh Python; it prints its wall seconds and peak RSS bytes."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    seconds, rss = result.stdout.split()[-2:]
    return float(seconds), int(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="", help="Where to build the model and outputs (default: a temp dir).")
    parser.add_argument("--layers", type=int, default=16, help="Decoder layers (16 gives about 2 GB).")
    parser.add_argument("--shard-size", default="500MB", help="Shard size of the random input checkpoint.")
    parser.add_argument("--keep", action="store_true", help="Keep the files afterwards.")
    parser.add_argument("--build", default="", help=argparse.SUPPRESS)  # internal: build into this dir and exit
    args = parser.parse_args()
    if args.build:
        import torch

        from abliterate.direction import save_direction

        largest = build_checkpoint(Path(args.build) / "model", args.layers, args.shard_size)
        save_direction(Path(args.build) / "direction", torch.randn(2048), {})
        print(largest)
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="abliterate-bench-"))
    try:
        model = work / "model"
        # Building happens in a child too: a forked child starts with its parent's peak RSS on Linux.
        largest = int(subprocess.run([sys.executable, __file__, "--build", str(work), "--layers", str(args.layers),
                                      "--shard-size", args.shard_size], capture_output=True, text=True,
                                     check=True).stdout.split()[-1])
        total = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        direction = work / "direction" / "direction.json"
        _, import_rss = run_child(_CHILD_IMPORT)
        copy_s, copy_rss = run_child(_CHILD_COPY, str(model), str(work / "copy"))
        apply_s, apply_rss = run_child(_CHILD_APPLY, str(model), str(work / "applied"), str(direction))
        rss_target = 2 * largest + 0.5 * GB
        print(f"checkpoint: {total / GB:.2f} GB in {len(list(model.glob('*.safetensors')))} shards, "
              f"largest tensor {largest / GB:.3f} GB")
        print(f"plain copy : {copy_s:6.1f} s, peak RSS {copy_rss / GB:.3f} GB")
        print(f"apply      : {apply_s:6.1f} s, peak RSS {apply_rss / GB:.3f} GB "
              f"(python + torch + abliterate imported alone: {import_rss / GB:.3f} GB)")
        print(f"time ratio apply/copy: {apply_s / copy_s:.2f} (target < 3); peak RSS {apply_rss / GB:.3f} GB vs "
              f"target 2 x largest + 0.5 GB = {rss_target / GB:.3f} GB: "
              f"{'ok' if apply_rss < rss_target else 'OVER'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
