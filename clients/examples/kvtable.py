"""The store's index: an open-addressing hash table of 16-byte slots in a caller's buffer.

Sans-I/O: the table only reads and writes the buffer it is given (a
preserved folio or anonymous memory), so a successor that maps the same
bytes has the same table, with nothing to rebuild. Linear probing; a slot is
``u64 hash, u64 loc`` (docs in :mod:`kvformat`). Single operations use a
``memoryview`` cast (fast scalar access from Python); building a table from
many entries at once is vectorized with numpy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .kvformat import EMPTY, SLOT_BYTES, TOMBSTONE, damaged

if sys.byteorder != "little":  # the slots are little-endian on the wire and in memory
    raise ImportError("the kvstore table is little-endian only")

MAX_LOAD = 0.75  # keys + tombstones; past it the table is rebuilt (larger if need be)

U64 = np.ndarray[Any, np.dtype[np.uint64]]


class Table:
    """``slots`` slots at the start of ``buf``, with its live and tombstone counts."""

    def __init__(self, buf: memoryview, slots: int, live: int = 0, tombstones: int = 0) -> None:
        if slots & (slots - 1) or slots < 8 or len(buf) < slots * SLOT_BYTES:
            raise ValueError(f"{slots} slots do not fit {len(buf)} bytes")
        self.q = buf[: slots * SLOT_BYTES].cast("Q")
        self.arr: U64 = np.frombuffer(buf, dtype=np.uint64, count=2 * slots)
        self.slots = slots
        self.mask = slots - 1
        self.live = live
        self.tombstones = tombstones

    def find(self, h: int, same: Callable[[int], bool]) -> tuple[int, int]:
        """(the slot holding the key, or -1; the first free slot on its probe path).

        ``same(loc)`` says whether the record at ``loc`` has the caller's key:
        hashes are 64 bits, but two keys may still share one.
        """
        q, mask = self.q, self.mask
        i = h & mask
        free = -1
        for _ in range(self.slots):
            sh = q[2 * i]
            if sh == EMPTY:
                return -1, (i if free < 0 else free)
            if sh == TOMBSTONE:
                if free < 0:
                    free = i
            elif sh == h and same(q[2 * i + 1]):
                return i, free
            i = (i + 1) & mask
        raise damaged(f"the index has no empty slot in {self.slots}: it is damaged")

    def loc(self, i: int) -> int:
        return int(self.q[2 * i + 1])

    def put_at(self, i: int, h: int, loc: int) -> None:
        """Fill the free slot ``i`` (from :meth:`find`)."""
        if self.q[2 * i] == TOMBSTONE:
            self.tombstones -= 1
        self.q[2 * i + 1] = loc
        self.q[2 * i] = h
        self.live += 1

    def replace_at(self, i: int, loc: int) -> None:
        self.q[2 * i + 1] = loc

    def remove_at(self, i: int) -> None:
        """Empty slot ``i``: a tombstone, unless no probe path can run through it."""
        q, mask = self.q, self.mask
        self.live -= 1
        if q[2 * ((i + 1) & mask)] != EMPTY:
            q[2 * i] = TOMBSTONE
            q[2 * i + 1] = 0
            self.tombstones += 1
            return
        q[2 * i] = EMPTY
        q[2 * i + 1] = 0
        j = (i - 1) & mask  # tombstones now followed by an empty slot end no probe path
        while q[2 * j] == TOMBSTONE:
            q[2 * j] = EMPTY
            self.tombstones -= 1
            j = (j - 1) & mask

    def full_after(self, more: int = 1) -> bool:
        return (self.live + self.tombstones + more) > self.slots * MAX_LOAD

    def entries(self) -> tuple[U64, U64]:
        """The live (hash, loc) pairs, in slot order."""
        pairs = self.arr.reshape(-1, 2)
        keep = pairs[:, 0] > TOMBSTONE
        return pairs[keep, 0].copy(), pairs[keep, 1].copy()

    def fill(self, hashes: U64, locs: U64) -> None:
        """Insert many entries into an empty table at once; the keys must be distinct.

        Rounds of linear probing run for all pending entries together: each
        round, every pending entry whose current slot is empty claims it, one
        winner per slot, and the rest move one slot on. Slots only fill, so
        every entry ends where a one-by-one insertion could have put it.
        """
        if self.live or self.tombstones:
            raise ValueError("fill needs an empty table")
        n = int(hashes.size)
        if (n + 1) > self.slots * MAX_LOAD:
            raise ValueError(f"{n} entries overfill {self.slots} slots")
        pairs = self.arr.reshape(-1, 2)
        pos = (hashes & np.uint64(self.mask)).astype(np.int64)
        pending = np.arange(n, dtype=np.int64)
        claim = np.full(self.slots, -1, dtype=np.int64)
        while pending.size:
            p = pos[pending]
            free = np.flatnonzero(pairs[p, 0] == EMPTY)
            cand, cp = pending[free], p[free]
            claim[cp] = cand  # several may claim one slot: exactly one write stays
            won = claim[cp] == cand
            win, wp = cand[won], cp[won]
            pairs[wp, 1] = locs[win]
            pairs[wp, 0] = hashes[win]
            done = np.zeros(pending.size, dtype=bool)
            done[free[won]] = True
            pending = pending[~done]
            pos[pending] = (pos[pending] + 1) & self.mask
        self.live = n


def slots_for(keys: int) -> int:
    """The smallest power of two that holds ``keys`` at most half full.

    A table that reached the maximum load (3/4) is rebuilt twice as large;
    one full of tombstones, at its own size.
    """
    return 1 << (max(8, 2 * keys) - 1).bit_length()
