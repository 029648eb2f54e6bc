"""Which folios are preserved: per-order sparse bitmaps (DESIGN §3).

A folio ``(pfn, order)`` is bit ``(pfn >> order) % 4096`` of bitmap
``(pfn >> order) // 4096`` of its order, exactly the layout the chunk pages
carry, so serializing is a copy of rows and not a re-encoding.

Memory follows the bitmaps actually touched: each order keeps its bitmaps as
rows of a slab (64 little-endian u64 words = 512 bytes per row) plus a dict
from bitmap index to row. A bitmap that becomes empty is dropped at once;
that invariant lets range checks treat "bitmap present" as "some bit set".

Two paths share the semantics: scalar methods for one folio (a client's
unbatched request must not pay numpy's per-call overhead) and batched
methods that stay vectorized for millions of folios. Batched calls are
atomic: on any error nothing has changed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from khod.abi import (
    BITMAP_SHIFT,
    BITMAP_WORDS,
    LE_U64,
    MAX_ORDER,
    PAGE_SHIFT,
    check_order,
    set_bit_positions,
    split_range,
)
from khod.errors import Errno, KhoError, eexist, einval, enoent

I64 = npt.NDArray[np.int64]
Rows = npt.NDArray[np.uint64]

PFN_LIMIT = 1 << (64 - PAGE_SHIFT)  # phys must fit in a u64
_ONE = np.uint64(1)
_WORD_MASK = np.int64(63)


IntArrayLike = Sequence[int] | npt.NDArray[np.integer[Any]]


def as_pfn_array(values: IntArrayLike, what: str = "pfn") -> I64:
    """Untrusted integers -> int64 pfns, refusing negatives and out-of-range values."""
    try:
        arr = np.asarray(values)
    except (OverflowError, ValueError, TypeError) as exc:
        raise einval(f"{what} list is not a list of integers: {exc}") from None
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        if arr.dtype == object:
            raise einval(f"{what} values must be integers below 2**64")
        raise einval(f"{what} list must be a flat list of integers")
    if arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise einval(f"negative {what} {int(arr.min())}")
    if int(arr.max()) >= PFN_LIMIT:
        raise einval(f"{what} {int(arr.max()):#x} is beyond the 64-bit physical address space")
    return arr.astype(np.int64, copy=False)


def _is_sorted_unique(a: I64) -> bool:
    return bool(a.size < 2 or np.all(a[1:] > a[:-1]))


class _Bitmaps:
    """All bitmaps of one order."""

    __slots__ = ("_keys", "_slots", "count", "free", "order", "rows", "slot")

    def __init__(self, order: int) -> None:
        self.order = order
        self.rows: Rows = np.zeros((0, BITMAP_WORDS), dtype=LE_U64)
        self.slot: dict[int, int] = {}
        self.free: list[int] = []
        self.count = 0
        self._keys: I64 | None = None
        self._slots: I64 | None = None

    # ----------------------------------------------------------------- storage

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
        return bool((int(self.rows[s, (hi >> 6) & 63]) >> (hi & 63)) & 1)

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
        return bool(int(self.rows[s, w]) & mask)

    def set1(self, hi: int) -> None:
        idx = hi >> BITMAP_SHIFT
        s = self.slot.get(idx)
        if s is None:
            s = self.add_index(idx)
        w = (hi >> 6) & 63
        self.rows[s, w] = np.uint64(int(self.rows[s, w]) | (1 << (hi & 63)))
        self.count += 1

    def clear1(self, hi: int) -> None:
        idx = hi >> BITMAP_SHIFT
        s = self.slot[idx]
        w = (hi >> 6) & 63
        self.rows[s, w] = np.uint64(int(self.rows[s, w]) & ~(1 << (hi & 63)))
        self.count -= 1
        if not self.rows[s].any():
            self.drop_if_empty((idx,))

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
        return _uniq_sorted(self.words >> 6)

    @classmethod
    def of(cls, hi: I64) -> Image:
        """Build from ``hi = pfn >> order`` values; raises _BatchDuplicate on repeats."""
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
                raise _BatchDuplicate(int(s[np.flatnonzero(s[1:] == s[:-1])[0]]))
            return img
        if not _is_sorted_unique(hi):
            hi = np.sort(hi)
            dup = np.flatnonzero(hi[1:] == hi[:-1])
            if dup.size:
                raise _BatchDuplicate(int(hi[dup[0]]))
        wk = hi >> 6
        starts = np.flatnonzero(np.concatenate(([True], wk[1:] != wk[:-1])))
        masks = np.left_shift(_ONE, (hi & _WORD_MASK).view(np.uint64))
        return cls(wk[starts], np.bitwise_or.reduceat(masks, starts), n)

    def first_hi(self, bits: Rows) -> int:
        """The lowest ``hi`` set in ``bits`` (one word per image word, some non-zero)."""
        i = int(np.flatnonzero(bits)[0])
        m = int(bits[i])
        return (int(self.words[i]) << 6) + ((m & -m).bit_length() - 1)

    def his(self) -> I64:
        """All ``hi`` values, ascending."""
        bits = set_bit_positions(self.masks.reshape(-1, 1))
        out: I64 = (self.words[bits >> 6] << 6) | (bits & _WORD_MASK)
        return out


@dataclass(frozen=True)
class OrderStats:
    order: int
    folios: int
    bitmaps: int

    @property
    def bytes(self) -> int:
        return self.folios << (self.order + PAGE_SHIFT)


class Tracker:
    """The preservation set: which ``(pfn, order)`` folios are preserved.

    pfns are absolute (``phys >> 12``); bounds against a region are the
    caller's business. Rules: orders 0..18, pfns aligned to their order, no
    folio may overlap an already preserved folio of any order (``EEXIST``),
    and unpreserve must name a preserved folio exactly (``ENOENT``).
    """

    def __init__(self) -> None:
        self._orders: dict[int, _Bitmaps] = {}

    # ----------------------------------------------------------------- helpers

    def _bm(self, order: int) -> _Bitmaps:
        bm = self._orders.get(order)
        if bm is None:
            bm = self._orders[order] = _Bitmaps(order)
        return bm

    def _active(self) -> list[_Bitmaps]:
        return [bm for bm in self._orders.values() if bm.slot]

    @staticmethod
    def _check_folio(pfn: int, order: int) -> None:
        check_order(order)
        if not isinstance(pfn, int) or isinstance(pfn, bool) or not 0 <= pfn < PFN_LIMIT:
            raise einval(f"pfn {pfn!r} is not a valid page frame number")
        if pfn & ((1 << order) - 1):
            raise einval(f"pfn {pfn:#x} is not aligned to order {order}")

    def _conflict1(self, pfn: int, order: int) -> str | None:
        """Why ``(pfn, order)`` cannot be added, or None."""
        for bm in self._active():
            o = bm.order
            if o >= order:
                if bm.test1(pfn >> o):
                    if o == order:
                        return f"folio pfn {pfn:#x} order {order} is already preserved"
                    head = (pfn >> o) << o
                    return (
                        f"folio pfn {pfn:#x} order {order} lies inside preserved folio "
                        f"pfn {head:#x} order {o}"
                    )
            elif bm.any1(pfn >> o, order - o):
                inner = bm.next_set(pfn >> o) << o
                return (
                    f"folio pfn {pfn:#x} order {order} overlaps preserved folio "
                    f"pfn {inner:#x} order {o}"
                )
        return None

    # ----------------------------------------------------------------- single folio

    def preserve_folio(self, pfn: int, order: int) -> None:
        self._check_folio(pfn, order)
        why = self._conflict1(pfn, order)
        if why:
            raise eexist(why)
        self._bm(order).set1(pfn >> order)

    def unpreserve_folio(self, pfn: int, order: int) -> None:
        self._check_folio(pfn, order)
        bm = self._orders.get(order)
        if bm is None or not bm.test1(pfn >> order):
            raise enoent(f"folio pfn {pfn:#x} order {order} is not preserved")
        bm.clear1(pfn >> order)

    def contains(self, pfn: int, order: int) -> bool:
        bm = self._orders.get(order)
        return bm is not None and not pfn & ((1 << order) - 1) and bm.test1(pfn >> order)

    def find_order(self, pfn: int) -> int | None:
        """The order of the preserved folio starting exactly at ``pfn``, if any."""
        for bm in self._active():
            if not pfn & ((1 << bm.order) - 1) and bm.test1(pfn >> bm.order):
                return bm.order
        return None

    def covering(self, pfn: int) -> tuple[int, int] | None:
        """The preserved folio ``(head, order)`` that contains page ``pfn``."""
        for bm in self._active():
            if bm.test1(pfn >> bm.order):
                return ((pfn >> bm.order) << bm.order, bm.order)
        return None

    def intersects(self, pfn: int, npages: int) -> bool:
        """Whether any preserved folio shares a page with ``[pfn, pfn + npages)``."""
        for head, order in split_range(pfn, npages):
            for bm in self._active():
                o = bm.order
                if o >= order:
                    if bm.test1(head >> o):
                        return True
                elif bm.any1(head >> o, order - o):
                    return True
        return False

    # ----------------------------------------------------------------- phys ranges

    def preserve_phys(self, phys: int, size: int) -> list[tuple[int, int]]:
        """Preserve a page-aligned range as the folios DESIGN §3's split gives."""
        folios = self._split_phys(phys, size)
        self.preserve_folios([p for p, _ in folios], [o for _, o in folios])
        return folios

    def unpreserve_phys(self, phys: int, size: int) -> list[tuple[int, int]]:
        folios = self._split_phys(phys, size)
        self.unpreserve_folios([p for p, _ in folios], [o for _, o in folios])
        return folios

    @staticmethod
    def _split_phys(phys: int, size: int) -> list[tuple[int, int]]:
        for name, v in (("phys", phys), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise einval(f"{name} {v!r} is not a non-negative integer")
        if phys & ((1 << PAGE_SHIFT) - 1) or size & ((1 << PAGE_SHIFT) - 1):
            raise einval(f"range {phys:#x}+{size:#x} is not page-aligned")
        if size == 0:
            raise einval("empty range")
        if (phys + size) >> PAGE_SHIFT > PFN_LIMIT:
            raise einval(f"range {phys:#x}+{size:#x} passes the end of the address space")
        return split_range(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    # ----------------------------------------------------------------- batches

    @staticmethod
    def _groups(pfns: IntArrayLike, orders: int | IntArrayLike) -> list[tuple[int, I64]]:
        """Validate a batch and split it into ``(order, pfns)`` groups, orders ascending."""
        p = as_pfn_array(pfns)
        if isinstance(orders, bool):
            raise einval("order must be an integer, not a boolean")
        if isinstance(orders, int | np.integer):
            check_order(int(orders))
            groups = [(int(orders), p)] if p.size else []
        else:
            o = as_pfn_array(orders, "order")
            if o.size != p.size:
                raise einval(f"{p.size} pfns but {o.size} orders")
            if o.size and int(o.max()) > MAX_ORDER:
                raise einval(f"order {int(o.max())} is outside 0..{MAX_ORDER}")
            groups = [(int(u), p[o == u]) for u in np.unique(o)]
        for order, g in groups:
            if order:
                bad = np.flatnonzero(g & np.int64((1 << order) - 1))
                if bad.size:
                    raise einval(f"pfn {int(g[bad[0]]):#x} is not aligned to order {order}")
        return groups

    @staticmethod
    def _image(order: int, pfns: I64, code: str) -> Image:
        try:
            return Image.of(pfns >> order if order else pfns)
        except _BatchDuplicate as dup:
            pfn = dup.hi << order
            raise KhoError(
                code, f"folio pfn {pfn:#x} order {order} appears twice in the batch"
            ) from None

    def preserve_folios(self, pfns: IntArrayLike, orders: int | IntArrayLike) -> int:
        """Preserve many folios at once; all or nothing. Returns how many."""
        done: list[tuple[_Bitmaps, Image]] = []
        try:
            for order, g in self._groups(pfns, orders):
                img = self._image(order, g, Errno.EEXIST)
                self._check_free(order, g, img)
                bm = self._bm(order)
                bm.set_image(img)
                done.append((bm, img))
        except BaseException:
            for bm, img in reversed(done):
                bm.clear_image(img)
            raise
        return sum(img.n for _, img in done)

    def unpreserve_folios(self, pfns: IntArrayLike, orders: int | IntArrayLike) -> int:
        """Unpreserve many folios at once; all or nothing. Returns how many."""
        work: list[tuple[_Bitmaps, Image]] = []
        for order, g in self._groups(pfns, orders):
            img = self._image(order, g, Errno.ENOENT)
            bm = self._orders.get(order) or _Bitmaps(order)
            missing = img.masks & ~bm.overlap_words(img)
            if missing.any():
                hi = img.first_hi(missing)
                raise enoent(f"folio pfn {hi << order:#x} order {order} is not preserved")
            work.append((bm, img))
        for bm, img in work:
            bm.clear_image(img)
        return sum(img.n for _, img in work)

    def _check_free(self, order: int, pfns: I64, img: Image) -> None:
        """Raise EEXIST naming the first folio that overlaps the current set."""
        for bm in self._active():
            o = bm.order
            if o == order:
                shared = bm.overlap_words(img)
                if shared.any():
                    hi = img.first_hi(shared)
                    raise eexist(f"folio pfn {hi << order:#x} order {order} is already preserved")
                continue
            hit = bm.test(pfns >> o) if o > order else bm.any_in(pfns >> o, order - o)
            if hit.any():
                pfn = int(pfns[np.flatnonzero(hit)[0]])
                why = self._conflict1(pfn, order)
                raise eexist(why or f"folio pfn {pfn:#x} order {order} overlaps a preserved folio")

    def contained_mask(self, pfns: I64, order: int) -> npt.NDArray[np.bool_]:
        """Per folio ``(pfn, order)``: does one preserved folio of order >= it contain it?"""
        out = np.zeros(pfns.shape, dtype=bool)
        for bm in self._active():
            if bm.order >= order:
                out |= bm.test(pfns >> bm.order)
        return out

    # ----------------------------------------------------------------- reading

    @property
    def orders(self) -> list[int]:
        """Orders that hold at least one folio, ascending."""
        return sorted(o for o, bm in self._orders.items() if bm.slot)

    def count(self, order: int | None = None) -> int:
        if order is None:
            return sum(bm.count for bm in self._orders.values())
        bm = self._orders.get(order)
        return bm.count if bm else 0

    def total_bytes(self) -> int:
        return sum(bm.count << (bm.order + PAGE_SHIFT) for bm in self._orders.values())

    def stats(self) -> list[OrderStats]:
        return [
            OrderStats(o, self._orders[o].count, len(self._orders[o].slot)) for o in self.orders
        ]

    def bitmap_count(self) -> int:
        return sum(len(bm.slot) for bm in self._orders.values())

    def __len__(self) -> int:
        return self.count()

    def __bool__(self) -> bool:
        return any(bm.slot for bm in self._orders.values())

    def bitmaps(self, order: int) -> tuple[I64, Rows]:
        """(bitmap indices ascending, their rows as an n x 64 '<u8' copy)."""
        bm = self._orders.get(order)
        if bm is None or not bm.slot:
            return np.empty(0, dtype=np.int64), np.empty((0, BITMAP_WORDS), dtype=LE_U64)
        keys, slots = bm.sorted_index()
        return keys.copy(), bm.rows[slots]

    def folios(self, order: int) -> I64:
        """pfns of the folios of ``order``, ascending."""
        keys, rows = self.bitmaps(order)
        if keys.size == 0:
            return np.empty(0, dtype=np.int64)
        bits = set_bit_positions(rows)
        row_of = bits >> BITMAP_SHIFT
        hi = (keys[row_of] << BITMAP_SHIFT) | (bits & np.int64((1 << BITMAP_SHIFT) - 1))
        out: I64 = hi << order
        return out

    def runs(self, order: int) -> tuple[I64, I64]:
        """Maximal runs of adjacent folios of ``order``: (first pfn, folio count), ascending.

        The compact form of a preserved set: 64 GiB of contiguous order-0
        folios is one run. Full words are handled 64 folios at a time and
        only partly set words are unpacked, so dense and sparse sets are
        both cheap.
        """
        keys, rows = self.bitmaps(order)
        if keys.size == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        words = rows.reshape(-1)
        gw = ((keys[:, None] << 6) + np.arange(64, dtype=np.int64)).reshape(-1)
        full = np.flatnonzero(words == np.uint64(0xFFFF_FFFF_FFFF_FFFF))
        part = np.flatnonzero((words != 0) & (words != np.uint64(0xFFFF_FFFF_FFFF_FFFF)))
        bits = set_bit_positions(words[part].reshape(-1, 1))
        starts = np.concatenate((gw[full] << 6, (gw[part][bits >> 6] << 6) + (bits & _WORD_MASK)))
        lens = np.concatenate(
            (np.full(full.size, 64, dtype=np.int64), np.ones(bits.size, dtype=np.int64))
        )
        perm = np.argsort(starts, kind="stable")
        starts, ends = starts[perm], starts[perm] + lens[perm]
        heads = np.flatnonzero(np.concatenate(([True], starts[1:] != ends[:-1])))
        tails = np.concatenate((heads[1:] - 1, [starts.size - 1]))
        first = starts[heads]
        count: I64 = ends[tails] - first
        return first << order, count

    def iter_folios(self) -> Iterator[tuple[int, int]]:
        """``(phys, order)`` in ABI order: orders, then bitmaps, then bits ascending."""
        for order in self.orders:
            for pfn in self.folios(order).tolist():
                yield pfn << PAGE_SHIFT, order

    def memory_bytes(self) -> int:
        """What this tracker holds in memory (slabs, indexes, dicts)."""
        return sys.getsizeof(self._orders) + sum(bm.nbytes() for bm in self._orders.values())

    # ----------------------------------------------------------------- building

    @classmethod
    def from_bitmaps(cls, bitmaps: dict[int, tuple[I64, Rows]]) -> Tracker:
        """Build from per-order (unique indices, rows); empty rows are skipped.

        The caller has checked the indices are unique within each order;
        overlaps *between* orders are found by :meth:`find_overlap`.
        """
        t = cls()
        for order, (keys, rows) in bitmaps.items():
            check_order(order)
            keep = np.flatnonzero(rows.any(axis=1)) if rows.size else np.empty(0, np.int64)
            if keep.size == 0:
                continue
            bm = t._bm(order)
            bm.rows = np.ascontiguousarray(rows[keep], dtype=LE_U64)
            bm.slot = {int(k): i for i, k in enumerate(keys[keep].tolist())}
            if len(bm.slot) != keep.size:
                raise einval(f"duplicate bitmap index at order {order}")
            bm.count = int(np.bitwise_count(bm.rows).sum())
        return t

    @classmethod
    def union(cls, trackers: Sequence[Tracker]) -> Tracker:
        """OR of several trackers (used for disjoint sets; overlaps are not checked)."""
        per: dict[int, tuple[list[I64], list[Rows]]] = {}
        for t in trackers:
            for order in t.orders:
                k, r = t.bitmaps(order)
                per.setdefault(order, ([], []))[0].append(k)
                per[order][1].append(r)
        built: dict[int, tuple[I64, Rows]] = {}
        for order, (ks, rs) in per.items():
            keys = np.concatenate(ks)
            rows = np.concatenate(rs)
            perm = np.argsort(keys, kind="stable")
            keys, rows = keys[perm], rows[perm]
            starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
            built[order] = (keys[starts], np.bitwise_or.reduceat(rows, starts, axis=0))
        return cls.from_bitmaps(built)

    def find_overlap(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Two preserved folios that share a page, ``((pfn, order), (pfn, order))``.

        Works on runs of the larger order and bit ranks of the smaller, so
        a dense set of millions of folios is checked without expanding it.
        """
        active = sorted(self._active(), key=lambda bm: bm.order)
        for i, big in enumerate(active[1:], start=1):
            first, count = self.runs(big.order)
            end = first + (count << big.order)
            for small in active[:i]:
                so = small.order
                hit = small.rank(end >> so) > small.rank(first >> so)
                if hit.any():
                    k = int(np.flatnonzero(hit)[0])
                    inner = small.next_set(int(first[k]) >> so) << so
                    head = (inner >> big.order) << big.order
                    return (inner, so), (head, big.order)
        return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tracker):
            return NotImplemented
        if self.orders != other.orders:
            return False
        for order in self.orders:
            ka, ra = self.bitmaps(order)
            kb, rb = other.bitmaps(order)
            if not (np.array_equal(ka, kb) and np.array_equal(ra, rb)):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]


class _BatchDuplicate(Exception):
    """A batch names one folio twice; callers turn it into their own code."""

    def __init__(self, hi: int) -> None:
        super().__init__(hi)
        self.hi = hi


def _uniq_sorted(a: I64) -> I64:
    if a.size < 2:
        return a
    return a[np.concatenate(([True], a[1:] != a[:-1]))]
