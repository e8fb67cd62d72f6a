"""The texts the CE loss is measured on: a general corpus and Alpaca-style (instruction, reply) pairs.

Sources (eval.ce_text, eval.ce_chat):
- a local `.txt` file: documents separated by a blank line (general text only);
- a local `.jsonl` (one object per line) or `.json` (a list of objects): `text` for general text, `instruction` and
  `output` for pairs (Alpaca's field names; `input` must be empty, as the paper's harmless Alpaca prompts);
- `hf:owner/name[:split][@revision]`: a Hub dataset, streamed so only the first rows are read; pin the revision
  for numbers that can be reproduced (e.g. `hf:monology/pile-uncopyrighted:train@<commit>`).
The first `n_ce_docs` documents and `n_ce_chat` pairs are used, in file order. Everything is loaded before any
generation, so a wrong path fails at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.config import EvalConfig
from abliterate.errors import UserError


@dataclass
class CorpusSets:
    """General-text documents and (instruction, reply) pairs; empty lists for sets that are not configured."""

    texts: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)


def load_corpora(eval_config: EvalConfig) -> CorpusSets:
    """Load both CE sets named in the config (either may be empty, meaning skipped)."""
    texts = _text_rows(eval_config.ce_text, eval_config.n_ce_docs) if eval_config.ce_text else []
    pairs = _pair_rows(eval_config.ce_chat, eval_config.n_ce_chat) if eval_config.ce_chat else []
    return CorpusSets(texts, pairs)


def _text_rows(source: str, n: int) -> list[str]:
    if source.endswith(".txt") and not source.startswith("hf:"):
        documents = [doc.strip() for doc in re.split(r"\n\s*\n", _read(source, "--ce-text"))]
        texts = [doc for doc in documents if doc][:n]
    else:
        texts = [_field(row, "text", source, "eval.ce_text") for row in _rows(source, n, "eval.ce_text")]
    if not texts:
        raise UserError(f"eval.ce_text {source} holds no documents; point it at a file with text or set it empty.")
    return texts


def _pair_rows(source: str, n: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    # A Hub set is streamed: read a few times n rows, enough for n pairs with an empty input (about 60% in Alpaca).
    for row in _rows(source, n * 4 if source.startswith("hf:") else None, "eval.ce_chat"):
        if str(row.get("input") or "").strip():
            continue  # instructions with a separate input are left out, as the paper's Alpaca set
        pairs.append((_field(row, "instruction", source, "eval.ce_chat"), _field(row, "output", source, "eval.ce_chat")))
        if len(pairs) == n:
            break
    if not pairs:
        raise UserError(f"eval.ce_chat {source} holds no instruction/output pairs with an empty input; fix the file.")
    return pairs


def _read(source: str, what: str) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; pass an existing file or hf:owner/name.")
    return path.read_text(encoding="utf-8")


def _field(row: dict[str, Any], name: str, source: str, key: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise UserError(f"{key} {source}: a row has no '{name}' text field (found {sorted(row)}); fix the file or {key}.")
    return value


def _rows(source: str, n: int | None, key: str) -> list[dict[str, Any]]:
    """The first `n` rows (all when None) of a local JSON/JSONL file or a streamed Hub dataset."""
    if source.startswith("hf:"):
        return _hub_rows(source.removeprefix("hf:"), n, key)
    text = _read(source, key)
    try:
        if source.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif source.endswith(".json"):
            rows = json.loads(text)
        else:
            raise UserError(f"{key} {source} must be a .txt, .json or .jsonl file or hf:owner/name[:split].")
    except json.JSONDecodeError as error:
        raise UserError(f"{key} {source} is not valid JSON ({error}); fix the file.")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{key} {source} must hold a list of JSON objects.")
    return rows if n is None else rows[:n]


def _hub_rows(spec: str, n: int | None, key: str) -> list[dict[str, Any]]:
    import datasets

    from abliterate.hub import hub_unreachable

    name, _, revision = spec.partition("@")
    name, _, split = name.partition(":")
    # A streamed dataset is never cached, so offline or unresolvable it fails at once, naming the local file.
    unreachable = hub_unreachable(f"{key} hf:{spec}", f"point {key} at a local .jsonl or .json file instead")
    if unreachable is not None:
        raise unreachable
    try:
        stream = datasets.load_dataset(name, split=split or "train", revision=revision or None, streaming=True)
        rows = []
        for row in stream:
            rows.append(dict(row))
            if n is not None and len(rows) == n:
                break
        return rows
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean the same to the user
        raise UserError(f"Could not read {key} hf:{spec} ({type(error).__name__}: {error}); check the name, split "
                        "and network, or use a local file.")
