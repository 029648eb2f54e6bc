"""Start-up: format a region, take in its handover, or refuse (docs/design.md §4).

Start-up runs in two steps so that nothing is written before the daemon
knows it can serve: :func:`plan_start` reads and validates what the region
holds and decides (it writes nothing), and :meth:`StartPlan.take` builds the
engine once the sockets are bound. The caller holds the region's lock
(:meth:`khod.region.Region.lock`), so no other daemon runs on it.

What the region's record says decides:

* none or ``clean``: format -- lay out the record page and scratch, mark the
  region live under this daemon's pid;
* ``handover``: populate -- validate everything, then reserve every incoming
  folio and the handover's own metadata pages while only scratch may be
  allocated, and keep each session's unclaimed folios and subtree until it
  restores them, an operator releases them, or the next finalize carries
  them forward. The record is left as it is for as long as the memory it
  describes is intact (``Engine._take_over``), so a successor that dies
  meanwhile leaves the handover for the next start;
* ``live``: refuse -- the daemon that owned it is gone without a handover
  (it no longer holds the lock) and its clients may still map that memory --
  unless told ``--reset``.

A refusal is a :class:`StartupRefused` with the exit status the ``khod``
command ends with and, for a refused handover, the fault that caused it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from khod.allocator import Allocator
from khod.engine import Engine, EngineLimits, PendingHandover
from khod.errors import Errno, Fault, HandoverError, KhoError, einval
from khod.faults import FaultPoint
from khod.kho.handover import Hook, Incoming, no_hook, read_handover
from khod.kho.memory import ScratchRange
from khod.kho.record import RecordState, live_record, read_record, write_record
from khod.memfiles import memory_files
from khod.pages import PAGE_SHIFT, PAGE_SIZE
from khod.region import Region
from khod.session import IncomingState


class Exit(IntEnum):
    """Exit statuses of the ``khod`` command."""

    OK = 0
    STOP_FAILED = 1
    CONFIG = 2
    REFUSED_HANDOVER = 3
    REGION_BUSY = 4

    @property
    def meaning(self) -> str:
        """What the status tells an operator (khod(8) lists these)."""
        return _EXIT_MEANINGS[self]


_EXIT_MEANINGS = {
    Exit.OK: "a clean stop or a handover (or a standby stopped while it waited)",
    Exit.STOP_FAILED: "a stop could not hand over as configured",
    Exit.CONFIG: "a configuration or environment error",
    Exit.REFUSED_HANDOVER: "the incoming handover failed validation; the region is left "
    "untouched for khoctl inspect",
    Exit.REGION_BUSY: "the region is live under a running or crashed daemon (or another "
    "standby waits for it)",
}


class StartupRefused(KhoError):
    """The daemon must not start on this region; ``fault`` names a refused handover's defect."""

    def __init__(
        self, code: Errno, message: str, exit_status: Exit, fault: Fault | None = None
    ) -> None:
        super().__init__(code, message)
        self.exit_status = exit_status
        self.fault = fault


@dataclass(frozen=True)
class StartInfo:
    """How the engine came up, for logs and metrics."""

    mode: str  # "format" or "populate"
    generation: int
    populate_s: float = 0.0
    incoming_sessions: int = 0
    incoming_bytes: int = 0
    reset_from: str | None = None


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


@dataclass
class StartPlan:
    """What start-up will do with the region, decided without writing to it."""

    region: Region
    pid: int
    mode: str  # "format" or "populate"
    generation: int
    scratch_size: int
    limits: EngineLimits | None
    hook: Hook
    incoming: Incoming | None = None
    reset_from: str | None = None
    t0: float = field(default_factory=time.perf_counter)

    def take(self) -> tuple[Engine, StartInfo]:
        """Build the engine: format now, or reserve everything the handover holds."""
        if self.incoming is not None:
            return self._populate(self.incoming)
        alloc, scratch = layout(self.region, self.scratch_size)
        write_record(self.region, live_record(self.region, scratch, self.generation, self.pid))
        engine = Engine(
            self.region,
            alloc,
            scratch,
            self.generation,
            pid=self.pid,
            limits=self.limits,
            memory=memory_files(self.region),
            hook=self.hook,
        )
        return engine, StartInfo("format", self.generation, reset_from=self.reset_from)

    def _populate(self, inc: Incoming) -> tuple[Engine, StartInfo]:
        region = self.region
        alloc = allocator_for(region, inc.scratch)
        alloc.set_scratch_only(True)  # nothing may land on memory still to be reserved
        root = inc.root.tracker
        for order in root.orders:
            first, count = root.runs(order)
            alloc.reserve_runs(first, count << order)
        metadata = _runs(inc.metadata_pfns())
        alloc.reserve_runs(
            np.array([p for p, _ in metadata], dtype=np.int64),
            np.array([n for _, n in metadata], dtype=np.int64),
        )
        self.hook(FaultPoint.POPULATE_RESERVED)
        memory = memory_files(region)
        incoming = {
            key: IncomingState(
                s.name,
                s.uid,
                s.memory.tracker,
                s.subtree,
                lost=bool(s.memory.tracker) and not memory.exists(key),
            )
            for key, s in inc.sessions.items()
        }
        alloc.set_scratch_only(False)
        engine = Engine(
            region,
            alloc,
            inc.scratch,
            inc.generation,
            pid=self.pid,
            limits=self.limits,
            incoming=incoming,
            incoming_fdt=inc.fdt,
            pending=PendingHandover(inc.record, tuple(metadata), root),
            memory=memory,
            hook=self.hook,
        )
        info = StartInfo(
            "populate",
            inc.generation,
            populate_s=time.perf_counter() - self.t0,
            incoming_sessions=len(incoming),
            incoming_bytes=root.total_bytes(),
        )
        return engine, info


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Ascending unique pfns as (first, count) runs."""
    out: list[tuple[int, int]] = []
    for p in pfns:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def plan_start(
    region: Region,
    *,
    scratch_size: int,
    pid: int,
    reset: bool = False,
    limits: EngineLimits | None = None,
    hook: Hook = no_hook,
) -> StartPlan:
    """Read and validate what the region holds and decide; refuse with a named reason."""
    plan = StartPlan(region, pid, "format", 0, scratch_size, limits, hook)
    try:
        rec = read_record(region)
    except HandoverError as exc:
        if not reset:
            raise StartupRefused(
                Errno.EPROTO,
                f"the region's handover record is damaged ({exc.detail}); inspect it, "
                "or start with --reset to discard it",
                Exit.REFUSED_HANDOVER,
                exc.fault,
            ) from exc
        plan.reset_from = "a damaged record"
        return plan
    if rec is None:
        return plan
    plan.generation = rec.generation
    if rec.state is RecordState.LIVE:
        if not reset:
            raise StartupRefused(
                Errno.EBUSY,
                f"the region was live under pid {rec.owner_pid}, which is gone without a "
                "handover; clients may still map that memory. Start with --reset to discard it",
                Exit.REGION_BUSY,
            )
        plan.reset_from = f"live pid {rec.owner_pid}"
    elif rec.state is RecordState.HANDOVER:
        if reset:
            plan.reset_from = f"handover generation {rec.generation}"
            return plan
        try:
            plan.incoming = read_handover(region, rec)
        except HandoverError as exc:
            raise StartupRefused(
                Errno.EPROTO,
                f"{exc.message}; nothing was reserved and the region is left as it is",
                Exit.REFUSED_HANDOVER,
                exc.fault,
            ) from exc
        plan.mode = "populate"
        hook(FaultPoint.POPULATE_VALIDATED)
    return plan


def start_engine(
    region: Region,
    *,
    scratch_size: int,
    pid: int,
    reset: bool = False,
    limits: EngineLimits | None = None,
    hook: Hook = no_hook,
) -> tuple[Engine, StartInfo]:
    """Plan and take at once (for callers with nothing to bind in between)."""
    plan = plan_start(
        region, scratch_size=scratch_size, pid=pid, reset=reset, limits=limits, hook=hook
    )
    return plan.take()
