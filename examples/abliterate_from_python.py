"""Abliterate a model from Python with the same library call the `abliterate run` command makes.

Run:  python examples/abliterate_from_python.py Qwen/Qwen2.5-0.5B-Instruct qwen-abliterated
      python examples/abliterate_from_python.py "$(python -c 'from abliterate.toy import toy_refuser; print(toy_refuser())')" toy-out --toy

The settings come from a preset in configs/ plus overrides given as {section: {key: value}}; any key that
`configs/default.toml` lists can be overridden. Rerunning the same call reuses the finished steps.
"""

import sys
from pathlib import Path

from abliterate.config import load_config
from abliterate.pipeline import run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    model, out_dir = sys.argv[1], Path(sys.argv[2])
    preset = ROOT / "configs" / ("toy.toml" if "--toy" in sys.argv else "fast.toml")
    config = load_config(preset, overrides={"eval": {"max_new_tokens": 64}})
    result = run(model, out_dir, config)
    print(f"direction: layer {result.layer} of {result.n_layers}, position {result.position}")
    print(f"tensors edited: {result.n_edited}; steps reused: {', '.join(result.reused) or 'none'}")
    for metric, base, edited in result.metrics:
        print(f"{metric}: {base} -> {edited}")
    print(f"checkpoint: {result.out_dir}  report: {result.report_path}")


if __name__ == "__main__":
    main()
