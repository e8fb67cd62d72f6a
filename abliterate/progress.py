"""Progress reporting seam: the library announces work, the CLI decides how (or whether) to show it.

Library code never prints. It wraps long loops in `progress.track(items, "what", total)`; by default that is a
plain pass-through, and the CLI installs a rich progress bar with `set_reporter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

# A reporter takes (items, description, total) and yields the items while showing progress.
Reporter = Callable[[Iterable, str, "int | None"], Iterator]


def _silent(items: Iterable, description: str, total: int | None) -> Iterator:
    yield from items


_reporter: Reporter = _silent


def set_reporter(reporter: Reporter | None) -> None:
    """Install a reporter (None restores the silent default)."""
    global _reporter
    _reporter = reporter or _silent


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, letting the installed reporter show `description` and counts."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return _reporter(items, description, total)
