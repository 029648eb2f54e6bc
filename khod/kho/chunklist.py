"""A preservation set <-> a chunk list of bitmaps in region pages (docs/format.md §4).

``serialize`` writes one list: orders ascending, a new chunk for each order
and every 255 bitmaps, 512-byte bitmaps packed eight to a page. The pages
come from the caller's page source (never scratch) and are returned so that
unfreeze can give them back.

``deserialize`` reads a list back from untrusted memory. It trusts nothing:
every pointer is bounds-, scratch- and alignment-checked before it is
dereferenced, chunks must ascend, loops are caught, and the folios found
must lie inside the region, outside scratch and not overlap. The first
fault stops it with a :class:`HandoverError` naming the fault class.
Whether metadata pages lie inside preserved folios is a question about the
whole handover (every list and the FDT), so :func:`check_metadata_outside`
answers it once for all of them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from khod.errors import Fault, HandoverError, ebusy
from khod.kho.abi import (
    BITMAP_BYTES,
    BITMAP_WORDS,
    BITMAPS_PER_PAGE,
    CHUNK_ENTRIES,
    LE_U64,
    Rows,
    bitmap_span_shift,
    decode_chunk,
    encode_chunk,
)
from khod.kho.memory import Memory, Pages, ScratchRange
from khod.kho.tracker import Tracker
from khod.pages import I64, PAGE_SHIFT, PAGE_SIZE


@dataclass(frozen=True)
class SerializedList:
    """Where a written chunk list lives and what it checksums to."""

    first_chunk: int  # phys of the first chunk page, 0 for an empty set
    pages: list[int]  # pfns of every page written (chunk pages, then bitmap pages)
    crc32: int  # over each chunk page followed by its bitmaps, in list order
    chunks: int
    bitmaps: int


def _plan(tracker: Tracker) -> list[tuple[int, I64, Rows]]:
    """(order, bitmap indices, rows) per chunk, in list order."""
    plan: list[tuple[int, I64, Rows]] = []
    for order in tracker.orders:
        keys, rows = tracker.bitmaps(order)
        plan.extend(
            (order, keys[at : at + CHUNK_ENTRIES], rows[at : at + CHUNK_ENTRIES])
            for at in range(0, keys.size, CHUNK_ENTRIES)
        )
    return plan


def serialize(
    tracker: Tracker, pages_from: Pages, region: Memory, *, crc_seed: int = 0
) -> SerializedList:
    """Write ``tracker`` as a chunk list into pages taken from ``pages_from``.

    The CRC continues from ``crc_seed`` so that several lists can share one
    checksum (the ``metadata-crc32`` of the khod node covers them all).
    """
    if pages_from.scratch_only:
        raise ebusy("cannot write metadata while only scratch may be allocated")
    plan = _plan(tracker)
    if not plan:
        return SerializedList(0, [], crc_seed, 0, 0)
    n_bitmaps = sum(keys.size for _, keys, _ in plan)
    n_bitmap_pages = -(-n_bitmaps // BITMAPS_PER_PAGE)
    pages = pages_from.alloc_pages(len(plan) + n_bitmap_pages)
    try:
        chunk_pfns, bitmap_pfns = pages[: len(plan)], pages[len(plan) :]
        slots = np.arange(n_bitmaps, dtype=np.int64)
        bitmap_phys = (
            np.asarray(bitmap_pfns, dtype=np.int64)[slots // BITMAPS_PER_PAGE] << PAGE_SHIFT
        ) + (slots % BITMAPS_PER_PAGE) * BITMAP_BYTES

        all_rows = np.concatenate([rows for _, _, rows in plan]).astype(LE_U64, copy=False)
        blob = np.zeros(n_bitmap_pages * PAGE_SIZE // 8, dtype=LE_U64)
        blob[: all_rows.size] = all_rows.reshape(-1)
        raw = blob.view(np.uint8)
        _write_pages(region, bitmap_pfns, raw)

        crc = crc_seed
        at = 0
        for i, (order, keys, _) in enumerate(plan):
            nxt = chunk_pfns[i + 1] << PAGE_SHIFT if i + 1 < len(plan) else 0
            starts = keys.astype(np.uint64) << np.uint64(bitmap_span_shift(order))
            ptrs = bitmap_phys[at : at + keys.size].astype(np.uint64)
            page = encode_chunk(nxt, order, starts, ptrs)
            region.write(chunk_pfns[i] << PAGE_SHIFT, page)
            crc = zlib.crc32(page, crc)
            crc = zlib.crc32(raw[at * BITMAP_BYTES : (at + keys.size) * BITMAP_BYTES].data, crc)
            at += keys.size
    except BaseException:
        pages_from.free_many(pages)
        raise
    return SerializedList(chunk_pfns[0] << PAGE_SHIFT, pages, crc, len(plan), n_bitmaps)


def _write_pages(region: Memory, pfns: list[int], raw: npt.NDArray[np.uint8]) -> None:
    """Write consecutive 4 KiB slices of ``raw`` to ``pfns``, one copy per contiguous run."""
    i = 0
    while i < len(pfns):
        j = i + 1
        while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
            j += 1
        region.write(pfns[i] << PAGE_SHIFT, raw[i * PAGE_SIZE : j * PAGE_SIZE].data)
        i = j


# --------------------------------------------------------------------------- reading back


@dataclass
class DeserializedList:
    """A validated chunk list: the folios, and the pages the metadata sat in."""

    tracker: Tracker
    chunk_pages: list[int] = field(default_factory=list)
    bitmap_ptrs: list[int] = field(default_factory=list)
    crc32: int = 0

    @property
    def metadata_pfns(self) -> list[int]:
        pages = {p >> PAGE_SHIFT for p in self.chunk_pages}
        pages.update(p >> PAGE_SHIFT for p in self.bitmap_ptrs)
        return sorted(pages)


class PointerBounds:
    """What a pointer read from the region may point at."""

    def __init__(self, region: Memory, scratch: ScratchRange) -> None:
        self.lo = region.base + PAGE_SIZE  # the first page is the handover record
        self.hi = region.end
        self.scratch = scratch

    def check(self, phys: int, length: int, align: int, what: str) -> None:
        if not (self.lo <= phys and phys + length <= self.hi):
            where = "the handover record" if phys < self.lo and phys >= self.lo - PAGE_SIZE else ""
            raise HandoverError(
                Fault.POINTER_OUTSIDE_REGION,
                f"{what} pointer {phys:#x} is outside the region's data pages "
                f"{self.lo:#x}..{self.hi:#x}" + (f" (it points at {where})" if where else ""),
            )
        if phys % align:
            raise HandoverError(
                Fault.POINTER_MISALIGNED, f"{what} pointer {phys:#x} is not {align}-byte aligned"
            )
        if self.scratch.overlaps(phys, length):
            raise HandoverError(
                Fault.POINTER_IN_SCRATCH,
                f"{what} pointer {phys:#x} lies in scratch "
                f"{self.scratch.phys:#x}+{self.scratch.size:#x}",
            )

    def check_many(self, ptrs: npt.NDArray[np.uint64], length: int, align: int, what: str) -> None:
        p = ptrs.astype(np.uint64)
        bad = (p < self.lo) | (p > self.hi - length) | (p % np.uint64(align) != 0)
        if self.scratch.size:
            s0, s1 = self.scratch.phys, self.scratch.phys + self.scratch.size
            bad |= (p < s1) & (p + np.uint64(length) > s0)
        if bad.any():
            self.check(int(p[np.flatnonzero(bad)[0]]), length, align, what)


def deserialize(
    region: Memory, first_chunk: int, scratch: ScratchRange, *, crc_seed: int = 0
) -> DeserializedList:
    """Walk and validate one chunk list; refuse the whole list on the first fault."""
    bounds = PointerBounds(region, scratch)
    seen: set[int] = set()
    chunk_pages: list[int] = []
    ptr_parts: list[npt.NDArray[np.uint64]] = []
    per_order: dict[int, tuple[list[I64], list[npt.NDArray[np.uint64]]]] = {}
    crc = crc_seed
    arr = region.array()
    phys = first_chunk
    last: tuple[int, int] | None = None  # (order, last phys_start)
    while phys:
        bounds.check(phys, PAGE_SIZE, PAGE_SIZE, "chunk")
        if phys in seen:
            raise HandoverError(
                Fault.CHUNK_LOOP, f"chunk list returns to {phys:#x} after {len(seen)} chunks"
            )
        seen.add(phys)
        chunk_pages.append(phys)
        page = region.view(phys, PAGE_SIZE)
        try:
            chunk = decode_chunk(page, where=phys)
            crc = zlib.crc32(page, crc)
        finally:
            page.release()
        if chunk.num_elms == 0:
            raise HandoverError(Fault.MALFORMED_CHUNK, f"chunk at {phys:#x} has no entries")
        first_start = int(chunk.phys_starts[0])
        if last is not None and (
            chunk.order < last[0] or (chunk.order == last[0] and first_start <= last[1])
        ):
            raise HandoverError(
                Fault.MALFORMED_CHUNK,
                f"chunk at {phys:#x} (order {chunk.order}) does not follow the previous chunk "
                f"(order {last[0]}) in ascending order",
            )
        last = (chunk.order, int(chunk.phys_starts[-1]))
        bounds.check_many(chunk.bitmaps, BITMAP_BYTES, BITMAP_BYTES, "bitmap")
        offs = chunk.bitmaps.astype(np.int64) - region.base
        raw = arr[offs[:, None] + np.arange(BITMAP_BYTES, dtype=np.int64)]
        crc = zlib.crc32(raw.tobytes(), crc)
        rows = raw.view(LE_U64).reshape(-1, BITMAP_WORDS)
        keys = (chunk.phys_starts >> np.uint64(bitmap_span_shift(chunk.order))).astype(np.int64)
        slot = per_order.setdefault(chunk.order, ([], []))
        slot[0].append(keys)
        slot[1].append(rows)
        ptr_parts.append(chunk.bitmaps)
        phys = chunk.next
    tracker = Tracker.from_bitmaps(
        {o: (np.concatenate(k), np.concatenate(r)) for o, (k, r) in per_order.items()}
    )
    ptrs = np.concatenate(ptr_parts).tolist() if ptr_parts else []
    result = DeserializedList(tracker, chunk_pages, ptrs, crc)
    _check_folios(region, scratch, result)
    return result


def _check_folios(region: Memory, scratch: ScratchRange, got: DeserializedList) -> None:
    """Every folio inside the data pages, none in scratch, none overlapping another."""
    lo = (region.base >> PAGE_SHIFT) + 1
    hi = region.end >> PAGE_SHIFT
    s0, s1 = scratch.phys >> PAGE_SHIFT, (scratch.phys + scratch.size) >> PAGE_SHIFT
    t = got.tracker
    for order in t.orders:
        first, count = t.runs(order)
        end = first + (count << order)
        if int(first[0]) < lo or int(end[-1]) > hi:
            bad = int(first[0]) if int(first[0]) < lo else int(end[-1] - (1 << order))
            raise HandoverError(
                Fault.FOLIO_OUT_OF_BOUNDS,
                f"preserved folio pfn {bad:#x} order {order} is outside the region's data pages",
            )
        if s1 > s0:
            hit = np.flatnonzero((first < s1) & (end > s0))
            if hit.size:
                k = int(hit[0])
                raise HandoverError(
                    Fault.FOLIO_OUT_OF_BOUNDS,
                    f"preserved folios of order {order} from pfn {int(first[k]):#x} reach into "
                    f"scratch pfns {s0:#x}..{s1:#x}",
                )
    clash = t.find_overlap()
    if clash is not None:
        (a, ao), (b, bo) = clash
        raise HandoverError(
            Fault.OVERLAP,
            f"preserved folio pfn {a:#x} order {ao} overlaps folio pfn {b:#x} order {bo}",
        )


def check_metadata_outside(preserved: Tracker, metadata_pfns: I64) -> None:
    """Refuse if a metadata page (chunk, bitmap or FDT page) lies inside a preserved folio."""
    inside = preserved.contained_mask(metadata_pfns, 0)
    if inside.any():
        pfn = int(metadata_pfns[np.flatnonzero(inside)[0]])
        raise HandoverError(
            Fault.OVERLAP, f"metadata page pfn {pfn:#x} lies inside a preserved folio"
        )
