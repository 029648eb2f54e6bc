"""The lifecycle on its own: the transition table and notifier rounds, with fake subscribers.

No sockets and no sleeps: subscribers are plain objects that answer (or do
not) when notified, and timeouts run on trio's MockClock.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from khod.engine import Engine
from khod.errors import Errno, KhoError
from khod.kho.handover import CommitStep, read_handover
from khod.kho.record import RecordState, live_record, read_record, write_record
from khod.lifecycle import TRANSITIONS, Lifecycle, State, Step, Subscriber, refusal
from khod.log import Log
from khod.region import Region
from khod.session import Session
from khod.startup import layout

from .conftest import MakeRegion

Answer = Callable[["Fakes", int, str, int], None]


def ok(fakes: Fakes, key: int, event: str, token: int) -> None:
    fakes.life.answer(key, token, "ok", "")


def veto(fakes: Fakes, key: int, event: str, token: int) -> None:
    if event == "finalize":
        fakes.life.answer(key, token, "veto", "guest is migrating")
    else:
        ok(fakes, key, event, token)


def error(fakes: Fakes, key: int, event: str, token: int) -> None:
    if event == "finalize":
        fakes.life.answer(key, token, "error", "RuntimeError: disk full")
    else:
        ok(fakes, key, event, token)


def silent(fakes: Fakes, key: int, event: str, token: int) -> None:
    return None


def vanish(fakes: Fakes, key: int, event: str, token: int) -> None:
    if event == "finalize":
        fakes.life.disconnected(key)


@dataclass
class Fakes:
    """Subscribers as the lifecycle sees them: a session name, a key and a behaviour."""

    life: Lifecycle = field(init=False)
    subs: dict[int, tuple[str, set[str], Answer]] = field(default_factory=dict)
    told: list[tuple[str, str]] = field(default_factory=list)  # (session, event)
    broadcasts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    keys: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, session: str, answer: Answer, events: set[str] | None = None) -> int:
        key = next(self.keys)
        self.subs[key] = (session, events or {"finalize", "unfreeze"}, answer)
        return key

    def subscribed(self, event: str) -> list[Subscriber]:
        return [
            Subscriber(key, name, self._notifier(key, name, answer))
            for key, (name, events, answer) in self.subs.items()
            if event in events
        ]

    def _notifier(self, key: int, name: str, answer: Answer) -> Callable[[str, int, int], bool]:
        def notify(event: str, token: int, generation: int) -> bool:
            self.told.append((name, event))
            answer(self, key, event, token)
            return True

        return notify

    def broadcast(self, event: str, **fields: Any) -> None:
        self.broadcasts.append((event, fields))


@dataclass
class Rig:
    engine: Engine
    life: Lifecycle
    fakes: Fakes
    log: io.StringIO
    states: list[str]

    def session(self, name: str = "db", persistent: bool = True, key: int = 0) -> Session:
        s, _ = self.engine.hello(1000, name, persistent, key)
        return s

    def preserved(self, s: Session, order: int = 0) -> int:
        phys = self.engine.alloc_folio(s, order)
        self.engine.preserve_folio(s, phys)
        return phys


class Metrics:
    def __init__(self) -> None:
        self.states: list[str] = []
        self.finalizes: list[str] = []

    def state(self, state: str) -> None:
        self.states.append(state)

    def finalize(self, result: str, seconds: float) -> None:
        self.finalizes.append(result)

    def notifier(self, event: str, seconds: float) -> None:
        return None


def rig_for(region: Region, **kw: Any) -> Rig:
    alloc, scratch = layout(region, 1 << 20)
    write_record(region, live_record(region, scratch, 0, os.getpid()))
    engine = Engine(region, alloc, scratch, 0, pid=os.getpid())
    fakes = Fakes()
    buf = io.StringIO()
    metrics = Metrics()
    life = Lifecycle(
        engine, fakes, notifier_timeout_s=5, log=Log("debug", stream=buf), metrics=metrics, **kw
    )
    fakes.life = life
    return Rig(engine, life, fakes, buf, metrics.states)


@pytest.fixture
def rig(make_region: MakeRegion) -> Rig:
    return rig_for(make_region(16 << 20))


def record_state(rig: Rig) -> RecordState:
    rec = read_record(rig.engine.region)
    assert rec is not None
    return rec.state


# ----------------------------------------------------------------------------- the table


def test_every_pair_is_either_a_transition_or_a_named_refusal() -> None:
    for state, step in itertools.product(State, Step):
        if (state, step) in TRANSITIONS:
            continue
        err = refusal(state, step)
        assert err.code in (Errno.EBUSY, Errno.EEXIST, Errno.ENOENT), (state, step)
        assert err.message
    assert refusal(State.FINALIZED, Step.FINALIZE).code is Errno.EEXIST
    assert refusal(State.ACTIVE, Step.UNFREEZE).message == "not finalized"
    assert "run finalize first" in refusal(State.ACTIVE, Step.HANDOVER).message
    assert "hand over or unfreeze" in refusal(State.FINALIZED, Step.STOP).message
    # nothing ever leaves a handover or a stop
    assert not [k for k in TRANSITIONS if k[0] in (State.HANDED_OVER, State.STOPPED)]


# ----------------------------------------------------------------------------- finalize


async def test_finalize_freezes_commits_and_unfreeze_undoes_it(rig: Rig) -> None:
    s = rig.session()
    phys = rig.preserved(s, 3)
    rig.fakes.add("db", ok)
    progress: list[dict[str, Any]] = []
    done = await rig.life.finalize(lambda **f: progress.append(f))
    assert rig.life.state is State.FINALIZED
    assert rig.states == ["active", "finalizing", "frozen", "finalized"]
    assert done.notified == {"db": "ok"} and done.bytes == {"3": 8 * 4096}
    assert [p["status"] for p in progress] == ["asked", "ok", "freezing", "committed"]
    assert record_state(rig) is RecordState.HANDOVER
    assert rig.life.last_finalize is done
    # the freeze: the engine refuses every edit, in one place
    with pytest.raises(KhoError, match="frozen") as e:
        rig.engine.unpreserve_folio(s, phys)
    assert e.value.code is Errno.EBUSY
    with pytest.raises(KhoError, match="frozen"):
        rig.engine.editable_tree(s)
    result = await rig.life.unfreeze()
    assert result.state == "active" and result.notified == {"db": "ok"}
    assert rig.fakes.told == [("db", "finalize"), ("db", "unfreeze")]
    assert record_state(rig) is RecordState.LIVE
    assert rig.engine.unpreserve_folio(s, phys) == 3  # edits allowed again


async def test_sessions_may_still_edit_during_the_finalize_phase(rig: Rig) -> None:
    s = rig.session()
    late = rig.engine.alloc_folio(s, 9)

    def edit_then_ok(fakes: Fakes, key: int, event: str, token: int) -> None:
        if event == "finalize":
            rig.engine.preserve_folio(s, late)
            rig.engine.editable_tree(s).add_node("/paused")
        ok(fakes, key, event, token)

    rig.fakes.add("db", edit_then_ok)
    await rig.life.finalize()
    region = rig.engine.region
    rec = read_record(region)
    assert rec is not None
    incoming = read_handover(region, rec)
    assert incoming.sessions[(1000, "db")].memory.tracker.folios(9).tolist() == [late >> 12]
    assert "paused" in incoming.sessions[(1000, "db")].subtree.children


@pytest.mark.parametrize(
    ("answer", "code", "status"),
    [
        (veto, Errno.EBUSY, "veto"),
        (error, Errno.EPROTO, "error"),
        (vanish, Errno.EPROTO, "disconnected"),
        (silent, Errno.ETIMEDOUT, "timeout"),
    ],
)
async def test_a_failed_finalize_phase_aborts_with_everything_intact(
    rig: Rig, autojump_clock: trio.testing.MockClock, answer: Answer, code: Errno, status: str
) -> None:
    s = rig.session()
    phys = rig.preserved(s, 2)
    rig.fakes.add("vmm", answer, {"finalize"})
    rig.fakes.add("db", ok, {"unfreeze"})
    progress: list[dict[str, Any]] = []
    with pytest.raises(KhoError) as e:
        await rig.life.finalize(lambda **f: progress.append(f))
    assert e.value.code is code
    assert "'vmm'" in e.value.message
    assert ("vmm", status) in [(p.get("session"), p.get("status")) for p in progress]
    assert rig.life.state is State.ACTIVE
    assert rig.states[-1] == "active"
    assert not rig.engine.frozen and not rig.engine.held
    assert ("db", "unfreeze") in rig.fakes.told  # the UNFREEZE notifiers ran
    assert record_state(rig) is RecordState.LIVE
    assert rig.engine.unpreserve_folio(s, phys) == 2  # intact and editable
    assert "finalize.aborted" in rig.log.getvalue()


async def test_a_failed_commit_aborts_with_everything_intact(rig: Rig) -> None:
    s = rig.session()
    first = rig.preserved(s, 0)

    def full(point: str) -> None:
        if point == CommitStep.FDT_WRITTEN:
            raise KhoError(Errno.ENOMEM, "the filesystem of the region is full")

    rig.engine.hook = full
    with pytest.raises(KhoError, match="is full") as e:
        await rig.life.finalize()
    assert e.value.code is Errno.ENOMEM
    assert rig.life.state is State.ACTIVE and not rig.engine.frozen
    assert record_state(rig) is RecordState.LIVE
    assert rig.engine.unpreserve_folio(s, first) == 0
    assert "finalize.failed" in rig.log.getvalue()


async def test_no_client_can_take_the_pages_finalize_needs(rig: Rig) -> None:
    s = rig.session()
    rig.preserved(s, 0)

    def take_everything() -> None:
        while True:
            rig.preserved(s, 0)

    with pytest.raises(KhoError, match="reserve no session may use") as e:
        take_everything()
    assert e.value.code is Errno.ENOMEM
    assert rig.engine.allocator.free_pages >= rig.engine.metadata_need()
    done = await rig.life.finalize()  # the metadata still fits
    assert done.total_bytes == s.tracker.total_bytes()


async def test_sessions_are_held_during_a_finalize_and_swept_after_an_abort(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    gone = rig.session("gone", persistent=False, key=7)
    rig.preserved(gone)

    def leave_then_veto(fakes: Fakes, key: int, event: str, token: int) -> None:
        if event == "finalize":
            assert not rig.engine.detach(gone, 7)  # held: not discarded mid-finalize
        veto(fakes, key, event, token)

    rig.fakes.add("vmm", leave_then_veto)
    with pytest.raises(KhoError):
        await rig.life.finalize()
    assert "gone" not in rig.engine.sessions  # swept once the abort released it
    assert "session.discarded session=gone" in rig.log.getvalue()


async def test_one_operator_transition_at_a_time(
    rig: Rig, autojump_clock: trio.testing.MockClock
) -> None:
    rig.fakes.add("slow", silent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.life.finalize)
        await trio.testing.wait_all_tasks_blocked()
        assert rig.life.state is State.FINALIZING and rig.life.busy
        for attempt in (rig.life.finalize(), rig.life.unfreeze()):
            with pytest.raises(KhoError, match="already in progress") as e:
                await attempt
            assert e.value.code is Errno.EBUSY
        with pytest.raises(KhoError, match="in progress"):
            rig.life.hand_over()
        with pytest.raises(KhoError, match="cannot release"):
            rig.life.release_unclaimed()
        nursery.cancel_scope.cancel()
    # a cancelled finalize (its requester went away) aborts: not held, not frozen,
    # and the sessions told to pause are told to carry on
    assert rig.life.state is State.ACTIVE and not rig.engine.frozen and not rig.engine.held
    assert rig.fakes.told == [("slow", "finalize"), ("slow", "unfreeze")]


# ----------------------------------------------------------------------------- handover, stop


async def test_handover_tells_everyone_and_only_from_finalized(rig: Rig) -> None:
    with pytest.raises(KhoError, match="run finalize first"):
        rig.life.hand_over()
    await rig.life.finalize()
    with pytest.raises(KhoError, match="already finalized") as e:
        await rig.life.finalize()
    assert e.value.code is Errno.EEXIST
    with pytest.raises(KhoError, match="hand over or unfreeze"):
        rig.life.stop()
    assert rig.life.hand_over() == 1
    assert rig.life.state is State.HANDED_OVER
    assert rig.fakes.broadcasts == [("handover", {"generation": 1})]
    assert record_state(rig) is RecordState.HANDOVER
    with pytest.raises(KhoError):
        await rig.life.unfreeze()


async def test_terminate_does_what_the_state_and_config_say(make_region: MakeRegion) -> None:
    plain = rig_for(make_region(16 << 20, name="a"))
    assert await plain.life.terminate() == ("stop without handover", 0)
    plain.life.stop()
    assert plain.life.state is State.STOPPED and record_state(plain) is RecordState.CLEAN

    finalized = rig_for(make_region(16 << 20, name="b"))
    await finalized.life.finalize()
    assert await finalized.life.terminate() == ("handover on SIGTERM", 0)
    assert finalized.life.state is State.HANDED_OVER

    eager = rig_for(make_region(16 << 20, name="c"), handover_on_stop=True)
    assert await eager.life.terminate() == ("handover on stop", 0)
    assert eager.life.state is State.HANDED_OVER and record_state(eager) is RecordState.HANDOVER

    vetoed = rig_for(make_region(16 << 20, name="d"), handover_on_stop=True)
    vetoed.fakes.add("vmm", veto)
    assert await vetoed.life.terminate() == ("stop: finalize on stop failed", 1)
    assert vetoed.life.state is State.ACTIVE


async def test_answers_to_unknown_rounds_are_refused(rig: Rig) -> None:
    with pytest.raises(KhoError, match="no notifier round 42") as e:
        rig.life.answer(1, 42, "ok", "")
    assert e.value.code is Errno.ENOENT


def test_the_metadata_reserve_counts_each_session_list_once(make_region: MakeRegion) -> None:
    """metadata_need counts live and handed-over sessions without building their union
    on every preserve; a reattached one is one list, and so is one discarded twice."""
    region = make_region(16 << 20)
    alloc, scratch = layout(region, 1 << 20)
    write_record(region, live_record(region, scratch, 0, os.getpid()))
    engine = Engine(region, alloc, scratch, 0, pid=os.getpid())

    def lists() -> int:
        return len(engine._session_keys()) + 1

    base = engine.metadata_need() - 20 * lists()
    a, _ = engine.hello(0, "a", False, 1)
    b, _ = engine.hello(7, "a", True, 2)
    assert engine.metadata_need() - 20 * lists() == base and lists() == 3
    engine.discard(a)
    engine.discard(a)
    assert engine.metadata_need() - 20 * lists() == base and lists() == 2
    engine.discard(b)
    assert engine.metadata_need() - 20 * lists() == base and lists() == 1
