"""Sessions: named owners of allocations, preservations and a KHO subtree.

A session belongs to the uid that created it. It owns the folios it
allocated or restored; it may preserve only memory it owns, so two
sessions' preservation sets can never overlap and one session's requests
never reach another's memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from khod.kho.handover import SESSION_PROPS
from khod.kho.tracker import Tracker
from khod.kho.tree import Node, Tree, TreeBudget, TreeLimits
from khod.pages import I64, NR_ORDERS, folio_bytes


@dataclass
class IncomingState:
    """What the predecessor handed over for one session name."""

    name: str
    uid: int
    unclaimed: Tracker  # folios not restored yet
    subtree: Node
    claimed: bool = False  # a live session of this name has reattached
    lost: bool = False  # its memory file was gone when the successor started


class Session:
    def __init__(
        self,
        name: str,
        uid: int,
        persistent: bool,
        limits: TreeLimits,
        budget: TreeBudget | None = None,
    ) -> None:
        self.name = name
        self.uid = uid
        self.persistent = persistent
        self.tracker = Tracker()
        self.owned = Tracker()  # what it allocated or restored, as folios (batches vectorized)
        self.tree = Tree(limits=limits, reserved_props=SESSION_PROPS, budget=budget)
        self.connections: set[int] = set()
        self.incoming: IncomingState | None = None
        self._runs: tuple[I64, I64] | None = None
        self._bytes = 0

    # ----------------------------------------------------------------- ownership

    def order_of(self, pfn: int) -> int | None:
        """The order of this session's folio starting at ``pfn``, if it has one there."""
        return self.owned.find_order(pfn)

    def add_alloc(self, pfn: int, order: int) -> None:
        self.owned.preserve_folio(pfn, order)
        self._bytes += folio_bytes(order)
        self._runs = None

    def add_allocs(self, pfns: I64, orders: I64 | int) -> None:
        """Many folios at once (one vectorized update of the bitmaps)."""
        self.owned.preserve_folios(pfns, orders)
        self._bytes += _bytes_of(pfns, orders)
        self._runs = None

    def drop_alloc(self, pfn: int) -> int:
        order = self.owned.find_order(pfn)
        if order is None:
            raise KeyError(pfn)
        self.owned.unpreserve_folio(pfn, order)
        self._bytes -= folio_bytes(order)
        self._runs = None
        return order

    def drop_allocs(self, pfns: I64, orders: I64 | int) -> None:
        self.owned.unpreserve_folios(pfns, orders)
        self._bytes -= _bytes_of(pfns, orders)
        self._runs = None

    def folios(self) -> tuple[I64, I64]:
        """Everything it holds: (pfns, orders)."""
        parts = [(self.owned.folios(o), o) for o in self.owned.orders]
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        pfns = np.concatenate([p for p, _ in parts])
        orders = np.concatenate([np.full(p.size, o, dtype=np.int64) for p, o in parts])
        return pfns, orders

    def _alloc_containing(self, pfn: int) -> tuple[int, int] | None:
        for order in range(NR_ORDERS):
            head = pfn & ~((1 << order) - 1)
            if self.owned.contains(head, order):
                return head, order
        return None

    def owns(self, pfn: int, npages: int) -> bool:
        """Whether every page of ``[pfn, pfn + npages)`` lies in this session's memory."""
        at, end = pfn, pfn + npages
        while at < end:
            hit = self._alloc_containing(at)
            if hit is None:
                return False
            at = hit[0] + (1 << hit[1])
        return True

    def owned_runs(self) -> tuple[I64, I64]:
        """Owned memory as coalesced (start, end) pfn runs, ascending (cached)."""
        if self._runs is None:
            self._runs = self.owned.page_runs()
        return self._runs

    def owned_mask(self, pfns: I64, npages: I64) -> npt.NDArray[np.bool_]:
        """Vectorized :meth:`owns` for many ranges.

        A range that is a folio inside one allocation (the usual case) is
        answered from the bitmaps without touching the rest; only ranges
        spanning several allocations go through the coalesced runs.
        """
        out = np.zeros(pfns.shape, dtype=bool)
        if not self.owned or pfns.size == 0:
            return out
        folio = ((npages & (npages - 1)) == 0) & ((pfns & (npages - 1)) == 0)
        # Folio sizes are powers of two: OR-ing them names every order present at once.
        # (Not np.unique: its first call imports numpy.ma, 20 ms of a request's time.)
        sizes = npages[folio]
        present = int(np.bitwise_or.reduce(sizes)) if sizes.size else 0
        while present:
            n = present & -present
            present ^= n
            at = np.flatnonzero(folio & (npages == n))
            out[at] = self.owned.contained_mask(pfns[at], n.bit_length() - 1)
        rest = np.flatnonzero(~out)
        if rest.size > 64:
            starts, ends = self.owned_runs()
            i = np.searchsorted(starts, pfns[rest], side="right") - 1
            j = np.maximum(i, 0)
            out[rest] = (i >= 0) & (pfns[rest] + npages[rest] <= ends[j])
        else:
            for k in rest.tolist():
                out[k] = self.owns(int(pfns[k]), int(npages[k]))
        return out

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the region this session holds (allocated or restored)."""
        return self._bytes

    @property
    def key(self) -> tuple[int, str]:
        return self.uid, self.name

    def __repr__(self) -> str:
        return f"<Session {self.name!r} uid={self.uid} folios={self.tracker.count()}>"


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED at accept)."""

    pid: int
    uid: int
    gid: int
    operator: bool = False  # root or a member of server.operator_group
    groups: frozenset[int] = field(default_factory=frozenset)
    maps_shared: bool = False  # root or a member of server.memory_group (devmem, dax)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _bytes_of(pfns: I64, orders: I64 | int) -> int:
    if isinstance(orders, int | np.integer):
        return int(pfns.size) * folio_bytes(int(orders))
    return int((np.int64(1) << np.asarray(orders, dtype=np.int64)).sum()) * folio_bytes(0)
