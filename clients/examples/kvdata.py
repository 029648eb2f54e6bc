"""A deterministic data set for the store: any process can regenerate it to load or verify.

Key ``i`` is ``key-%010d``; its value is ``i`` as 8 little-endian bytes
followed by bytes of a seeded random pool, ``size`` bytes in all, sizes
uniform in ``[lo, hi]``. With ``churn``, after loading, every 5th key is
overwritten with another value and every 7th deleted, so a store carries
dead records and tombstones through the handover.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

POOL = 1 << 16


def parse_sizes(text: str) -> tuple[int, int]:
    """``400`` or ``200-4000``."""
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not 0 <= a <= b:
        raise ValueError(f"value sizes {text!r}: need 0 <= low <= high")
    return a, b


@dataclass(frozen=True)
class Dataset:
    keys: int
    lo: int
    hi: int
    seed: int = 0
    churn: bool = False

    def _plan(self) -> tuple[bytes, list[int], list[int], list[int]]:
        rng = np.random.default_rng(self.seed)
        pool = rng.bytes(POOL + self.hi)
        sizes = rng.integers(self.lo, self.hi + 1, self.keys).tolist()
        offs = rng.integers(0, POOL, self.keys).tolist()
        offs2 = rng.integers(0, POOL, self.keys).tolist()
        return pool, sizes, offs, offs2

    @staticmethod
    def key(i: int) -> bytes:
        return b"key-%010d" % i

    def items(self) -> Iterator[tuple[bytes, bytes | None]]:
        """The writes that make the data set, in order (None: a delete)."""
        pool, sizes, offs, offs2 = self._plan()
        for i in range(self.keys):
            yield self.key(i), _value(i, sizes[i], pool, offs[i])
        if self.churn:
            for i in range(0, self.keys, 5):
                yield self.key(i), _value(i, sizes[i], pool, offs2[i])
            for i in range(0, self.keys, 7):
                yield self.key(i), None

    def expected(self) -> Iterator[tuple[bytes, bytes | None]]:
        """Every key and what a store holding the data set answers for it."""
        pool, sizes, offs, offs2 = self._plan()
        for i in range(self.keys):
            if self.churn and i % 7 == 0:
                yield self.key(i), None
            else:
                off = offs2[i] if self.churn and i % 5 == 0 else offs[i]
                yield self.key(i), _value(i, sizes[i], pool, off)

    def live_keys(self) -> int:
        return self.keys - (len(range(0, self.keys, 7)) if self.churn else 0)


def _value(i: int, size: int, pool: bytes, off: int) -> bytes:
    return (i.to_bytes(8, "little") + pool[off : off + size])[:size]
