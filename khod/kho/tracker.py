"""Which folios are preserved: per-order sparse bitmaps (docs/format.md §3).

A folio ``(pfn, order)`` is bit ``(pfn >> order) % 4096`` of bitmap
``(pfn >> order) // 4096`` of its order, exactly the layout the chunk pages
carry, so serializing is a copy of rows and not a re-encoding. Memory
follows the bitmaps actually touched (see :mod:`khod.kho.bitmaps`).

Single-folio methods stay scalar and batched methods stay vectorized for
millions of folios; batched calls are atomic: on any error nothing has
changed. The tracker checks the invariants of a preservation set (orders,
alignment, no overlap, no duplicates); bounds against a region are the
caller's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from khod.errors import Errno, KhoError, eexist, einval, enoent
from khod.kho.abi import BITMAP_SHIFT, BITMAP_WORDS, LE_U64, Rows, set_bit_positions
from khod.kho.bitmaps import BatchDuplicate, Image, OrderBitmaps
from khod.pages import I64, MAX_ORDER, PAGE_SHIFT, check_order, split_range

PFN_LIMIT = 1 << (64 - PAGE_SHIFT)  # phys must fit in a u64
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
        self._orders: dict[int, OrderBitmaps] = {}

    # ----------------------------------------------------------------- helpers

    def _bm(self, order: int) -> OrderBitmaps:
        bm = self._orders.get(order)
        if bm is None:
            bm = self._orders[order] = OrderBitmaps(order)
        return bm

    def _active(self) -> list[OrderBitmaps]:
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
            used = np.flatnonzero(np.bincount(o, minlength=1)).tolist() if o.size else []
            # bincount: no sort of a million orders; one order (the usual batch): no masks
            groups = [(used[0], p)] if len(used) == 1 else [(u, p[o == u]) for u in used]
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
        except BatchDuplicate as dup:
            pfn = dup.hi << order
            raise KhoError(
                code, f"folio pfn {pfn:#x} order {order} appears twice in the batch"
            ) from None

    def preserve_folios(self, pfns: IntArrayLike, orders: int | IntArrayLike) -> int:
        """Preserve many folios at once; all or nothing. Returns how many."""
        done: list[tuple[OrderBitmaps, Image]] = []
        try:
            for order, g in self._groups(pfns, orders):
                img = self._image(order, g, Errno.EEXIST)
                self._refuse_overlap(order, g, img)
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
        work: list[tuple[OrderBitmaps, Image]] = []
        for order, g in self._groups(pfns, orders):
            img = self._image(order, g, Errno.ENOENT)
            bm = self._orders.get(order) or OrderBitmaps(order)
            missing = img.masks & ~bm.overlap_words(img)
            if missing.any():
                hi = img.first_hi(missing)
                raise enoent(f"folio pfn {hi << order:#x} order {order} is not preserved")
            work.append((bm, img))
        for bm, img in work:
            bm.clear_image(img)
        return sum(img.n for _, img in work)

    def _refuse_overlap(self, order: int, pfns: I64, img: Image) -> None:
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
        """Per folio ``(pfn, order)``: does one preserved folio of order >= it contain it?

        Folios of exactly ``order`` are looked up a bitmap word at a time (the
        usual case: a batch naming what was allocated); only those not found
        are tested against the larger orders.
        """
        out = np.zeros(pfns.shape, dtype=bool)
        same = self._orders.get(order)
        if same is not None and same.slot and pfns.size:
            hi = pfns >> order
            try:
                img = Image.of(hi)
            except BatchDuplicate:
                out |= same.test(hi)
            else:
                words = same.overlap_words(img)
                at = np.searchsorted(img.words, hi >> 6)
                out |= ((words[at] >> (hi & _WORD_MASK).astype(np.uint64)) & np.uint64(1)) != 0
        for bm in self._active():
            if bm.order > order:
                rest = np.flatnonzero(~out)
                if rest.size == 0:
                    break
                out[rest] = bm.test(pfns[rest] >> bm.order)
        return out

    def find_orders(self, pfns: I64) -> I64:
        """Vectorized :meth:`find_order`: per pfn, the order of the folio starting there, or -1."""
        out = np.full(pfns.shape, -1, dtype=np.int64)
        for bm in self._active():
            o = bm.order
            cand = np.flatnonzero((out < 0) & ((pfns & np.int64((1 << o) - 1)) == 0))
            if cand.size:
                out[cand[bm.test(pfns[cand] >> o)]] = o
        return out

    def overlap_mask(self, pfns: I64, orders: I64) -> npt.NDArray[np.bool_]:
        """Per folio ``(pfn, order)`` (aligned): does it share a page with any folio here?"""
        out = np.zeros(pfns.shape, dtype=bool)
        active = self._active()
        if not active or pfns.size == 0:
            return out
        for order in np.flatnonzero(np.bincount(orders, minlength=1)).tolist():
            at = np.flatnonzero(orders == order)
            g = pfns[at]
            hit = np.zeros(g.shape, dtype=bool)
            for bm in active:
                o = bm.order
                hit |= bm.test(g >> o) if o >= order else bm.any_in(g >> o, order - o)
            out[at] = hit
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

    def page_runs(self) -> tuple[I64, I64]:
        """Every page of every folio as maximal runs ``[start, end)`` of pfns, ascending."""
        parts = [(self.runs(o), o) for o in self.orders]
        if not parts:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        starts = np.concatenate([f for (f, _), _ in parts])
        ends = np.concatenate([f + (c << o) for (f, c), o in parts])
        if len(parts) > 1:
            perm = np.argsort(starts)
            starts, ends = starts[perm], ends[perm]
        brk = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        last = np.concatenate((brk - 1, [ends.size - 1]))
        return starts[np.concatenate(([0], brk))], ends[last]

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
