"""Prompt sets: load instructions from files, Hub datasets or bundled sets, and draw disjoint, seeded samples.

Sources (one string each, as in the config):
- a local file: `.txt` (one prompt a line), `.json` (a list of strings, or of objects), `.jsonl`, `.csv`, `.parquet`;
  for objects and tables the instruction column is `prompts.column` (`--column`) or detected among
  instruction / prompt / goal / Goal / Behavior; a `category` or `Category` column is kept.
- a Hub dataset: `hf:owner/name[/config][@revision][:split][#column]`, e.g.
  `hf:JailbreakBench/JBB-Behaviors/behaviors@<commit>:harmful#Goal` (split defaults to train). A local folder
  (`hf:./my_data:train`) is read the same way through the `datasets` library, which is how tests exercise it.
- `builtin:NAME`: a file bundled in abliterate/data (the toy refuser's sets: toy_harmful_train, toy_harmless_train,
  toy_harmful_eval, toy_harmless_eval, toy_demo).
- several of these joined by ` + `: their prompts in order (the paper fits on AdvBench + MaliciousInstruct + TDC 2023).

Rows whose `input` column is non-empty are dropped (Alpaca: the paper keeps only instructions without an input).
`prompt_sets` deduplicates, removes overlaps between training, validation and evaluation (logged), and samples with
the configured seed; its `record()` is the provenance written next to results.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abliterate.errors import UserError
from abliterate.hub import hub_unreachable

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
TEXT_COLUMNS = ("instruction", "prompt", "goal", "Goal", "Behavior", "behavior")
CATEGORY_COLUMNS = ("category", "Category")
_HF_NAME = re.compile(r"^hf:(?P<name>[^@:#]+)")


@dataclass(frozen=True)
class Prompt:
    """One instruction and, where the source has one, its category (JailbreakBench's `Category`)."""

    text: str
    category: str = ""


@dataclass
class PromptSets:
    """The six disjoint prompt lists a job uses, and how they were drawn."""

    harmful_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_train: list[Prompt]
    harmless_val: list[Prompt]
    harmful_eval: list[Prompt]
    harmless_eval: list[Prompt]
    provenance: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Sources, seed, sizes and removed overlaps, for the provenance files."""
        return dict(self.provenance)


def _row_text(row: Any, column: str, where: str) -> Prompt | None:
    """The prompt in one row (a string or an object); None for a row to skip (Alpaca rows with an input)."""
    if isinstance(row, str):
        text, category = row, ""
    elif isinstance(row, dict):
        if column not in row:
            raise UserError(f"{where} has no column '{column}' (it has {', '.join(map(str, row))}); "
                            "choose the instruction column with --column (prompts.column).")
        if str(row.get("input") or "").strip():
            return None
        text = row[column]
        category = next((str(row[c]) for c in CATEGORY_COLUMNS if row.get(c) not in (None, "")), "")
    else:
        raise UserError(f"{where} is neither a string nor an object; fix the file or pass another.")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where} has an empty or non-text prompt ({text!r}); fix or remove that row.")
    return Prompt(text.strip(), category)


def _detect_column(rows: list[Any], column: str, source: str) -> str:
    if column or not rows or not isinstance(rows[0], dict):
        return column
    found = next((name for name in TEXT_COLUMNS if name in rows[0]), None)
    if found is None:
        raise UserError(f"{source}: no instruction column found among {', '.join(map(str, rows[0]))}; "
                        "name it with --column (prompts.column).")
    return found


def _from_rows(rows: list[Any], column: str, source: str, first_row: int = 1) -> list[Prompt]:
    column = _detect_column(rows, column, source)
    prompts = []
    for index, row in enumerate(rows):
        prompt = _row_text(row, column, f"{source} row {index + first_row}")
        if prompt is not None:
            prompts.append(prompt)
    skipped = len(rows) - len(prompts)
    if skipped:
        logger.info("%s: skipped %d rows with a non-empty input field.", source, skipped)
    return prompts


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}); fix the file.") from error
    if isinstance(data, dict):
        # A table stored column-wise, or a single list under one key (e.g. {"data": [...]}).
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) == 1:
            return lists[0]
        raise UserError(f"{path} holds an object, not a list of prompts; write a JSON list of strings or objects.")
    if not isinstance(data, list):
        raise UserError(f"{path} holds {type(data).__name__}, not a list of prompts; write a JSON list.")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path} row {number} is not valid JSON ({error.msg}); fix or remove that line.") from error
    return rows


def _read_csv(path: Path) -> list[Any]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = []
        for row in reader:
            if None in row:
                raise UserError(f"{path} row {reader.line_num} has more fields than the header; fix that row "
                                "(quote fields that contain commas).")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[Any]:
    from pyarrow import parquet

    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path} is not a readable parquet file ({error}); fix or replace it.") from error


def load_file(path: Path, column: str = "") -> list[Prompt]:
    """Prompts from a local file, by its suffix."""
    if not path.is_file():
        raise UserError(f"Prompt file {path} does not exist; pass an existing file (or hf:owner/name, builtin:NAME).")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [Prompt(line.strip()) for line in lines if line.strip()]
        else:
            readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
            if suffix not in readers:
                raise UserError(f"Prompt file {path} has an unknown format '{suffix}'; use .txt, .json, .jsonl, "
                                ".csv or .parquet.")
            first_row = 2 if suffix == ".csv" else 1  # CSV rows are counted as lines, after the header
            prompts = _from_rows(readers[suffix](path), column, str(path), first_row)
    except UnicodeDecodeError as error:
        raise UserError(f"Prompt file {path} is not UTF-8 text ({error}); re-save it as UTF-8.") from error
    if not prompts:
        raise UserError(f"Prompt file {path} has no prompts; fill it or pass another file.")
    return prompts


def parse_hf_source(source: str) -> dict[str, str]:
    """`hf:owner/name[/config][@revision][:split][#column]` as its parts (split defaults to train).

    `@revision` and `:split` may come in either order (`hf:owner/name:split@revision` also reads).
    """
    match = _HF_NAME.match(source)
    rest = source[match.end():] if match else ""
    found = re.findall(r"([@:#])([^@:#]+)", rest)
    parts = dict(found)
    if not match or "".join(mark + value for mark, value in found) != rest:
        raise UserError(f"Cannot read the dataset source '{source}'; write hf:owner/name[/config][@revision]"
                        "[:split][#column].")
    name = match["name"]
    local = name.startswith((".", "/", "~"))
    pieces = name.split("/")
    config = ""
    if not local and len(pieces) == 3:
        name, config = "/".join(pieces[:2]), pieces[2]
    elif not local and len(pieces) != 2:
        raise UserError(f"'{source}' does not name a Hub dataset as owner/name; write hf:owner/name[/config]...")
    return {"name": name, "config": config, "revision": parts.get("@", ""), "split": parts.get(":", "train"),
            "column": parts.get("#", "")}


def load_hub_dataset(source: str, column: str = "") -> list[Prompt]:
    """Prompts from a Hub dataset (or a local dataset folder) through the `datasets` library."""
    import datasets

    spec = parse_hf_source(source)
    kwargs: dict[str, Any] = {"split": spec["split"]}
    if spec["revision"]:
        kwargs["revision"] = spec["revision"]
    path = Path(spec["name"]).expanduser()
    local_file = ("pass a local prompt file instead (.txt with one prompt a line, or .json, .jsonl, .csv, "
                  ".parquet) in the prompts.* key named next, or its flag (`--help` lists them per command)")
    from huggingface_hub import constants

    if not path.is_dir() and not constants.is_offline_mode():
        unreachable = hub_unreachable(f"The dataset {source}", local_file)
        if unreachable is not None:
            raise unreachable
    try:
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(path))[spec["split"]]
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            table = datasets.load_from_disk(str(path))
        else:
            table = datasets.load_dataset(str(path) if path.is_dir() else spec["name"], spec["config"] or None,
                                          **kwargs)
    except Exception as error:  # datasets raises many types (offline, missing split, bad config)
        if not path.is_dir() and constants.is_offline_mode():
            raise hub_unreachable(f"The dataset {source}", local_file) from error
        raise UserError(f"Could not load the dataset {source} ({type(error).__name__}: {error}); check the name, "
                        "config, split and revision, and that the Hub is reachable (HF_HUB_OFFLINE).") from error
    prompts = _from_rows(list(table), spec["column"] or column, source)
    if not prompts:
        raise UserError(f"The dataset {source} has no prompts; pick another split or dataset.")
    return prompts


def builtin_names() -> list[str]:
    return sorted(path.stem for path in DATA_DIR.iterdir() if path.suffix in (".txt", ".json", ".jsonl"))


def load_prompts(source: str, column: str = "") -> list[Prompt]:
    """Prompts from `source`: a local file, `hf:...` or `builtin:NAME`, or several joined by " + "."""
    if " + " in source:
        return [prompt for part in source.split(" + ") for prompt in load_prompts(part.strip(), column)]
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        matches = [path for path in DATA_DIR.glob(f"{name}.*") if path.stem == name]
        if not matches:
            raise UserError(f"No bundled prompt set '{name}'; bundled sets are {', '.join(builtin_names())}.")
        return load_file(matches[0], column)
    if source.startswith("hf:"):
        return load_hub_dataset(source, column)
    return load_file(Path(source).expanduser(), column)


def _key(text: str) -> str:
    """Prompts equal up to case and whitespace count as the same prompt."""
    return " ".join(text.casefold().split())


def _dedupe(prompts: list[Prompt]) -> tuple[list[Prompt], int]:
    seen: set[str] = set()
    kept = []
    for prompt in prompts:
        if _key(prompt.text) not in seen:
            seen.add(_key(prompt.text))
            kept.append(prompt)
    return kept, len(prompts) - len(kept)


def _without(prompts: list[Prompt], taken: list[Prompt]) -> tuple[list[Prompt], int]:
    keys = {_key(prompt.text) for prompt in taken}
    kept = [prompt for prompt in prompts if _key(prompt.text) not in keys]
    return kept, len(prompts) - len(kept)


def _split_fit(pool: list[Prompt], n_train: int, n_val: int, rng: random.Random, what: str,
               source: str) -> tuple[list[Prompt], list[Prompt]]:
    if len(pool) < n_train + n_val:
        raise UserError(f"{what} prompts ({source}) number {len(pool)} after deduplication, fewer than "
                        f"n_train + n_val = {n_train + n_val}; lower prompts.n_train / prompts.n_val or use a "
                        "larger set.")
    drawn = rng.sample(pool, n_train + n_val)
    return drawn[:n_train], drawn[n_train:]


def _draw_eval(pool: list[Prompt], n_eval: int, rng: random.Random, what: str, source: str) -> list[Prompt]:
    if not pool:
        raise UserError(f"No {what} evaluation prompts are left from {source} once training and validation prompts "
                        "are removed; use a separate evaluation set or lower prompts.n_train / prompts.n_val.")
    if len(pool) < n_eval:
        logger.warning("Only %d %s evaluation prompts (asked for %d) in %s.", len(pool), what, n_eval, source)
    return rng.sample(pool, min(n_eval, len(pool)))


def prompt_sets(prompts_config: Any, fit_only: bool = False) -> PromptSets:
    """Training, validation and evaluation prompts per side: deduplicated, disjoint and sampled with the seed.

    Order of work: load and deduplicate each source; remove from the harmless sources any prompt that is also a
    harmful fit prompt; draw training + validation from the training sources; remove every fit prompt from the
    evaluation sources (an overlap is logged: fitting on evaluation prompts would inflate the results) and harmful
    evaluation prompts from the harmless ones; draw the evaluation prompts. The fit draw never depends on the
    evaluation sources, so `fit_only` (what `measure` uses: the evaluation sources are not even loaded, so a Hub
    evaluation set needs no network) draws exactly the fit prompts a full call draws, and empty evaluation lists.
    """
    c = prompts_config
    sources = {"harmful_train": c.harmful_train, "harmless_train": c.harmless_train,
               "harmful_eval": c.harmful_eval, "harmless_eval": c.harmless_eval}
    if getattr(c, "harmful_val", ""):
        sources["harmful_val"] = c.harmful_val  # a validation set of its own (the paper: HarmBench's)
    if fit_only:
        sources = {name: source for name, source in sources.items() if not name.endswith("_eval")}
    pools, duplicates, overlaps = {}, {}, {}
    for name, source in sources.items():
        try:
            pools[name], duplicates[name] = _dedupe(load_prompts(source, c.column))
        except UserError as error:  # the same flag names another set in eval than in measure: name the key
            raise UserError(f"{error} (prompts.{name})") from None
        if duplicates[name]:
            logger.info("Removed %d duplicate prompts from %s.", duplicates[name], source)
    pools["harmless_train"], overlaps["harmless_train_also_harmful"] = _without(
        pools["harmless_train"], pools["harmful_train"])
    rng = random.Random(c.seed)
    if "harmful_val" in pools:
        pools["harmful_train"], overlaps["harmful_train_in_val"] = _without(pools["harmful_train"], pools["harmful_val"])
        harmful_train, _ = _split_fit(pools["harmful_train"], c.n_train, 0, rng, "Harmful", c.harmful_train)
        _, harmful_val = _split_fit(pools["harmful_val"], 0, c.n_val, rng, "Harmful validation", c.harmful_val)
    else:
        harmful_train, harmful_val = _split_fit(pools["harmful_train"], c.n_train, c.n_val, rng, "Harmful",
                                                c.harmful_train)
    harmless_train, harmless_val = _split_fit(pools["harmless_train"], c.n_train, c.n_val, rng, "Harmless",
                                              c.harmless_train)
    fit = harmful_train + harmful_val + harmless_train + harmless_val
    if fit_only:
        return _fit_sets(c, sources, harmful_train, harmful_val, harmless_train, harmless_val, duplicates, overlaps)
    pools["harmless_eval"], overlaps["harmless_eval_also_harmful"] = _without(
        pools["harmless_eval"], pools["harmful_train"] + pools["harmful_eval"])
    for side in ("harmful", "harmless"):
        pools[f"{side}_eval"], overlaps[f"{side}_eval_in_fit"] = _without(pools[f"{side}_eval"], fit)
    harmful_eval = _draw_eval(pools["harmful_eval"], c.n_eval, rng, "harmful", c.harmful_eval)
    harmless_eval = _draw_eval(pools["harmless_eval"], c.n_eval, rng, "harmless", c.harmless_eval)
    return _fit_sets(c, sources, harmful_train, harmful_val, harmless_train, harmless_val, duplicates, overlaps,
                     harmful_eval, harmless_eval)


def _fit_sets(c: Any, sources: dict[str, str], harmful_train: list[Prompt], harmful_val: list[Prompt],
              harmless_train: list[Prompt], harmless_val: list[Prompt], duplicates: dict[str, int],
              overlaps: dict[str, int], harmful_eval: list[Prompt] | None = None,
              harmless_eval: list[Prompt] | None = None) -> PromptSets:
    """The drawn sets with their provenance (evaluation lists empty when they were not drawn)."""
    for name, count in overlaps.items():
        if count:
            logger.warning("Removed %d prompts (%s) so that fitting and evaluation stay disjoint.", count,
                           name.replace("_", " "))
    sets = PromptSets(harmful_train, harmful_val, harmless_train, harmless_val, harmful_eval or [],
                      harmless_eval or [])
    sets.provenance = {
        "seed": c.seed, "sources": sources, "column": c.column,
        "sizes": {name: len(getattr(sets, name)) for name in (
            "harmful_train", "harmful_val", "harmless_train", "harmless_val", "harmful_eval", "harmless_eval")},
        "duplicates_removed": duplicates, "overlaps_removed": overlaps,
    }
    return sets
