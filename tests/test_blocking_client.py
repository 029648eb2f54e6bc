"""The blocking Client's two ways of reading: the caller itself, or a reader thread when subscribed.

Most tests script the daemon's side by hand (:class:`Peer`, a plain socket
in a thread of the test), so the order of every byte is the test's choice;
threads meet at threading events, never at sleeps. The last ones run the
real daemon.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from khoclient import Client, KhoError, NotifierEvent, spin
from khoclient.calls import Call
from khoclient.spin import BusyPoll

from khod.errors import Errno
from khod.protocol import Decoder, encode

from .helpers import daemon_running

WAIT = 10.0  # a bound on every wait, so that a broken client fails the test, not hangs it


class Peer:
    """The daemon's end of one connection, driven step by step from a thread of the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(WAIT)
        self.decoder = Decoder()
        self.inbox: list[dict[str, Any]] = []

    def read(self) -> dict[str, Any]:
        """The next request the client sent."""
        while not self.inbox:
            data = self.sock.recv(1 << 16)
            assert data, "the client closed the connection"
            self.inbox += self.decoder.feed(data)
        return self.inbox.pop(0)

    def send(self, **message: Any) -> None:
        self.sock.sendall(encode(message))

    def reply(self, request: dict[str, Any], **result: Any) -> None:
        self.send(id=request["id"], result=result)


@contextlib.contextmanager
def scripted(shm_dir: Path, script: Callable[[Peer], None]) -> Iterator[str]:
    """A socket whose one connection runs ``script``; its failures fail the test."""
    path = str(shm_dir / "peer.sock")
    errors: list[BaseException] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(WAIT)

        def run() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    script(Peer(conn))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, name="peer")
        t.start()
        try:
            yield path
        finally:
            t.join(WAIT)
            os.unlink(path)
    assert not t.is_alive(), "the scripted peer did not finish"
    if errors:
        raise errors[0]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list gets its result or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def no_threads(c: Client) -> bool:
    return c._reader is None and c._dispatcher is None


# ----------------------------------------------------------------------------- the calling thread reads


def test_a_call_reads_its_own_reply_and_starts_no_thread(shm_dir: Path) -> None:
    def script(p: Peer) -> None:
        r = p.read()
        assert r["op"] == "status"
        p.send(id=999, result={"stray": True})  # a reply nobody waits for is dropped
        p.reply(r, answer=1)
        r = p.read()
        p.send(id=r["id"], error={"code": "ENOENT", "message": "no such thing"})
        r = p.read()
        assert r["op"] == "ping"
        p.reply(r)

    with scripted(shm_dir, script) as path, Client(path) as c:
        assert c.status() == {"answer": 1}
        with pytest.raises(KhoError) as e:
            c.status()
        assert (e.value.code, e.value.message) == (Errno.ENOENT, "no such thing")
        c.ping()
        assert no_threads(c) and not c._pending


class Announced(threading.Event):
    """A thread's wake-up event that tells the test when the thread goes to sleep on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.sleeping.set()
        return super().wait(timeout)


@pytest.mark.parametrize("first", ["reader", "sleeper"])
def test_replies_reach_the_thread_that_waits_for_them(shm_dir: Path, first: str) -> None:
    """Two threads call at once: the one reading routes the other's reply to it, or, when its
    own reply comes first, stops reading and wakes the other, which reads on."""
    a_asked, b_asked, go, returned = (threading.Event() for _ in range(4))

    def script(p: Peer) -> None:
        a = p.read()
        p.send(event="progress", request=a["id"])  # tells the test that A's thread reads
        a_asked.set()
        b = p.read()
        b_asked.set()
        assert go.wait(WAIT)
        later, sooner = (a, b) if first == "sleeper" else (b, a)
        p.reply(sooner, who=sooner["op"])
        assert returned.wait(WAIT)  # its call is over before the other reply exists
        p.reply(later, who=later["op"])

    reading = threading.Event()
    wake = Announced()

    def call_b() -> Any:
        c._local.wake = wake  # the thread sleeps on this event
        return c.call(Call("b", {}))

    with scripted(shm_dir, script) as path, Client(path) as c:
        ta, out_a = in_thread(lambda: c.call(Call("a", {}), progress=lambda ev: reading.set()))
        assert a_asked.wait(WAIT) and reading.wait(WAIT)  # A holds the socket
        tb, out_b = in_thread(call_b)
        assert b_asked.wait(WAIT) and wake.sleeping.wait(WAIT)  # B waits for A
        go.set()
        sooner, later = (tb, ta) if first == "sleeper" else (ta, tb)
        sooner.join(WAIT)
        assert not sooner.is_alive()
        returned.set()
        later.join(WAIT)
        assert out_a == [{"who": "a"}] and out_b == [{"who": "b"}]
        assert no_threads(c) and not c._sleepers


def test_close_from_another_thread_ends_a_waiting_call(shm_dir: Path) -> None:
    asked, closed = threading.Event(), threading.Event()

    def script(p: Peer) -> None:
        p.read()
        asked.set()
        assert closed.wait(WAIT)
        assert p.sock.recv(1) == b""  # the client shut its end down

    with scripted(shm_dir, script) as path:
        c = Client(path, timeout=None)  # no timeout: only close() can end the call
        t, out = in_thread(c.status)
        assert asked.wait(WAIT)
        c.close()
        closed.set()
        t.join(WAIT)
        assert not t.is_alive()
        assert isinstance(out[0], KhoError) and out[0].code is Errno.EPROTO
        assert out[0].message == "connection closed"
        with pytest.raises(KhoError, match="connection closed"):
            c.ping()
        c.close()  # twice is fine


def test_the_connection_closing_mid_call(shm_dir: Path) -> None:
    def script(p: Peer) -> None:
        r = p.read()
        p.send(event="progress", request=r["id"], status="asked", session="u0,vmm")
        # and then the daemon is gone

    seen: list[dict[str, Any]] = []
    with scripted(shm_dir, script) as path, Client(path) as c:
        with pytest.raises(KhoError) as e:
            c.finalize(progress=seen.append)
        assert (e.value.code, e.value.message) == (Errno.EPROTO, "connection closed")
        assert [s["status"] for s in seen] == ["asked"]
        with pytest.raises(KhoError, match="connection closed"):
            c.ping()  # fails at once, nothing is sent


def test_a_send_to_a_closed_connection_says_it_is_closed(shm_dir: Path) -> None:
    """Nobody reads an idle connection, so the first call after the peer left finds out."""
    gone = threading.Event()

    def script(p: Peer) -> None:
        p.send(event="handover", generation=3)
        p.sock.shutdown(socket.SHUT_RDWR)
        gone.set()

    with scripted(shm_dir, script) as path, Client(path) as c:
        assert gone.wait(WAIT)
        with pytest.raises(KhoError) as e:
            c.ping()
        assert (e.value.code, e.value.message) == (Errno.EPROTO, "connection closed")
        assert threading.Event.is_set(c.handed_over)  # what came before the end was taken in


def test_a_progress_callback_may_call_the_client(shm_dir: Path) -> None:
    """The reading thread runs the callback; the callback's own call reads on (no deadlock)."""

    def script(p: Peer) -> None:
        fin = p.read()
        assert fin["op"] == "finalize"
        p.send(event="progress", request=fin["id"], status="asked")
        ping = p.read()  # sent from inside the progress callback
        assert ping["op"] == "ping"
        p.reply(fin, generation=1)  # replies in the daemon's order: finalize first
        p.reply(ping)

    pinged: list[str] = []
    with scripted(shm_dir, script) as path, Client(path) as c:

        def progress(ev: dict[str, Any]) -> None:
            c.ping()
            pinged.append(ev["status"])

        assert c.finalize(progress=progress) == {"generation": 1}
        assert pinged == ["asked"]


def test_events_that_arrive_during_a_call(shm_dir: Path) -> None:
    """Handled as a reader thread would: a notifier answered, the handover recorded."""
    answered = threading.Event()

    def script(p: Peer) -> None:
        r = p.read()
        p.send(event="finalize", token=7, generation=0)  # (subscribed behind the client's back)
        p.send(event="handover", generation=1)
        p.reply(r)
        answer = p.read()  # from the callback thread: no callback registered means ok
        assert (answer["op"], answer["token"], answer["ok"]) == ("notify_reply", 7, True)
        p.reply(answer)
        answered.set()

    with scripted(shm_dir, script) as path, Client(path) as c:
        c.ping()
        assert threading.Event.is_set(c.handed_over)
        assert c._dispatcher is not None and c._reader is None
        assert answered.wait(WAIT)


def test_handed_over_is_read_when_looked_at(shm_dir: Path) -> None:
    sent = threading.Event()

    def script(p: Peer) -> None:
        p.send(event="handover", generation=2)
        sent.set()
        assert p.sock.recv(1) == b""

    with scripted(shm_dir, script) as path, Client(path) as c:
        assert sent.wait(WAIT)
        assert c.handed_over.is_set()  # no call made: looking at it read the socket
        assert c.handed_over.wait(0)

    sent.clear()
    with scripted(shm_dir, script) as path, Client(path) as c:
        assert c.handed_over.wait(WAIT)  # waits by reading, whenever the event comes


def test_a_timed_out_reply_is_dropped_and_its_fds_closed(shm_dir: Path) -> None:
    asked, timed_out = threading.Event(), threading.Event()
    r, w = os.pipe()

    def script(p: Peer) -> None:
        late = p.read()
        asked.set()
        assert timed_out.wait(WAIT)
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))]
        p.sock.sendmsg([encode({"id": late["id"], "result": {}, "nfds": 1})], fds)
        nxt = p.read()
        p.reply(nxt, ok=True)

    with scripted(shm_dir, script) as path, Client(path) as c:
        with pytest.raises(KhoError) as e:
            c.call(Call("status", {}), timeout=0.05)
        assert e.value.code is Errno.ETIMEDOUT
        assert asked.is_set()
        timed_out.set()
        assert c.status() == {"ok": True}
        assert not c._core.fds  # the late reply's fd was closed, not kept
    os.close(r)
    os.close(w)


def test_a_reply_with_a_malformed_fd_count_carries_no_fds(shm_dir: Path) -> None:
    def script(p: Peer) -> None:
        for nfds in ("two", -1, 2):  # the last announces fds that never came
            r = p.read()
            p.send(id=r["id"], result={"nfds": str(nfds)}, nfds=nfds)

    with scripted(shm_dir, script) as path, Client(path) as c:
        assert [c.status()["nfds"] for _ in range(3)] == ["two", "-1", "2"]
        assert not c._core.fds


def test_a_reply_longer_than_one_read_is_read_to_its_end(shm_dir: Path) -> None:
    """The direct path's first read takes 64 KiB at most: the rest comes by the routed reads."""
    big = "k" * (300 << 10)

    def script(p: Peer) -> None:
        r = p.read()
        p.reply(r, blob=big)
        r = p.read()
        p.reply(r, n=2)

    with scripted(shm_dir, script) as path, Client(path) as c:
        assert c.status() == {"blob": big}
        assert c.status() == {"n": 2}
        assert not c._pending and not c._inbox


def test_a_call_with_no_time_left_times_out_without_blocking(shm_dir: Path) -> None:
    def script(p: Peer) -> None:
        late = p.read()
        nxt = p.read()
        p.reply(late, late=True)  # dropped: its call is over
        p.reply(nxt, ok=True)

    with scripted(shm_dir, script) as path, Client(path) as c:
        with pytest.raises(KhoError) as e:
            c.call(Call("status", {}), timeout=0)
        assert e.value.code is Errno.ETIMEDOUT
        assert c.status() == {"ok": True}


# ----------------------------------------------------------------------------- busy polling


def test_busy_poll_backs_off_on_misses_and_a_hit_ends_it() -> None:
    bp = BusyPoll(100)
    assert bp.budget() == pytest.approx(100e-6)
    bp.hit()
    assert bp.budget() == pytest.approx(100e-6)
    skipped = []
    for _ in range(12):  # misses in a row: 2, 4, ... calls sleep at once, up to 1024
        bp.miss()
        n = 0
        while bp.budget() == 0:
            n += 1
        skipped.append(n)
    assert skipped == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1024, 1024]
    bp.hit()
    bp.miss()
    assert [bp.budget() for _ in range(3)] == [0, 0, pytest.approx(100e-6)]
    assert BusyPoll(0).budget() == 0  # never spins


def test_busy_poll_budget_comes_from_the_argument_or_the_environment(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(spin.ENV, raising=False)
    assert spin.default_us() == spin.DEFAULT_US
    monkeypatch.setenv(spin.ENV, "0")
    assert spin.default_us() == 0
    for bad in ("fast", "-1", "1000001", "1.5"):
        monkeypatch.setenv(spin.ENV, bad)
        with pytest.raises(KhoError, match=spin.ENV) as e:
            spin.default_us()
        assert e.value.code is Errno.EINVAL
        with pytest.raises(KhoError, match=spin.ENV):
            Client(str(shm_dir / "nobody.sock"))  # refused before it connects
    for bad_arg in (-5, 2_000_000, True, 1.5):
        with pytest.raises(KhoError, match="busy_poll_us") as e:
            BusyPoll(bad_arg)  # type: ignore[arg-type]
        assert e.value.code is Errno.EINVAL


class Observed(BusyPoll):
    """A budget whose hits and misses the test can wait for."""

    def __init__(self, limit_us: int) -> None:
        super().__init__(limit_us)
        self.missed, self.hits = threading.Event(), 0

    def hit(self) -> None:
        self.hits += 1
        super().hit()

    def miss(self) -> None:
        super().miss()
        self.missed.set()


def test_a_reply_after_the_spin_is_read_asleep_and_the_next_calls_sleep_at_once(
    shm_dir: Path,
) -> None:
    observed = Observed(2000)  # 2 ms of polling, then the call sleeps in recvmsg

    def script(p: Peer) -> None:
        r = p.read()
        assert observed.missed.wait(WAIT)  # the client has stopped spinning
        p.reply(r, n=1)
        for n in (2, 3, 4):  # one miss: two calls sleep at once, the third spins again
            r = p.read()
            p.reply(r, n=n)

    with scripted(shm_dir, script) as path, Client(path) as c:
        c._spin = observed
        assert c.status() == {"n": 1}
        observed.missed.clear()
        assert [c.status()["n"] for _ in range(2)] == [2, 3]
        assert not observed.missed.is_set() and observed.hits == 0
        assert c.status() == {"n": 4}
        assert observed.hits == 1 or observed.missed.is_set()  # it spun (a slow peer: a miss)


def test_a_reply_while_spinning_is_taken_without_sleeping(shm_dir: Path) -> None:
    observed = Observed(spin.MAX_US)  # a second: long enough for any reply here

    def script(p: Peer) -> None:
        for n in range(5):
            r = p.read()
            p.reply(r, n=n)

    with scripted(shm_dir, script) as path, Client(path) as c:
        c._spin = observed
        assert [c.status()["n"] for _ in range(5)] == list(range(5))
        assert observed.hits == 5 and not observed.missed.is_set()


def test_busy_poll_off_never_polls(shm_dir: Path) -> None:
    def script(p: Peer) -> None:
        r = p.read()
        p.reply(r, ok=True)

    with scripted(shm_dir, script) as path, Client(path, busy_poll_us=0) as c:
        observed = Observed(0)
        c._spin = observed
        assert c.status() == {"ok": True}
        assert observed.hits == 0 and not observed.missed.is_set()


# ----------------------------------------------------------------------------- the real daemon


def test_subscribe_starts_a_reader_thread_and_unsubscribing_stops_it(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d, d.client("vmm") as vmm, d.client() as op:
        f = vmm.alloc_folio(0)
        vmm.preserve_folio(f)
        assert no_threads(vmm)
        called = threading.Event()

        def on_finalize(ev: NotifierEvent) -> None:
            vmm.preserve_folio(vmm.alloc_folio(0))  # from the callback thread
            called.set()

        vmm.subscribe(on_finalize=on_finalize)
        assert vmm._reader is not None and vmm._reader.is_alive()
        progress: list[dict[str, Any]] = []
        # the vmm's own thread is busy elsewhere: the reader thread must take the event
        summary = op.finalize(progress=progress.append)
        assert called.is_set()
        assert summary["bytes"] == {"0": 2 * 4096}
        assert [p["status"] for p in progress] == ["asked", "ok", "freezing", "committed"]
        assert no_threads(op)  # progress reached the operator's direct call
        op.unfreeze()

        reader = vmm._reader
        assert vmm.subscribe() == []
        assert vmm._reader is None and not reader.is_alive()
        vmm.unpreserve_folio(f)
        assert op.finalize()["bytes"] == {"0": 4096}  # not asked: finalize does not wait
        op.unfreeze()
        vmm.subscribe(on_finalize=lambda ev: None)  # and back again
        assert vmm._reader is not None and vmm._reader.is_alive()
        assert op.finalize()["notified"] == {f"u{os.getuid()},vmm": "ok"}
        op.unfreeze()


def test_a_callback_that_unsubscribes_answers_from_a_direct_call(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d, d.client("vmm") as vmm, d.client() as op:

        def on_finalize(ev: NotifierEvent) -> None:
            assert vmm.subscribe() == []  # stops the reader thread, from the callback thread

        vmm.subscribe(on_finalize=on_finalize)
        # the answer is sent after the reader thread is gone, by a direct call
        assert op.finalize()["notified"] == {f"u{os.getuid()},vmm": "ok"}
        assert vmm._reader is None
        op.unfreeze()
        vmm.ping()
        assert op.finalize()["notified"] == {}


def test_a_region_fd_arrives_on_a_direct_call(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d, d.client("m") as c:
        f = c.alloc_folio(0)
        view = c.map(f)
        view[:4] = b"khod"
        del view
        assert no_threads(c)
        base = c._core.region[1].base if c._core.region else -1
        assert os.pread(c.region_fd(), 4, f.phys - base) == b"khod"
