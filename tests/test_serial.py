"""Chunk-list round trips over random preservation sets (all orders, big and empty)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khod.allocator import Allocator
from khod.errors import Errno, KhoError
from khod.kho.abi import CHUNK_ENTRIES
from khod.kho.chunklist import deserialize, serialize
from khod.kho.memory import ScratchRange
from khod.kho.tracker import Tracker
from khod.pages import MAX_ORDER, PAGE_SHIFT
from khod.region import Region

from .conftest import BASE, MakeRegion, allocator_for

GIB_PAGES = 1 << 18


def reserve_folios(alloc: Allocator, t: Tracker) -> None:
    """Preserved folios belong to clients, so metadata never lands on them."""
    for order in t.orders:
        first, count = t.runs(order)
        alloc.reserve_runs(first, count << order)


@st.composite
def preservation_sets(draw: st.DrawFn, slots: int = 62) -> Tracker:
    """Folios in distinct 1 GiB slots (one order per slot), so none overlap.

    Slot 0 holds the record page and scratch; slot ``slots + 1`` is the
    region's last GiB, so folios at its very last page are common.
    """
    t = Tracker()
    for slot in draw(st.lists(st.integers(1, slots + 1), unique=True, max_size=6)):
        order = draw(st.integers(0, MAX_ORDER))
        per_slot = GIB_PAGES >> order
        base = (BASE >> PAGE_SHIFT) + slot * GIB_PAGES
        picks = draw(
            st.one_of(
                st.lists(st.integers(0, per_slot - 1), unique=True, max_size=40),
                st.just([per_slot - 1]),  # the slot's last folio
                st.just(list(range(min(per_slot, 3000)))),  # dense
            )
        )
        t.preserve_folios([base + (i << order) for i in picks], order)
    return t


@pytest.fixture
def big_region(make_region: MakeRegion) -> Region:
    return make_region(size=64 << 30)  # sparse: only the metadata pages get touched


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=preservation_sets())
def test_round_trip_any_set(big_region: Region, t: Tracker) -> None:
    alloc, scratch = allocator_for(big_region)
    reserve_folios(alloc, t)
    before = alloc.usage()
    out = serialize(t, alloc, big_region)
    try:
        back = deserialize(big_region, out.first_chunk, scratch)
        assert back.tracker == t
        assert list(back.tracker.iter_folios()) == list(t.iter_folios())
        assert back.crc32 == out.crc32
        assert sorted(back.metadata_pfns) == sorted(out.pages)
        assert out.chunks == sum(-(-s.bitmaps // CHUNK_ENTRIES) for s in t.stats())
    finally:
        alloc.free_many(out.pages)
    assert alloc.usage() == before


def test_empty_set(make_region: MakeRegion) -> None:
    region = make_region()
    alloc, scratch = allocator_for(region)
    out = serialize(Tracker(), alloc, region)
    assert (out.first_chunk, out.pages, out.chunks) == (0, [], 0)
    assert deserialize(region, 0, scratch).tracker.count() == 0


def test_more_than_255_bitmaps_and_the_last_page(big_region: Region) -> None:
    alloc, scratch = allocator_for(big_region)
    t = Tracker()
    first = (BASE >> PAGE_SHIFT) + GIB_PAGES
    t.preserve_folios(np.arange(first, first + 600 * 4096, 4096, dtype=np.int64), 0)  # 600 bitmaps
    last_page = (big_region.end >> PAGE_SHIFT) - 1
    t.preserve_folio(last_page, 0)
    t.preserve_folio(((big_region.end >> PAGE_SHIFT) - GIB_PAGES * 2), 18)
    reserve_folios(alloc, t)
    out = serialize(t, alloc, big_region)
    assert out.chunks == 4  # order 0: 601 bitmaps -> 3 chunks, order 18: 1
    back = deserialize(big_region, out.first_chunk, scratch)
    assert back.tracker == t
    assert (last_page << PAGE_SHIFT, 0) in set(back.tracker.iter_folios())


def test_serialize_rolls_back_on_out_of_memory(make_region: MakeRegion) -> None:
    region = make_region(size=8 << 20)
    alloc, _ = allocator_for(region, scratch_size=1 << 20)
    while True:
        try:
            alloc.alloc(0)
        except KhoError:
            break
    t = Tracker()
    t.preserve_folio(region.base_pfn + 2000, 0)
    before = alloc.usage()
    with pytest.raises(KhoError) as e:
        serialize(t, alloc, region)
    assert e.value.code is Errno.ENOMEM
    assert alloc.usage() == before


def test_serialize_refuses_in_scratch_only_mode(make_region: MakeRegion) -> None:
    region = make_region()
    alloc, _ = allocator_for(region)
    alloc.set_scratch_only(True)
    t = Tracker()
    t.preserve_folio(region.base_pfn + 5000, 0)
    with pytest.raises(KhoError, match="scratch") as e:
        serialize(t, alloc, region)
    assert e.value.code is Errno.EBUSY


def test_scratch_range_overlap() -> None:
    s = ScratchRange(0x1000, 0x2000)
    assert s.overlaps(0x2000, 1) and not s.overlaps(0x3000, 0x1000)
    assert not ScratchRange(0, 0).overlaps(0, 1 << 40)
