"""What ``status`` and the metrics report: the engine's state as frozen results.

Read-only views built on demand; the engine keeps no reporting state of its
own.
"""

from __future__ import annotations

import dataclasses
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


def incoming_info(e: Engine, viewer: int | None = None) -> IncomingInfo:
    shown = [i for i in e.incoming.values() if viewer is None or i.uid == viewer]
    return IncomingInfo(
        unclaimed_bytes=sum(i.unclaimed.total_bytes() for i in shown),
        sessions=tuple(
            IncomingSessionInfo(
                name=inc.name,
                uid=inc.uid,
                claimed=inc.claimed,
                unclaimed_bytes=inc.unclaimed.total_bytes(),
                unclaimed_folios=inc.unclaimed.count(),
            )
            for inc in sorted(shown, key=lambda i: (i.name, i.uid))
        ),
    )


def snapshot(e: Engine, life: Lifecycle, connections: int, viewer: int | None = None) -> Status:
    """The whole ``status`` reply; ``viewer`` (a uid) sees only its own sessions."""
    sessions = sorted(e.sessions.values(), key=lambda s: (s.name, s.uid))
    last = life.last_finalize
    if viewer is not None:
        sessions = [s for s in sessions if s.uid == viewer]
        if last is not None:
            mine = f"u{viewer},"  # notified sessions are named u<uid>,<name>
            last = dataclasses.replace(
                last,
                sessions=tuple(b for b in last.sessions if b.uid == viewer),
                notified={k: v for k, v in last.notified.items() if k.startswith(mine)},
            )
    return Status(
        state=str(life.state),
        generation=e.generation,
        pid=os.getpid(),
        region=region_usage(e),
        sessions=tuple(session_info(s) for s in sessions),
        incoming=incoming_info(e, viewer),
        last_finalize=last,
        connections=connections,
        frozen=e.frozen,
    )
