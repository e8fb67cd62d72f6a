"""Evaluate a published abliterated model against its base, the way `abliterate eval --base` does.

Run:  python examples/evaluate_published.py someone/Llama-3-8B-Instruct-abliterated meta-llama/Meta-Llama-3-8B-Instruct eval-out
      python examples/evaluate_published.py EDITED BASE eval-out --config configs/paper.toml   # with the judge
      (the paper preset uses Llama Guard 2 on Together: put TOGETHER_API_KEY in the environment)

Both models answer the same held-out prompts; the report gives refusal rates with their prompt counts and
confidence intervals, over-refusal on harmless prompts, KL and CE loss, base beside edited.
"""

import sys
from pathlib import Path

from abliterate.config import load_config
from abliterate.evaluation import evaluate


def main() -> None:
    edited, base, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    config_file = sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None
    config = load_config(config_file)
    config.eval.actadd = False  # ActAdd needs the direction's measure folder, which a published model does not ship
    report = evaluate(edited, config, out_dir, base=base)
    print(report.to_markdown())
    print(f"JSON and Markdown reports in {out_dir}")


if __name__ == "__main__":
    main()
