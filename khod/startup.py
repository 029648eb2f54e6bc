"""Start-up: format a region, take in its handover, or refuse (docs/design.md §4).

What the region's record says decides:

* none or ``clean``: format -- lay out the record page and scratch, mark the
  region live under this daemon's pid;
* ``handover``: populate -- validate everything, reserve every incoming folio
  while only scratch may be allocated, keep each session's unclaimed folios
  and subtree until it restores them, an operator releases them, or the
  next finalize carries them forward; then mark the region live;
* ``live`` under another pid: refuse (the owner runs, or crashed and its
  clients may still map that memory) unless told ``--reset``.

A refusal is a :class:`StartupRefused` with the exit status the ``khod``
command ends with and, for a refused handover, the fault that caused it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from khod.allocator import Allocator
from khod.engine import Engine, EngineLimits
from khod.errors import Errno, Fault, HandoverError, KhoError, einval
from khod.faults import FaultPoint
from khod.kho.handover import Hook, no_hook, read_handover
from khod.kho.memory import ScratchRange
from khod.kho.record import HandoverRecord, RecordState, live_record, read_record, write_record
from khod.pages import PAGE_SHIFT, PAGE_SIZE
from khod.pids import pid_alive
from khod.region import Region
from khod.session import IncomingState


class Exit(IntEnum):
    """Exit statuses of the ``khod`` command."""

    OK = 0  # a clean stop or a handover
    STOP_FAILED = 1  # a stop could not hand over as configured
    CONFIG = 2  # a configuration or environment error
    REFUSED_HANDOVER = 3  # the incoming handover failed validation; the region is untouched
    REGION_BUSY = 4  # the region is live under a running or crashed daemon


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


def start_engine(
    region: Region,
    *,
    scratch_size: int,
    pid: int,
    reset: bool = False,
    limits: EngineLimits | None = None,
    hook: Hook = no_hook,
    alive: Callable[[int], bool] = pid_alive,
) -> tuple[Engine, StartInfo]:
    """Format the region or take in its handover, as daemon ``pid``; refuse with a named reason."""
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
        rec = None
    reset_from = None
    if rec is not None and rec.state is RecordState.LIVE and rec.owner_pid != pid:
        if alive(rec.owner_pid):
            raise StartupRefused(
                Errno.EBUSY,
                f"the region is in use by a running daemon (pid {rec.owner_pid})",
                Exit.REGION_BUSY,
            )
        if not reset:
            raise StartupRefused(
                Errno.EBUSY,
                f"the region was live under pid {rec.owner_pid}, which is gone without a "
                "handover; clients may still map that memory. Start with --reset to discard it",
                Exit.REGION_BUSY,
            )
        reset_from = f"live pid {rec.owner_pid}"
    if rec is not None and rec.state is RecordState.HANDOVER and not reset:
        return _populate(region, rec, limits=limits, hook=hook, pid=pid)
    if rec is not None and rec.state is RecordState.HANDOVER:
        reset_from = f"handover generation {rec.generation}"
    generation = rec.generation if rec is not None else 0
    alloc, scratch = layout(region, scratch_size)
    write_record(region, live_record(region, scratch, generation, pid))
    engine = Engine(region, alloc, scratch, generation, pid=pid, limits=limits, hook=hook)
    return engine, StartInfo("format", generation, reset_from=reset_from)


def _populate(
    region: Region,
    rec: HandoverRecord,
    *,
    limits: EngineLimits | None,
    hook: Hook,
    pid: int,
) -> tuple[Engine, StartInfo]:
    t0 = time.perf_counter()
    try:
        inc = read_handover(region, rec, limits=(limits or EngineLimits()).tree)
    except HandoverError as exc:
        raise StartupRefused(
            Errno.EPROTO,
            f"{exc.message}; nothing was reserved and the region is left as it is",
            Exit.REFUSED_HANDOVER,
            exc.fault,
        ) from exc
    hook(FaultPoint.POPULATE_VALIDATED)
    scratch = inc.scratch
    alloc = allocator_for(region, scratch)
    alloc.set_scratch_only(True)  # nothing may land on memory still to be reserved
    root = inc.root.tracker
    for order in root.orders:
        first, count = root.runs(order)
        alloc.reserve_runs(first, count << order)
    hook(FaultPoint.POPULATE_RESERVED)
    incoming = {
        name: IncomingState(name, s.uid, s.memory.tracker, s.subtree)
        for name, s in inc.sessions.items()
    }
    alloc.set_scratch_only(False)
    hook(FaultPoint.POPULATE_RECORD)
    write_record(region, live_record(region, scratch, inc.generation, pid))
    engine = Engine(
        region,
        alloc,
        scratch,
        inc.generation,
        pid=pid,
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
