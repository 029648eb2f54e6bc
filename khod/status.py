"""What ``status`` and the metrics report: the engine's state as frozen results.

Read-only views built on demand; the engine keeps no reporting state of its
own.
"""

from __future__ import annotations

import os

from khod.engine import Engine
from khod.lifecycle import Lifecycle
from khod.pages import NR_ORDERS, PAGE_SIZE
from khod.results import (
    IncomingInfo,
    IncomingSessionInfo,
    OrderCount,
    RegionUsage,
    SessionInfo,
    Status,
)
from khod.session import Session


def incoming_unclaimed_bytes(e: Engine) -> int:
    return sum(inc.unclaimed.total_bytes() for inc in e.incoming.values())


def preserved_folios(e: Engine) -> list[int]:
    """Folios preserved for the next handover, per order (index = order)."""
    folios = [0] * NR_ORDERS
    for s in e.sessions.values():
        for st in s.tracker.stats():
            folios[st.order] += st.folios
    return folios


def region_usage(e: Engine) -> RegionUsage:
    u = e.allocator.usage()
    meta = e.committed.metadata_bytes if e.committed is not None else 0
    return RegionUsage(
        backend=e.region.backend,
        path=e.region.path,
        base=e.region.base,
        size=e.region.size,
        free=u.free,
        allocated=u.allocated - meta,
        preserved=sum(s.tracker.total_bytes() for s in e.sessions.values()),
        metadata=meta,
        reserved_incoming=u.reserved - PAGE_SIZE,
        reserved=u.reserved,
        scratch=u.scratch,
        scratch_free=u.scratch_free,
    )


def session_info(s: Session) -> SessionInfo:
    return SessionInfo(
        name=s.name,
        uid=s.uid,
        persistent=s.persistent,
        connections=len(s.connections),
        allocated_bytes=s.allocated_bytes,
        preserved_bytes=s.tracker.total_bytes(),
        preserved={str(st.order): OrderCount(st.folios, st.bytes) for st in s.tracker.stats()},
        tree_nodes=s.tree.nodes,
        tree_bytes=s.tree.size,
        incoming_unclaimed_bytes=s.incoming.unclaimed.total_bytes() if s.incoming else 0,
    )


def incoming_info(e: Engine) -> IncomingInfo:
    return IncomingInfo(
        unclaimed_bytes=incoming_unclaimed_bytes(e),
        sessions=tuple(
            IncomingSessionInfo(
                name=inc.name,
                uid=inc.uid,
                claimed=inc.claimed,
                unclaimed_bytes=inc.unclaimed.total_bytes(),
                unclaimed_folios=inc.unclaimed.count(),
            )
            for inc in sorted(e.incoming.values(), key=lambda i: i.name)
        ),
    )


def snapshot(e: Engine, life: Lifecycle, connections: int) -> Status:
    """The whole ``status`` reply."""
    return Status(
        state=str(life.state),
        generation=e.generation,
        pid=os.getpid(),
        region=region_usage(e),
        sessions=tuple(session_info(s) for s in sorted(e.sessions.values(), key=lambda s: s.name)),
        incoming=incoming_info(e),
        last_finalize=life.last_finalize,
        connections=connections,
        frozen=e.frozen,
    )
