"""How the base model refuses, found from its own greedy replies: the shared reply prefix and the refusal tokens.

The refusal score reads the log-probability of refusal tokens at one reply position. Which position and which tokens
differ per model: a template may put a lone space before every reply, a reasoning model opens every reply with the
same thinking block, and refusals may be worded in lower case or another language. So the base model's own short
greedy replies to harmful and harmless prompts are read: the prefix they all share is teacher-forced after the
prompt, and the refusal tokens are the tokens that open the harmful replies there and rarely the harmless ones.

`refusal.json` in the measure folder records what was found; evaluation reads it to match refusals the same way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REFUSAL_JSON = "refusal.json"


@dataclass
class RefusalProfile:
    """How the base model refuses, as found from its own greedy replies (or as configured)."""

    source: str  # "discovered" or "configured" (measure.refusal_openings set by the user)
    prefix: str  # reply text shared by refusals and answers, teacher-forced before scoring ("" none)
    token_ids: list[int]  # refusal tokens at the scored position (first token after the prefix)
    token_texts: list[str]  # the same, decoded
    openings: list[str]  # how the base model's refusals open, as text after the prefix (first words)
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # template kwargs used for measuring
    thinking_end: str = ""  # text that closes a thinking block in this model's replies ("" when none found)
    n_harmful_replies: int = 0
    n_harmless_replies: int = 0
    n_refusals: int = 0  # harmful replies recognised as refusals
    separation: float = 1.0  # how well the score separates harmful from harmless (AUC in [0, 1])
    prefix_ids: list[int] = field(default_factory=list)  # the prefix as token ids, appended to each prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefusalProfile:
        """Reads a profile, ignoring keys a later version added (so an older reader keeps working)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def save_profile(profile: RefusalProfile, folder: Path) -> Path:
    path = Path(folder) / REFUSAL_JSON
    path.write_text(json.dumps(profile.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_profile(folder_or_file: Path) -> RefusalProfile | None:
    """The profile in a measure folder (or the refusal.json file itself); None when the file is absent."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / REFUSAL_JSON
    if not path.is_file():
        return None
    return RefusalProfile.from_dict(json.loads(path.read_text(encoding="utf-8")))
