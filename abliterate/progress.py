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
# Called before every item: the CLI re-raises a Ctrl-C there that Python swallowed (an interrupt that lands in a
# weakref callback or a __del__ is printed as "Exception ignored" and dropped).
_checkpoint: Callable[[], None] = lambda: None


def set_reporter(reporter: Reporter | None) -> None:
    """Install a reporter (None restores the silent default)."""
    global _reporter
    _reporter = reporter or _silent


def set_checkpoint(checkpoint: Callable[[], None] | None) -> None:
    """Install a function called before each tracked item (None restores the no-op)."""
    global _checkpoint
    _checkpoint = checkpoint or (lambda: None)


def _checked(items: Iterable[T]) -> Iterator[T]:
    for item in items:
        _checkpoint()
        yield item


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items`, letting the installed reporter show `description` and counts."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    return _reporter(_checked(items), description, total)
