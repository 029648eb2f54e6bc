"""What a request handler may use: the narrow interface between the ops and the server.

Handlers (:mod:`khod.ops`) see a :class:`Context` -- the engine, the
lifecycle, a few limits and callbacks -- and the :class:`Caller` whose
request it is; never the server or its connections. They answer with a
result, or an :class:`Outcome` when the reply carries fds or something must
happen once it is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from khod.engine import Engine
from khod.lifecycle import Lifecycle, Progress
from khod.log import Log
from khod.session import Peer, Session


@dataclass
class Caller:
    """One connection's standing: who is calling, for which session, told of which events."""

    key: int
    peer: Peer
    session: Session | None = None
    events: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Outcome:
    """A result with extras: fds passed with the reply, work to do once it is queued."""

    result: Any
    fds: tuple[int, ...] = ()
    after: Callable[[], None] | None = None


class RequestMetrics(Protocol):
    def request(self, op: str, code: str, seconds: float) -> None: ...

    def restored(self, nbytes: int) -> None: ...


class Context(Protocol):
    @property
    def engine(self) -> Engine: ...

    @property
    def lifecycle(self) -> Lifecycle: ...

    @property
    def log(self) -> Log: ...

    @property
    def metrics(self) -> RequestMetrics | None: ...

    @property
    def max_batch(self) -> int: ...

    def connection_count(self) -> int: ...

    def progress(self, caller: Caller, req_id: int) -> Progress:
        """Where a long operation reports progress: events to the calling connection."""
        ...

    def request_stop(self, reason: str) -> None: ...

    def serial(self, key: tuple[int, str]) -> AbstractAsyncContextManager[None]:
        """Hold while a request of session ``key`` runs: one at a time per session."""
        ...

    def evict(self, key: tuple[int, str], spare: int | None = None) -> int:
        """Close every connection that speaks for session ``key``; returns how many.

        Connection ``spare`` (the one asking) is only unbound from it, and stays open.
        """
        ...
