"""Storage behind the tracker: the bitmaps of one order, and batches as bitmap words.

Each order keeps its bitmaps as rows of one slab (64 little-endian u64 words,
512 bytes per row, exactly a bitmap of docs/format.md §3) plus a dict from
bitmap index to row. A bitmap that becomes empty is dropped at once; that
invariant lets range checks treat "bitmap present" as "some bit set".

Two paths share the semantics: scalar methods for one folio (a client's
unbatched request must not pay numpy's per-call overhead) and vectorized
methods over an :class:`Image`, the word-level form of a batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from khod.kho.abi import BITMAP_SHIFT, BITMAP_WORDS, LE_U64, Rows, set_bit_positions
from khod.pages import I64

_ONE = np.uint64(1)
_ZERO_ROW = bytes(8 * BITMAP_WORDS)
_NATIVE_LE = sys.byteorder == "little"  # the format's u64 words are the machine's own
_WORD_MASK = np.int64(63)


def _is_sorted_unique(a: I64) -> bool:
    return bool(a.size < 2 or np.all(a[1:] > a[:-1]))


class OrderBitmaps:
    """All bitmaps of one order."""

    __slots__ = ("_keys", "_rows", "_slots", "_words", "count", "free", "order", "slot")

    _words: Any  # the slab's words, flat (see ``rows``)

    def __init__(self, order: int) -> None:
        self.order = order
        self.rows = np.zeros((0, BITMAP_WORDS), dtype=LE_U64)
        self.slot: dict[int, int] = {}
        self.free: list[int] = []
        self.count = 0
        self._keys: I64 | None = None
        self._slots: I64 | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry the slab; its view is made again (a memoryview
        cannot be pickled)."""
        return {k: getattr(self, k) for k in self.__slots__ if k != "_words"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.rows = state["_rows"]

    # ----------------------------------------------------------------- storage

    @property
    def rows(self) -> Rows:
        return self._rows

    @rows.setter
    def rows(self, value: Rows) -> None:
        """Every new slab gets a flat view of its words for the scalar methods.

        Indexing a memoryview gives a Python int: no numpy scalar is built,
        which is most of what a single-folio request cost in a busy daemon.
        Where u64 is not little-endian the numpy view does the same, slower.
        """
        self._rows = value
        if not _NATIVE_LE:
            self._words = value.reshape(-1)
        elif value.size:
            self._words = value.data.cast("B").cast("Q")
        else:  # (a view of no words cannot be cast)
            self._words = memoryview(b"").cast("Q")

    def _invalidate(self) -> None:
        self._keys = self._slots = None

    def sorted_index(self) -> tuple[I64, I64]:
        """Bitmap indices ascending, and their rows (cached until the set changes)."""
        if self._keys is None or self._slots is None:
            n = len(self.slot)
            keys = np.fromiter(self.slot.keys(), dtype=np.int64, count=n)
            slots = np.fromiter(self.slot.values(), dtype=np.int64, count=n)
            order = np.argsort(keys, kind="stable")
            self._keys, self._slots = keys[order], slots[order]
        return self._keys, self._slots

    def _reserve_rows(self, n: int) -> None:
        """Make sure ``n`` free rows exist: double for one, grow 1.5x for a bulk add."""
        short = n - len(self.free)
        if short <= 0:
            return
        cap = self.rows.shape[0]
        new_cap = max(cap + short, 8, cap * 2 if n == 1 else cap + cap // 2)
        rows = np.zeros((new_cap, BITMAP_WORDS), dtype=LE_U64)
        rows[:cap] = self.rows
        self.free[:0] = range(new_cap - 1, cap - 1, -1)
        self.rows = rows

    def add_index(self, idx: int) -> int:
        self._reserve_rows(1)
        s = self.free.pop()
        self.slot[idx] = s
        self._invalidate()
        return s

    def ensure(self, idxs: I64) -> list[int]:
        """Create empty bitmaps for the (unique) indices not present; return those created."""
        new = [int(i) for i in idxs if int(i) not in self.slot]
        if new:
            self._reserve_rows(len(new))
            for i in new:
                self.slot[i] = self.free.pop()
            self._invalidate()
        return new

    def drop_if_empty(self, idxs: Iterable[int]) -> None:
        dropped = False
        for i in idxs:
            s = self.slot.get(int(i))
            if s is not None and not self.rows[s].any():
                del self.slot[int(i)]
                self.free.append(s)
                dropped = True
        if dropped:
            self._invalidate()
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        cap, used = self.rows.shape[0], len(self.slot)
        if cap <= 64 or used * 4 > cap:
            return
        new_cap = max(8, used * 2)
        keys, slots = self.sorted_index()
        rows = np.zeros((new_cap, BITMAP_WORDS), dtype=LE_U64)
        rows[:used] = self.rows[slots]
        self.rows = rows
        self.slot = {int(k): i for i, k in enumerate(keys)}
        self.free = list(range(new_cap - 1, used - 1, -1))
        self._invalidate()

    def nbytes(self) -> int:
        per_entry = sys.getsizeof(1 << 40) * 2  # key and row number objects
        size = self.rows.nbytes + sys.getsizeof(self.slot) + len(self.slot) * per_entry
        size += sys.getsizeof(self.free) + len(self.free) * 8
        if self._keys is not None and self._slots is not None:
            size += self._keys.nbytes + self._slots.nbytes
        return size

    # ----------------------------------------------------------------- scalar

    def test1(self, hi: int) -> bool:
        s = self.slot.get(hi >> BITMAP_SHIFT)
        if s is None:
            return False
        return bool((int(self._words[(s << 6) | ((hi >> 6) & 63)]) >> (hi & 63)) & 1)

    def any1(self, hi: int, k: int) -> bool:
        """Any bit set in ``[hi, hi + 2**k)``; ``hi`` is aligned to ``2**k``."""
        if k >= BITMAP_SHIFT:
            first = hi >> BITMAP_SHIFT
            n = 1 << (k - BITMAP_SHIFT)
            if n > len(self.slot):
                keys, _ = self.sorted_index()
                lo = int(np.searchsorted(keys, first))
                return lo < keys.size and int(keys[lo]) < first + n
            return any(i in self.slot for i in range(first, first + n))
        s = self.slot.get(hi >> BITMAP_SHIFT)
        if s is None:
            return False
        w = (hi >> 6) & 63
        if k >= 6:
            return bool(self.rows[s, w : w + (1 << (k - 6))].any())
        mask = ((1 << (1 << k)) - 1) << (hi & 63)
        return bool(int(self._words[(s << 6) | w]) & mask)

    def set1(self, hi: int) -> None:
        idx = hi >> BITMAP_SHIFT
        s = self.slot.get(idx)
        if s is None:
            s = self.add_index(idx)
        i = (s << 6) | ((hi >> 6) & 63)
        self._words[i] = int(self._words[i]) | (1 << (hi & 63))
        self.count += 1

    def clear1(self, hi: int) -> None:
        idx = hi >> BITMAP_SHIFT
        s = self.slot[idx]
        i = (s << 6) | ((hi >> 6) & 63)
        word = int(self._words[i]) & ~(1 << (hi & 63))
        self._words[i] = word
        self.count -= 1
        # the word still set: the bitmap is too; else compare the row's bytes (a numpy
        # reduction costs several times as much for 64 words)
        if not word and bytes(self._words[s << 6 : (s + 1) << 6]) == _ZERO_ROW:
            del self.slot[idx]
            self.free.append(s)
            self._invalidate()
            self._maybe_compact()

    # ----------------------------------------------------------------- vectorized

    def lookup(self, idx: I64) -> I64:
        """Row of each bitmap index, -1 where absent."""
        keys, slots = self.sorted_index()
        if keys.size == 0:
            return np.full(idx.shape, -1, dtype=np.int64)
        pos = np.searchsorted(keys, idx)
        np.minimum(pos, keys.size - 1, out=pos)
        return np.where(keys[pos] == idx, slots[pos], -1)

    def test(self, hi: I64) -> npt.NDArray[np.bool_]:
        out = np.zeros(hi.shape, dtype=bool)
        if not self.slot or hi.size == 0:
            return out
        slots = self.lookup(hi >> BITMAP_SHIFT)
        present = np.flatnonzero(slots >= 0)
        if present.size:
            h = hi[present]
            words = self.rows.reshape(-1)[slots[present] * 64 + ((h >> 6) & _WORD_MASK)]
            out[present] = ((words >> (h & _WORD_MASK).astype(np.uint64)) & _ONE) != 0
        return out

    def any_in(self, hi: I64, k: int) -> npt.NDArray[np.bool_]:
        """Per element: any bit set in ``[hi, hi + 2**k)`` (``hi`` aligned)."""
        out = np.zeros(hi.shape, dtype=bool)
        if not self.slot or hi.size == 0:
            return out
        if k >= BITMAP_SHIFT:
            keys, _ = self.sorted_index()
            first = hi >> BITMAP_SHIFT
            lo = np.searchsorted(keys, first)
            up = np.searchsorted(keys, first + (1 << (k - BITMAP_SHIFT)))
            return up > lo
        slots = self.lookup(hi >> BITMAP_SHIFT)
        present = np.flatnonzero(slots >= 0)
        if present.size == 0:
            return out
        h = hi[present]
        base = slots[present] * 64 + ((h >> 6) & _WORD_MASK)
        flat = self.rows.reshape(-1)
        if k >= 6:
            span = np.arange(1 << (k - 6), dtype=np.int64)
            out[present] = flat[base[:, None] + span].any(axis=1)
        else:
            width = np.uint64((1 << (1 << k)) - 1)
            masks = width << (h & _WORD_MASK).astype(np.uint64)
            out[present] = (flat[base] & masks) != 0
        return out

    def rank(self, x: I64) -> I64:
        """Per element: how many bits below ``x`` are set (``x`` in this order's bit space)."""
        keys, slots = self.sorted_index()
        if keys.size == 0:
            return np.zeros(x.shape, dtype=np.int64)
        words = self.rows[slots].reshape(-1)
        prefix = np.zeros(words.size + 1, dtype=np.int64)
        np.cumsum(np.bitwise_count(words), out=prefix[1:])
        idx = x >> BITMAP_SHIFT
        pos = np.searchsorted(keys, idx)
        present = (pos < keys.size) & (keys[np.minimum(pos, keys.size - 1)] == idx)
        w = pos * 64 + np.where(present, (x >> 6) & _WORD_MASK, 0)
        low = np.left_shift(_ONE, (x & _WORD_MASK).view(np.uint64)) - _ONE
        word = words[np.minimum(w, words.size - 1)]
        partial = np.where(present, np.bitwise_count(word & low), 0).astype(np.int64)
        out: I64 = prefix[w] + partial
        return out

    def next_set(self, x: int) -> int:
        """The lowest set bit at or after ``x`` (one must exist)."""
        keys, slots = self.sorted_index()
        for k in range(int(np.searchsorted(keys, x >> BITMAP_SHIFT)), keys.size):
            for b in set_bit_positions(self.rows[slots[k] : slots[k] + 1]).tolist():
                bit = (int(keys[k]) << BITMAP_SHIFT) + int(b)
                if bit >= x:
                    return bit
        raise AssertionError("next_set past the last set bit")

    def flat_words(self, words: I64) -> I64:
        """Offsets into ``rows.reshape(-1)`` of global word keys, -1 where absent."""
        slots = self.lookup(words >> 6)
        return np.where(slots >= 0, slots * 64 + (words & _WORD_MASK), -1)

    def overlap_words(self, img: Image) -> Rows:
        """Per image word: the bits it shares with this order's bitmaps."""
        flat = self.flat_words(img.words)
        present = flat >= 0
        out = np.zeros(flat.shape, dtype=LE_U64)
        out[present] = self.rows.reshape(-1)[flat[present]] & img.masks[present]
        return out

    def set_image(self, img: Image) -> list[int]:
        """OR the image in (its bits must be clear); returns bitmaps created."""
        created = self.ensure(img.bitmap_indices())
        self.rows.reshape(-1)[self.flat_words(img.words)] |= img.masks
        self.count += img.n
        return created

    def clear_image(self, img: Image) -> None:
        """Clear the image's bits (they must all be set) and drop emptied bitmaps."""
        self.rows.reshape(-1)[self.flat_words(img.words)] &= ~img.masks
        self.count -= img.n
        self.drop_if_empty(img.bitmap_indices())


@dataclass(frozen=True)
class Image:
    """A set of folios of one order as bitmap words: keys ``hi >> 6`` and masks.

    The form every batched operation works on: tight for dense batches (one
    word per 64 folios) and never larger than two words per folio.
    """

    words: I64
    masks: Rows
    n: int

    def bitmap_indices(self) -> I64:
        return uniq_sorted(self.words >> 6)

    @classmethod
    def of(cls, hi: I64) -> Image:
        """Build from ``hi = pfn >> order`` values; raises BatchDuplicate on repeats."""
        n = int(hi.size)
        if n == 0:
            return cls(np.empty(0, np.int64), np.empty(0, LE_U64), 0)
        lo, top = int(hi.min()), int(hi.max())
        lo &= ~63
        span = top - lo + 1
        if span <= 8 * n:
            # Dense: scatter into a bit array and pack; no sort needed.
            flags = np.zeros((span + 63) & ~63, dtype=bool)
            flags[hi - lo] = True
            packed = np.packbits(flags, bitorder="little").view(LE_U64)
            nz = np.flatnonzero(packed)
            img = cls(nz.astype(np.int64) + (lo >> 6), packed[nz], n)
            if int(np.bitwise_count(img.masks).sum(dtype=np.int64)) != n:
                s = np.sort(hi)
                raise BatchDuplicate(int(s[np.flatnonzero(s[1:] == s[:-1])[0]]))
            return img
        if not _is_sorted_unique(hi):
            hi = np.sort(hi)
            dup = np.flatnonzero(hi[1:] == hi[:-1])
            if dup.size:
                raise BatchDuplicate(int(hi[dup[0]]))
        wk = hi >> 6
        starts = np.flatnonzero(np.concatenate(([True], wk[1:] != wk[:-1])))
        masks = np.left_shift(_ONE, (hi & _WORD_MASK).view(np.uint64))
        return cls(wk[starts], np.bitwise_or.reduceat(masks, starts), n)

    def first_hi(self, bits: Rows) -> int:
        """The lowest ``hi`` set in ``bits`` (one word per image word, some non-zero)."""
        i = int(np.flatnonzero(bits)[0])
        m = int(bits[i])
        return (int(self.words[i]) << 6) + ((m & -m).bit_length() - 1)


class BatchDuplicate(Exception):
    """A batch names one folio twice; callers turn it into their own code."""

    def __init__(self, hi: int) -> None:
        super().__init__(hi)
        self.hi = hi


def uniq_sorted(a: I64) -> I64:
    if a.size < 2:
        return a
    return a[np.concatenate(([True], a[1:] != a[:-1]))]
