"""Byte layouts of docs/format.md §3-§7, pinned by hand-computed golden bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from khod.errors import Fault, HandoverError, KhoError
from khod.kho.abi import (
    BITMAP_BYTES,
    CHUNK_ENTRIES,
    decode_bitmap,
    decode_chunk,
    encode_bitmap,
    encode_chunk,
)
from khod.kho.chunklist import deserialize, serialize
from khod.kho.record import HandoverRecord, RecordState, decode_record, read_record, record_present
from khod.kho.tracker import Tracker
from khod.pages import MAX_ORDER, PAGE_SIZE, split_range

from .conftest import MakeRegion, allocator_for

# The hand-computed example: region at phys 0x1_0000_0000 (pfn 0x100000), order-0
# folios at pfns 0x100400, 0x100401 and 0x101000, one order-9 folio at pfn 0x100200.
#   order 0: hi = pfn; bitmap 0x100 holds bits 0x400 and 0x401 -> byte 128 = 0b11,
#            bitmap 0x101 holds bit 0 -> byte 0 = 0b1; phys_start = idx << 24.
#   order 9: hi = 0x100200 >> 9 = 0x801; bitmap 0, bit 0x801 = 2049 -> byte 256 = 0b10;
#            phys_start = 0 << 33 = 0.
# A fresh allocator (record page reserved) hands out pfns 0x100001, 0x100002 (chunk
# pages, one per order) then 0x100003 (the page holding the three bitmaps, 512 B each).
GOLDEN_CHUNK0 = bytes.fromhex(
    "0020000001000000"  # next  = 0x1_0000_2000 (the order-9 chunk)
    "00000000"  # order = 0
    "02000000"  # num_elms = 2
    "0000000001000000"  # phys_start = 0x1_0000_0000  (bitmap index 0x100 << 24)
    "0030000001000000"  # bitmap = 0x1_0000_3000
    "0000000101000000"  # phys_start = 0x1_0100_0000  (bitmap index 0x101 << 24)
    "0032000001000000"  # bitmap = 0x1_0000_3200
) + bytes(PAGE_SIZE - 48)
GOLDEN_CHUNK1 = bytes.fromhex(
    "0000000000000000"  # next = 0: end of list
    "09000000"  # order = 9
    "01000000"  # num_elms = 1
    "0000000000000000"  # phys_start = 0
    "0034000001000000"  # bitmap = 0x1_0000_3400
) + bytes(PAGE_SIZE - 32)
GOLDEN_BITMAPS = (
    bytes(128) + b"\x03" + bytes(383)  # order 0, index 0x100
    + b"\x01" + bytes(511)  # order 0, index 0x101
    + bytes(256) + b"\x02" + bytes(255)  # order 9, index 0
    + bytes(PAGE_SIZE - 3 * BITMAP_BYTES)
)  # fmt: skip

GOLDEN_RECORD = bytes.fromhex(
    "4b484f4452454300"  # magic "KHODREC\0"
    "01000000"  # format version 1
    "02000000"  # state HANDOVER
    "9210000000000000"  # owner pid 4242
    "0000000001000000"  # region base 0x1_0000_0000
    "0000000400000000"  # region size 64 MiB
    "0040000001000000"  # fdt phys 0x1_0000_4000
    "c501000000000000"  # fdt size 0x1c5
    "78563412"  # fdt crc32 0x12345678
    "00000000"  # reserved
    "0000c00301000000"  # scratch phys 0x1_03c0_0000
    "0000400000000000"  # scratch size 4 MiB
    "0100000000000000"  # generation 1
    "afd6b9d3"  # record crc32 over the 88 bytes above
    "00000000"  # reserved
)


def golden_tracker() -> Tracker:
    t = Tracker()
    for pfn in (0x100400, 0x100401, 0x101000):
        t.preserve_folio(pfn, 0)
    t.preserve_folio(0x100200, 9)
    return t


def test_golden_chunk_list_bytes(make_region: MakeRegion) -> None:
    region = make_region()
    alloc, scratch = allocator_for(region, scratch_at_end=True)
    out = serialize(golden_tracker(), alloc, region)
    assert out.first_chunk == 0x1_0000_1000
    assert out.pages == [0x100001, 0x100002, 0x100003]
    assert region.read(0x1_0000_1000, PAGE_SIZE) == GOLDEN_CHUNK0
    assert region.read(0x1_0000_2000, PAGE_SIZE) == GOLDEN_CHUNK1
    assert region.read(0x1_0000_3000, PAGE_SIZE) == GOLDEN_BITMAPS
    # and the list reads back to the same four folios, in ABI order
    back = deserialize(region, out.first_chunk, scratch)
    assert list(back.tracker.iter_folios()) == [
        (0x100400 << 12, 0),
        (0x100401 << 12, 0),
        (0x101000 << 12, 0),
        (0x100200 << 12, 9),
    ]
    assert back.crc32 == out.crc32


def test_golden_record_bytes() -> None:
    rec = HandoverRecord(
        state=RecordState.HANDOVER,
        owner_pid=4242,
        region_base=0x1_0000_0000,
        region_size=64 << 20,
        fdt_phys=0x1_0000_4000,
        fdt_size=0x1C5,
        fdt_crc32=0x12345678,
        scratch_phys=0x1_03C0_0000,
        scratch_size=4 << 20,
        generation=1,
    )
    assert rec.encode() == GOLDEN_RECORD
    assert decode_record(GOLDEN_RECORD) == rec


def test_golden_bitmap_bit_order() -> None:
    # bit b is byte b // 8, bit b % 8, LSB first
    assert encode_bitmap([0]) == b"\x01" + bytes(511)
    assert encode_bitmap([7, 8]) == b"\x80\x01" + bytes(510)
    assert encode_bitmap([4095]) == bytes(511) + b"\x80"
    assert decode_bitmap(encode_bitmap([1024, 1025])).tolist() == [1024, 1025]
    with pytest.raises(KhoError, match="outside"):
        encode_bitmap([4096])


@given(st.sets(st.integers(0, 4095), max_size=200))
def test_bitmap_round_trip(bits: set[int]) -> None:
    assert decode_bitmap(encode_bitmap(bits)).tolist() == sorted(bits)


def test_chunk_codec_round_trip_and_limits() -> None:
    starts = [i << 24 for i in range(CHUNK_ENTRIES)]
    ptrs = [0x2000_0000 + i * 512 for i in range(CHUNK_ENTRIES)]
    page = encode_chunk(0x5000, 0, starts, ptrs)
    assert len(page) == PAGE_SIZE
    chunk = decode_chunk(page)
    assert chunk.next == 0x5000 and chunk.order == 0 and chunk.num_elms == 255
    assert chunk.phys_starts.tolist() == starts and chunk.bitmaps.tolist() == ptrs
    with pytest.raises(KhoError, match="at most 255"):
        encode_chunk(0, 0, [*starts, 255 << 24], [*ptrs, 0])


def test_chunk_decode_faults() -> None:
    def hdr(order: int, n: int) -> bytearray:
        page = bytearray(PAGE_SIZE)
        struct.pack_into("<QII", page, 0, 0, order, n)
        return page

    with pytest.raises(HandoverError) as e:
        decode_chunk(bytes(hdr(MAX_ORDER + 1, 0)))
    assert e.value.fault is Fault.BAD_ORDER
    with pytest.raises(HandoverError) as e:
        decode_chunk(bytes(hdr(0, 256)))
    assert e.value.fault is Fault.TOO_MANY_ENTRIES
    page = hdr(9, 1)
    struct.pack_into("<QQ", page, 16, 1 << 24, 0x1000)  # order 9 needs multiples of 1 << 33
    with pytest.raises(HandoverError) as e:
        decode_chunk(bytes(page))
    assert e.value.fault is Fault.MISALIGNED_PHYS_START
    page = hdr(0, 1)
    struct.pack_into("<QQ", page, 32, 5, 5)  # garbage in entry 1, beyond num_elms
    with pytest.raises(HandoverError) as e:
        decode_chunk(bytes(page))
    assert e.value.fault is Fault.MALFORMED_CHUNK


def test_record_faults() -> None:
    assert not record_present(bytes(PAGE_SIZE))
    bad = bytearray(GOLDEN_RECORD)
    bad[20] ^= 1
    with pytest.raises(HandoverError, match="CRC32") as e:
        decode_record(bytes(bad))
    assert e.value.fault is Fault.BAD_RECORD
    with pytest.raises(HandoverError, match="magic"):
        decode_record(b"X" + GOLDEN_RECORD[1:])
    with pytest.raises(HandoverError, match="needs"):
        decode_record(GOLDEN_RECORD[:40])


def test_read_record_of_fresh_region(make_region: MakeRegion) -> None:
    assert read_record(make_region()) is None


@pytest.mark.parametrize(
    ("pfn", "npages", "expected"),
    [
        (0, 1, [(0, 0)]),
        # the v5 bug: phys=4096 size=8192 must be two order-0 pages, not order 1 at pfn 0
        (1, 2, [(1, 0), (2, 0)]),
        (1, 3, [(1, 0), (2, 1)]),
        (0x100, 0x300, [(0x100, 8), (0x200, 9)]),
        (0, (1 << 18) + 1, [(0, 18), (1 << 18, 0)]),
        (0, 1 << 20, [(i << 18, 18) for i in range(4)]),
    ],
)
def test_split_range(pfn: int, npages: int, expected: list[tuple[int, int]]) -> None:
    assert split_range(pfn, npages) == expected


@given(st.integers(0, 1 << 30), st.integers(1, 1 << 21))
def test_split_range_covers_exactly_with_aligned_folios(pfn: int, npages: int) -> None:
    parts = split_range(pfn, npages)
    at = pfn
    for head, order in parts:
        assert head == at and 0 <= order <= MAX_ORDER and head % (1 << order) == 0
        at += 1 << order
    assert at == pfn + npages
    assert np.all(np.diff([o for _, o in parts]) <= 18)
