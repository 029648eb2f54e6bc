"""The engine: sessions, operations and the lifecycle state machine (DESIGN §4, §5).

Plain Python, no sockets or threads: the server calls these methods with the
caller's session and turns results and :class:`KhoError` into replies. The
parts that wait -- notifier round trips and the freeze lock -- live in the
server; the engine only moves between states:

    POPULATING -> ACTIVE -> FINALIZING -> FINALIZED -> HANDED_OVER
                    ^            |             |
                    +-- abort ---+-- unfreeze -+

Start-up (:func:`start_engine`) formats a fresh region or populates from a
committed handover: validate everything, reserve every incoming folio while
only scratch may be allocated, and keep each session's unclaimed folios and
subtree until it restores them, an operator releases them, or the next
finalize carries them forward.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from khod.abi import PAGE_SHIFT, PAGE_SIZE, RecordState, split_range
from khod.allocator import Allocator
from khod.errors import (
    Errno,
    HandoverError,
    KhoError,
    ebusy,
    eexist,
    einval,
    enoent,
    enomem,
    eperm,
)
from khod.handover import (
    ROOT_NODES,
    Committed,
    Hook,
    SessionImage,
    commit,
    live_record,
    no_hook,
    read_handover,
    read_record,
    write_record,
)
from khod.pids import pid_alive
from khod.region import Region
from khod.serial import ScratchRange
from khod.session import IncomingState, Session
from khod.tracker import Tracker
from khod.tree import Node, TreeLimits, check_node_name, descend, split_path

I64 = npt.NDArray[np.int64]


class State(StrEnum):
    POPULATING = "populating"
    ACTIVE = "active"
    FINALIZING = "finalizing"
    FINALIZED = "finalized"
    HANDED_OVER = "handed_over"
    STOPPED = "stopped"


@dataclass(frozen=True)
class EngineLimits:
    max_sessions: int = 1024
    max_batch: int = 1 << 20
    tree: TreeLimits = field(default_factory=TreeLimits)


class StartupRefused(KhoError):
    """The daemon must not start on this region (a live owner, a bad handover)."""

    def __init__(self, code: Errno, message: str, exit_status: int) -> None:
        super().__init__(code, message)
        self.exit_status = exit_status


EXIT_REFUSED_HANDOVER = 3  # the incoming handover failed validation
EXIT_REGION_BUSY = 4  # the region is live (owned by a running or crashed daemon)


@dataclass
class StartInfo:
    """How the engine came up, for logs and metrics."""

    mode: str  # "format" or "populate"
    generation: int
    populate_s: float = 0.0
    incoming_sessions: int = 0
    incoming_bytes: int = 0
    reset_from: str | None = None


class Engine:
    def __init__(
        self,
        region: Region,
        allocator: Allocator,
        scratch: ScratchRange,
        generation: int,
        *,
        limits: EngineLimits | None = None,
        incoming: dict[str, IncomingState] | None = None,
        incoming_fdt: bytes | None = None,
        hook: Hook = no_hook,
    ) -> None:
        self.region = region
        self.allocator = allocator
        self.scratch = scratch
        self.generation = generation
        self.limits = limits or EngineLimits()
        self.sessions: dict[str, Session] = {}
        self.incoming: dict[str, IncomingState] = incoming or {}
        self.incoming_fdt = incoming_fdt
        self.hook = hook
        self.state = State.ACTIVE
        self.committed: Committed | None = None
        self.last_finalize: dict[str, Any] | None = None

    # ================================================================= sessions

    def hello(self, uid: int, name: str, persistent: bool) -> tuple[Session, bool]:
        """Create or reattach session ``name`` for ``uid``; returns (session, created)."""
        check_node_name(name)
        if "@" in name or name in ROOT_NODES:
            raise einval(f"session name {name!r} is reserved or not allowed")
        s = self.sessions.get(name)
        if s is not None:
            if s.uid != uid and uid != 0:  # root may act for anyone
                raise eperm(f"session {name!r} belongs to another user")
            s.persistent = persistent
            return s, False
        inc = self.incoming.get(name)
        if inc is not None and inc.uid != uid and uid != 0:
            raise eperm(f"session {name!r} was handed over for another user")
        if len(self.sessions) >= self.limits.max_sessions:
            raise enomem(f"{self.limits.max_sessions} sessions exist; no room for {name!r}")
        s = Session(name, inc.uid if inc is not None else uid, persistent, self.limits.tree)
        if inc is not None:
            inc.claimed = True
            s.incoming = inc
        self.sessions[name] = s
        return s, True

    def detach(self, s: Session, conn_id: int) -> bool:
        """A connection of ``s`` closed; returns True if the session was discarded."""
        s.connections.discard(conn_id)
        if not s.connections and not s.persistent and self.state is State.ACTIVE:
            self.discard(s)
            return True
        return False

    def discard(self, s: Session) -> None:
        """Drop a session with everything it preserved and allocated (LUO's close rule)."""
        s.tracker = Tracker()
        for pfn in list(s.allocs):
            self.allocator.free(pfn)
            s.drop_alloc(pfn)
        if s.incoming is not None:
            s.incoming.claimed = False
        self.sessions.pop(s.name, None)

    def sweep(self) -> list[str]:
        """Discard non-persistent sessions left without a connection (back in ACTIVE)."""
        gone = [s for s in self.sessions.values() if not s.connections and not s.persistent]
        for s in gone:
            self.discard(s)
        return [s.name for s in gone]

    # ================================================================= helpers

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

    def _size_pages(self, size: int) -> int:
        if size <= 0 or size % PAGE_SIZE:
            raise einval(f"size {size:#x} is not a positive multiple of the page size")
        return size >> PAGE_SHIFT

    def _preservable(self) -> None:
        if self.state in (State.FINALIZED, State.HANDED_OVER):
            raise ebusy("preservation is frozen (finalized); unfreeze first")
        if self.state is not State.ACTIVE and self.state is not State.FINALIZING:
            raise ebusy(f"the daemon is {self.state}")

    def _not_owned(self, s: Session, pfn: int, order: int) -> KhoError:
        return eperm(
            f"phys {pfn << PAGE_SHIFT:#x} order {order} is not memory session "
            f"{s.name!r} allocated or restored"
        )

    # ================================================================= memory

    def alloc_folio(self, s: Session, order: int) -> int:
        pfn = self.allocator.alloc(order)
        s.add_alloc(pfn, order)
        return pfn << PAGE_SHIFT

    def alloc_folios(self, s: Session, order: int, count: int) -> list[int]:
        got: list[int] = []
        try:
            for _ in range(count):
                got.append(self.allocator.alloc(order))  # noqa: PERF401 -- partial list is the rollback
        except BaseException:
            self.allocator.free_many(got)
            raise
        for pfn in got:
            s.add_alloc(pfn, order)
        return [p << PAGE_SHIFT for p in got]

    def _check_free(self, s: Session, phys: int) -> tuple[int, int]:
        pfn = self._pfn(phys)
        order = s.allocs.get(pfn)
        if order is None:
            raise enoent(f"session {s.name!r} has no allocation starting at {phys:#x}")
        if s.tracker.intersects(pfn, 1 << order):
            raise ebusy(f"folio {phys:#x} order {order} holds preserved memory; unpreserve first")
        return pfn, order

    def free_folio(self, s: Session, phys: int) -> None:
        pfn, _ = self._check_free(s, phys)
        self.allocator.free(pfn)
        s.drop_alloc(pfn)

    def free_folios(self, s: Session, phys: I64) -> int:
        checked = [self._check_free(s, int(p)) for p in phys.tolist()]
        if len({p for p, _ in checked}) != len(checked):
            raise einval("free_folios: the same folio appears twice")
        for pfn, _ in checked:
            self.allocator.free(pfn)
            s.drop_alloc(pfn)
        return len(checked)

    # ================================================================= preservation

    def preserve_folio(self, s: Session, phys: int, order: int | None = None) -> int:
        self._preservable()
        pfn = self._pfn(phys)
        if order is None:
            order = s.allocs.get(pfn)
            if order is None:
                raise einval(f"{phys:#x} is not the start of an allocation: give the order")
        if pfn & ((1 << order) - 1):
            raise einval(f"phys {phys:#x} is not aligned to order {order}")
        self._pfn(phys, 1 << order)
        if not s.owns(pfn, 1 << order):
            raise self._not_owned(s, pfn, order)
        s.tracker.preserve_folio(pfn, order)
        return order

    def unpreserve_folio(self, s: Session, phys: int, order: int | None = None) -> int:
        self._preservable()
        pfn = self._pfn(phys)
        if order is None:
            order = s.tracker.find_order(pfn)
            if order is None:
                raise enoent(f"no folio of session {s.name!r} is preserved at {phys:#x}")
        s.tracker.unpreserve_folio(pfn, order)
        return order

    def _batch(
        self, s: Session, phys: I64, orders: int | I64 | None, *, lookup: str
    ) -> tuple[I64, int | I64]:
        """Validate a batch's addresses and orders; ``lookup`` says where to find missing orders."""
        if phys.size > self.limits.max_batch:
            raise einval(f"{phys.size} folios in one batch; at most {self.limits.max_batch}")
        if phys.size and (np.any(phys % PAGE_SIZE) or phys.min() < self.region.base):
            bad = phys[(phys % PAGE_SIZE != 0) | (phys < self.region.base)][0]
            raise einval(f"phys {int(bad):#x} is misaligned or outside the region")
        pfns = phys >> PAGE_SHIFT
        if orders is None:
            table: Callable[[int], int | None] = (
                s.allocs.get if lookup == "alloc" else s.tracker.find_order
            )
            found = [table(int(p)) for p in pfns.tolist()]
            if any(o is None for o in found):
                p = int(pfns[[o is None for o in found].index(True)]) << PAGE_SHIFT
                what = "the start of an allocation" if lookup == "alloc" else "preserved"
                code = Errno.EINVAL if lookup == "alloc" else Errno.ENOENT
                raise KhoError(code, f"{p:#x} is not {what}: give the order")
            orders = np.asarray(found, dtype=np.int64)
        npages = np.int64(1) << (orders if isinstance(orders, np.ndarray) else np.int64(orders))
        end = pfns + npages
        if pfns.size and int(end.max()) > (self.region.end >> PAGE_SHIFT):
            raise einval("a folio of the batch runs past the end of the region")
        return pfns, orders

    def preserve_folios(self, s: Session, phys: I64, orders: int | I64 | None) -> int:
        self._preservable()
        pfns, ords = self._batch(s, phys, orders, lookup="alloc")
        npages = np.int64(1) << (ords if isinstance(ords, np.ndarray) else np.int64(ords))
        owned = s.owned_mask(pfns, np.broadcast_to(npages, pfns.shape))
        if not owned.all():
            i = int(np.flatnonzero(~owned)[0])
            o = int(ords[i]) if isinstance(ords, np.ndarray) else ords
            raise self._not_owned(s, int(pfns[i]), o)
        return s.tracker.preserve_folios(pfns, ords)

    def unpreserve_folios(self, s: Session, phys: I64, orders: int | I64 | None) -> int:
        self._preservable()
        pfns, ords = self._batch(s, phys, orders, lookup="tracker")
        return s.tracker.unpreserve_folios(pfns, ords)

    def _split(self, phys: int, size: int) -> list[tuple[int, int]]:
        npages = self._size_pages(size)
        return split_range(self._pfn(phys, npages), npages)

    def preserve_phys(self, s: Session, phys: int, size: int) -> list[tuple[int, int]]:
        return self.preserve_ranges(s, [(phys, size)])

    def unpreserve_phys(self, s: Session, phys: int, size: int) -> list[tuple[int, int]]:
        return self.unpreserve_ranges(s, [(phys, size)])

    def preserve_ranges(self, s: Session, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Preserve page-aligned ranges (split per DESIGN §3); all or nothing."""
        self._preservable()
        folios = [f for phys, size in ranges for f in self._split(phys, size)]
        for pfn, order in folios:
            if not s.owns(pfn, 1 << order):
                raise self._not_owned(s, pfn, order)
        s.tracker.preserve_folios([p for p, _ in folios], [o for _, o in folios])
        return [(p << PAGE_SHIFT, o) for p, o in folios]

    def unpreserve_ranges(self, s: Session, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        self._preservable()
        folios = [f for phys, size in ranges for f in self._split(phys, size)]
        s.tracker.unpreserve_folios([p for p, _ in folios], [o for _, o in folios])
        return [(p << PAGE_SHIFT, o) for p, o in folios]

    # ================================================================= restore (successor)

    def _incoming_of(self, s: Session) -> IncomingState:
        if s.incoming is None:
            raise enoent(f"no memory was handed over for session {s.name!r}")
        return s.incoming

    def restore_folio(self, s: Session, phys: int) -> int:
        """Take back one incoming folio: owner only, at its start, once; returns its order."""
        inc = self._incoming_of(s)
        pfn = self._pfn(phys)
        order = inc.unclaimed.find_order(pfn)
        if order is None:
            raise enoent(
                f"{phys:#x} is not the start of an unrestored folio handed over "
                f"for session {s.name!r}"
            )
        self.allocator.claim(pfn, order)
        inc.unclaimed.unpreserve_folio(pfn, order)
        s.add_alloc(pfn, order)
        return order

    def restore_folios(self, s: Session, phys: I64) -> list[int]:
        """Restore many incoming folios at once (all or none); returns their orders."""
        if phys.size > self.limits.max_batch:
            raise einval(f"{phys.size} folios in one batch; at most {self.limits.max_batch}")
        inc = self._incoming_of(s)
        pfns = [self._pfn(int(p)) for p in phys.tolist()]
        if len(set(pfns)) != len(pfns):
            raise einval("restore_folios: the same folio appears twice")
        orders = []
        for pfn in pfns:
            order = inc.unclaimed.find_order(pfn)
            if order is None:
                raise enoent(
                    f"{pfn << PAGE_SHIFT:#x} is not the start of an unrestored folio handed "
                    f"over for session {s.name!r}"
                )
            orders.append(order)
        for pfn, order in zip(pfns, orders, strict=True):
            self.allocator.claim(pfn, order)
            s.add_alloc(pfn, order)
        inc.unclaimed.unpreserve_folios(pfns, orders)
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
        return [(p << PAGE_SHIFT, o) for p, o in folios]

    def release_unclaimed(self, name: str | None = None) -> dict[str, Any]:
        """Free incoming memory nobody restored, and forget unreattached sessions' subtrees."""
        if self.state not in (State.ACTIVE,):
            raise ebusy(f"cannot release incoming memory while {self.state}")
        names = [name] if name is not None else sorted(self.incoming)
        if name is not None and name not in self.incoming:
            raise enoent(f"no incoming session {name!r}")
        released = 0
        dropped: list[str] = []
        for n in names:
            inc = self.incoming[n]
            for order in inc.unclaimed.orders:
                first, count = inc.unclaimed.runs(order)
                for pfn, c in zip(first.tolist(), count.tolist(), strict=True):
                    self.allocator.unreserve_pages(pfn, c << order)
            released += inc.unclaimed.total_bytes()
            inc.unclaimed = Tracker()
            if not inc.claimed:
                del self.incoming[n]
                dropped.append(n)
            else:
                inc.subtree = Node()
        return {"released_bytes": released, "dropped_sessions": dropped}

    # ================================================================= tree

    def get_node(self, s: Session, path: str, which: str) -> dict[str, Any]:
        node = self._tree_node(s, path, which)
        return {"props": sorted(node.props), "children": sorted(node.children)}

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

    # ================================================================= lifecycle

    def begin_finalize(self) -> None:
        if self.state is State.FINALIZED:
            raise eexist("already finalized")
        if self.state is State.FINALIZING:
            raise ebusy("a finalize is already running")
        if self.state is not State.ACTIVE:
            raise ebusy(f"cannot finalize while {self.state}")
        self.state = State.FINALIZING

    def images(self) -> list[SessionImage]:
        """What the next handover holds: live sessions plus carried-forward incoming."""
        out = []
        for s in self.sessions.values():
            parts = [s.tracker]
            if s.incoming is not None:
                parts.append(s.incoming.unclaimed)
            out.append(SessionImage(s.name, s.uid, Tracker.union(parts), s.tree.root))
        for name, inc in self.incoming.items():
            if name not in self.sessions:
                out.append(SessionImage(name, inc.uid, inc.unclaimed, inc.subtree))
        return out

    def commit_finalize(self) -> dict[str, Any]:
        """Freeze trees, write the handover and commit it (the write lock is held)."""
        if self.state is not State.FINALIZING:
            raise ebusy(f"cannot commit while {self.state}")
        t0 = time.perf_counter()
        for s in self.sessions.values():
            s.tree.freeze()
        try:
            images = self.images()
            done = commit(
                self.region,
                self.allocator,
                self.scratch,
                self.generation + 1,
                images,
                hook=self.hook,
            )
        except BaseException:
            for s in self.sessions.values():
                s.tree.thaw()
            raise
        self.committed = done
        self.state = State.FINALIZED
        self.last_finalize = {
            "generation": done.record.generation,
            "folios": {str(o): n for o, n in done.folios_by_order.items()},
            "bytes": {str(o): n for o, n in done.bytes_by_order.items()},
            "total_bytes": sum(done.bytes_by_order.values()),
            "sessions": [
                {"name": i.name, "uid": i.uid, "bytes": i.tracker.total_bytes()} for i in images
            ],
            "chunk_pages": done.chunk_pages,
            "metadata_pages": done.metadata_pages,
            "fdt_bytes": len(done.fdt),
            "commit_ms": round((time.perf_counter() - t0) * 1e3, 3),
        }
        return self.last_finalize

    def abort_finalize(self) -> list[str]:
        """Back to ACTIVE after a veto, error or timeout; every preservation intact."""
        for s in self.sessions.values():
            s.tree.thaw()
        self.state = State.ACTIVE
        return self.sweep()

    def unfreeze(self) -> list[str]:
        """FINALIZED -> ACTIVE: free the metadata, clear the record, thaw."""
        if self.state is not State.FINALIZED or self.committed is None:
            raise enoent("not finalized")
        write_record(self.region, live_record(self.region, self.scratch, self.generation))
        self.committed.free(self.allocator)
        self.committed = None
        return self.abort_finalize()

    def hand_over(self) -> int:
        if self.state is not State.FINALIZED or self.committed is None:
            raise ebusy("handover needs a finalized daemon; run finalize first")
        self.state = State.HANDED_OVER
        return self.committed.record.generation

    def stop_clean(self) -> None:
        """Stop without a handover: the region is marked clean."""
        if self.state is State.FINALIZED:
            raise ebusy("finalized: hand over or unfreeze before stopping")
        rec = live_record(self.region, self.scratch, self.generation, pid=0)
        write_record(self.region, replace(rec, state=RecordState.CLEAN))
        self.state = State.STOPPED

    # ================================================================= reporting

    def incoming_unclaimed_bytes(self) -> int:
        return sum(inc.unclaimed.total_bytes() for inc in self.incoming.values())

    def region_usage(self) -> dict[str, Any]:
        """Region geometry and bytes by use (what status and the metrics report)."""
        u = self.allocator.usage()
        meta = 0
        if self.committed is not None:
            c = self.committed
            meta = (c.metadata_pages + (1 << c.fdt_block[1])) * PAGE_SIZE
        return {
            "backend": self.region.backend,
            "path": self.region.path,
            "base": self.region.base,
            "size": self.region.size,
            "free": u.free,
            "allocated": u.allocated - meta,
            "preserved": sum(s.tracker.total_bytes() for s in self.sessions.values()),
            "metadata": meta,
            "reserved_incoming": u.reserved - PAGE_SIZE,
            "reserved": u.reserved,
            "scratch": u.scratch,
            "scratch_free": u.scratch_free,
        }

    def status(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "generation": self.generation,
            "pid": os.getpid(),
            "region": self.region_usage(),
            "sessions": [
                self.session_info(s) for s in sorted(self.sessions.values(), key=lambda s: s.name)
            ],
            "incoming": {
                "unclaimed_bytes": self.incoming_unclaimed_bytes(),
                "sessions": [
                    {
                        "name": inc.name,
                        "uid": inc.uid,
                        "claimed": inc.claimed,
                        "unclaimed_bytes": inc.unclaimed.total_bytes(),
                        "unclaimed_folios": inc.unclaimed.count(),
                    }
                    for inc in sorted(self.incoming.values(), key=lambda i: i.name)
                ],
            },
            "last_finalize": self.last_finalize,
        }

    @staticmethod
    def session_info(s: Session) -> dict[str, Any]:
        return {
            "name": s.name,
            "uid": s.uid,
            "persistent": s.persistent,
            "connections": len(s.connections),
            "allocated_bytes": s.allocated_bytes,
            "preserved_bytes": s.tracker.total_bytes(),
            "preserved": {
                str(st.order): {"folios": st.folios, "bytes": st.bytes} for st in s.tracker.stats()
            },
            "tree_nodes": s.tree.nodes,
            "tree_bytes": s.tree.size,
            "incoming_unclaimed_bytes": s.incoming.unclaimed.total_bytes() if s.incoming else 0,
        }


# ===================================================================== start-up


def allocator_for(region: Region, scratch: ScratchRange) -> Allocator:
    """An allocator over the region with ``scratch`` and the record page reserved."""
    alloc = Allocator(
        region.base_pfn,
        region.npages,
        scratch=(scratch.phys >> PAGE_SHIFT, scratch.size >> PAGE_SHIFT),
    )
    alloc.reserve_pages(region.base_pfn, 1)
    return alloc


def layout(region: Region, scratch_size: int) -> tuple[Allocator, ScratchRange]:
    """khod's layout for a fresh region: the record page, then scratch right after it."""
    if scratch_size % PAGE_SIZE or not 0 < scratch_size < region.size - 2 * PAGE_SIZE:
        raise einval(f"scratch size {scratch_size:#x} does not fit the region")
    scratch = ScratchRange(region.base + PAGE_SIZE, scratch_size)
    return allocator_for(region, scratch), scratch


def start_engine(
    region: Region,
    *,
    scratch_size: int,
    reset: bool = False,
    limits: EngineLimits | None = None,
    hook: Hook = no_hook,
    alive: Callable[[int], bool] = pid_alive,
    pid: int | None = None,
) -> tuple[Engine, StartInfo]:
    """Format the region or take in its handover; refuse with a named reason."""
    pid = os.getpid() if pid is None else pid
    try:
        rec = read_record(region)
    except HandoverError as exc:
        if not reset:
            raise StartupRefused(
                Errno.EPROTO,
                f"the region's handover record is damaged ({exc.detail}); inspect it, "
                "or start with --reset to discard it",
                EXIT_REFUSED_HANDOVER,
            ) from exc
        rec = None
    reset_from = None
    if rec is not None and rec.state is RecordState.LIVE and rec.owner_pid != pid:
        if alive(rec.owner_pid):
            raise StartupRefused(
                Errno.EBUSY,
                f"the region is in use by a running daemon (pid {rec.owner_pid})",
                EXIT_REGION_BUSY,
            )
        if not reset:
            raise StartupRefused(
                Errno.EBUSY,
                f"the region was live under pid {rec.owner_pid}, which is gone without a "
                "handover; clients may still map that memory. Start with --reset to discard it",
                EXIT_REGION_BUSY,
            )
        reset_from = f"live pid {rec.owner_pid}"
    if rec is not None and rec.state is RecordState.HANDOVER and not reset:
        return _populate(region, rec, limits=limits, hook=hook, pid=pid)
    if rec is not None and rec.state is RecordState.HANDOVER:
        reset_from = f"handover generation {rec.generation}"
    generation = rec.generation if rec is not None else 0
    alloc, scratch = layout(region, scratch_size)
    write_record(region, live_record(region, scratch, generation, pid))
    engine = Engine(region, alloc, scratch, generation, limits=limits, hook=hook)
    return engine, StartInfo("format", generation, reset_from=reset_from)


def _populate(
    region: Region,
    rec: Any,
    *,
    limits: EngineLimits | None,
    hook: Hook,
    pid: int,
) -> tuple[Engine, StartInfo]:
    t0 = time.perf_counter()
    try:
        inc = read_handover(region, rec, limits=(limits or EngineLimits()).tree, hook=hook)
    except HandoverError as exc:
        raise StartupRefused(
            Errno.EPROTO,
            f"{exc.message}; nothing was reserved and the region is left as it is",
            EXIT_REFUSED_HANDOVER,
        ) from exc
    hook("populate-validated")
    scratch = inc.scratch
    alloc = allocator_for(region, scratch)
    alloc.set_scratch_only(True)  # nothing may land on memory still to be reserved
    root = inc.root.tracker
    for order in root.orders:
        first, count = root.runs(order)
        alloc.reserve_runs(first, count << order)
    hook("populate-reserved")
    incoming = {
        name: IncomingState(name, s.uid, s.memory.tracker, s.subtree)
        for name, s in inc.sessions.items()
    }
    alloc.set_scratch_only(False)
    hook("populate-record")
    write_record(region, live_record(region, scratch, inc.generation, pid))
    engine = Engine(
        region,
        alloc,
        scratch,
        inc.generation,
        limits=limits,
        incoming=incoming,
        incoming_fdt=inc.fdt,
        hook=hook,
    )
    info = StartInfo(
        "populate",
        inc.generation,
        populate_s=time.perf_counter() - t0,
        incoming_sessions=len(incoming),
        incoming_bytes=root.total_bytes(),
    )
    return engine, info
