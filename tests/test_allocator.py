"""Buddy allocator: alignment, accounting, reservations, scratch, and misuse."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from khod.allocator import Allocator
from khod.errors import Errno, KhoError
from khod.pages import PAGE_SHIFT

BASE = 0x100000
PAGES = 1 << 14  # 64 MiB
SCRATCH = (BASE + PAGES - 1024, 1024)


def fresh() -> Allocator:
    a = Allocator(BASE, PAGES, scratch=SCRATCH)
    a.reserve_pages(BASE, 1)  # the handover record page
    return a


def test_natural_alignment_and_lowest_first() -> None:
    a = fresh()
    for order in (0, 3, 9, 12):
        pfn = a.alloc(order)
        assert pfn % (1 << order) == 0
        assert BASE <= pfn < SCRATCH[0]
    assert a.alloc(0) == BASE + 2  # page 0 reserved, page 1 taken by the first alloc


def test_accounting_adds_up() -> None:
    a = fresh()
    u = a.usage()
    assert u.total == PAGES << PAGE_SHIFT
    assert u.reserved == 1 << PAGE_SHIFT
    assert u.scratch == 1024 << PAGE_SHIFT == u.scratch_free
    assert u.free + u.allocated + u.reserved + u.scratch == u.total
    pfn = a.alloc(9)
    u = a.usage()
    assert u.allocated == 512 << PAGE_SHIFT
    assert u.free + u.allocated + u.reserved + u.scratch == u.total
    a.free(pfn)
    assert a.usage().allocated == 0


def test_misuse_is_an_error_not_corruption() -> None:
    a = fresh()
    pfn = a.alloc(2)
    with pytest.raises(KhoError, match="not the head") as e:
        a.free(pfn + 1)
    assert e.value.code is Errno.EINVAL
    a.free(pfn)
    with pytest.raises(KhoError, match="double free"):
        a.free(pfn)
    with pytest.raises(KhoError, match="not the head"):
        a.free(BASE)  # the reserved record page
    with pytest.raises(KhoError, match=r"outside 0\.\.18"):
        a.alloc(19)
    used = a.alloc(0)
    with pytest.raises(KhoError, match="not all free") as e:
        a.reserve_pages(used, 1)  # reserving something already allocated
    assert e.value.code is Errno.EBUSY
    with pytest.raises(KhoError, match="scratch"):
        a.reserve_pages(SCRATCH[0], 1)
    with pytest.raises(KhoError, match="outside the region"):
        a.reserve_pages(BASE + PAGES, 1)
    with pytest.raises(KhoError, match="overlap each other"):
        a.reserve_runs(np.array([BASE + 100, BASE + 101]), np.array([4, 4]))
    with pytest.raises(KhoError, match="not all reserved"):
        a.claim(BASE + 64, 0)
    u = a.usage()
    assert u.free + u.allocated + u.reserved + u.scratch == u.total


def test_out_of_memory_and_scratch_only_mode() -> None:
    a = fresh()
    with pytest.raises(KhoError, match="no free order-14") as e:
        a.alloc(14)  # bigger than the region minus scratch can hold
    assert e.value.code is Errno.ENOMEM
    a.set_scratch_only(True)
    pfn = a.alloc(4)
    assert SCRATCH[0] <= pfn < SCRATCH[0] + SCRATCH[1]
    assert a.usage().scratch_free == (1024 - 16) << PAGE_SHIFT
    with pytest.raises(KhoError, match="in scratch"):
        a.alloc(10)
    a.free(pfn)
    a.set_scratch_only(False)
    assert not SCRATCH[0] <= a.alloc(4) < SCRATCH[0] + SCRATCH[1]


def test_alloc_pages_is_all_or_nothing() -> None:
    a = Allocator(BASE, 64)
    a.alloc(5)
    before = a.usage()
    with pytest.raises(KhoError):
        a.alloc_pages(33)
    assert a.usage() == before


def test_reserve_claim_and_release_runs() -> None:
    a = fresh()
    # incoming memory: 3000 pages from BASE+0x400 and 5 pages further on, reserved in one call
    a.reserve_runs(np.array([BASE + 0x400, BASE + 0x1000]), np.array([3000, 5]))
    assert a.usage().reserved == (1 + 3005) << PAGE_SHIFT
    a.claim(BASE + 0x400, 0)  # restore an order-0 folio
    a.claim(BASE + 0x800, 10)  # and an order-10 folio
    assert a.order_of(BASE + 0x800) == 10
    with pytest.raises(KhoError, match="not all reserved"):
        a.claim(BASE + 0x400, 0)  # only once
    a.unreserve_pages(BASE + 0x401, 1023)  # release_unclaimed of the rest
    a.unreserve_pages(BASE + 0xC00, 3000 - 2048)
    a.unreserve_pages(BASE + 0x1000, 5)
    assert a.usage().reserved == 1 << PAGE_SHIFT
    a.free(BASE + 0x400)
    a.free(BASE + 0x800)
    u = a.usage()
    assert u.allocated == 0
    assert u.free == (PAGES - 1 - 1024) << PAGE_SHIFT
    # everything merged back: the biggest aligned block clear of the record page and
    # scratch (order 12 at BASE + 0x1000) is available again
    assert a.alloc(12) == BASE + 0x1000


def test_reserving_a_large_run_is_cheap() -> None:
    a = Allocator(0x100000, 1 << 24)  # 64 GiB
    a.reserve_runs(np.array([0x100000 + 1]), np.array([(1 << 24) - 2]))
    assert len(a.reserved) < 128  # split into aligned blocks: ~100 entries, not 16M
    assert a.usage().free == 2 << PAGE_SHIFT


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free/reserve/claim/release keep the books exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a = fresh()
        self.allocs: dict[int, int] = {}
        self.reserved: set[int] = {BASE}

    @rule(order=st.integers(0, 10))
    def alloc(self, order: int) -> None:
        if self.a.usage().free < (1 << order) << PAGE_SHIFT:
            with pytest.raises(KhoError, match="no free"):
                self.a.alloc(order)
            return
        try:
            pfn = self.a.alloc(order)
        except KhoError as e:  # fragmentation can refuse even with enough free pages
            if e.code is not Errno.ENOMEM:
                raise
            return
        pages = set(range(pfn, pfn + (1 << order)))
        assert pfn % (1 << order) == 0
        for p, o in self.allocs.items():
            assert not pages & set(range(p, p + (1 << o)))
        assert not pages & self.reserved
        self.allocs[pfn] = order

    @precondition(lambda self: self.allocs)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.allocs)))
        self.a.free(pfn)
        del self.allocs[pfn]

    @rule(start=st.integers(BASE, BASE + PAGES - 1024 - 300), n=st.integers(1, 300))
    def reserve(self, start: int, n: int) -> None:
        pages = set(range(start, start + n))
        taken = set(self.reserved)
        for p, o in self.allocs.items():
            taken.update(range(p, p + (1 << o)))
        if pages & taken:
            with pytest.raises(KhoError):
                self.a.reserve_pages(start, n)
        else:
            self.a.reserve_pages(start, n)
            self.reserved |= pages

    @precondition(lambda self: len(self.reserved) > 1)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.reserved - {BASE})))
        self.a.unreserve_pages(pfn, 1)
        self.reserved.remove(pfn)

    @precondition(lambda self: len(self.reserved) > 1)
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.reserved - {BASE})))
        self.a.claim(pfn, 0)
        self.reserved.remove(pfn)
        self.allocs[pfn] = 0

    @invariant()
    def books_balance(self) -> None:
        u = self.a.usage()
        assert u.free + u.allocated + u.reserved + u.scratch == u.total
        assert u.allocated == sum(1 << o for o in self.allocs.values()) << PAGE_SHIFT
        assert u.reserved == len(self.reserved) << PAGE_SHIFT


TestAllocatorModel = AllocatorMachine.TestCase
TestAllocatorModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


# ------------------------------------------------------------------ batches against the scalar path


def _state(a: Allocator) -> tuple[object, ...]:
    """Everything that decides what the allocator does next."""
    return (
        [set(s) for s in a._main.free],
        [set(s) for s in a._scratch.free],
        dict(a.reserved),
        [(o, a.allocated.folios(o).tolist()) for o in a.allocated.orders],
        a.usage(),
    )


@st.composite
def fragmented(draw: st.DrawFn) -> tuple[Allocator, dict[int, int]]:
    """An allocator after a random history of allocations, frees and reservations."""
    a, allocs = fresh(), {}
    for _ in range(draw(st.integers(0, 30))):
        what = draw(st.sampled_from(["alloc", "alloc", "free", "reserve"]))
        if what == "alloc":
            order = draw(st.integers(0, 9))
            with contextlib.suppress(KhoError):
                allocs[a.alloc(order)] = order
        elif what == "free" and allocs:
            pfn = draw(st.sampled_from(sorted(allocs)))
            a.free(pfn)
            del allocs[pfn]
        elif what == "reserve":
            start, n = draw(st.integers(BASE, BASE + PAGES - 1400)), draw(st.integers(1, 300))
            with contextlib.suppress(KhoError):
                a.reserve_pages(start, n)
    return a, allocs


@settings(max_examples=150, deadline=None)
@given(fragmented(), st.integers(0, 10), st.integers(1, 3000), st.booleans())
def test_alloc_many_gives_what_as_many_allocs_give(
    setup: tuple[Allocator, dict[int, int]], order: int, count: int, scratch: bool
) -> None:
    a, _ = setup
    a.set_scratch_only(scratch)
    b = copy.deepcopy(a)
    try:
        one_by_one = [b.alloc(order) for _ in range(count)]
    except KhoError:
        with pytest.raises(KhoError) as e:
            a.alloc_many(order, count)
        assert e.value.code is Errno.ENOMEM
        b2 = copy.deepcopy(a)
        assert _state(a) == _state(b2)  # and nothing changed
        return
    assert a.alloc_many(order, count).tolist() == one_by_one
    assert _state(a) == _state(b)


@settings(max_examples=150, deadline=None)
@given(fragmented(), st.data())
def test_free_blocks_leaves_what_frees_one_by_one_leave(
    setup: tuple[Allocator, dict[int, int]], data: st.DataObject
) -> None:
    a, allocs = setup
    more = a.alloc_many(0, data.draw(st.integers(0, 600)))  # a big run to free as well
    allocs.update(dict.fromkeys(more.tolist(), 0))
    a.set_scratch_only(True)  # and blocks of scratch, maybe next to the main pool's
    allocs.update(dict.fromkeys(a.alloc_many(0, data.draw(st.integers(0, 40))).tolist(), 0))
    a.set_scratch_only(False)
    chosen = data.draw(
        st.lists(st.sampled_from(sorted(allocs)), unique=True) if allocs else st.just([])
    )
    b = copy.deepcopy(a)
    for pfn in chosen:
        b.free(pfn)
    a.free_blocks(
        np.array(chosen, dtype=np.int64), np.array([allocs[p] for p in chosen], dtype=np.int64)
    )
    assert _state(a) == _state(b)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_claim_many_leaves_what_claims_one_by_one_leave(data: st.DataObject) -> None:
    a = fresh()
    start = BASE + data.draw(st.integers(1, 2000))
    n = data.draw(st.integers(1, 6000))
    a.reserve_pages(start, n)
    folios: list[tuple[int, int]] = []  # aligned folios inside the run, a random subset
    at = start
    while at < start + n:
        order = data.draw(st.integers(0, 6))
        while order and (at % (1 << order) or at + (1 << order) > start + n):
            order -= 1
        if data.draw(st.booleans()):
            folios.append((at, order))
        at += 1 << order
    b = copy.deepcopy(a)
    for pfn, order in folios:
        b.claim(pfn, order)
    order_list = data.draw(st.permutations(folios))
    a.claim_many(
        np.array([p for p, _ in order_list], dtype=np.int64),
        np.array([o for _, o in order_list], dtype=np.int64),
    )
    assert _state(a) == _state(b)


def test_claim_many_refuses_what_is_not_reserved_and_changes_nothing() -> None:
    a = fresh()
    a.reserve_pages(BASE + 64, 64)
    before = _state(a)
    with pytest.raises(KhoError, match="not all reserved"):
        a.claim_many(np.array([BASE + 64, BASE + 128], dtype=np.int64), np.array([0, 0]))
    assert _state(a) == before
    with pytest.raises(KhoError, match="overlap"):
        a.claim_many(np.array([BASE + 64, BASE + 64], dtype=np.int64), np.array([1, 0]))
    assert _state(a) == before


def test_free_blocks_refuses_what_is_not_allocated_and_changes_nothing() -> None:
    a = fresh()
    got = a.alloc_many(0, 10)
    before = _state(a)
    with pytest.raises(KhoError, match="not an allocated block"):
        a.free_blocks(np.append(got, got[-1] + 1), 0)
    with pytest.raises(KhoError, match="not an allocated block"):
        a.free_blocks(np.append(got, got[0]), 0)  # twice
    assert _state(a) == before
