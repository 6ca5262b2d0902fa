"""The one rule that turns a run's seed and a position (epoch, rank, sample, ...) into a generator's seed."""

from __future__ import annotations

import hashlib


def mix_seed(purpose: str, *parts: int, bits: int = 31) -> int:
    """A seed in [0, 2**bits) for `purpose` (a name, e.g. "views") at `parts` (e.g. seed, epoch, sample index).

    A hash (the first bytes of blake2b over "purpose:part:part...", little-endian), not a linear mix: with
    seed * a + epoch * b + i, other (seed, epoch, i) land on the same value, and two purposes with the same parts
    would draw the same numbers. `bits`: 31 suits every generator (numpy's takes < 2**32); torch's take 63.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"mix_seed: bits must be in 1..64, got {bits}")
    text = ":".join([purpose, *map(str, parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=(bits + 7) // 8).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)
