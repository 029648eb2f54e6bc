"""The blocking client: the calling thread reads its own reply; a reader thread when subscribed.

Whoever waits reads. A call writes its request and then, if no other thread
is reading the socket, reads it itself until its reply has come, routing
whatever else arrives meanwhile (other threads' replies, progress events,
the handover event) as a reader thread would. There is no handoff between
threads on that path, which is what makes an unsubscribed client fast; the
common case, a call's own reply in one read, is decoded without a waiter or
any routing (:meth:`Client._call_direct`), after polling the socket briefly
rather than sleeping at once (``spin.py``). A thread that finds another one
reading sleeps until that one routes its reply to it or stops reading, then
takes over.

Notifier events (FINALIZE, UNFREEZE) must be answered even while nobody
calls, so while the connection is subscribed, or when ``on_handover`` is
given, a reader thread holds the reading role for good and every call waits
for it to route the reply. Notifier callbacks run on a thread of their own,
so a callback that calls the daemon never blocks the reader.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from khod.errors import Errno, KhoError
from khod.protocol import FrameError, error_from_reply

from . import calls as C
from . import spin
from .calls import Call, Folio, NodeInfo, RegionInfo
from .core import (
    ANCILLARY,
    RECV_FLAGS,
    Core,
    NotifierEvent,
    Reply,
    Veto,
    decode_reply,
    default_socket,
    notifier_event,
    timeout_error,
)
from .spin import BusyPoll

T = TypeVar("T")
Callback = Callable[[NotifierEvent], None]
Item = tuple[int | None, Reply] | dict[str, Any]
JOIN_S = 5.0  # how long close() waits for the client's threads and the reading role
RECV_NOWAIT = RECV_FLAGS | int(socket.MSG_DONTWAIT)  # after poll: never block holding the role


class _Pending:
    __slots__ = ("progress", "reply", "wake")

    def __init__(self, progress: Callable[[dict[str, Any]], None] | None) -> None:
        self.reply: Reply | None = None
        self.progress = progress
        self.wake: threading.Event | None = None  # set once its thread sleeps on it

    def arrived(self) -> bool:
        return self.reply is not None


class _HandedOver(threading.Event):
    """``Client.handed_over``: looking at it reads what has arrived when nobody else reads.

    Without a reader thread an idle connection is read by no one, so
    ``is_set()`` first takes in what the daemon has already sent, and
    ``wait()`` reads the socket until the handover event comes.
    """

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = weakref.ref(client)

    def is_set(self) -> bool:
        client = self._client()
        if not super().is_set() and client is not None:
            client._catch_up()
        return super().is_set()

    def wait(self, timeout: float | None = None) -> bool:
        client = self._client()
        if super().is_set() or client is None:
            return super().wait(timeout)
        return client._wait_handover(timeout)


class Client:
    """``with Client(path, session="vmm") as c: folio = c.alloc_folio(9)``."""

    def __init__(
        self,
        socket_path: str | None = None,
        session: str | None = None,
        persistent: bool = False,
        *,
        uid: int | None = None,
        timeout: float | None = 60.0,
        on_handover: Callable[[int], None] | None = None,
        busy_poll_us: int | None = None,
    ) -> None:
        self.socket_path = default_socket(socket_path)
        # how long a call polls for its reply before sleeping (khoclient/spin.py)
        self._spin = BusyPoll(spin.default_us() if busy_poll_us is None else busy_poll_us)
        self.timeout = timeout
        self.on_handover = on_handover
        self.handed_over = _HandedOver(self)
        self._core = Core()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            raise KhoError(
                Errno.ENOENT, f"cannot reach khod at {self.socket_path}: {exc.strerror}"
            ) from None
        self._poll = select.poll()  # used by whoever holds the reading role
        self._rcvtimeo: float | None = None  # the socket's SO_RCVTIMEO in seconds (None: none)
        self._poll.register(self._sock, select.POLLIN)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._close_reason = "connection closed"
        self._callbacks: dict[str, Callback] = {}
        self._events: queue.Queue[NotifierEvent | None] = queue.Queue()
        # the reading role: one thread at a time reads the socket and routes what it reads
        self._read_lock = threading.Lock()
        self._reading: int | None = None  # the thread ident holding it
        self._inbox: deque[Item] = deque()  # decoded, not yet routed (a nested reader goes on)
        self._sleepers: set[threading.Event] = set()  # threads waiting for the role to be free
        self._local = threading.local()
        # the reader and callback threads, started only when needed
        self._threads_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._reader_stop = False
        self._bell: tuple[int, int] | None = None  # a pipe that wakes the reader thread
        self._dispatcher: threading.Thread | None = None
        self.session: str | None = None
        self.persistent = persistent
        self.uid = uid
        self.hello_info: dict[str, Any] = {}
        try:
            if on_handover is not None:  # a callback promised: someone must always read
                self._threaded(True)
            if session is not None:
                self.hello(session, persistent, uid)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- reading and routing

    def _read_once(self) -> None:
        """One recvmsg: decode, route; the end of the stream or a broken one fails every call."""
        try:
            data, anc, flags, _ = self._sock.recvmsg(1 << 16, ANCILLARY, RECV_NOWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail_all(f"connection lost: {exc}")
            return
        try:
            self._inbox.extend(self._core.ingest(data, anc, flags))
        except (FrameError, KhoError) as exc:
            self._route()
            self._fail_all(f"connection lost: {exc}")
            return
        self._route()
        if not data:
            self._fail_all("connection closed")

    def _route(self) -> None:
        """Replies to their callers, progress to the call's callback, events to their handlers."""
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, dict):
                self._on_event(item)
                continue
            req_id, reply = item
            waiter = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
            if waiter is None:  # timed out, or never ours
                for fd in reply.fds or []:
                    os.close(fd)
                continue
            waiter.reply = reply
            wake = waiter.wake
            if wake is not None:
                wake.set()

    def _on_event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("event")
        if kind == "progress":
            req = msg.get("request")
            waiter = self._pending.get(req) if isinstance(req, int) else None
            if waiter is not None and waiter.progress is not None:
                waiter.progress(msg)
            return
        if kind == "handover":
            self.handed_over.set()
            self._wake_sleepers()
            if self.on_handover is not None:
                self.on_handover(int(msg.get("generation", 0)))
            return
        ev = notifier_event(msg)
        if ev is not None:
            self._start_dispatcher()
            self._events.put(ev)

    def _fail_all(self, reason: str) -> None:
        """The connection is over: every waiting call fails with ``reason`` (the first one)."""
        if not self._closed:
            self._close_reason = reason
            self._closed = True  # before the swap: a call registered after it sees this
        waiters, self._pending = self._pending, {}
        for w in waiters.values():
            w.reply = Reply(error=KhoError(Errno.EPROTO, self._close_reason))
            if w.wake is not None:
                w.wake.set()
        self._wake_sleepers()
        self._events.put(None)  # the callback thread, if any, ends after what is queued

    def _wake_sleepers(self) -> None:
        for wake in list(self._sleepers):
            wake.set()

    def _lead(self, done: Callable[[], bool], deadline: float | None) -> bool:
        """Read and route until ``done()``; False at the deadline or once the stream is over."""
        while not done():
            if self._inbox:  # a nested call: route what the outer read left first
                self._route()
                continue
            if self._closed:
                return done()
            if deadline is None:
                wait_ms = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return done()
                wait_ms = math.ceil(left * 1000)
            if self._poll.poll(wait_ms):
                self._read_once()
        return True

    def _await(
        self, done: Callable[[], bool], deadline: float | None, waiter: _Pending | None = None
    ) -> bool:
        """Wait until ``done()`` (True) or the deadline (False), reading the socket when free."""
        me = threading.get_ident()
        if self._reading == me:  # a callback of ours calls the daemon: read on
            return self._lead(done, deadline)
        if self._read_lock.acquire(blocking=False):  # nobody reads: we do, no handoff
            return self._lead_locked(me, done, deadline)
        wake: threading.Event | None = getattr(self._local, "wake", None)
        if wake is None:
            wake = self._local.wake = threading.Event()
        self._sleepers.add(wake)
        if waiter is not None:
            waiter.wake = wake
        try:
            while True:
                wake.clear()  # every change after this is seen below, or wakes us
                if done():
                    return True
                if self._read_lock.acquire(blocking=False):
                    self._sleepers.discard(wake)
                    return self._lead_locked(me, done, deadline)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return done()
                wake.wait(left)
        finally:
            self._sleepers.discard(wake)

    def _lead_locked(self, me: int, done: Callable[[], bool], deadline: float | None) -> bool:
        self._reading = me
        try:
            return self._lead(done, deadline)
        finally:
            self._release_role()

    def _release_role(self) -> None:
        self._reading = None
        self._read_lock.release()
        if self._sleepers:  # someone may be waiting for the role
            self._wake_sleepers()

    def _catch_up(self) -> None:
        """Take in what has already arrived, if no one else is reading (``handed_over``)."""
        me = threading.get_ident()
        if self._reading == me:
            self._drain()
        elif self._read_lock.acquire(blocking=False):
            self._reading = me
            try:
                self._drain()
            finally:
                self._release_role()

    def _drain(self) -> None:
        self._route()
        while not self._closed and self._poll.poll(0):
            self._read_once()

    def _wait_handover(self, timeout: float | None) -> bool:
        flag = self.handed_over
        deadline = None if timeout is None else time.monotonic() + timeout

        def seen() -> bool:
            return threading.Event.is_set(flag)

        if self._await(seen, deadline):
            return True
        if self._closed:  # nothing can come any more: wait out the time, as an Event does
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return threading.Event.wait(flag, left)
        return False

    # ----------------------------------------------------------------- the threads

    def _threaded(self, on: bool) -> None:
        """Start (or stop) the reader thread that holds the reading role while subscribed."""
        stopping: threading.Thread | None = None
        with self._threads_lock:
            if on:
                self._reader_stop = False
                if self._reader is None and not self._closed:
                    if self._bell is None:
                        r, w = os.pipe()
                        os.set_blocking(r, False)
                        self._bell = (r, w)
                    self._reader = threading.Thread(
                        target=self._read_loop, name="khoclient-reader", daemon=True
                    )
                    self._reader.start()
            elif self._reader is not None:
                self._reader_stop = True
                stopping = self._reader
                self._ring()
        if stopping is not None and stopping is not threading.current_thread():
            stopping.join(JOIN_S)

    def _ring(self) -> None:
        self._wake_sleepers()  # the reader may be waiting for the role
        if self._bell is not None:
            with contextlib.suppress(OSError):
                os.write(self._bell[1], b"\0")

    def _reader_done(self) -> bool:
        """Whether the reader thread should end (it then no longer counts as running)."""
        with self._threads_lock:
            if self._reader_stop or self._closed:
                if self._reader is threading.current_thread():
                    self._reader = None
                return True
            return False

    def _read_loop(self) -> None:
        try:
            if self._take_role():
                try:
                    self._read_until_stopped()
                finally:
                    self._release_role()
        finally:
            with self._threads_lock:  # ended by an error: no longer counts as running
                if self._reader is threading.current_thread():
                    self._reader = None

    def _take_role(self) -> bool:
        """Wait for the reading role (a caller may hold it until its reply is in)."""
        wake = self._local.wake = threading.Event()
        self._sleepers.add(wake)
        try:
            while True:
                wake.clear()
                if self._reader_done():
                    return False
                if self._read_lock.acquire(blocking=False):
                    self._reading = threading.get_ident()
                    return True
                wake.wait()
        finally:
            self._sleepers.discard(wake)

    def _read_until_stopped(self) -> None:
        assert self._bell is not None
        bell = self._bell[0]
        poll = select.poll()
        poll.register(self._sock, select.POLLIN)
        poll.register(bell, select.POLLIN)
        while not self._reader_done():
            if self._inbox:
                self._route()
                continue
            for fd, _ in poll.poll():
                if fd == bell:
                    with contextlib.suppress(OSError):
                        os.read(bell, 512)
                else:
                    self._read_once()

    def _start_dispatcher(self) -> None:
        with self._threads_lock:
            if self._dispatcher is None and not self._closed:
                self._dispatcher = threading.Thread(
                    target=self._callback_loop, name="khoclient-callbacks", daemon=True
                )
                self._dispatcher.start()

    def _callback_loop(self) -> None:
        while True:
            ev = self._events.get()
            if ev is None:
                return
            cb = self._callbacks.get(ev.name)
            ok, reason, error = True, "", None
            try:
                if cb is not None:
                    cb(ev)
            except Veto as v:
                ok, reason = False, str(v) or "vetoed"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(KhoError):
                self.call(C.notify_reply(ev.token, ok, reason, error))

    # ----------------------------------------------------------------- calls

    def call(
        self,
        call: Call[T],
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Send one request and wait for its reply."""
        limit = self.timeout if timeout is None else timeout
        if progress is None and self._read_lock.acquire(blocking=False):
            result: T = self._call_direct(call, limit)  # nobody else reads: no waiter, no routing
        else:
            result = self._call_routed(call, limit, progress)
        if call.op == "subscribe":  # events may come while nobody calls: someone must read
            self._threaded(bool(result) or self.on_handover is not None)
        return result

    def _call_direct(self, call: Call[T], limit: float | None) -> T:
        """A call made holding the reading role (taken by the caller), the common case.

        The request goes out and one read takes the reply: a busy poll first
        (khoclient/spin.py), then a recvmsg that sleeps in the kernel, bounded by
        the socket's receive timeout. When that read brings exactly this call's
        reply, it is decoded at once. Anything else (a reply in pieces, fds,
        events, other threads' replies, a timeout, the end) goes the routed way
        from there: the call registers its waiter and reads on as :meth:`_lead`
        does.

        Every microsecond here is one the daemon waits for the next request, and
        a daemon that waits longer sleeps and wakes more: 5 µs more per call cost
        a raw socket client a quarter of its round trips (bench/rpc.py). Hence
        one function, no waiter, and no poll before a sleeping read (a poll that
        wakes and a second system call cost a third of the rate).
        """
        self._reading = threading.get_ident()
        try:
            deadline = None if limit is None else time.monotonic() + limit
            self._ensure_open()
            try:
                with self._send_lock:
                    req_id, frame = self._core.frame(call)
                    self._sock.sendall(frame)
            except OSError as exc:
                raise self._send_failed(call.op, exc) from None
            got: list[Any] = []
            if limit != self._rcvtimeo:
                self._set_rcvtimeo(limit)
            if not self._inbox and self._rcvtimeo == limit:
                try:
                    budget = self._spin.budget()
                    read = self._spin_read(budget) if budget else None
                    if read is None:
                        read = self._sock.recvmsg(1 << 16, ANCILLARY, RECV_FLAGS)
                    data, anc, flags, _ = read
                except (BlockingIOError, InterruptedError):  # SO_RCVTIMEO ran out
                    pass
                except OSError as exc:
                    self._fail_all(f"connection lost: {exc}")
                else:
                    try:
                        got = self._core.messages(data, anc, flags)
                    except (FrameError, KhoError) as exc:
                        self._fail_all(f"connection lost: {exc}")
                    if not data:
                        self._fail_all("connection closed")
                    elif len(got) == 1:
                        msg = got[0]
                        if (
                            type(msg) is dict
                            and msg.get("id") == req_id
                            and "event" not in msg
                            and "nfds" not in msg
                        ):
                            if "error" in msg:
                                raise error_from_reply(msg["error"])
                            try:
                                result: T = call.decode(msg.get("result"))
                            except (KeyError, TypeError, ValueError) as exc:
                                raise KhoError(
                                    Errno.EPROTO, f"malformed {call.op} reply: {exc!r}"
                                ) from None
                            return result
            waiter = _Pending(None)
            self._pending[req_id] = waiter
            if got:
                self._inbox.extend(self._core.items(got))
            elif self._closed:  # (ended by that read, or before the waiter was in)
                self._pending.pop(req_id, None)
                raise KhoError(Errno.EPROTO, self._close_reason)
            self._lead(waiter.arrived, deadline)
        finally:
            self._release_role()
        return self._outcome(call, req_id, waiter, limit)

    def _spin_read(
        self, budget: float
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, Any] | None:
        """Poll the socket for up to ``budget`` seconds without sleeping (khoclient/spin.py):
        what one recvmsg took, or None when nothing came in time."""
        recvmsg, clock = self._sock.recvmsg, time.perf_counter
        end = clock() + budget
        while True:
            try:
                read = recvmsg(1 << 16, ANCILLARY, RECV_NOWAIT)
            except BlockingIOError:
                if clock() >= end:
                    self._spin.miss()
                    return None
                continue
            self._spin.hit()
            return read

    def _ensure_open(self) -> None:
        if self._closed:
            raise KhoError(Errno.EPROTO, self._close_reason)

    def _set_rcvtimeo(self, limit: float | None) -> None:
        """Bound the direct path's blocking read by ``limit`` (None: no bound).

        The socket's receive timeout, set only when a call's limit differs from
        the last one's. A limit of 0 or less is not set (SO_RCVTIMEO 0 means
        forever): such a call only polls. Later reads of a call poll with what is
        left of its deadline, so a reply in many pieces still ends in time.
        """
        if limit is not None and limit <= 0:
            return
        usec = 0 if limit is None else max(1, math.ceil(limit * 1e6))
        with contextlib.suppress(OSError):  # (closed meanwhile: the polling reads see it)
            self._sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", *divmod(usec, 10**6))
            )
            self._rcvtimeo = limit

    def _send_failed(self, op: str, exc: OSError) -> KhoError:
        """What a call whose request could not be sent raises. The daemon may have
        closed: take in what came before the end, as a reader would have, and say so."""
        self._catch_up()
        if self._closed:
            return KhoError(Errno.EPROTO, self._close_reason)
        return KhoError(Errno.EPROTO, f"sending {op} failed: {exc}")

    def _call_routed(
        self,
        call: Call[T],
        limit: float | None,
        progress: Callable[[dict[str, Any]], None] | None,
    ) -> T:
        """A call whose reply may be read by another thread (or has a progress callback)."""
        waiter = _Pending(progress)
        with self._send_lock:
            req_id, frame = self._core.frame(call)
            self._pending[req_id] = waiter
            if self._closed:  # looked at after registering: _fail_all sets it before it fails calls
                self._pending.pop(req_id, None)
                raise KhoError(Errno.EPROTO, self._close_reason)
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self._pending.pop(req_id, None)
                error: OSError | None = exc
            else:
                error = None
        if error is not None:
            raise self._send_failed(call.op, error) from None
        deadline = None if limit is None else time.monotonic() + limit
        if self._read_lock.acquire(blocking=False):  # nobody reads: we do, no handoff
            self._lead_locked(threading.get_ident(), waiter.arrived, deadline)
        else:
            self._await(waiter.arrived, deadline, waiter)
        return self._outcome(call, req_id, waiter, limit)

    def _outcome(self, call: Call[T], req_id: int, waiter: _Pending, limit: float | None) -> T:
        """The result of a call whose waiter has its reply, or the timeout."""
        reply = waiter.reply
        if reply is None:
            self._pending.pop(req_id, None)
            reply = waiter.reply  # (routed just now?)
            if reply is None:
                raise timeout_error(call.op, limit)
        result: T = decode_reply(call, reply) if not reply.fds else self._core.finish(call, reply)
        return result

    def close(self) -> None:
        """Close the connection; calls waiting in other threads fail with EPROTO."""
        if self._sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._fail_all("connection closed")
        with self._threads_lock:
            reader, dispatcher = self._reader, self._dispatcher
            self._reader_stop = True
        self._ring()
        me = threading.current_thread()
        for t in (reader, dispatcher):
            if t is not None and t is not me:
                t.join(JOIN_S)
        # nobody may poll or read the fd once it is closed (its number could be reused)
        held = self._reading != me.ident and self._read_lock.acquire(timeout=JOIN_S)
        try:
            self._sock.close()
            self._core.close_fds()
            if self._bell is not None and (reader is None or not reader.is_alive()):
                for fd in self._bell:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._bell = None
        finally:
            if held:
                self._read_lock.release()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- session and region

    def hello(self, name: str, persistent: bool = False, uid: int | None = None) -> dict[str, Any]:
        """Create or reattach session ``name`` (of ``uid``: root only)."""
        self.hello_info = self.call(C.hello(name, persistent, uid))
        self.session, self.persistent = name, bool(self.hello_info["persistent"])
        self.uid = int(self.hello_info["uid"])
        return self.hello_info

    def region(self) -> RegionInfo:
        return self.call(C.region())

    def region_fd(self) -> int:
        """The passed region fd (fetched on first use; owned by the client)."""
        if self._core.region is None:
            self.region()
        assert self._core.region is not None
        return self._core.region[0]

    def map(self, folio: Folio) -> memoryview:
        """A writable memoryview of the folio's bytes, mapped from the region fd (no copy)."""
        return self.map_phys(folio.phys, folio.size)

    def map_phys(self, phys: int, size: int) -> memoryview:
        """A writable memoryview of whole pages at ``phys`` (several adjacent folios in one map)."""
        self.region_fd()
        return self._core.map(phys, size)

    def subscribe(
        self, on_finalize: Callback | None = None, on_unfreeze: Callback | None = None
    ) -> list[str]:
        """Register notifier callbacks; raise :class:`Veto` in ``on_finalize`` to veto."""
        self._callbacks = {
            k: v for k, v in (("finalize", on_finalize), ("unfreeze", on_unfreeze)) if v is not None
        }
        return self.call(C.subscribe(sorted(self._callbacks)))

    def ping(self) -> None:
        self.call(C.ping())

    # ----------------------------------------------------------------- memory

    def alloc_folio(self, order: int) -> Folio:
        return self.call(C.alloc_folio(order))

    def alloc_folios(self, order: int, count: int) -> list[Folio]:
        return self.call(C.alloc_folios(order, count))

    def free_folio(self, phys: int | Folio) -> None:
        self.call(C.free_folio(_phys(phys)))

    def free_folios(self, phys: Iterable[int] | np.ndarray[Any, Any]) -> int:
        return self.call(C.free_folios(phys))

    def preserve_folio(self, phys: int | Folio, order: int | None = None) -> int:
        return self.call(C.preserve_folio(_phys(phys), _order(phys, order)))

    def unpreserve_folio(self, phys: int | Folio, order: int | None = None) -> int:
        return self.call(C.unpreserve_folio(_phys(phys), _order(phys, order)))

    def preserve_folios(
        self,
        phys: Iterable[int] | np.ndarray[Any, Any],
        orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
    ) -> int:
        return self.call(C.preserve_folios(phys, orders))

    def unpreserve_folios(
        self,
        phys: Iterable[int] | np.ndarray[Any, Any],
        orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
    ) -> int:
        return self.call(C.unpreserve_folios(phys, orders))

    def preserve_phys(self, phys: int, size: int) -> list[Folio]:
        return self.call(C.preserve_phys(phys, size))

    def unpreserve_phys(self, phys: int, size: int) -> list[Folio]:
        return self.call(C.unpreserve_phys(phys, size))

    def preserve_phys_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        return self.call(C.preserve_phys_ranges(ranges))

    def unpreserve_phys_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        return self.call(C.unpreserve_phys_ranges(ranges))

    def restore_folio(self, phys: int) -> Folio:
        return self.call(C.restore_folio(phys))

    def restore_folios(self, phys: Iterable[int] | np.ndarray[Any, Any]) -> list[Folio]:
        """Restore many incoming folios in one call (all or none)."""
        phys = list(phys.tolist() if isinstance(phys, np.ndarray) else phys)
        orders = self.call(C.restore_folios(phys))
        return [Folio(int(p), o) for p, o in zip(phys, orders, strict=True)]

    def restore_phys(self, phys: int, size: int) -> list[Folio]:
        return self.call(C.restore_phys(phys, size))

    # ----------------------------------------------------------------- tree

    def add_node(self, path: str) -> bool:
        return self.call(C.add_node(path))

    def add_prop(self, path: str, name: str, value: bytes) -> bool:
        return self.call(C.add_prop(path, name, value))

    def add_string_prop(self, path: str, name: str, value: str) -> bool:
        return self.call(C.add_string_prop(path, name, value))

    def remove_node(self, path: str) -> None:
        self.call(C.remove_node(path))

    def remove_prop(self, path: str, name: str) -> bytes:
        return self.call(C.remove_prop(path, name))

    def get_node(self, path: str, tree: str = "in") -> NodeInfo:
        return self.call(C.get_node(path, tree))

    def get_prop(self, path: str, name: str, tree: str = "in") -> bytes:
        return self.call(C.get_prop(path, name, tree))

    # ----------------------------------------------------------------- operator

    def status(self) -> dict[str, Any]:
        return self.call(C.status())

    def fdt(self, which: str = "out") -> bytes:
        return self.call(C.fdt(which))

    def finalize(
        self, progress: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return self.call(C.finalize(), progress=progress, timeout=timeout)

    def unfreeze(
        self, progress: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return self.call(C.unfreeze(), progress=progress, timeout=timeout)

    def handover(self) -> dict[str, Any]:
        return self.call(C.handover())

    def release_unclaimed(
        self, session: str | None = None, uid: int | None = None
    ) -> dict[str, Any]:
        return self.call(C.release_unclaimed(session, uid))

    def drop_session(self, session: str, uid: int | None = None) -> dict[str, Any]:
        """Discard a session for good (operator; refused while finalized)."""
        return self.call(C.drop_session(session, uid))


def _phys(phys: int | Folio) -> int:
    return phys.phys if isinstance(phys, Folio) else phys


def _order(phys: int | Folio, order: int | None) -> int | None:
    if order is None and isinstance(phys, Folio):
        return phys.order
    return order
