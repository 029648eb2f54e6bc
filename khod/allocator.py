"""A buddy allocator over the region's pfns, with memblock-style reservations.

Blocks are naturally aligned, orders 0..18. Three kinds of pages exist
outside the free lists: *allocated* blocks (client folios, metadata pages;
freed by head pfn), *reserved* ranges (the memblock role: the handover
record, incoming preserved memory before it is restored), and *scratch*, a
separate pool that client allocations never come from. In scratch-only mode
(the successor before populate has processed the incoming metadata) only
scratch can be allocated, so nothing lands on memory still to be reserved.

Every misuse -- double free, freeing a pfn that is not a block head,
reserving pages that are not free -- raises instead of corrupting state, and
the four byte counts always add up to the region size.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from khod.errors import KhoError, ebusy, einval, enomem
from khod.kho.tracker import Tracker
from khod.pages import I64, MAX_ORDER, NR_ORDERS, PAGE_SHIFT, check_order, split_range


class _Pool:
    """Free lists of one contiguous-or-not set of pages, with buddy merging."""

    def __init__(self, name: str, ranges: Iterable[tuple[int, int]]) -> None:
        self.name = name
        self.free: list[set[int]] = [set() for _ in range(NR_ORDERS)]
        self._heap: list[list[int]] = [[] for _ in range(NR_ORDERS)]
        self.total = 0
        self.free_pages = 0
        self.ranges = [(p, n) for p, n in ranges if n > 0]
        for pfn, npages in self.ranges:
            self.total += npages
            for head, order in split_range(pfn, npages):
                self._push(head, order)

    def contains(self, pfn: int) -> bool:
        return any(p <= pfn < p + n for p, n in self.ranges)

    def _push(self, head: int, order: int) -> None:
        self.free[order].add(head)
        heap = self._heap[order]
        heapq.heappush(heap, head)
        if len(heap) > 2 * len(self.free[order]) + 64:
            self._heap[order] = sorted(self.free[order])
        self.free_pages += 1 << order

    def _remove(self, head: int, order: int) -> None:
        self.free[order].remove(head)
        self.free_pages -= 1 << order

    def take(self, order: int) -> int | None:
        """The lowest free block of the smallest order >= ``order``, split down."""
        for o in range(order, NR_ORDERS):
            if not self.free[o]:
                continue
            heap = self._heap[o]
            while True:
                head = heapq.heappop(heap)
                if head in self.free[o]:
                    break
            self._remove(head, o)
            while o > order:
                o -= 1
                self._push(head + (1 << o), o)
            return head
        return None

    def _pop_lowest(self, order: int) -> int:
        heap = self._heap[order]
        while True:
            head = heapq.heappop(heap)
            if head in self.free[order]:
                break
        self._remove(head, order)
        return head

    def take_many(self, order: int, count: int) -> list[I64] | None:
        """``count`` blocks of ``order``: exactly those ``count`` calls of :meth:`take` give.

        Sequential takes exhaust the free blocks of ``order``, then split the
        lowest block of the next order up and walk it from its first block to
        its last before touching another. So a big block yields its blocks as
        one ``arange``, and what is left of the last one is its greedy split
        (the buddies those takes would leave). None, with nothing taken, when
        the pool runs out of blocks of ``order`` or larger.
        """
        parts: list[I64] = []
        need, step = count, 1 << order
        while need:
            o = next((o for o in range(order, NR_ORDERS) if self.free[o]), None)
            if o is None:
                for part in parts:  # give back what this call took
                    self.give_run(int(part[0]), int(part[-1]) + step)
                return None
            head = self._pop_lowest(o)
            n = min(1 << (o - order), need)
            parts.append(head + np.arange(n, dtype=np.int64) * step)
            rest = (1 << o) - n * step
            if rest:
                for h, ho in split_range(head + n * step, rest):
                    self._push(h, ho)
            need -= n
        return parts

    def give_run(self, start: int, end: int) -> None:
        """Pages ``[start, end)``, none of them free, become free, merged as buddies would be.

        Eager buddy merging keeps the free lists the unique split of the free
        pages into maximal aligned blocks. So freeing a run is: absorb the
        free blocks adjacent to it, and push the greedy split of the free
        interval that makes -- what freeing its pages one by one would leave.
        """
        while (hit := self.containing(start - 1)) is not None:
            self._remove(*hit)
            start = hit[0]
        while (hit := self.containing(end)) is not None:
            self._remove(*hit)
            end = hit[0] + (1 << hit[1])
        for head, order in split_range(start, end - start):
            self._push(head, order)

    def give(self, head: int, order: int) -> None:
        """Return a block, merging with free buddies as far as they go."""
        while order < MAX_ORDER:
            buddy = head ^ (1 << order)
            if buddy not in self.free[order]:
                break
            self._remove(buddy, order)
            head = min(head, buddy)
            order += 1
        self._push(head, order)

    def containing(self, pfn: int) -> tuple[int, int] | None:
        """The free block ``(head, order)`` that holds page ``pfn``."""
        for o in range(NR_ORDERS):
            head = pfn & ~((1 << o) - 1)
            if head in self.free[o]:
                return head, o
        return None

    def carve(self, head: int, order: int, want: int, want_order: int) -> None:
        """Take the free block ``(head, order)`` and keep only ``(want, want_order)`` out."""
        self._remove(head, order)
        while order > want_order:
            order -= 1
            half = 1 << order
            if want >= head + half:
                self._push(head, order)
                head += half
            else:
                self._push(head + half, order)


@dataclass(frozen=True)
class Usage:
    """Bytes by use; ``free + allocated + reserved + scratch == total``."""

    total: int
    free: int
    allocated: int
    reserved: int
    scratch: int
    scratch_free: int


class Allocator:
    """Buddy allocator over ``[base_pfn, base_pfn + npages)`` with a scratch pool."""

    def __init__(self, base_pfn: int, npages: int, *, scratch: tuple[int, int] = (0, 0)) -> None:
        if base_pfn < 0 or npages <= 0:
            raise einval(f"empty or negative allocator range {base_pfn:#x}+{npages}")
        s_pfn, s_pages = scratch
        end = base_pfn + npages
        if s_pages and not (base_pfn <= s_pfn and s_pfn + s_pages <= end):
            raise einval(f"scratch {s_pfn:#x}+{s_pages} pages lies outside the region")
        self.base_pfn = base_pfn
        self.npages = npages
        self.scratch_range = (s_pfn, s_pages)
        if s_pages:
            main = [(base_pfn, s_pfn - base_pfn), (s_pfn + s_pages, end - s_pfn - s_pages)]
        else:
            main = [(base_pfn, npages)]
        self._main = _Pool("main", main)
        self._scratch = _Pool("scratch", [(s_pfn, s_pages)] if s_pages else [])
        self.allocated = Tracker()  # allocated blocks, as folios: batches are vectorized
        self.reserved: dict[int, int] = {}
        self._allocated_main = 0
        self._reserved_pages = 0
        self.scratch_only = False

    # ----------------------------------------------------------------- queries

    def in_region(self, pfn: int, npages: int = 1) -> bool:
        return self.base_pfn <= pfn and pfn + npages <= self.base_pfn + self.npages

    def in_scratch(self, pfn: int, npages: int = 1) -> bool:
        """Whether ``[pfn, pfn + npages)`` shares a page with scratch."""
        s, n = self.scratch_range
        return n > 0 and pfn < s + n and s < pfn + npages

    @property
    def free_pages(self) -> int:
        """Free pages of the main pool (what clients and metadata are allocated from)."""
        return self._main.free_pages

    def usage(self) -> Usage:
        page = 1 << PAGE_SHIFT
        return Usage(
            total=self.npages * page,
            free=self._main.free_pages * page,
            allocated=self._allocated_main * page,
            reserved=self._reserved_pages * page,
            scratch=self._scratch.total * page,
            scratch_free=self._scratch.free_pages * page,
        )

    def order_of(self, pfn: int) -> int | None:
        """The order of the allocation whose head is ``pfn``."""
        return self.allocated.find_order(pfn)

    def _check_range(self, pfn: int, npages: int) -> None:
        if npages <= 0:
            raise einval("empty range")
        if not self.in_region(pfn, npages):
            raise einval(
                f"pages {pfn:#x}+{npages} are outside the region {self.base_pfn:#x}+{self.npages}"
            )
        if self.in_scratch(pfn, npages):
            raise einval(f"pages {pfn:#x}+{npages} overlap scratch")

    # ----------------------------------------------------------------- allocate / free

    def alloc(self, order: int, *, keep: int = 0) -> int:
        """Allocate a naturally aligned block of ``2**order`` pages; returns its pfn.

        ``keep``: pages that must stay free afterwards (the reserve a client's
        allocation may not eat into).
        """
        check_order(order)
        pool = self._scratch if self.scratch_only else self._main
        head = pool.take(order)
        if head is None:
            where = "scratch" if self.scratch_only else "the region"
            raise enomem(f"no free order-{order} block in {where}")
        if keep and pool.free_pages < keep:
            pool.give(head, order)
            raise enomem(
                f"an order-{order} block would leave fewer than the {keep} free pages kept "
                "for the handover's metadata (a reserve no session may use)"
            )
        self.allocated.preserve_folio(head, order)
        if pool is self._main:
            self._allocated_main += 1 << order
        return head

    def alloc_many(self, order: int, count: int, *, keep: int = 0) -> I64:
        """``count`` blocks of ``order`` at once, all or none: what ``count`` calls of
        :meth:`alloc` would give, in the same order, at the cost of a few numpy calls."""
        check_order(order)
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        pool = self._scratch if self.scratch_only else self._main
        pages = count << order
        if keep and pool.free_pages - pages < keep:
            raise enomem(
                f"{count} order-{order} blocks would leave fewer than the {keep} free pages kept "
                "for the handover's metadata (a reserve no session may use)"
            )
        parts = pool.take_many(order, count) if pool.free_pages >= pages else None
        if parts is None:
            where = "scratch" if self.scratch_only else "the region"
            raise enomem(f"no room for {count} order-{order} blocks in {where}")
        heads = np.concatenate(parts)
        self.allocated.preserve_folios(heads, order)
        if pool is self._main:
            self._allocated_main += pages
        return heads

    def alloc_pages(self, count: int) -> list[int]:
        """``count`` order-0 pages, all or none."""
        got: list[int] = []
        try:
            for _ in range(count):
                got.append(self.alloc(0))  # noqa: PERF401 -- partial list is the rollback
        except BaseException:
            self.free_many(got)
            raise
        return got

    def free(self, pfn: int) -> None:
        order = self.allocated.find_order(pfn)
        if order is not None:
            self.allocated.unpreserve_folio(pfn, order)
        else:
            pool = self._scratch if self._scratch.contains(pfn) else self._main
            if pool.containing(pfn) is not None:
                raise einval(f"double free: pfn {pfn:#x} is already free")
            raise einval(f"pfn {pfn:#x} is not the head of an allocation")
        if self._scratch.contains(pfn):
            self._scratch.give(pfn, order)
        else:
            self._allocated_main -= 1 << order
            self._main.give(pfn, order)

    def free_many(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.free(pfn)

    def free_blocks(self, pfns: I64, orders: I64 | int) -> tuple[I64, I64]:
        """Free many allocated blocks at once, all or none (vectorized).

        The pages go back as coalesced runs, each merged with its free
        neighbours (:meth:`_Pool.give_run`), so the free lists end exactly as
        freeing them one by one would leave them. Returns those runs
        ``[start, end)``.
        """
        if pfns.size == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        try:
            self.allocated.unpreserve_folios(pfns, orders)
        except KhoError as e:
            raise einval(f"not an allocated block: {e.message}") from None
        freed = Tracker()
        freed.preserve_folios(pfns, orders)
        starts, ends = freed.page_runs()
        s_lo, s_pages = self.scratch_range
        s_hi = s_lo + s_pages
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            # a run may touch scratch and the main pool on either side of it
            for lo, hi in ((a, min(b, s_lo)), (max(a, s_hi), b)):
                if lo < hi:
                    self._allocated_main -= hi - lo
                    self._main.give_run(lo, hi)
            if s_pages and max(a, s_lo) < min(b, s_hi):
                self._scratch.give_run(max(a, s_lo), min(b, s_hi))
        return starts, ends

    # ----------------------------------------------------------------- reserve (memblock)

    def reserve(self, phys: int, size: int) -> None:
        """Take a page-aligned phys range out of the free pool for good."""
        if phys % (1 << PAGE_SHIFT) or size % (1 << PAGE_SHIFT):
            raise einval(f"range {phys:#x}+{size:#x} is not page-aligned")
        self.reserve_pages(phys >> PAGE_SHIFT, size >> PAGE_SHIFT)

    def reserve_pages(self, pfn: int, npages: int) -> None:
        self.reserve_runs(np.array([pfn], dtype=np.int64), np.array([npages], dtype=np.int64))

    def reserve_runs(self, pfns: npt.NDArray[np.int64], npages: npt.NDArray[np.int64]) -> None:
        """Reserve many page ranges at once; all or nothing.

        The successor reserves every incoming folio through here as
        coalesced runs, so 64 GiB of order-0 folios costs one carve, not
        sixteen million.
        """
        blocks: list[tuple[int, int]] = []
        for pfn, n in zip(pfns.tolist(), npages.tolist(), strict=True):
            self._check_range(pfn, n)
            blocks.extend(split_range(pfn, n))
        blocks.sort()
        for (h1, o1), (h2, _) in itertools.pairwise(blocks):
            if h1 + (1 << o1) > h2:
                raise einval(f"reserve ranges overlap each other at pfn {h2:#x}")
        for head, order in blocks:
            if not self._block_is_free(head, order):
                raise ebusy(
                    f"pages {head:#x}+{1 << order} are not all free (allocated or already reserved)"
                )
        for head, order in blocks:
            hit = self._main.containing(head)
            assert hit is not None, "checked above"
            self._main.carve(hit[0], hit[1], head, order)
            self.reserved[head] = order
            self._reserved_pages += 1 << order

    def _block_is_free(self, head: int, order: int) -> bool:
        """Whether every page of the aligned block is in the main pool's free lists."""
        hit = self._main.containing(head)
        if hit is not None and hit[1] >= order:
            return True
        if order == 0:
            return False
        half = 1 << (order - 1)
        return self._block_is_free(head, order - 1) and self._block_is_free(head + half, order - 1)

    def _reserved_block(self, pfn: int) -> tuple[int, int] | None:
        """The reserved block ``(head, order)`` that holds page ``pfn``."""
        for o in range(NR_ORDERS):
            head = pfn & ~((1 << o) - 1)
            order = self.reserved.get(head)
            if order is not None and head + (1 << order) > pfn:
                return head, order
        return None

    def _is_reserved(self, head: int, order: int) -> bool:
        # Aligned blocks either nest or are disjoint: the reserved block holding
        # ``head`` either covers the whole block or is smaller and starts at head.
        hit = self._reserved_block(head)
        if hit is None:
            return False
        if hit[1] >= order:
            return True
        half = 1 << (order - 1)
        return self._is_reserved(head, order - 1) and self._is_reserved(head + half, order - 1)

    def _take_reserved(self, head: int, order: int) -> None:
        """Remove the (fully reserved) block from the reserved set, splitting as needed."""
        hit = self._reserved_block(head)
        assert hit is not None
        bhead, border = hit
        if border < order:
            half = 1 << (order - 1)
            self._take_reserved(head, order - 1)
            self._take_reserved(head + half, order - 1)
            return
        del self.reserved[bhead]
        while border > order:
            border -= 1
            half = 1 << border
            if head >= bhead + half:
                self.reserved[bhead] = border
                bhead += half
            else:
                self.reserved[bhead + half] = border
        self._reserved_pages -= 1 << order

    def _check_reserved(self, blocks: list[tuple[int, int]]) -> None:
        for head, order in blocks:
            if not self._is_reserved(head, order):
                raise einval(f"pages {head:#x}+{1 << order} are not all reserved")

    def unreserve_pages(self, pfn: int, npages: int) -> None:
        """Give reserved pages back to the free pool (release_unclaimed)."""
        self._check_range(pfn, npages)
        blocks = split_range(pfn, npages)
        self._check_reserved(blocks)
        for head, order in blocks:
            self._take_reserved(head, order)
            self._main.give(head, order)

    def claim_many(self, pfns: I64, orders: I64) -> None:
        """Claim many reserved folios at once, all or none (a restore batch).

        A folio inside one reserved block (the usual case: incoming memory
        is reserved as large aligned blocks) is claimed in bulk: each touched
        block leaves the reserved set and the gaps between its claimed folios
        go back in as greedy splits. Anything else goes through :meth:`claim`.
        """
        if pfns.size == 0:
            return
        npages = np.int64(1) << orders
        ends = pfns + npages
        if np.any(pfns & (npages - 1)):
            i = int(np.flatnonzero(pfns & (npages - 1))[0])
            raise einval(f"pfn {int(pfns[i]):#x} is not aligned to order {int(orders[i])}")
        if pfns.size > 1 and not bool(np.all(pfns[1:] > pfns[:-1])):
            perm = np.argsort(pfns, kind="stable")
            pfns, orders, npages, ends = pfns[perm], orders[perm], npages[perm], ends[perm]
        if pfns.size > 1 and bool(np.any(ends[:-1] > pfns[1:])):
            i = int(np.flatnonzero(ends[:-1] > pfns[1:])[0]) + 1
            raise einval(f"claimed folios overlap at pfn {int(pfns[i]):#x}")
        n = len(self.reserved)
        heads = np.fromiter(self.reserved.keys(), dtype=np.int64, count=n)
        bords = np.fromiter(self.reserved.values(), dtype=np.int64, count=n)
        perm = np.argsort(heads)
        heads, bends = heads[perm], heads[perm] + (np.int64(1) << bords[perm])
        blk = np.searchsorted(heads, pfns, side="right") - 1
        inside = (blk >= 0) & (ends <= bends[np.maximum(blk, 0)])
        if not inside.all():  # a folio over several reserved blocks: the careful way
            rest = np.flatnonzero(~inside)
            for k in rest.tolist():
                self._check_reserved([(int(pfns[k]), int(orders[k]))])
            keep = np.flatnonzero(inside)
            for k in rest.tolist():
                self.claim(int(pfns[k]), int(orders[k]))
            pfns, orders, npages, ends, blk = (x[keep] for x in (pfns, orders, npages, ends, blk))
            if pfns.size == 0:
                return
            return self.claim_many(pfns, orders)
        first = np.concatenate(([True], blk[1:] != blk[:-1]))
        last = np.concatenate((blk[1:] != blk[:-1], [True]))
        prev_end = np.where(first, heads[blk], np.concatenate(([0], ends[:-1])))
        gap_lo = np.flatnonzero(pfns > prev_end)  # a gap before folio k
        gap_hi = np.flatnonzero(last & (ends < bends[blk]))  # and after the last of a block
        gaps = [(int(prev_end[k]), int(pfns[k])) for k in gap_lo.tolist()]
        gaps += [(int(ends[k]), int(bends[blk[k]])) for k in gap_hi.tolist()]
        for b in blk[first].tolist():  # blk ascends with the sorted pfns
            del self.reserved[int(heads[b])]
        for a, b in gaps:
            for h, o in split_range(a, b - a):
                self.reserved[h] = o
        total = int(npages.sum())
        self._reserved_pages -= total
        self.allocated.preserve_folios(pfns, orders)
        self._allocated_main += total

    def claim(self, pfn: int, order: int) -> None:
        """Turn the reserved folio ``(pfn, order)`` into an allocation (a restore)."""
        check_order(order)
        if pfn & ((1 << order) - 1):
            raise einval(f"pfn {pfn:#x} is not aligned to order {order}")
        self._check_range(pfn, 1 << order)
        self._check_reserved([(pfn, order)])
        self._take_reserved(pfn, order)
        self.allocated.preserve_folio(pfn, order)
        self._allocated_main += 1 << order

    # ----------------------------------------------------------------- modes

    def set_scratch_only(self, on: bool) -> None:
        self.scratch_only = on
