"""The engine: sessions, their memory, preservation and restore (docs/design.md §3).

Plain Python over the region, the allocator and the format core, with no
sockets or waiting: the request handlers call these methods with the
caller's session and turn results and :class:`KhoError` into replies.

The engine owns two facts that the lifecycle (:mod:`khod.lifecycle`) sets
and nobody else: ``held`` -- a handover is being prepared or is committed,
so sessions are kept even when their last connection closes -- and
``frozen`` -- preservation and tree edits are refused. :meth:`_editable` is
the one place that refuses an edit after the freeze. Every method runs to
completion on the event loop thread, so no edit can be half-done when the
lifecycle freezes. While a handover is committed, none of its memory can be
freed (:meth:`_freeable`).

A successor leaves the predecessor's handover record on the region, and its
metadata pages reserved, for as long as the memory it describes is intact:
restored folios stay where they are and belong to their owners as before.
Only freeing such a folio or releasing unclaimed memory contradicts it
(:meth:`_take_over`). Until then a successor that dies, stops or unfreezes
leaves that handover on the region for the next start to take in whole.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from khod.allocator import Allocator
from khod.config import MAX_SESSION_NODES
from khod.errors import Errno, KhoError, ebusy, einval, enoent, enomem, eperm
from khod.faults import FaultPoint
from khod.kho.handover import (
    FDT_FIXED_BYTES,
    ROOT_NAMES,
    Committed,
    Hook,
    SessionImage,
    SessionKey,
    commit,
    no_hook,
    session_node,
    session_node_bytes,
)
from khod.kho.memory import ScratchRange
from khod.kho.record import HandoverRecord, RecordState, live_record, write_record
from khod.kho.tracker import Tracker
from khod.kho.tree import (
    Node,
    Tree,
    TreeBudget,
    TreeLimits,
    check_node_name,
    descend,
    split_path,
)
from khod.memfiles import MemoryFiles
from khod.pages import I64, PAGE_SHIFT, PAGE_SIZE, folio_bytes, split_range, split_ranges
from khod.region import Region
from khod.results import CommitSummary, DropResult, NodeListing, ReleaseResult, SessionBytes
from khod.session import IncomingState, Session


@dataclass(frozen=True)
class EngineLimits:
    max_sessions: int = MAX_SESSION_NODES  # live and carried-forward sessions together
    max_batch: int = 1 << 20
    tree: TreeLimits = field(default_factory=TreeLimits)  # one session's tree
    tree_total_nodes: int = 1 << 14  # all trees of one handover
    tree_total_bytes: int = 4 << 20
    # what one user (root excepted) may hold, so that others keep room
    uid_max_bytes: int = 1 << 62
    uid_max_sessions: int = 64
    uid_max_tree_bytes: int = 1 << 20


@dataclass(frozen=True)
class PendingHandover:
    """The handover a successor populated from, still on the region until taken over."""

    record: HandoverRecord
    metadata: tuple[tuple[int, int], ...]  # (pfn, pages) runs of its chunk, bitmap, FDT pages
    folios: Tracker  # every folio it holds


class Engine:
    def __init__(
        self,
        region: Region,
        allocator: Allocator,
        scratch: ScratchRange,
        generation: int,
        *,
        pid: int,
        limits: EngineLimits | None = None,
        incoming: dict[SessionKey, IncomingState] | None = None,
        incoming_fdt: bytes | None = None,
        pending: PendingHandover | None = None,
        memory: MemoryFiles | None = None,
        hook: Hook = no_hook,
    ) -> None:
        self.region = region
        self.allocator = allocator
        self.scratch = scratch
        self.generation = generation
        self.pid = pid  # the owner the region's live record names
        self.limits = limits or EngineLimits()
        self.sessions: dict[SessionKey, Session] = {}
        self.incoming: dict[SessionKey, IncomingState] = incoming or {}
        self.memory = memory or MemoryFiles(region)  # where clients' bytes live
        self.incoming_fdt = incoming_fdt
        self.pending = pending
        self.hook = hook
        self.held = False
        self.frozen = False
        self.committed: Committed | None = None
        lim = self.limits
        self.budget = TreeBudget(lim.tree_total_nodes, lim.tree_total_bytes)
        self._uid_budgets: dict[int, TreeBudget] = {}
        # bitmaps of every tracker the next handover writes: what its chunk lists will take
        self._bitmaps: dict[tuple[str, SessionKey], int] = {}
        self._bitmaps_total = 0
        self._reattached = 0  # live sessions that took an incoming one's name (counted once)
        fdt_pages = -(-(lim.tree_total_bytes + FDT_FIXED_BYTES) // PAGE_SIZE)
        self._fdt_pages = 1 << max(0, (fdt_pages - 1).bit_length())  # one block of 2^k pages
        for k, inc in self.incoming.items():  # carried forward until released
            self.tree_budget(k[0]).charge(*_subtree_cost(k, inc.subtree), force=True)
            self._count(("in", k), inc.unclaimed)

    # ================================================================= sessions

    def hello(self, uid: int, name: str, persistent: bool, conn: int) -> tuple[Session, bool]:
        """Create or reattach session ``(uid, name)`` on connection ``conn``.

        Sessions of different users never meet: two uids may both have a
        session "db". Returns the session and whether it was created.
        """
        check_node_name(name)
        if "@" in name or name in ROOT_NAMES:
            raise einval(f"session name {name!r} is reserved or not allowed")
        key = (uid, name)
        s = self.sessions.get(key)
        created = s is None
        if s is not None:
            s.persistent = s.persistent or persistent  # a reattach never downgrades
        else:
            inc = self.incoming.get(key)
            if inc is None:
                self._room_for_session(uid, name)
            # its node is already in the handover when it was handed over: always room
            budget = self.tree_budget(uid)
            budget.charge(1, session_node_bytes(key), force=inc is not None)
            if inc is None:
                try:
                    self.memory.ensure(key)  # from now on, missing means lost
                except BaseException:
                    budget.release(1, session_node_bytes(key))
                    raise
            s = Session(name, uid, persistent, self.limits.tree, budget)
            if inc is not None:
                inc.claimed = True
                s.incoming = inc
                self._reattached += 1
            self.sessions[key] = s
        s.connections.add(conn)
        return s, created

    def detach(self, s: Session, conn: int) -> bool:
        """Connection ``conn`` of ``s`` closed; returns True if the session was discarded."""
        s.connections.discard(conn)
        if not s.connections and not s.persistent and not self.held:
            self.discard(s)
            return True
        return False

    def discard(self, s: Session) -> None:
        """Drop a session with everything it preserved and allocated (LUO's close rule).

        Memory handed over to it and not restored yet stays, for whoever takes
        that name next or for the next handover.
        """
        s.tracker = Tracker()
        self._count(("out", s.key), s.tracker)
        self.free_blocks(s, *s.folios())
        if s.incoming is not None:
            s.incoming.claimed = False
            if self.sessions.get(s.key) is s:  # (a second discard counts nothing)
                self._reattached -= 1
        else:
            self.memory.drop(s.key)
        s.tree.budget.release(s.tree.nodes, s.tree.size + session_node_bytes(s.key))
        self.sessions.pop(s.key, None)

    def _session_keys(self) -> set[SessionKey]:
        """Every session node the next handover would hold: live and handed-over ones."""
        return set(self.sessions) | set(self.incoming)

    def _room_for_session(self, uid: int, name: str) -> None:
        keys = self._session_keys()
        if len(keys) >= self.limits.max_sessions:
            raise enomem(
                f"{len(keys)} sessions exist, live or handed over (limits.max_sessions); "
                f"no room for {name!r}"
            )
        mine = sum(1 for k in keys if k[0] == uid)
        if uid != 0 and mine >= self.limits.uid_max_sessions:
            raise enomem(
                f"uid {uid} has {mine} sessions, live or handed over "
                f"(limits.uid_max_sessions); no room for {name!r}"
            )

    def tree_budget(self, uid: int) -> TreeBudget:
        """One user's share of the handover's tree budget (root's is the whole)."""
        if uid == 0:
            return self.budget
        b = self._uid_budgets.get(uid)
        if b is None:
            b = TreeBudget(
                1 << 62,
                self.limits.uid_max_tree_bytes,
                parent=self.budget,
                whose=f"uid {uid}'s sessions",
                keys=("", "limits.uid_max_tree_bytes"),
            )
            self._uid_budgets[uid] = b
        return b

    def uid_bytes(self, uid: int) -> int:
        """Bytes of the region held by the sessions of ``uid``."""
        return sum(s.allocated_bytes for s in self.sessions.values() if s.uid == uid)

    def _quota(self, s: Session, nbytes: int) -> None:
        """Refuse an allocation that would take ``s``'s user past its share of the region."""
        if s.uid == 0:
            return
        held, most = self.uid_bytes(s.uid), self.limits.uid_max_bytes
        if held + nbytes > most:
            raise enomem(
                f"uid {s.uid} holds {held} bytes of the region; {nbytes} more would pass its "
                f"share, {most} (limits.uid_max_bytes)"
            )

    # ================================================================= the metadata reserve

    def _count(self, which: tuple[str, SessionKey], tracker: Tracker) -> None:
        """Keep the count of bitmaps the next handover writes for one tracker."""
        n = tracker.bitmap_count()
        self._bitmaps_total += n - self._bitmaps.get(which, 0)
        self._bitmaps[which] = n

    def metadata_need(self) -> int:
        """Pages the next finalize may need for its metadata: no client may take them.

        An upper bound: the root list and the sessions' lists describe every
        bitmap twice, eight bitmaps to a page and 255 to a chunk page, plus a
        chunk page per order in use of every list, and the largest FDT the
        tree budget allows (docs/design.md §3).
        """
        b = self._bitmaps_total
        # len(self._session_keys()) without building the set: this runs on every preserve
        lists = len(self.sessions) + len(self.incoming) - self._reattached + 1
        return -(-2 * b // 8) + -(-2 * b // 255) + 20 * lists + self._fdt_pages

    def _room_for_metadata(self) -> None:
        need, free = self.metadata_need(), self.allocator.free_pages
        if free < need:
            raise enomem(
                f"preserving this would leave {free} free pages where the handover's metadata "
                f"may need {need} (a reserve no session may use)"
            )

    def _preserved(self, s: Session, undo: Callable[[], object]) -> None:
        """After ``s`` preserved more: recount, and undo it if the reserve is short."""
        self._count(("out", s.key), s.tracker)
        try:
            self._room_for_metadata()
        except KhoError:
            undo()
            self._count(("out", s.key), s.tracker)
            raise

    def sweep(self) -> list[Session]:
        """Discard non-persistent sessions left without a connection; returns them."""
        gone = [s for s in self.sessions.values() if not s.connections and not s.persistent]
        for s in gone:
            self.discard(s)
        return gone

    # ================================================================= checks

    def _editable(self, what: str) -> None:
        """The freeze: after it, nothing that goes into the handover may change."""
        if self.frozen:
            raise ebusy(f"{what} is frozen for finalize; try again after unfreeze")

    def _pfn(self, phys: int, npages: int = 1, what: str = "phys") -> int:
        if phys % PAGE_SIZE:
            raise einval(f"{what} {phys:#x} is not page-aligned")
        pfn = phys >> PAGE_SHIFT
        if not self.allocator.in_region(pfn, npages):
            raise einval(
                f"{what} {phys:#x}+{npages << PAGE_SHIFT:#x} is outside the region "
                f"{self.region.base:#x}+{self.region.size:#x}"
            )
        return pfn

    def _split(self, phys: int, size: int) -> list[tuple[int, int]]:
        """A page-aligned range inside the region as folios (docs/format.md §5)."""
        if size <= 0 or size % PAGE_SIZE:
            raise einval(f"size {size:#x} is not a positive multiple of the page size")
        npages = size >> PAGE_SHIFT
        return split_range(self._pfn(phys, npages), npages)

    def _batch_pfns(self, phys: I64) -> I64:
        """pfns of a batch: within the size limit, page-aligned, not below the region."""
        if phys.size > self.limits.max_batch:
            raise einval(f"{phys.size} folios in one batch; at most {self.limits.max_batch}")
        if phys.size and (np.any(phys % PAGE_SIZE) or phys.min() < self.region.base):
            bad = phys[(phys % PAGE_SIZE != 0) | (phys < self.region.base)][0]
            raise einval(f"phys {int(bad):#x} is misaligned or outside the region")
        return phys >> PAGE_SHIFT

    def _batch_orders(
        self,
        pfns: I64,
        orders: int | I64 | None,
        lookup: Tracker,
        missing: tuple[Errno, str],
    ) -> int | I64:
        """The batch's orders: as given, or looked up in ``lookup`` (``missing``: code and what)."""
        if orders is None:
            found = lookup.find_orders(pfns)
            if pfns.size and int(found.min()) < 0:
                p = int(pfns[np.flatnonzero(found < 0)[0]]) << PAGE_SHIFT
                raise KhoError(missing[0], f"{p:#x} is not {missing[1]}: give the order")
            orders = found
        npages = np.int64(1) << (orders if isinstance(orders, np.ndarray) else np.int64(orders))
        if pfns.size and int((pfns + npages).max()) > (self.region.end >> PAGE_SHIFT):
            raise einval("a folio of the batch runs past the end of the region")
        return orders

    def _not_owned(self, s: Session, pfn: int, order: int) -> KhoError:
        return eperm(
            f"phys {pfn << PAGE_SHIFT:#x} order {order} is not memory session "
            f"{s.name!r} allocated or restored"
        )

    # ================================================================= memory

    def alloc_folio(self, s: Session, order: int) -> int:
        self._quota(s, folio_bytes(order))
        pfn = self.allocator.alloc(order, keep=self.metadata_need())
        s.add_alloc(pfn, order)
        return pfn << PAGE_SHIFT

    def alloc_folios(self, s: Session, order: int, count: int) -> I64:
        """``count`` folios of ``order``, all or none; their phys, as an array."""
        self._quota(s, count * folio_bytes(order))
        pfns = self.allocator.alloc_many(order, count, keep=self.metadata_need())
        s.add_allocs(pfns, order)
        return pfns << PAGE_SHIFT

    def _freeable(self, s: Session, phys: int) -> int:
        """The pfn of ``s``'s allocation at ``phys``, if it may be freed now.

        Never while it holds preserved memory, nor while it is part of a
        committed handover (a carried-forward folio restored after finalize).
        """
        pfns, _ = self.freeable(s, np.array([phys], dtype=np.int64))
        return int(pfns[0])

    def free_folio(self, s: Session, phys: int) -> None:
        self.free_blocks(s, *self.freeable(s, np.array([phys], dtype=np.int64)))

    def freeable(self, s: Session, phys: I64) -> tuple[I64, I64]:
        """The (pfns, orders) of ``s``'s allocations at ``phys`` if all may be freed now.

        Nothing changes; a batch naming one folio twice is refused when it is
        freed (:meth:`free_blocks`), before anything changes.
        """
        bad = (phys % PAGE_SIZE != 0) | (phys < self.region.base) | (phys >= self.region.end)
        if bad.any():
            p = int(phys[np.flatnonzero(bad)[0]])
            self._pfn(p)  # names the fault
        pfns = phys >> PAGE_SHIFT
        orders = s.owned.find_orders(pfns)
        if orders.size and int(orders.min()) < 0:
            p = int(phys[np.flatnonzero(orders < 0)[0]])
            raise enoent(f"session {s.name!r} has no allocation starting at {p:#x}")
        held = s.tracker.overlap_mask(pfns, orders)
        if held.any():
            i = int(np.flatnonzero(held)[0])
            raise ebusy(
                f"folio {int(phys[i]):#x} order {int(orders[i])} holds preserved memory; "
                "unpreserve first"
            )
        c = self.committed
        if c is not None:
            held = c.tracker.overlap_mask(pfns, orders)
            if held.any():
                i = int(np.flatnonzero(held)[0])
                raise ebusy(
                    f"folio {int(phys[i]):#x} order {int(orders[i])} is part of the committed "
                    f"handover of generation {c.record.generation}; it stays until unfreeze"
                )
        return pfns, orders

    def free_folios(self, s: Session, phys: I64) -> int:
        pfns, orders = self.freeable(s, phys)
        self.free_blocks(s, pfns, orders)
        return int(pfns.size)

    def check_quota(self, s: Session, nbytes: int) -> None:
        """Refuse now what an allocation of ``nbytes`` would refuse (for sliced requests)."""
        self._quota(s, nbytes)

    # ================================================================= preservation

    def preserve_folio(self, s: Session, phys: int, order: int | None = None) -> int:
        self._editable("preservation")
        pfn = self._pfn(phys)
        if order is None:
            order = s.order_of(pfn)
            if order is None:
                raise einval(f"{phys:#x} is not the start of an allocation: give the order")
        if pfn & ((1 << order) - 1):
            raise einval(f"phys {phys:#x} is not aligned to order {order}")
        self._pfn(phys, 1 << order)
        if not s.owns(pfn, 1 << order):
            raise self._not_owned(s, pfn, order)
        s.tracker.preserve_folio(pfn, order)
        self._preserved(s, lambda: s.tracker.unpreserve_folio(pfn, order))
        return order

    def unpreserve_folio(self, s: Session, phys: int, order: int | None = None) -> int:
        self._editable("preservation")
        pfn = self._pfn(phys)
        if order is None:
            order = s.tracker.find_order(pfn)
            if order is None:
                raise enoent(f"no folio of session {s.name!r} is preserved at {phys:#x}")
        s.tracker.unpreserve_folio(pfn, order)
        self._count(("out", s.key), s.tracker)
        return order

    def preserve_folios(self, s: Session, phys: I64, orders: int | I64 | None) -> int:
        self._editable("preservation")
        pfns = self._batch_pfns(phys)
        ords = self._batch_orders(pfns, orders, s.owned, _NOT_ALLOCATED)
        npages = np.int64(1) << (ords if isinstance(ords, np.ndarray) else np.int64(ords))
        owned = s.owned_mask(pfns, np.broadcast_to(npages, pfns.shape))
        if not owned.all():
            i = int(np.flatnonzero(~owned)[0])
            o = int(ords[i]) if isinstance(ords, np.ndarray) else ords
            raise self._not_owned(s, int(pfns[i]), o)
        n = s.tracker.preserve_folios(pfns, ords)
        self._preserved(s, lambda: s.tracker.unpreserve_folios(pfns, ords))
        return n

    def unpreserve_folios(self, s: Session, phys: I64, orders: int | I64 | None) -> int:
        self._editable("preservation")
        pfns = self._batch_pfns(phys)
        ords = self._batch_orders(pfns, orders, s.tracker, _NOT_PRESERVED)
        n = s.tracker.unpreserve_folios(pfns, ords)
        self._count(("out", s.key), s.tracker)
        return n

    def _range_folios(
        self, phys: I64, sizes: I64, ordered: bool = False, limit: int | None = None
    ) -> tuple[I64, I64, I64]:
        """Page-aligned ranges in the region as folios (docs/format.md §5), vectorized.

        Every range is checked before any is split, and the split stops at
        ``max_batch`` folios: a request cannot make the daemon build more.
        """
        if phys.size > self.limits.max_batch:
            raise einval(f"{phys.size} ranges in one batch; at most {self.limits.max_batch}")
        bad = np.flatnonzero((sizes <= 0) | (sizes % PAGE_SIZE != 0))
        if bad.size:
            raise einval(
                f"size {int(sizes[bad[0]]):#x} is not a positive multiple of the page size"
            )
        bad = np.flatnonzero(
            (phys % PAGE_SIZE != 0) | (phys < self.region.base) | (phys > self.region.end - sizes)
        )
        if bad.size:
            i = int(bad[0])
            raise einval(
                f"range {int(phys[i]):#x}+{int(sizes[i]):#x} is misaligned or outside the region "
                f"{self.region.base:#x}+{self.region.size:#x}"
            )
        pfns, npages = phys >> PAGE_SHIFT, sizes >> PAGE_SHIFT
        most = self.limits.max_batch if limit is None else limit
        return split_ranges(pfns, npages, most, ordered=ordered)

    def preserve_ranges(
        self, s: Session, phys: I64, sizes: I64, limit: int | None = None
    ) -> tuple[I64, I64]:
        """Preserve page-aligned ranges of ``s``'s memory; all or nothing. (pfns, orders)."""
        self._editable("preservation")
        pfns, npages = phys >> PAGE_SHIFT, sizes >> PAGE_SHIFT
        owned = s.owned_mask(pfns, npages)  # ownership per range, before any splitting
        if phys.size and not owned.all():
            i = int(np.flatnonzero(~owned)[0])
            raise eperm(
                f"range {int(phys[i]):#x}+{int(sizes[i]):#x} is not memory session {s.name!r} "
                "allocated or restored"
            )
        folios, orders, _ = self._range_folios(phys, sizes, phys.size == 1, limit)
        s.tracker.preserve_folios(folios, orders)
        self._preserved(s, lambda: s.tracker.unpreserve_folios(folios, orders))
        return folios, orders

    def unpreserve_ranges(
        self, s: Session, phys: I64, sizes: I64, limit: int | None = None
    ) -> tuple[I64, I64]:
        """Unpreserve ranges preserved as such: each must name its folios exactly."""
        self._editable("preservation")
        folios, orders, _ = self._range_folios(phys, sizes, phys.size == 1, limit)
        s.tracker.unpreserve_folios(folios, orders)
        self._count(("out", s.key), s.tracker)
        return folios, orders

    # ================================================================= tree (outgoing)

    def editable_tree(self, s: Session) -> Tree:
        """``s``'s outgoing tree, to edit now; refused after the freeze."""
        self._editable("the KHO tree")
        return s.tree

    def get_node(self, s: Session, path: str, which: str) -> NodeListing:
        node = self._tree_node(s, path, which)
        return NodeListing(tuple(sorted(node.props)), tuple(sorted(node.children)))

    def get_prop(self, s: Session, path: str, name: str, which: str) -> bytes:
        node = self._tree_node(s, path, which)
        if name not in node.props:
            raise enoent(f"no property {name!r} in {path} ({which})")
        return node.props[name]

    def _tree_node(self, s: Session, path: str, which: str) -> Node:
        if which == "out":
            return s.tree.get_node(path)
        if which != "in":
            raise einval(f"tree must be 'in' or 'out', not {which!r}")
        where = f" in the incoming tree of {s.name!r}"
        return descend(self._incoming_of(s).subtree, split_path(path), where)

    def fdt(self, which: str) -> bytes:
        if which == "out":
            if self.committed is None:
                raise enoent("no outgoing FDT: the daemon is not finalized")
            return self.committed.fdt
        if which == "in":
            if self.incoming_fdt is None:
                raise enoent("no incoming FDT: this daemon did not start from a handover")
            return self.incoming_fdt
        raise einval(f"fdt must be 'in' or 'out', not {which!r}")

    # ================================================================= restore (successor)

    def _incoming_of(self, s: Session) -> IncomingState:
        if s.incoming is None:
            raise enoent(f"no memory was handed over for session {s.name!r}")
        if s.incoming.lost:
            raise enoent(
                f"the memory of session {s.name!r} (uid {s.uid}) was handed over, but its file "
                "was gone when this daemon started: nothing of it can be restored"
            )
        return s.incoming

    def _not_incoming(self, s: Session, pfn: int) -> KhoError:
        return enoent(
            f"{pfn << PAGE_SHIFT:#x} is not the start of an unrestored folio handed over "
            f"for session {s.name!r}"
        )

    def restore_folio(self, s: Session, phys: int) -> int:
        """Take back one incoming folio: owner only, at its start, once; returns its order."""
        inc = self._incoming_of(s)
        pfn = self._pfn(phys)
        order = inc.unclaimed.find_order(pfn)
        if order is None:
            raise self._not_incoming(s, pfn)
        self.allocator.claim(pfn, order)
        inc.unclaimed.unpreserve_folio(pfn, order)
        self._count(("in", s.key), inc.unclaimed)
        s.add_alloc(pfn, order)
        return order

    def restorable(self, s: Session, pfns: I64) -> I64:
        """The orders of incoming folios of ``s`` starting at ``pfns``, if all can be restored."""
        inc = self._incoming_of(s)
        orders = inc.unclaimed.find_orders(pfns)
        if orders.size and int(orders.min()) < 0:
            raise self._not_incoming(s, int(pfns[np.flatnonzero(orders < 0)[0]]))
        return orders

    def claim(self, s: Session, pfns: I64, orders: I64) -> None:
        """Restore incoming folios :meth:`restorable` accepted; all or none.

        The incoming set is updated first: it refuses a batch that names a
        folio twice before anything else changes.
        """
        inc = self._incoming_of(s)
        try:
            inc.unclaimed.unpreserve_folios(pfns, orders)
        except KhoError as e:
            raise einval(f"restore_folios: {e.message}") from None
        try:
            self.allocator.claim_many(pfns, orders)
        except BaseException:
            inc.unclaimed.preserve_folios(pfns, orders)
            raise
        s.add_allocs(pfns, orders)
        self._count(("in", s.key), inc.unclaimed)

    def restore_pfns(self, phys: I64) -> I64:
        """A restore batch's pfns: within the batch limit, page-aligned, in the region."""
        pfns = self._batch_pfns(phys)
        if pfns.size and int(pfns.max()) >= self.region.end >> PAGE_SHIFT:
            raise einval(f"phys {int(phys.max()):#x} is outside the region")
        return pfns

    def restore_folios(self, s: Session, phys: I64) -> I64:
        """Restore many incoming folios; every one is checked before any is taken."""
        pfns = self.restore_pfns(phys)
        orders = self.restorable(s, pfns)
        self.claim(s, pfns, orders)
        return orders

    def restore_phys(self, s: Session, phys: int, size: int) -> list[tuple[int, int]]:
        """Restore a range preserved with ``preserve_phys``; all of its folios or none."""
        inc = self._incoming_of(s)
        folios = self._split(phys, size)
        for pfn, order in folios:
            if not inc.unclaimed.contains(pfn, order):
                raise enoent(
                    f"range {phys:#x}+{size:#x}: folio {pfn << PAGE_SHIFT:#x} order {order} "
                    "is not an unrestored incoming folio of this session"
                )
        for pfn, order in folios:
            self.allocator.claim(pfn, order)
            inc.unclaimed.unpreserve_folio(pfn, order)
            s.add_alloc(pfn, order)
        self._count(("in", s.key), inc.unclaimed)
        return [(p << PAGE_SHIFT, o) for p, o in folios]

    def release_unclaimed(self, name: str | None = None, uid: int | None = None) -> ReleaseResult:
        """Free incoming memory nobody restored, and forget unreattached sessions' subtrees.

        All of it, or that of sessions called ``name`` (of ``uid``, if given).
        """
        keys = sorted(
            k
            for k in self.incoming
            if (name is None or k[1] == name) and (uid is None or k[0] == uid)
        )
        if name is not None and not keys:
            raise enoent(f"no incoming session {name!r}")
        self._take_over()
        released = 0
        dropped: list[SessionKey] = []
        for k in keys:
            inc = self.incoming[k]
            runs: list[tuple[int, int]] = []
            for order in inc.unclaimed.orders:
                first, count = inc.unclaimed.runs(order)
                for pfn, c in zip(first.tolist(), count.tolist(), strict=True):
                    self.allocator.unreserve_pages(pfn, c << order)
                    runs.append((pfn, c << order))
            self.memory.punch(k, runs)
            released += inc.unclaimed.total_bytes()
            inc.unclaimed = Tracker()
            self._count(("in", k), inc.unclaimed)
            self.tree_budget(k[0]).release(*_subtree_cost(k, inc.subtree))
            if not inc.claimed:
                del self.incoming[k]
                self.memory.drop(k)
                dropped.append(k)
            else:
                inc.subtree = Node()
                self.tree_budget(k[0]).charge(*_subtree_cost(k, inc.subtree), force=True)
        return ReleaseResult(
            released, tuple(k[1] for k in dropped), tuple(session_node(k) for k in dropped)
        )

    def drop_session(self, uid: int, name: str) -> DropResult:
        """Discard session ``(uid, name)`` for good: its live part, what was handed over
        to it, its tree and its memory. Returns what was given back; the caller closes
        the session's connections (``connections_closed`` counts them)."""
        key = (uid, name)
        s, inc = self.sessions.get(key), self.incoming.get(key)
        if s is None and inc is None:
            raise enoent(f"no session {name!r} of uid {uid}, live or handed over")
        freed = released = conns = 0
        if s is not None:
            freed, conns = s.allocated_bytes, len(s.connections)
            s.connections.clear()
            self.discard(s)
        if inc is not None:
            released = self.release_unclaimed(name, uid).released_bytes
        return DropResult(name, uid, freed, released, conns)

    def _take_over(self) -> None:
        """Make the pending handover ours: the region says live, its metadata pages are free.

        Called before the first change that contradicts what it describes.
        A committed handover of our own stays the region's record.
        """
        p = self.pending
        if p is None:
            return
        self.hook(FaultPoint.TAKE_OVER)
        if self.committed is None:
            rec = live_record(self.region, self.scratch, self.generation, self.pid)
            write_record(self.region, rec)
        for pfn, npages in p.metadata:
            self.allocator.unreserve_pages(pfn, npages)
        self.pending = None

    def free_blocks(self, s: Session, pfns: I64, orders: I64) -> None:
        """Give ``s``'s allocations back (:meth:`freeable` said they may go); all or none.

        The session's own set goes first: it refuses a batch naming a folio
        twice before anything changes. Freeing handed-over memory takes the
        handover over; the pages are punched out of the session's file.
        """
        if pfns.size == 0:
            return
        try:
            s.drop_allocs(pfns, orders)
        except KhoError as e:
            raise einval(f"free_folios: {e.message}") from None
        p = self.pending
        if p is not None and p.folios.overlap_mask(pfns, orders).any():
            self._take_over()
        starts, ends = self.allocator.free_blocks(pfns, orders)
        self.memory.punch(s.key, list(zip(starts.tolist(), (ends - starts).tolist(), strict=True)))

    # ================================================================= the lifecycle's levers

    def hold(self) -> None:
        """A finalize began: keep every session until :meth:`release`."""
        self.held = True

    def freeze(self) -> None:
        """Refuse preservation and tree edits from now on."""
        self.held = True
        self.frozen = True

    def release(self) -> list[Session]:
        """Back to normal after an abort or unfreeze; returns the sessions swept meanwhile."""
        self.frozen = False
        self.held = False
        return self.sweep()

    def images(self) -> list[SessionImage]:
        """What the next handover holds: live sessions plus carried-forward incoming."""
        out = []
        for s in self.sessions.values():
            parts = [s.tracker]
            if s.incoming is not None:
                parts.append(s.incoming.unclaimed)
            out.append(SessionImage(s.name, s.uid, Tracker.union(parts), s.tree.root))
        for k, inc in self.incoming.items():
            if k not in self.sessions:
                out.append(SessionImage(inc.name, inc.uid, inc.unclaimed, inc.subtree))
        return out

    def commit(self) -> CommitSummary:
        """Write the handover and commit it; needs the freeze. Nothing changes on failure."""
        if not self.frozen or self.committed is not None:
            raise ebusy("commit needs a frozen, uncommitted engine")
        self.region.check_identity()
        t0 = time.perf_counter()
        images = self.images()
        done = commit(
            self.region,
            self.allocator,
            self.scratch,
            self.generation + 1,
            images,
            owner_pid=self.pid,
            hook=self.hook,
        )
        self.committed = done
        return CommitSummary(
            generation=done.record.generation,
            folios={str(o): n for o, n in done.folios_by_order.items()},
            bytes={str(o): n for o, n in done.bytes_by_order.items()},
            total_bytes=sum(done.bytes_by_order.values()),
            sessions=tuple(SessionBytes(i.name, i.uid, i.tracker.total_bytes()) for i in images),
            chunk_pages=done.chunk_pages,
            metadata_pages=done.metadata_pages,
            fdt_bytes=len(done.fdt),
            commit_ms=round((time.perf_counter() - t0) * 1e3, 3),
        )

    def uncommit(self) -> None:
        """Take a committed handover back: the record says live again, metadata is freed."""
        if self.committed is None:
            raise enoent("not finalized")
        if self.pending is not None:  # the handover we came from is still whole: offer it again
            write_record(self.region, self.pending.record)
        else:
            rec = live_record(self.region, self.scratch, self.generation, self.pid)
            write_record(self.region, rec)
        self.committed.free(self.allocator)
        self.committed = None

    def close(self) -> None:
        """Let go of the descriptors of clients' memory (the region is the caller's)."""
        self.memory.close()

    def stop_clean(self) -> bool:
        """Stop without a handover of our own: the region's record says clean.

        A handover not taken over yet stays on the region for the next start;
        returns False then.
        """
        if self.committed is not None:
            raise ebusy("finalized: hand over or unfreeze before stopping")
        if self.pending is not None:
            return False
        rec = live_record(self.region, self.scratch, self.generation, 0, RecordState.CLEAN)
        write_record(self.region, rec)
        return True


_NOT_ALLOCATED = (Errno.EINVAL, "the start of an allocation")
_NOT_PRESERVED = (Errno.ENOENT, "preserved")


def _subtree_cost(key: SessionKey, subtree: Node) -> tuple[int, int]:
    """What a carried-forward session node costs the handover's tree budget."""
    return subtree.count_nodes(), subtree.nbytes() + session_node_bytes(key)
