"""Where the store's bytes live: preserved khod folios, or anonymous memory.

Both backings hold the same three things, so :class:`kvdb.Store` does not
care which one it runs on: a superblock page, one index folio (replaced
whole when the table is rebuilt) and a list of 2 MiB data segments.

``KhoMemory`` allocates them from khod, maps them through the passed fd,
preserves each as it is made and keeps the session's KHO subtree saying
where they are: node ``/kvstore`` with ``compatible`` and ``folios``, the
physical addresses (packed little-endian u64) of the superblock, the index
and every segment, in that order. A successor finds everything from that one
property: one ``get_prop``, one ``restore_folios``, one ``mmap`` per run of
adjacent folios. ``AnonMemory`` is the same without khod: the cold start's
baseline and the unit tests.
"""

from __future__ import annotations

import mmap
import time
from typing import Protocol

import numpy as np
from khoclient import Client, Errno, Folio, KhoError

from .kvformat import PAGE, SEGMENT, SEGMENT_ORDER, Header, KvError, damaged

NODE = "/kvstore"
COMPATIBLE = "khoexamples,kvstore-v1"
MAX_ORDER = 18  # khod's largest folio (khod/pages.py)
MAX_FOLIOS = (256 << 10) // 8  # one property holds at most 256 KiB (khod/kho/tree.py)


def order_for(nbytes: int) -> int:
    """The smallest folio order holding ``nbytes``."""
    return max(0, (max(1, -(-nbytes // PAGE)) - 1).bit_length())


class Memory(Protocol):
    superblock: memoryview
    index: memoryview | None
    index_order: int
    index_phys: int
    segments: list[memoryview]
    max_segments: int
    max_index_order: int

    def add_segments(self, count: int) -> None:
        """Append ``count`` zeroed segments; all of them or none."""

    def new_index(self, order: int) -> tuple[memoryview, int]:
        """A zeroed folio of ``order`` for a new index, and its phys (0 without khod)."""

    def swap_index(self, view: memoryview, order: int, phys: int) -> None:
        """Adopt a new index (from :meth:`new_index`) and give up the old one."""

    def rearm(self) -> None:
        """Make the next handover carry this memory (after a warm start); idempotent."""

    def discard(self) -> None:
        """Give the memory up: the store will be rebuilt elsewhere."""

    def close(self) -> None:
        """Let go of every mapping (the memory itself stays with khod)."""


class AnonMemory:
    """Anonymous memory: gone with the process."""

    def __init__(
        self, max_segments: int = MAX_FOLIOS - 2, max_index_order: int = MAX_ORDER
    ) -> None:
        self.superblock = memoryview(mmap.mmap(-1, PAGE))
        self.index: memoryview | None = None
        self.index_order = 0
        self.index_phys = 0
        self.segments: list[memoryview] = []
        self.max_segments = max_segments
        self.max_index_order = max_index_order

    def add_segments(self, count: int) -> None:
        if count <= 0:
            return
        if len(self.segments) + count > self.max_segments:
            raise KvError("ENOSPC", f"the store is full: {self.max_segments} data segments")
        run = memoryview(mmap.mmap(-1, count * SEGMENT))
        self.segments.extend(run[i * SEGMENT : (i + 1) * SEGMENT] for i in range(count))

    def new_index(self, order: int) -> tuple[memoryview, int]:
        check_index_order(order, self.max_index_order)
        return memoryview(mmap.mmap(-1, PAGE << order)), 0

    def swap_index(self, view: memoryview, order: int, phys: int) -> None:
        self.index, self.index_order, self.index_phys = view, order, phys

    def rearm(self) -> None:
        pass

    def discard(self) -> None:
        self.close()

    def close(self) -> None:
        self.segments.clear()
        self.index = None


def check_index_order(order: int, limit: int) -> None:
    if order > limit:
        raise KvError(
            "ENOSPC", f"the index would need an order-{order} folio, above the largest ({limit})"
        )


def folio_list(raw: bytes) -> list[int]:
    """The ``folios`` property: superblock, index, then segments, as u64 addresses."""
    if len(raw) % 8 or len(raw) < 16:
        raise damaged(f"{NODE}/folios holds {len(raw)} bytes, not 2 or more u64 addresses")
    return np.frombuffer(raw, dtype="<u8").tolist()  # type: ignore[no-any-return]


def _folios(client: Client, tree: str) -> list[int] | None:
    """The ``folios`` property of the session's incoming or outgoing tree, if it has one."""
    try:
        return folio_list(client.get_prop(NODE, "folios", tree=tree))
    except KhoError as exc:
        if exc.code != Errno.ENOENT:
            raise
        return None


def map_runs(c: Client, phys: list[int], size: int) -> list[memoryview]:
    """One view per folio of ``size`` bytes, one mmap per run of physically adjacent ones."""
    views: list[memoryview] = []
    i = 0
    while i < len(phys):
        j = i + 1
        while j < len(phys) and phys[j] == phys[j - 1] + size:
            j += 1
        run = c.map_phys(phys[i], (j - i) * size)
        views.extend(run[k * size : (k + 1) * size] for k in range(j - i))
        i = j
    return views


class KhoMemory:
    """Preserved folios of one khod session, described by the session's KHO subtree."""

    def __init__(
        self,
        client: Client,
        superblock: Folio,
        index: Folio | None = None,
        segments: list[int] | None = None,
        *,
        armed: bool = True,
        published: bool = False,
    ) -> None:
        self.client = client
        self.sb_phys = superblock.phys
        self.superblock = client.map(superblock)
        self.index: memoryview | None = client.map(index) if index else None
        self.index_order = index.order if index else 0
        self.index_phys = index.phys if index else 0
        self.seg_phys: list[int] = list(segments or [])
        self.segments = map_runs(client, self.seg_phys, SEGMENT)
        self.max_segments = MAX_FOLIOS - 2
        self.max_index_order = MAX_ORDER
        self.armed = armed
        self.restored_at: float | None = None  # when restore_folios returned
        self.phases: dict[str, float] = {}  # how long a warm start's steps took
        self._published: bytes | None = None
        if published:
            self._published = np.asarray(self.folios(), dtype="<u8").tobytes()

    @classmethod
    def create(cls, client: Client) -> KhoMemory:
        """A new store's memory: a preserved superblock page, nothing else yet."""
        sb = client.alloc_folio(0)
        try:
            client.preserve_folio(sb)
        except BaseException:
            client.free_folio(sb)
            raise
        return cls(client, sb)

    @classmethod
    def find(cls, client: Client) -> KhoMemory | None:
        """This session's store memory, if there is one; mapped in place, nothing else.

        Either it was handed over (the incoming tree names it): then it is
        restored, in one ``restore_folios``, and not preserved again until
        :meth:`rearm`, so a warm start does only this before it serves. Or
        it is still this daemon's: an earlier process of the store stopped
        or crashed, and the outgoing tree names it.
        """
        handed: list[int] | None = None
        if client.hello_info.get("incoming"):
            handed = _folios(client, "in")
        if handed is not None:
            t0 = time.perf_counter()
            try:
                folios = client.restore_folios(handed)
            except KhoError as exc:
                if exc.code != Errno.ENOENT:
                    raise
            else:
                t1 = time.perf_counter()
                orders = [f.order for f in folios]
                if orders[0] != 0 or any(o != SEGMENT_ORDER for o in orders[2:]):
                    raise damaged(
                        f"restored folio orders {orders[:4]}...: expected a page, the index, "
                        f"then order {SEGMENT_ORDER}"
                    )
                mem = cls(client, folios[0], folios[1], [f.phys for f in folios[2:]], armed=False)
                mem.restored_at = time.time()
                mem.phases = {
                    "restore_ms": (t1 - t0) * 1e3,
                    "map_ms": (time.perf_counter() - t1) * 1e3,
                }
                return mem
        own = _folios(client, "out")
        if own is not None:
            return cls.adopt(client, own)
        if handed is not None:
            # restored by an earlier process of this store that stopped before
            # it preserved them again: they are this session's, as they are
            return cls.adopt(client, handed, armed=False)
        return None

    @classmethod
    def adopt(cls, client: Client, phys: list[int], armed: bool = True) -> KhoMemory:
        """Map folios this session already holds; the index's order is the superblock's."""
        sb = Folio(phys[0], 0)
        order = Header.index_order_of(client.map(sb))
        return cls(client, sb, Folio(phys[1], order), phys[2:], armed=armed, published=armed)

    def discard(self) -> None:
        """Give every folio back to khod and drop the subtree (the store starts afresh)."""
        c = self.client
        held = [(self.sb_phys, 0)] + [(p, SEGMENT_ORDER) for p in self.seg_phys]
        if self.index is not None:
            held.append((self.index_phys, self.index_order))
        phys, orders = [p for p, _ in held], [o for _, o in held]
        if self.armed:
            c.unpreserve_folios(phys, orders)
        if self._published is not None:
            c.remove_node(NODE)
        self.close()
        c.free_folios(phys)

    def add_segments(self, count: int) -> None:
        if count <= 0:
            return
        if len(self.seg_phys) + count > self.max_segments:
            raise KvError("ENOSPC", f"the store is full: {self.max_segments} data segments")
        self.rearm()
        c = self.client
        folios = c.alloc_folios(SEGMENT_ORDER, count)
        phys = [f.phys for f in folios]
        try:
            c.preserve_folios(phys, SEGMENT_ORDER)
        except BaseException:
            c.free_folios(phys)
            raise
        try:
            views = map_runs(c, phys, SEGMENT)
            self.seg_phys.extend(phys)
            self.publish()
        except BaseException:
            del self.seg_phys[len(self.seg_phys) - count :]
            c.unpreserve_folios(phys, SEGMENT_ORDER)
            c.free_folios(phys)
            raise
        self.segments.extend(views)

    def new_index(self, order: int) -> tuple[memoryview, int]:
        check_index_order(order, self.max_index_order)
        self.rearm()
        c = self.client
        folio = c.alloc_folio(order)
        try:
            c.preserve_folio(folio)
            return c.map(folio), folio.phys
        except BaseException:
            c.free_folio(folio)
            raise

    def swap_index(self, view: memoryview, order: int, phys: int) -> None:
        prev = (self.index, self.index_order, self.index_phys)
        self.index, self.index_order, self.index_phys = view, order, phys
        try:
            self.publish()
        except BaseException:
            self.index, self.index_order, self.index_phys = prev
            self.client.unpreserve_folio(phys, order)
            self.client.free_folio(phys)
            raise
        if prev[0] is not None:
            self.client.unpreserve_folio(prev[2], prev[1])
            self.client.free_folio(prev[2])

    def folios(self) -> list[int]:
        return [self.sb_phys, self.index_phys, *self.seg_phys]

    def publish(self) -> None:
        """Make the subtree describe the folios as they are now (once there is an index)."""
        if self.index is None:
            return
        raw = np.asarray(self.folios(), dtype="<u8").tobytes()
        if raw == self._published:
            return
        c = self.client
        if self._published is None:
            c.add_node(NODE)
            c.add_string_prop(NODE, "compatible", COMPATIBLE)
        else:
            c.remove_prop(NODE, "folios")
        try:
            c.add_prop(NODE, "folios", raw)
        except BaseException:
            if self._published is not None:  # it fitted before: the tree says what is true
                c.add_prop(NODE, "folios", self._published)
            raise
        self._published = raw

    def rearm(self) -> None:
        """Preserve the restored folios again and describe them again, for the next update."""
        if self.armed:
            return
        phys = self.folios()
        orders = [0, self.index_order] + [SEGMENT_ORDER] * len(self.seg_phys)
        self.client.preserve_folios(phys, orders)
        self.armed = True
        self.publish()

    def close(self) -> None:
        self.segments.clear()
        self.index = None
