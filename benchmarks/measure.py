"""Benchmark `measure`: where the time goes, candidates scored per second, and the ratio to the floor.

The floor is the forward passes that selection cannot avoid, timed alone on the same model with no hooks: one pass
over the validation prompts for every candidate scored (bypass and KL share it; zero candidates and discarded
layers are skipped), one base pass, and one pass over the harmless validation prompts for every induce score the
search needed. For scale it also prints the floor of an unpruned search (all three scores for every candidate). A ratio near 1 means the hooks,
scoring maths and bookkeeping cost little next to the model itself.

Run:  python benchmarks/measure.py                 # the toy refuser, default settings
      python benchmarks/measure.py MODEL --config configs/fast.toml --repeats 5 --threads 1
      python benchmarks/measure.py --set measure.require_induce=false
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path


def _median_pass_s(model, batches, repeats: int) -> float:
    from abliterate.selection import last_log_probs

    last_log_probs(model, batches)  # warm-up: first-call allocations are not part of the floor
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        last_log_probs(model, batches)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_s(source: str, config, n_scored: int, n_induce: int, repeats: int) -> dict[str, float]:
    """Time the unavoidable passes alone: plain forward passes over the same validation batches."""
    from abliterate.activations import encode
    from abliterate.chat import format_instructions
    from abliterate.model import load_model
    from abliterate.prompts import prompt_sets

    model, tokenizer = load_model(source, config.model)
    sets = prompt_sets(config.prompts)
    harmful = format_instructions(tokenizer, [p.text for p in sets.harmful_val], config.model)
    harmless = format_instructions(tokenizer, [p.text for p in sets.harmless_val], config.model)
    size = config.measure.batch_size
    val_s = _median_pass_s(model, encode(tokenizer, harmful + harmless, size), repeats)
    harmless_s = _median_pass_s(model, encode(tokenizer, harmless, size), repeats)
    return {"val_pass_s": val_s, "harmless_pass_s": harmless_s,
            "floor_s": (n_scored + 1) * val_s + n_induce * harmless_s}


def _overrides(assignments: list[str]) -> dict:
    import tomllib

    nested: dict = {}
    for assignment in assignments:
        dotted, _, value = assignment.partition("=")
        section, key = dotted.split(".")
        nested.setdefault(section, {})[key] = tomllib.loads(f"v = {value}")["v"]
    return nested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="", help="Model folder or Hub id (default: the toy refuser).")
    parser.add_argument("--config", default="", help="TOML config (default: configs/toy.toml for the toy).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed repeats of each floor pass (median).")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Override a setting, value in TOML syntax (e.g. measure.require_induce=false).")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice).")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from abliterate.config import load_config
    from abliterate.measure import measure
    from abliterate.toy import toy_refuser

    source = args.model or str(toy_refuser())
    config_file = args.config or ("" if args.model else str(Path(__file__).parents[1] / "configs" / "toy.toml"))
    config = load_config(config_file or None, _overrides(args.set))
    print(f"model {source}\nconfig {config_file or 'defaults'} {args.set or ''}; "
          f"torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = measure(source, Path(out) / "measure", config)
        total_s = time.perf_counter() - start
    n_candidates = len(result.scores)
    n_scored = sum(not math.isnan(s.bypass) for s in result.scores)
    n_induce = sum(not math.isnan(s.induce) for s in result.scores)
    floor = floor_s(source, config, n_scored, n_induce, args.repeats)
    every_s = (n_candidates + 1) * floor["val_pass_s"] + n_candidates * floor["harmless_pass_s"]

    print(f"chosen layer {result.layer} position {result.position}: {result.chosen}")
    print(f"total measure            {total_s:8.2f} s")
    for stage, seconds in result.timings_s.items():
        print(f"  {stage:<22} {seconds:8.2f} s ({100 * seconds / total_s:4.1f}%)")
    scoring_s = result.timings_s["scoring_s"]
    print(f"candidates               {n_candidates} (bypass and KL for {n_scored}, induce for {n_induce})")
    print(f"candidates scored per s  {n_candidates / scoring_s:8.1f}")
    print(f"floor pass over val      {floor['val_pass_s'] * 1000:8.1f} ms; harmless only "
          f"{floor['harmless_pass_s'] * 1000:.1f} ms")
    print(f"floor for selection      {floor['floor_s']:8.2f} s (the passes this search ran, without hooks)")
    print(f"selection / floor        {scoring_s / floor['floor_s']:8.2f}x")
    print(f"unpruned search floor    {every_s:8.2f} s (3 scores for every candidate); "
          f"selection / that {scoring_s / every_s:.2f}x")


if __name__ == "__main__":
    main()
