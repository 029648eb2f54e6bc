"""The preservation tracker against a page-level model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from khod.errors import Errno, KhoError
from khod.kho.tracker import Tracker
from khod.pages import MAX_ORDER, PAGE_SHIFT, split_range


def folio(draw: st.DrawFn, space: int = 1 << 20) -> tuple[int, int]:
    order = draw(st.one_of(st.integers(0, 3), st.integers(0, 12), st.sampled_from([9, 18])))
    pfn = draw(st.integers(0, space - 1)) >> order << order
    return pfn, order


folios = st.composite(folio)


class Model:
    """Which folios are preserved, and which page each one covers."""

    def __init__(self) -> None:
        self.folios: set[tuple[int, int]] = set()

    def overlaps(self, pfn: int, order: int) -> bool:
        end = pfn + (1 << order)
        return any(p < end and pfn < p + (1 << o) for p, o in self.folios)

    def sorted(self) -> list[tuple[int, int]]:
        return sorted(((p << PAGE_SHIFT, o) for p, o in self.folios), key=lambda x: (x[1], x[0]))


class TrackerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = Tracker()
        self.m = Model()

    @rule(f=folios())
    def preserve_one(self, f: tuple[int, int]) -> None:
        pfn, order = f
        if self.m.overlaps(pfn, order):
            with pytest.raises(KhoError) as e:
                self.t.preserve_folio(pfn, order)
            assert e.value.code is Errno.EEXIST
        else:
            self.t.preserve_folio(pfn, order)
            self.m.folios.add(f)

    @rule(fs=st.lists(folios(), max_size=20))
    def preserve_batch(self, fs: list[tuple[int, int]]) -> None:
        ok = True
        trial = Model()
        trial.folios = set(self.m.folios)
        for pfn, order in fs:
            if trial.overlaps(pfn, order):
                ok = False
                break
            trial.folios.add((pfn, order))
        pfns = [p for p, _ in fs]
        orders = [o for _, o in fs]
        if ok:
            assert self.t.preserve_folios(pfns, orders) == len(fs)
            self.m = trial
        else:
            with pytest.raises(KhoError) as e:
                self.t.preserve_folios(pfns, orders)
            assert e.value.code is Errno.EEXIST

    @rule(data=st.data())
    def unpreserve_some(self, data: st.DataObject) -> None:
        pool = sorted(self.m.folios)
        extra = data.draw(st.lists(folios(), max_size=2))
        picks = data.draw(st.lists(st.sampled_from(pool), max_size=6, unique=True)) if pool else []
        batch = picks + extra
        ok = all(f in self.m.folios for f in batch) and len(set(batch)) == len(batch)
        pfns, orders = [p for p, _ in batch], [o for _, o in batch]
        if ok:
            self.t.unpreserve_folios(pfns, orders)
            self.m.folios -= set(batch)
        else:
            with pytest.raises(KhoError) as e:
                self.t.unpreserve_folios(pfns, orders)
            assert e.value.code is Errno.ENOENT

    @rule(f=folios())
    def unpreserve_one(self, f: tuple[int, int]) -> None:
        if f in self.m.folios:
            self.t.unpreserve_folio(*f)
            self.m.folios.remove(f)
        else:
            with pytest.raises(KhoError) as e:
                self.t.unpreserve_folio(*f)
            assert e.value.code is Errno.ENOENT

    @rule(start=st.integers(0, (1 << 20) - 1), n=st.integers(1, 3000))
    def preserve_range(self, start: int, n: int) -> None:
        parts = split_range(start, n)
        if any(self.m.overlaps(p, o) for p, o in parts):
            with pytest.raises(KhoError):
                self.t.preserve_folios([p for p, _ in parts], [o for _, o in parts])
        else:
            assert self.t.preserve_folios([p for p, _ in parts], [o for _, o in parts]) == len(
                parts
            )
            self.m.folios.update(parts)

    @invariant()
    def same_set(self) -> None:
        assert list(self.t.iter_folios()) == self.m.sorted()
        assert self.t.count() == len(self.m.folios)
        assert self.t.total_bytes() == sum(1 << (o + PAGE_SHIFT) for _, o in self.m.folios)
        assert self.t.find_overlap() is None

    @invariant()
    def runs_expand_to_folios(self) -> None:
        for order in self.t.orders:
            first, count = self.t.runs(order)
            expanded = [
                f + (i << order) for f, c in zip(first, count, strict=True) for i in range(c)
            ]
            assert expanded == self.t.folios(order).tolist()


TestTrackerModel = TrackerMachine.TestCase
TestTrackerModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_rules_and_messages() -> None:
    t = Tracker()
    t.preserve_folio(0x100200, 9)
    with pytest.raises(KhoError, match="lies inside preserved folio pfn 0x100200 order 9"):
        t.preserve_folio(0x100201, 0)
    with pytest.raises(KhoError, match="overlaps preserved folio pfn 0x100200 order 9"):
        t.preserve_folio(0x100000, 18)
    with pytest.raises(KhoError, match="already preserved"):
        t.preserve_folio(0x100200, 9)
    # unpreserve must name the folio exactly: a page inside it is not preserved "so"
    with pytest.raises(KhoError, match="not preserved") as e:
        t.unpreserve_folio(0x100200, 0)
    assert e.value.code is Errno.ENOENT
    assert t.find_order(0x100200) == 9 and t.find_order(0x100201) is None
    inside = t.contained_mask(np.array([0x1003FF, 0x100400], dtype=np.int64), 0)
    assert inside.tolist() == [True, False]


@pytest.mark.parametrize(
    ("pfn", "order", "msg"),
    [
        (-1, 0, "not a valid"),
        (1, 1, "not aligned"),
        (0, MAX_ORDER + 1, "outside 0..18"),
        (0, -1, "outside 0..18"),
        (1 << 52, 0, "not a valid"),
        (True, 0, "not a valid"),
        ("7", 0, "not a valid"),
    ],
)
def test_bad_folios_are_einval(pfn: object, order: object, msg: str) -> None:
    t = Tracker()
    with pytest.raises(KhoError, match=msg) as e:
        t.preserve_folio(pfn, order)  # type: ignore[arg-type]
    assert e.value.code is Errno.EINVAL


@pytest.mark.parametrize(
    ("pfns", "orders", "msg"),
    [
        ([1, -2], 0, "negative"),
        ([1 << 60], 0, "beyond"),
        ([1, 2], [0], "2 pfns but 1 orders"),
        ([0], [19], "outside"),
        ([3], 1, "not aligned"),
        ([[1, 2]], 0, "flat list"),
        ([1.5], 0, "integers"),
        ([0], True, "boolean"),
    ],
)
def test_bad_batches_are_einval(pfns: object, orders: object, msg: str) -> None:
    t = Tracker()
    with pytest.raises(KhoError, match=msg) as e:
        t.preserve_folios(pfns, orders)  # type: ignore[arg-type]
    assert e.value.code is Errno.EINVAL
    assert not t


def test_batches_are_atomic() -> None:
    t = Tracker()
    t.preserve_folio(1000, 0)
    before = list(t.iter_folios())
    big = np.arange(0, 1 << 16, dtype=np.int64)  # includes 1000
    with pytest.raises(KhoError, match="pfn 0x3e8 order 0 is already preserved"):
        t.preserve_folios(big, 0)
    assert list(t.iter_folios()) == before
    # a later group's conflict rolls back the earlier groups of the same batch
    with pytest.raises(KhoError, match="overlaps"):
        t.preserve_folios([2048, 4096, 512], [0, 0, 9])
    assert list(t.iter_folios()) == before
    with pytest.raises(KhoError, match="twice") as e:
        t.preserve_folios([5, 6, 5], 0)
    assert e.value.code is Errno.EEXIST
    with pytest.raises(KhoError, match="twice") as e:
        t.unpreserve_folios([1000, 1000], 0)
    assert e.value.code is Errno.ENOENT
    with pytest.raises(KhoError, match="0x3e9 order 0 is not preserved"):
        t.unpreserve_folios([1000, 1001], 0)
    assert list(t.iter_folios()) == before
    assert t.memory_bytes() < 64 << 10


def test_memory_is_proportional_to_touched_bitmaps() -> None:
    t = Tracker()
    for order in range(MAX_ORDER + 1):
        t.preserve_folio(((1 << 40) >> order << order) + (order << 30), order)
    assert t.bitmap_count() == MAX_ORDER + 1
    assert t.memory_bytes() < 200 << 10  # nowhere near the 2**40-page span
    dense = Tracker()
    dense.preserve_folios(np.arange(1 << 20, dtype=np.int64), 0)
    raw = dense.bitmap_count() * 512
    assert raw == 128 << 10
    assert dense.memory_bytes() <= 3 * raw
    dense.unpreserve_folios(np.arange(1 << 20, dtype=np.int64), 0)
    assert dense.bitmap_count() == 0 and dense.memory_bytes() < 16 << 10


def test_stats_union_and_overlap_detection() -> None:
    a, b = Tracker(), Tracker()
    a.preserve_folios(np.arange(0, 8192, dtype=np.int64), 0)
    b.preserve_folios([1 << 20, 2 << 20], 9)
    u = Tracker.union([a, b])
    assert u.count(0) == 8192 and u.count(9) == 2 and u.orders == [0, 9]
    assert [(s.order, s.folios, s.bitmaps, s.bytes) for s in u.stats()] == [
        (0, 8192, 2, 8192 << 12),
        (9, 2, 2, 2 << 21),  # hi 2048 and 4096: bitmaps 0 and 1
    ]
    assert u.find_overlap() is None
    # union does not check overlap; find_overlap does
    c = Tracker()
    c.preserve_folio(4096 + 512, 9)
    clash = Tracker.union([a, c]).find_overlap()
    assert clash == ((4096 + 512, 0), (4096 + 512, 9))
    assert u.contained_mask(
        np.array([5, 1 << 20, (1 << 20) + 7, 9000], dtype=np.int64), 0
    ).tolist() == [
        True,
        True,
        True,
        False,
    ]
    assert u.intersects(8000, 500) and not u.intersects(9000, 100)


@given(st.lists(st.integers(0, 1 << 22), max_size=300, unique=True))
def test_batch_and_scalar_paths_agree(pfns: list[int]) -> None:
    one, many = Tracker(), Tracker()
    for p in pfns:
        one.preserve_folio(p, 0)
    many.preserve_folios(pfns, 0)
    assert one == many
    assert one.runs(0)[1].sum() == len(pfns)
