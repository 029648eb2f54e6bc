"""What the engine and the lifecycle report: frozen dataclasses, serialized at the wire edge.

Each result is built once by the layer that knows it and never changed
afterwards; :func:`wire` turns any of them into the plain maps the protocol
carries (docs/protocol.md §6 lists their keys). Per-order figures are keyed
by the order as a string, as the wire format has always had them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OrderCount:
    folios: int
    bytes: int


@dataclass(frozen=True)
class SessionBytes:
    name: str
    uid: int
    bytes: int


@dataclass(frozen=True)
class CommitSummary:
    """What one commit wrote (the engine's part of a finalize)."""

    generation: int
    folios: Mapping[str, int]
    bytes: Mapping[str, int]
    total_bytes: int
    sessions: tuple[SessionBytes, ...]
    chunk_pages: int
    metadata_pages: int
    fdt_bytes: int
    commit_ms: float


@dataclass(frozen=True)
class FinalizeResult(CommitSummary):
    """A whole finalize: the commit, how long it all took, and how notifiers answered."""

    duration_ms: float
    notified: Mapping[str, str]

    @classmethod
    def of(
        cls, summary: CommitSummary, duration_ms: float, notified: Mapping[str, str]
    ) -> FinalizeResult:
        parts = {f.name: getattr(summary, f.name) for f in dataclasses.fields(summary)}
        return cls(**parts, duration_ms=duration_ms, notified=dict(notified))


@dataclass(frozen=True)
class UnfreezeResult:
    state: str
    notified: Mapping[str, str]


@dataclass(frozen=True)
class ReleaseResult:
    released_bytes: int
    dropped_sessions: tuple[str, ...]  # names alone, as before (ambiguous across uids)
    dropped: tuple[str, ...]  # the same sessions as u<uid>,<name>, as everywhere else


@dataclass(frozen=True)
class DropResult:
    name: str
    uid: int
    freed_bytes: int  # allocated or restored memory given back
    released_bytes: int  # handed-over memory never restored, given back
    connections_closed: int


@dataclass(frozen=True)
class NodeListing:
    props: tuple[str, ...]
    children: tuple[str, ...]


@dataclass(frozen=True)
class RegionUsage:
    """Region geometry and bytes by use (status and the metrics report it)."""

    backend: str
    path: str
    base: int
    size: int
    free: int
    allocated: int
    preserved: int
    metadata: int
    reserved_incoming: int
    reserved: int
    scratch: int
    scratch_free: int


@dataclass(frozen=True)
class SessionInfo:
    name: str
    uid: int
    persistent: bool
    connections: int
    allocated_bytes: int
    preserved_bytes: int
    preserved: Mapping[str, OrderCount]
    tree_nodes: int
    tree_bytes: int
    incoming_unclaimed_bytes: int


@dataclass(frozen=True)
class IncomingSessionInfo:
    name: str
    uid: int
    claimed: bool
    unclaimed_bytes: int
    unclaimed_folios: int


@dataclass(frozen=True)
class IncomingInfo:
    unclaimed_bytes: int
    sessions: tuple[IncomingSessionInfo, ...]


@dataclass(frozen=True)
class Status:
    """The ``status`` reply: the engine's view plus the lifecycle's and the server's."""

    state: str
    generation: int
    pid: int
    region: RegionUsage
    sessions: tuple[SessionInfo, ...]
    incoming: IncomingInfo
    last_finalize: FinalizeResult | None
    connections: int
    frozen: bool


def wire(value: Any) -> Any:
    """A result as the plain maps, lists and scalars a reply carries."""
    if type(value) is dict:  # most replies: no dataclass check to pay for
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value, dict_factory=dict)
    return value
