"""Evaluate a published abliterated model against its base, the way `abliterate eval --base` does.

Run:  python examples/evaluate_published.py someone/Llama-3-8B-Instruct-abliterated meta-llama/Meta-Llama-3-8B-Instruct eval-out
      (add TOGETHER_API_KEY to the environment and --judge together on the command line for the safety judge)

Both models answer the same held-out prompts; the report gives refusal rates with their prompt counts and
confidence intervals, over-refusal on harmless prompts, KL and CE loss, base beside edited.
"""

import sys
from pathlib import Path

from abliterate.config import load_config
from abliterate.evaluation import evaluate


def main() -> None:
    edited, base, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    judge = "together" if "--judge" in sys.argv and "together" in sys.argv else "none"
    config = load_config(overrides={"eval": {"judge": judge}})
    report = evaluate(edited, config, out_dir, base=base)
    print(report.to_markdown())
    print(f"JSON and Markdown reports in {out_dir}")


if __name__ == "__main__":
    main()
