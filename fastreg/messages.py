"""Wording that error messages and warnings share."""

from __future__ import annotations

from collections.abc import Iterable


def listing(items: Iterable[str], first: int = 10, sep: str = ", ") -> str:
    """The first `first` items joined by `sep`, then how many there are in all when some were left out:
    'a, b, ... (25 in all)'. Messages stay readable however many keys or files went wrong."""
    items = list(items)
    more = f"{sep}... ({len(items)} in all)" if len(items) > first else ""
    return sep.join(items[:first]) + more
