"""Benchmark `abliterate apply` against a plain copy of the same checkpoint: cold and warm wall time, peak memory.

Builds a random Llama-shaped checkpoint of about 2 GB in bfloat16 (Llama 3's 128k vocabulary, tied embeddings, so
the largest tensor is the 0.5 GB embedding and `apply` also writes an untied lm_head: 27% more bytes than the copy
moves), saved in several shards. Then, each in its own fresh subprocess, alternately and `--repeats` times: a plain
`shutil.copytree` of the same files to the same disk, and `apply_direction`. Each child reports its own wall time
(imports excluded) and peak RSS (getrusage), so the figures do not mix. The best of the repeats is reported, since
on a shared machine every slower run is someone else's load.

- warm: the input is read once beforehand, so both read from the page cache (what a second run sees);
- cold: the input's pages are dropped first (posix_fadvise DONTNEED after a sync, no root needed), so both read
  from the disk (what a first run after a download sees, unless the download is still cached).
Pending writes are flushed (sync) before every timed run and not counted in it.

`--profile` adds one more apply run that sums, over all writer threads, the seconds spent reading edited tensors,
editing them, writing them and copying the others, beside the wall time: where the time goes, and how much of it
overlaps.

Targets: apply's peak RSS under 2 x largest tensor + 0.5 GB; warm wall time at most 1.5 x the warm copy.

Run: python benchmarks/apply.py [--layers 16] [--repeats 3] [--profile] [--work-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 10**9

# Each child prints its wall seconds, then JSON: peak RSS and the CPU seconds (user + system) of the timed part.
_USAGE = """
def usage(before):
    now = resource.getrusage(resource.RUSAGE_SELF)
    return json.dumps({"rss_bytes": now.ru_maxrss * 1024,
                       "cpu_s": now.ru_utime + now.ru_stime - before.ru_utime - before.ru_stime})
"""

_CHILD_COPY = """
import json, resource, shutil, sys, time
""" + _USAGE + """
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
shutil.copytree(sys.argv[1], sys.argv[2])
print(time.perf_counter() - start, usage(before))
"""

_CHILD_APPLY = """
import json, resource, sys, time
from pathlib import Path
from abliterate.apply import apply_direction
from abliterate.config import load_config
""" + _USAGE + """
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
apply_direction(sys.argv[1], Path(sys.argv[3]), Path(sys.argv[2]), load_config())
print(time.perf_counter() - start, usage(before))
"""

_CHILD_IMPORT = """
import json, resource
import abliterate.apply
""" + _USAGE + """
print(0.0, usage(resource.getrusage(resource.RUSAGE_SELF)))
"""

# Wraps the phases of a write in timers (summed over threads) and prints them as JSON after the wall time.
_CHILD_PROFILE = """
import functools, json, sys, threading, time
from pathlib import Path
from abliterate import apply as checkpoint, shards
from abliterate.config import load_config
seconds, lock = {}, threading.Lock()
def timed(module, name, label):
    original = getattr(module, name, None)
    if original is None:  # an older abliterate without this phase
        return
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
    setattr(module, name, wrapper)
timed(checkpoint, "read_tensor", "read edited tensors (into the mapped output)")
timed(checkpoint, "edit_in_chunks", "edit in place (float64 maths)")
timed(shards, "_reserve", "reserve the output files")
timed(shards, "_copy_range", "copy other tensors (kernel)")
start = time.perf_counter()
checkpoint.apply_direction(sys.argv[1], Path(sys.argv[3]), Path(sys.argv[2]), load_config())
print(time.perf_counter() - start, json.dumps(seconds))
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
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(shapes, get_storage_size=lambda shape: 2 * math.prod(shape),
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    generator = torch.Generator().manual_seed(0)
    for filename, names in split.filename_to_tensors.items():
        tensors = {name: (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16) for name in names}
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        del tensors
    weight_map = split.tensor_to_filename
    total = sum(2 * int(torch.tensor(s).prod()) for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return max(2 * int(torch.tensor(s).prod()) for s in shapes.values())


def run_child(code: str, *args: str) -> tuple[float, str]:
    """Run `code` in a fresh Python; it prints its wall seconds and one more figure."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    seconds, figure = result.stdout.strip().split(" ", 1)
    return float(seconds), figure


def prepare_input(model: Path, cold: bool) -> None:
    """Flush pending writes, then drop the input's cached pages (cold) or read it all once (warm)."""
    os.sync()
    for path in sorted(model.iterdir()):
        with open(path, "rb") as handle:
            if cold:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while handle.read(64 * 2**20):
                    pass


def timed_runs(model: Path, direction: Path, work: Path, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds, CPU seconds and peak RSS of copy and apply, cold and warm, alternating so that load changes hit
    both alike."""
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):
        for state in ("cold", "warm"):
            for name, code, extra in (("copy", _CHILD_COPY, ()), ("apply", _CHILD_APPLY, (str(direction),))):
                out = work / f"{name}_out"
                prepare_input(model, cold=state == "cold")
                seconds, usage = run_child(code, str(model), str(out), *extra)
                shutil.rmtree(out)
                entry = runs.setdefault(f"{name} {state}", {"seconds": [], "rss_bytes": [], "cpu_s": []})
                entry["seconds"].append(seconds)
                for key, value in json.loads(usage).items():
                    entry[key].append(value)
    return runs


def profile(model: Path, direction: Path, work: Path) -> tuple[float, dict[str, float]]:
    prepare_input(model, cold=False)
    seconds, phases = run_child(_CHILD_PROFILE, str(model), str(work / "profile_out"), str(direction))
    shutil.rmtree(work / "profile_out")
    return seconds, json.loads(phases)


def report(runs: dict[str, dict[str, list[float]]], total: int, n_shards: int, largest: int, import_rss: float,
           phases: tuple[float, dict[str, float]] | None) -> None:
    best = {name: min(entry["seconds"]) for name, entry in runs.items()}
    rss = max(runs["apply warm"]["rss_bytes"] + runs["apply cold"]["rss_bytes"])
    print(f"checkpoint: {total / GB:.2f} GB in {n_shards} shards, largest tensor {largest / GB:.3f} GB; "
          f"best of {len(runs['apply warm']['seconds'])} runs each, load average {os.getloadavg()[0]:.1f}")
    for state in ("cold", "warm"):
        copy_s, apply_s = best[f"copy {state}"], best[f"apply {state}"]
        copy_cpu, apply_cpu = (min(runs[f"{name} {state}"]["cpu_s"]) for name in ("copy", "apply"))
        print(f"{state}: plain copy {copy_s:6.2f} s ({total / GB / copy_s:.2f} GB/s, {copy_cpu:.2f} CPU s), "
              f"apply {apply_s:6.2f} s ({total / GB / apply_s:.2f} GB/s read, {apply_cpu:.2f} CPU s), "
              f"apply / copy {apply_s / copy_s:.2f}{' (target <= 1.5)' if state == 'warm' else ''}")
    print("every run (s): " + "; ".join(f"{name} {', '.join(f'{s:.2f}' for s in entry['seconds'])}"
                                        for name, entry in runs.items()))
    rss_target = 2 * largest + 0.5 * GB
    print(f"apply peak RSS {rss / GB:.3f} GB (python + torch + abliterate imported alone: {import_rss / GB:.3f} GB) "
          f"vs target 2 x largest + 0.5 GB = {rss_target / GB:.3f} GB: {'ok' if rss < rss_target else 'OVER'}")
    if phases is not None:
        wall, seconds = phases
        print(f"profile (warm, seconds summed over writer threads; wall {wall:.2f} s):")
        for label, value in sorted(seconds.items(), key=lambda item: -item[1]):
            print(f"  {label:<30} {value:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="", help="Where to build the model and outputs (default: a temp dir).")
    parser.add_argument("--layers", type=int, default=16, help="Decoder layers (16 gives about 2 GB, 2 about 0.7 GB).")
    parser.add_argument("--shard-size", default="500MB", help="Shard size of the random input checkpoint.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each of the four cases (best kept).")
    parser.add_argument("--profile", action="store_true", help="Also time the phases of one warm apply.")
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
        if not model.is_dir():  # building happens in a child too: a forked child starts with its parent's peak RSS
            largest = int(subprocess.run([sys.executable, __file__, "--build", str(work), "--layers",
                                          str(args.layers), "--shard-size", args.shard_size], capture_output=True,
                                         text=True, check=True).stdout.split()[-1])
            (work / "largest.txt").write_text(str(largest))
        largest = int((work / "largest.txt").read_text())
        shard_files = list(model.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shard_files)
        direction = work / "direction" / "direction.json"
        import_rss = json.loads(run_child(_CHILD_IMPORT)[1])["rss_bytes"]
        runs = timed_runs(model, direction, work, args.repeats)
        phases = profile(model, direction, work) if args.profile else None
        report(runs, total, len(shard_files), largest, float(import_rss), phases)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
