"""The lifecycle: finalize, unfreeze, handover and stop, as one transition table.

Every change of the daemon's state happens here, through :data:`TRANSITIONS`
and nowhere else (docs/design.md §5)::

    ACTIVE --finalize--> FINALIZING --freeze--> FROZEN --commit--> FINALIZED --handover--> HANDED_OVER
      ^  ^                   |                    |                    |
      |  +------ abort ------+------- abort ------+                    |
      +------------------------------ unfreeze ------------------------+
    ACTIVE, FINALIZING, FROZEN --stop--> STOPPED;   ACTIVE --release--> ACTIVE

Rules, in the order a finalize meets them:

* FINALIZING: the engine holds every session (a disconnect no longer
  discards one) and the FINALIZE notifiers run; subscribed sessions may still
  preserve memory and edit their trees, and answer ok, veto or error.
* A veto, an error, a disconnect or a timeout aborts: back to ACTIVE with
  every preservation intact, then the UNFREEZE notifiers run.
* FROZEN: the engine refuses preservation and tree edits (its one check,
  ``Engine._editable``) while the commit writes the handover; a failed
  commit aborts the same way.
* FINALIZED: the record is committed. ``unfreeze`` takes it back (ACTIVE,
  then UNFREEZE notifiers); ``handover`` tells every client and the daemon
  exits. Nothing leaves FINALIZED or HANDED_OVER by a stop.
* One operator transition at a time: a second finalize or unfreeze while
  one runs is refused ``EBUSY``; SIGTERM waits for the running one.

Notifier rounds reach sessions through the small :class:`Subscribers`
interface, so this module is tested with fake subscribers, without sockets.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Protocol

import trio

from khod.engine import Engine
from khod.errors import KhoError, ebusy, eexist, enoent
from khod.faults import FaultPoint
from khod.kho.handover import Hook, no_hook
from khod.log import Log
from khod.results import DropResult, FinalizeResult, ReleaseResult, UnfreezeResult
from khod.session import Session


class State(StrEnum):
    ACTIVE = "active"
    FINALIZING = "finalizing"  # FINALIZE notifiers run; edits still allowed
    FROZEN = "frozen"  # edits refused; the commit is being written
    FINALIZED = "finalized"  # a committed handover waits
    HANDED_OVER = "handed_over"  # clients told; the daemon exits
    STOPPED = "stopped"  # exiting without a handover; the region is clean


class Step(StrEnum):
    FINALIZE = "finalize"
    FREEZE = "freeze"
    COMMIT = "commit"
    ABORT = "abort"
    UNFREEZE = "unfreeze"
    HANDOVER = "handover"
    RELEASE = "release"  # release-unclaimed: only while nothing is being handed over
    DROP = "drop"  # drop-session: likewise
    STOP = "stop"


S = State
TRANSITIONS: Mapping[tuple[State, Step], State] = MappingProxyType(
    {
        (S.ACTIVE, Step.FINALIZE): S.FINALIZING,
        (S.FINALIZING, Step.FREEZE): S.FROZEN,
        (S.FINALIZING, Step.ABORT): S.ACTIVE,
        (S.FROZEN, Step.COMMIT): S.FINALIZED,
        (S.FROZEN, Step.ABORT): S.ACTIVE,
        (S.FINALIZED, Step.UNFREEZE): S.ACTIVE,
        (S.FINALIZED, Step.HANDOVER): S.HANDED_OVER,
        (S.ACTIVE, Step.RELEASE): S.ACTIVE,
        (S.ACTIVE, Step.DROP): S.ACTIVE,
        (S.ACTIVE, Step.STOP): S.STOPPED,
        (S.FINALIZING, Step.STOP): S.STOPPED,
        (S.FROZEN, Step.STOP): S.STOPPED,
    }
)


def refusal(state: State, step: Step) -> KhoError:
    """Why ``step`` cannot happen in ``state``, as the error a client gets."""
    if step is Step.FINALIZE:
        if state is S.FINALIZED:
            return eexist("already finalized")
        if state in (S.FINALIZING, S.FROZEN):
            return ebusy("a finalize is already running")
    if step is Step.UNFREEZE:
        return enoent("not finalized")
    if step is Step.HANDOVER:
        return ebusy("handover needs a finalized daemon; run finalize first")
    if step is Step.RELEASE:
        return ebusy(f"cannot release incoming memory while {state}")
    if step is Step.DROP:
        return ebusy(f"cannot drop a session while {state}: what it holds may be handed over")
    if step is Step.STOP and state is S.FINALIZED:
        return ebusy("finalized: hand over or unfreeze before stopping")
    return ebusy(f"cannot {step} while {state}")


# ------------------------------------------------------------------------- notifier rounds


@dataclass(frozen=True)
class Subscriber:
    """A session that asked to be told of an event, on one connection ``key``."""

    key: int
    session: str  # as reports name it: u<uid>,<name>, unique across users
    notify: Callable[[str, int, int], bool]  # (event, token, generation) -> delivered


class Subscribers(Protocol):
    """Who is told what: the server's connections, or a test's fakes."""

    def subscribed(self, event: str) -> list[Subscriber]: ...

    def broadcast(self, event: str, **fields: Any) -> None:
        """Tell every connection, subscribed or not (the handover)."""
        ...


class LifecycleMetrics(Protocol):
    def state(self, state: str) -> None: ...

    def finalize(self, result: str, seconds: float) -> None: ...

    def notifier(self, event: str, seconds: float) -> None: ...


Progress = Callable[..., None]  # called with phase=..., session=..., status=..., reason=...


def no_progress(**fields: Any) -> None:
    return None


@dataclass(frozen=True)
class RoundResult:
    failure: tuple[str, str, str] | None  # (session, status, reason) of the first failure
    answered: Mapping[str, str]  # session -> ok | veto | error | timeout | disconnected


_FAILED = {
    "veto": "vetoed by",
    "timeout": "timed out waiting for",
    "disconnected": "aborted: disconnect of",
}
_OUTCOME = {"veto": "vetoed", "timeout": "timeout"}


class Lifecycle:
    """The one owner of the daemon's state; drives the engine's levers in order."""

    def __init__(
        self,
        engine: Engine,
        subscribers: Subscribers,
        *,
        notifier_timeout_s: float,
        handover_on_stop: bool = False,
        log: Log | None = None,
        metrics: LifecycleMetrics | None = None,
        hook: Hook = no_hook,
        announce: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.engine = engine
        self.subscribers = subscribers
        self.notifier_timeout_s = notifier_timeout_s
        self.handover_on_stop = handover_on_stop
        self.log = log or Log()
        self.metrics = metrics
        self.hook = hook
        self.announce = announce  # one-line status for the service manager
        self.state = State.ACTIVE
        self.last_finalize: FinalizeResult | None = None
        self._busy = trio.Lock()
        self._editors = 0  # preservation requests running in steps (see editing())
        self._drained = trio.Event()
        self._drained.set()
        self._freezing = False
        self._tokens = itertools.count(1)
        self._rounds: dict[int, trio.MemorySendChannel[tuple[int, str, str]]] = {}
        if metrics is not None:
            metrics.state(self.state)

    @contextlib.asynccontextmanager
    async def editing(self) -> AsyncIterator[None]:
        """Hold while a preservation request runs in steps, so the freeze waits for it.

        Requests made of one step never wait and need not hold this: no freeze
        can land inside them. One made of several steps must not see the
        freeze land between two of them; once the freeze is wanted, new ones
        are refused at once, as edits are after it.
        """
        if self._freezing:
            raise ebusy("preservation is frozen for finalize; try again after unfreeze")
        self._editors += 1
        if self._editors == 1:
            self._drained = trio.Event()
        try:
            yield
        finally:
            self._editors -= 1
            if self._editors == 0:
                self._drained.set()

    async def _drain(self) -> None:
        """Refuse new stepped edits and wait for those running to finish."""
        self._freezing = True
        await self._drained.wait()

    @property
    def busy(self) -> bool:
        """A finalize or unfreeze is running."""
        return self._busy.locked()

    def _check(self, step: Step) -> State:
        """The state ``step`` leads to from here, or the refusal."""
        nxt = TRANSITIONS.get((self.state, step))
        if nxt is None:
            raise refusal(self.state, step)
        return nxt

    def _enter(self, state: State) -> None:
        self.state = state
        if self.metrics is not None:
            self.metrics.state(state)

    def _fire(self, step: Step) -> None:
        self._enter(self._check(step))

    # ----------------------------------------------------------------- finalize

    async def finalize(self, progress: Progress = no_progress) -> FinalizeResult:
        if self.busy:
            raise ebusy("a finalize, unfreeze or handover is already in progress")
        async with self._busy:
            return await self._finalize(progress)

    async def _finalize(self, progress: Progress) -> FinalizeResult:
        self._fire(Step.FINALIZE)
        self.engine.hold()
        t0 = time.perf_counter()
        outcome = "error"
        self.log.info(
            "finalize.start",
            sessions=len(self.engine.sessions),
            generation=self.engine.generation + 1,
        )
        self.announce("finalizing: FINALIZE notifiers")
        try:
            result = await self._round("finalize", progress, stop_on_failure=True)
            if result.failure is not None:
                session, status, reason = result.failure
                outcome = _OUTCOME.get(status, "error")
                await self._abort(progress, f"{status} from {session!r}: {reason}")
                code = {"veto": "EBUSY", "timeout": "ETIMEDOUT"}.get(status, "EPROTO")
                raise KhoError(
                    code,
                    f"finalize {_FAILED.get(status, 'failed in')} session {session!r}: {reason}",
                )
            self.hook(FaultPoint.FINALIZE_NOTIFIED)
            progress(phase="finalize", status="freezing")
            await self._drain()
            self._fire(Step.FREEZE)
            self.engine.freeze()
            summary = self.engine.commit()
            self._fire(Step.COMMIT)
            outcome = "ok"
        except BaseException as exc:
            self._freezing = False
            if self.state in (State.FINALIZING, State.FROZEN):
                # a failed commit, or the finalize was cancelled (its requester went away,
                # the daemon stops): never leave the daemon holding or frozen
                if isinstance(exc, trio.Cancelled):
                    reason = "cancelled: the requester's connection broke or the daemon stops"
                else:
                    reason = exc.message if isinstance(exc, KhoError) else repr(exc)
                self.log.error("finalize.failed", reason=reason)
                await self._abort(progress, reason)
            raise
        finally:
            self._count_finalize(outcome, t0)
        self._freezing = False  # the engine refuses edits itself from here on
        done = FinalizeResult.of(
            summary, round((time.perf_counter() - t0) * 1e3, 3), result.answered
        )
        self.last_finalize = done
        self.log.info(
            "finalize.done",
            generation=done.generation,
            bytes=done.total_bytes,
            chunk_pages=done.chunk_pages,
            fdt_bytes=done.fdt_bytes,
            ms=done.duration_ms,
        )
        self.announce(f"finalized: generation {done.generation} committed")
        progress(phase="finalize", status="committed")
        return done

    def _count_finalize(self, outcome: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.finalize(outcome, time.perf_counter() - t0)

    async def _abort(self, progress: Progress, reason: str) -> None:
        """FINALIZING or FROZEN -> ACTIVE with every preservation as it was, then UNFREEZE.

        The UNFREEZE events go out before the first checkpoint, so even a
        cancelled abort tells every session that paused for the finalize.
        """
        self.log.warning("finalize.aborted", reason=reason)
        self._fire(Step.ABORT)
        self._log_swept(self.engine.release(), "no connection after abort")
        self.announce("active")
        await self._round("unfreeze", progress, stop_on_failure=False)

    def _log_swept(self, sessions: list[Session], reason: str) -> None:
        for s in sessions:
            self.log.info("session.discarded", session=s.name, uid=s.uid, reason=reason)

    # ----------------------------------------------------------------- unfreeze, handover, stop

    async def unfreeze(self, progress: Progress = no_progress) -> UnfreezeResult:
        if self.busy:
            raise ebusy("a finalize, unfreeze or handover is already in progress")
        async with self._busy:
            nxt = self._check(Step.UNFREEZE)
            self.engine.uncommit()
            self._enter(nxt)
            self._log_swept(self.engine.release(), "no connection after unfreeze")
            self.log.info("unfreeze.done", generation=self.engine.generation)
            result = await self._round("unfreeze", progress, stop_on_failure=False)
            self.announce("active")
            return UnfreezeResult(str(self.state), result.answered)

    def hand_over(self) -> int:
        """FINALIZED -> HANDED_OVER: tell every client; the caller then stops the daemon."""
        if self.busy:
            raise ebusy("a finalize or unfreeze is in progress")
        nxt = self._check(Step.HANDOVER)
        self.engine.region.check_identity()  # the successor must find what we wrote
        self._enter(nxt)
        assert self.engine.committed is not None  # FINALIZED means committed
        generation = self.engine.committed.record.generation
        self.subscribers.broadcast("handover", generation=generation)
        self.log.info("handover", generation=generation)
        self.hook(FaultPoint.HANDOVER)
        return generation

    async def terminate(self) -> tuple[str, int]:
        """SIGTERM: hand over when finalized, else stop (or finalize first if configured).

        Returns why the daemon stops and its exit status.
        """
        async with self._busy:
            state = self.state
        if state is State.FINALIZED:
            self.hand_over()
            return "handover on SIGTERM", 0
        if state is State.ACTIVE and self.handover_on_stop:
            try:
                await self.finalize()
            except KhoError as exc:
                self.log.error("stop.no_handover", reason=exc.message)
                return "stop: finalize on stop failed", 1
            self.hand_over()
            return "handover on stop", 0
        return "stop without handover", 0

    def stop(self) -> None:
        """The daemon exits without a handover: the region's record says clean."""
        nxt = self._check(Step.STOP)
        if not self.engine.stop_clean():
            self.log.info(
                "stop.handover_kept",
                generation=self.engine.generation,
                reason="nothing was taken over; the next start takes the handover in",
            )
        self._enter(nxt)

    def release_unclaimed(self, name: str | None = None, uid: int | None = None) -> ReleaseResult:
        self._check(Step.RELEASE)
        out = self.engine.release_unclaimed(name, uid)
        self.log.info(
            "incoming.released",
            session=name or "*",
            bytes=out.released_bytes,
            dropped=" ".join(out.dropped) or None,
        )
        return out

    def drop_session(self, uid: int, name: str) -> DropResult:
        """An operator evicts a session (only while nothing is being handed over)."""
        if self.busy:
            raise ebusy("a finalize or unfreeze is in progress")
        self._check(Step.DROP)
        out = self.engine.drop_session(uid, name)
        self.log.warning(
            "session.dropped",
            session=name,
            uid=uid,
            freed=out.freed_bytes,
            released=out.released_bytes,
            connections=out.connections_closed,
        )
        return out

    # ----------------------------------------------------------------- notifier rounds

    def answer(self, key: int, token: int, status: str, reason: str) -> None:
        """A session's answer (ok, veto or error) to round ``token``, from connection ``key``."""
        waiter = self._rounds.get(token)
        if waiter is None:
            raise enoent(f"no notifier round {token} is waiting for answers")
        waiter.send_nowait((key, status, reason))

    def disconnected(self, key: int) -> None:
        """Connection ``key`` closed: whatever it was asked counts as a disconnect."""
        for waiter in self._rounds.values():
            waiter.send_nowait((key, "disconnected", "the connection closed"))

    async def _round(self, event: str, progress: Progress, *, stop_on_failure: bool) -> RoundResult:
        """Tell every subscriber of ``event`` and collect their answers, bounded in time."""
        token = next(self._tokens)
        send, recv = trio.open_memory_channel[tuple[int, str, str]](math.inf)
        self._rounds[token] = send
        pending: dict[int, str] = {}
        answered: dict[str, str] = {}
        failure: tuple[str, str, str] | None = None
        timeout = self.notifier_timeout_s
        t0 = time.perf_counter()
        try:
            for sub in self.subscribers.subscribed(event):
                pending[sub.key] = sub.session
                progress(phase=event, session=sub.session, status="asked")
                self.log.info(f"notify.{event}", session=sub.session, token=token)
                if not sub.notify(event, token, self.engine.generation):
                    send.send_nowait((sub.key, "disconnected", "could not deliver the event"))
            with trio.move_on_after(timeout) as scope:
                while pending:
                    key, status, reason = await recv.receive()
                    session = pending.pop(key, None)
                    if session is None:
                        continue
                    answered[session] = status
                    progress(phase=event, session=session, status=status, reason=reason or None)
                    if status != "ok":
                        self.log.warning(f"notify.{event}.{status}", session=session, reason=reason)
                        failure = failure or (session, status, reason)
                        if stop_on_failure:
                            break
            if scope.cancelled_caught:
                for session in pending.values():
                    answered[session] = "timeout"
                    progress(phase=event, session=session, status="timeout")
                    self.log.warning(f"notify.{event}.timeout", session=session, timeout_s=timeout)
                    failure = failure or (session, "timeout", f"no answer in {timeout:g} s")
        finally:
            del self._rounds[token]
            if self.metrics is not None:
                self.metrics.notifier(event, time.perf_counter() - t0)
        return RoundResult(failure, answered)
