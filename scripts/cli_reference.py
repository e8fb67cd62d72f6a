"""Regenerate README.md's "CLI reference" section from the real `--help` output of every command.

    python scripts/cli_reference.py          # rewrite the section in place
    python scripts/cli_reference.py --check  # exit 1 when the section is out of date

Everything from the "## CLI reference" heading to the end of README.md is replaced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## CLI reference"
COMMANDS = ("measure", "optimize", "eval", "run", "demo", "apply", "inspect", "push")
WIDTH = 112  # the width the section was always rendered at (rich wraps help text to the terminal's columns)


def help_text(command: str | None) -> str:
    env = {**os.environ, "COLUMNS": str(WIDTH), "TERM": "dumb", "NO_COLOR": "1"}
    args = [sys.executable, "-m", "abliterate.cli", *([command] if command else []), "--help"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return "\n".join(line.rstrip() for line in done.stdout.splitlines()).strip("\n")


def section() -> str:
    parts = [HEADING, "", "Generated from the real `--help` output (`python scripts/cli_reference.py`).", "",
             "```text", "$ abliterate --help", "", help_text(None), "```"]
    for command in COMMANDS:
        parts += ["", f"### abliterate {command}", "", "```text", f"$ abliterate {command} --help", "",
                  help_text(command), "```"]
    return "\n".join(parts) + "\n"


def main() -> int:
    text = README.read_text()
    head = text[: text.index(HEADING)] if HEADING in text else text.rstrip() + "\n\n"
    new = head + section()
    if "--check" in sys.argv:
        return 0 if new == text else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
