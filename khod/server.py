"""The trio server: sockets, peer credentials, and a reader and a writer per connection.

The transport edge around :func:`khod.dispatch.dispatch`. Connections are
accepted by ``trio.serve_listeners`` (which backs off on EMFILE and friends
and fails on anything else). Per connection: one reader task decodes frames
and runs requests in order, and one writer task drains a bounded queue, so
replies and pushed events never interleave. Identity comes from
SO_PEERCRED at accept.

Slow-consumer policy: a connection's outgoing queue holds ``send_queue``
frames. Replies wait for room (a client that does not read its replies
stalls only itself); pushed events never wait -- if the queue is full the
connection is closed and logged, because an event that cannot be delivered
cannot be answered. Nothing a client sends can crash the server: a broken
or oversized frame closes that connection, a bad request gets an error
reply, and any unexpected exception is logged and answered with EPROTO.
"""

from __future__ import annotations

import array
import contextlib
import functools
import grp
import itertools
import math
import os
import pwd
import signal
import socket
import stat
import struct
import traceback
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from khod import protocol, systemd
from khod.config import Config
from khod.context import Caller, RequestMetrics
from khod.dispatch import Response, dispatch, label
from khod.engine import Engine
from khod.errors import Errno, KhoError
from khod.kho.handover import session_node
from khod.lifecycle import Lifecycle, Progress, State, Subscriber
from khod.log import Log
from khod.protocol import (
    DEFAULT_MAX_ARRAY,
    Decoder,
    FrameError,
    Limits,
    encode,
    error_reply,
    event,
)
from khod.session import Peer

Frame = tuple[bytes, tuple[int, ...]]
OPERATOR_CONNECTIONS = 16  # beyond limits.max_connections, for root and operators
STOP_GRACE_S = 2.0  # how long a stopping daemon lets connections send what is queued


@dataclass(frozen=True)
class ConnLimits:
    """How long and how much one connection may take (the ``[limits]`` section)."""

    send_queue: int = 256  # frames queued for the peer
    request_timeout_s: float = 10.0  # to complete a frame once begun, and the first one
    send_timeout_s: float = 30.0  # for the peer to take one frame
    wire: Limits = field(default_factory=Limits)


class Buffered:
    """Bytes of unfinished frames held for all connections, against one cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0

    def take(self, n: int) -> bool:
        if n > 0 and self.total + n > self.cap:
            return False
        self.total += n
        return True


class Connection:
    """One client: its caller state, its outgoing queue, its reader and writer."""

    def __init__(
        self,
        stream: trio.SocketStream,
        caller: Caller,
        *,
        limits: ConnLimits,
        buffered: Buffered,
        log: Log,
        handle: Callable[[Caller, object], Awaitable[Response]],
    ) -> None:
        self.stream = stream
        self.caller = caller
        self.log = log
        self.limits = limits
        self.buffered = buffered
        self.handle = handle
        self._send, self._recv = trio.open_memory_channel[Frame](limits.send_queue)
        self._closing = False
        self._scope: trio.CancelScope | None = None
        self._reading = trio.CancelScope()  # the reader's: quiesce() ends it
        self.reader_done = trio.Event()  # no request of this connection runs any more
        self._held = 0  # bytes of an unfinished frame, counted in ``buffered``
        self._queued = 0  # frames handed to the writer and not yet written (keeps the order)
        self._fd = stream.socket.fileno()  # open for as long as run() runs

    @property
    def key(self) -> int:
        return self.caller.key

    async def send(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        """Send a reply, or queue it; waits for room (only this connection stalls).

        With nothing queued before it, a reply goes straight into the socket
        (it is non-blocking): handing it to the writer task would cost a task
        switch and a scheduler pass per request, as much as the rest of a
        small request together. What the socket does not take, and any error,
        is left to the writer, which applies ``send_timeout_s`` and closes.
        """
        data = encode(message)
        if not fds and not self._queued and not self._closing:
            try:
                sent = os.write(self._fd, data)
            except OSError:  # EAGAIN, or a broken peer: the writer meets it too
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self._queued += 1
        try:
            await self._send.send((data, fds))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._queued -= 1  # closing: replies after close are dropped
        except BaseException:
            self._queued -= 1  # cancelled before it went in
            raise

    def push(self, message: dict[str, Any]) -> bool:
        """Queue an event without waiting; a full queue cuts the connection off."""
        try:
            self._send.send_nowait((encode(message), ()))
            self._queued += 1
        except trio.WouldBlock:
            self.log.warning(
                "conn.slow_consumer", conn=label(self.caller), queued=self.limits.send_queue
            )
            self.cut_off()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def notify(self, name: str, token: int, generation: int) -> bool:
        return self.push(event(name, token=token, generation=generation))

    def close(self) -> None:
        """Stop output after what is queued; the writer then closes the socket."""
        self._closing = True
        self._send.close()

    def quiesce(self) -> None:
        """Read no more requests: the one running ends at its next checkpoint (or, past
        the point of no return of a batch, when the batch is done); output still drains."""
        self._reading.cancel()

    def cut_off(self) -> None:
        """Close now: nothing more is read or sent, the socket goes, resources are freed."""
        self._closing = True
        self._send.close()
        if self._scope is not None:
            self._scope.cancel()

    @property
    def closing(self) -> bool:
        return self._closing

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer, nursery.cancel_scope)
                try:
                    with self._reading:
                        await self._reader()
                finally:
                    self.reader_done.set()
                    self.close()
        finally:
            self.buffered.take(-self._held)
            self._held = 0
            await trio.aclose_forcefully(self.stream)

    async def _receive(self, deadline: float) -> bytes | None:
        """The next bytes from the peer; None when it is gone or too slow.

        Read from the trio socket itself: the stream's ``receive_some`` only
        adds a generator context manager per read, to turn OSError into its
        own errors, and both mean the same here.
        """
        sock = self.stream.socket
        try:
            if deadline == math.inf:  # between requests: no cancel scope to pay for
                return await sock.recv(1 << 16)
            with trio.move_on_at(deadline):
                return await sock.recv(1 << 16)
        except (OSError, trio.ClosedResourceError):
            return None
        self.log.warning(
            "conn.timeout",
            conn=label(self.caller),
            reason=f"no complete request in {self.limits.request_timeout_s:g} s",
        )
        return None

    async def _reader(self) -> None:
        decoder = Decoder(self.limits.wire)
        timeout = self.limits.request_timeout_s
        deadline = trio.current_time() + timeout  # the first request must come
        served = False
        pending = 0  # bytes of an unfinished frame
        while True:
            data = await self._receive(deadline if pending or not served else math.inf)
            if not data:
                return
            before = pending
            try:
                messages = decoder.feed(data)
            except FrameError as exc:
                self.log.warning("conn.bad_frame", conn=label(self.caller), reason=str(exc))
                return
            pending = decoder.pending
            if pending != self._held and not self._hold(pending):
                return
            if pending and (before == 0 or messages):
                deadline = trio.current_time() + timeout  # a new frame began
            for i, msg in enumerate(messages):
                if i:  # a reply sent straight is no checkpoint: several requests in one read
                    await trio.lowlevel.checkpoint()  # must still let everyone else in
                served = True
                response = await self.handle(self.caller, msg)
                await self.send(response.message, response.fds)
                if response.after is not None:
                    response.after()
                if self.closing:
                    return
            if messages and pending:
                deadline = trio.current_time() + timeout  # time we spent serving it is not its

    def _hold(self, pending: int) -> bool:
        """Count this connection's unfinished frame against the daemon-wide cap."""
        if not self.buffered.take(pending - self._held):
            self.log.warning(
                "conn.buffer_cap",
                conn=label(self.caller),
                reason=f"unfinished requests would hold more than {self.buffered.cap} bytes",
            )
            return False
        self._held = pending
        return True

    async def _writer(self, scope: trio.CancelScope) -> None:
        try:
            async with self._recv:
                with trio.CancelScope() as slow:  # one scope, armed only while a frame is out
                    async for data, fds in self._recv:
                        slow.deadline = trio.current_time() + self.limits.send_timeout_s
                        await self._write(data, fds)
                        self._queued -= 1
                        slow.deadline = math.inf
                if slow.cancelled_caught:
                    self.log.warning(
                        "conn.slow_consumer",
                        conn=label(self.caller),
                        reason=f"a frame not taken in {self.limits.send_timeout_s:g} s",
                    )
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()

    async def _write(self, data: bytes, fds: tuple[int, ...]) -> None:
        if fds:
            sent = await self.stream.socket.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            if sent < len(data):
                await self.stream.send_all(data[sent:])
        else:
            await self.stream.send_all(data)


class Turn(contextlib.AbstractAsyncContextManager[None]):
    """Hold the turn of one session: its requests run one at a time, in arrival order.

    ``turns`` maps a session whose turn is taken to the requests waiting for
    it. The usual case, a free turn, is a dict entry: no lock is built and
    there is no trip through the scheduler, which costs as much as a small
    request itself.
    """

    __slots__ = ("_key", "_turns")

    def __init__(self, turns: dict[tuple[int, str], deque[trio.Event]], key: tuple[int, str]):
        self._turns = turns
        self._key = key

    async def __aenter__(self) -> None:
        waiting = self._turns.get(self._key)
        if waiting is None:
            self._turns[self._key] = deque()
            return
        handed = trio.Event()
        waiting.append(handed)
        try:
            await handed.wait()
        except BaseException:  # cancelled while waiting: no longer in the line
            if handed.is_set():
                self._pass_on()
            else:
                waiting.remove(handed)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._pass_on()

    def _pass_on(self) -> None:
        waiting = self._turns[self._key]
        if waiting:
            waiting.popleft().set()
        else:
            del self._turns[self._key]


class Connections:
    """Every open connection by key: who the lifecycle notifies and tells of a handover."""

    def __init__(self) -> None:
        self._by_key: dict[int, Connection] = {}
        self._per_uid: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._by_key.values()))

    def get(self, key: int) -> Connection | None:
        return self._by_key.get(key)

    def of_uid(self, uid: int) -> int:
        return self._per_uid[uid]

    def add(self, conn: Connection) -> None:
        self._by_key[conn.key] = conn
        self._per_uid[conn.caller.peer.uid] += 1

    def remove(self, conn: Connection) -> None:
        if self._by_key.pop(conn.key, None) is not None:
            self._per_uid[conn.caller.peer.uid] -= 1

    def subscribed(self, event: str) -> list[Subscriber]:
        return [
            Subscriber(c.key, session_node(c.caller.session.key), c.notify)  # u<uid>,<name>
            for c in self
            if event in c.caller.events and c.caller.session is not None
        ]

    def broadcast(self, event: str, **fields: Any) -> None:
        message = protocol.event(event, **fields)
        for c in self:
            c.push(message)


class Server:
    """Accepts connections and serves them until stopped; the handlers' :class:`Context`."""

    def __init__(
        self,
        engine: Engine,
        lifecycle: Lifecycle,
        conns: Connections,
        config: Config,
        log: Log,
        *,
        metrics: RequestMetrics | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.conns = conns
        self.config = config
        self.log = log
        self.metrics = metrics
        self.handle_signals = handle_signals
        self._keys = itertools.count(1)
        self._turns: dict[tuple[int, str], deque[trio.Event]] = {}  # see Turn
        self._groups: dict[tuple[int, int], frozenset[int]] = {}
        self.stopping = trio.Event()
        # called once after a handover, when no request can run any more (main: let the
        # region go, so that a standby need not wait for output to slow peers)
        self.on_quiet: Callable[[], None] | None = None
        self._idle = trio.Event()  # set when stopping and the last connection is gone
        self.finished = trio.Event()  # run() has drained every connection
        self.exit_reason = ""
        self.exit_status = 0
        lim = config.limits
        self.conn_limits = ConnLimits(
            send_queue=lim.send_queue,
            request_timeout_s=lim.request_timeout_s,
            send_timeout_s=lim.send_timeout_s,
            # a list of a million integers costs the loop a tenth of a second to decode;
            # packed u64 bytes cost nothing, so long batches must come packed
            wire=Limits(max_frame=lim.max_frame, max_array=min(lim.max_batch, DEFAULT_MAX_ARRAY)),
        )
        self.buffered = Buffered(lim.max_buffered)
        og, mg = config.server.operator_group, config.server.memory_group
        self.operator_gid: int | None = grp.getgrnam(og).gr_gid if og else None
        self.memory_gid: int | None = grp.getgrnam(mg).gr_gid if mg else None

    # ================================================================= the handlers' context

    @property
    def max_batch(self) -> int:
        return self.config.limits.max_batch

    def connection_count(self) -> int:
        return len(self.conns)

    def progress(self, caller: Caller, req_id: int) -> Progress:
        def report(**fields: Any) -> None:
            conn = self.conns.get(caller.key)
            if conn is not None and not conn.closing:
                shown = {k: v for k, v in fields.items() if v is not None}
                conn.push(event("progress", request=req_id, **shown))

        return report

    def serial(self, key: tuple[int, str]) -> Turn:
        """One request of session ``key`` at a time, across its connections."""
        return Turn(self._turns, key)

    def evict(self, key: tuple[int, str], spare: int | None = None) -> int:
        gone = [
            c for c in self.conns if c.caller.session is not None and c.caller.session.key == key
        ]
        for c in gone:
            c.caller.session = None
            c.caller.events = frozenset()
            if c.caller.key == spare:  # the operator who dropped it gets its reply
                continue
            self.log.warning("conn.evicted", conn=label(c.caller), reason="its session was dropped")
            c.cut_off()
        return len(gone)

    def request_stop(self, reason: str, status: int = 0) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.exit_status = status
            self.log.info("daemon.stopping", reason=reason, state=str(self.lifecycle.state))
            self.stopping.set()

    # ================================================================= running

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            accepting = trio.CancelScope()
            serve = functools.partial(
                trio.serve_listeners, self._serve, listeners, handler_nursery=nursery
            )

            async def accept(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                with accepting:
                    await serve(task_status=task_status)

            await nursery.start(accept)
            if self.handle_signals:
                nursery.start_soon(self._signals)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(self._watchdog, interval)
            task_status.started()
            await self.stopping.wait()
            accepting.cancel()
            systemd.notify("STOPPING=1", f"STATUS=stopping: {self.exit_reason}")
            with trio.move_on_after(STOP_GRACE_S):
                for conn in self.conns:
                    conn.close()
                if self.on_quiet is not None and self.lifecycle.state is State.HANDED_OVER:
                    await self._quiesce()
                if len(self.conns):
                    await self._idle.wait()
            nursery.cancel_scope.cancel()
        self.finished.set()

    async def _quiesce(self) -> None:
        """After a handover: stop every reader, wait until none runs, then ``on_quiet``.

        Output queued for slow or hostile peers may take the whole grace to drain
        (or never); the region must not wait for it, since a standby successor
        waits for the region. No request can touch the region once every reader
        has ended, and writers only write to sockets.
        """
        for conn in self.conns:
            conn.quiesce()
        for conn in list(self.conns):
            await conn.reader_done.wait()
        assert self.on_quiet is not None
        try:
            self.on_quiet()
        except Exception as exc:  # the region is then let go at exit, as before
            self.log.error("daemon.quiet_failed", reason=repr(exc))

    def _peer(self, stream: trio.SocketStream) -> Peer:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, gid = struct.unpack("3i", raw)
        key = (uid, gid)
        if key not in self._groups:
            try:
                groups = frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
            except KeyError:
                groups = frozenset({gid})
            self._groups[key] = groups
        groups = self._groups[key]
        operator = uid == 0 or (self.operator_gid is not None and self.operator_gid in groups)
        shared = uid == 0 or (self.memory_gid is not None and self.memory_gid in groups)
        return Peer(pid, uid, gid, operator, groups, shared)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = self._peer(stream)
        except OSError as exc:
            self.log.warning("conn.no_credentials", reason=str(exc))
            await stream.aclose()
            return
        refusal = self._refusal(peer)
        if refusal:
            self.log.warning("conn.refused", uid=peer.uid, reason=refusal)
            err = KhoError(Errno.EBUSY, refusal)
            with contextlib.suppress(Exception), trio.move_on_after(1):
                await stream.send_all(encode(error_reply(None, err)))
            await trio.aclose_forcefully(stream)
            return
        conn = Connection(
            stream,
            Caller(next(self._keys), peer),
            limits=self.conn_limits,
            buffered=self.buffered,
            log=self.log,
            handle=functools.partial(dispatch, self),
        )
        self.conns.add(conn)
        self.log.debug("conn.open", conn=label(conn.caller))
        try:
            await conn.run()
        except Exception as exc:  # a connection never takes the daemon down
            self.log.error(
                "conn.crashed",
                conn=label(conn.caller),
                reason=repr(exc),
                trace=traceback.format_exc(),
            )
        finally:
            self._closed(conn)

    def _refusal(self, peer: Peer) -> str | None:
        """Why a new connection from ``peer`` is turned away, if it is."""
        lim = self.config.limits
        if self.conns.of_uid(peer.uid) >= lim.max_connections_per_uid:
            return f"uid {peer.uid} has too many connections (limits.max_connections_per_uid)"
        # operators keep a way in when everyone else is out of connections
        most = lim.max_connections + (OPERATOR_CONNECTIONS if peer.operator else 0)
        if len(self.conns) >= most:
            return f"the daemon serves {len(self.conns)} connections (limits.max_connections)"
        return None

    def _closed(self, conn: Connection) -> None:
        conn.reader_done.set()  # (however its run ended)
        self.conns.remove(conn)
        if not len(self.conns) and self.stopping.is_set():
            self._idle.set()
        self.lifecycle.disconnected(conn.key)
        s = conn.caller.session
        if s is not None and self.engine.detach(s, conn.key):
            self.log.info(
                "session.discarded", session=s.name, uid=s.uid, reason="last connection closed"
            )
        self.log.debug("conn.close", conn=label(conn.caller))

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.log.info(
                    "signal", signal=signal.Signals(signum).name, state=str(self.lifecycle.state)
                )
                reason, status = await self.lifecycle.terminate()
                self.request_stop(reason, status)

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)


# ===================================================================== the listening socket


def bind_unix(path: str, mode: int, group: str) -> tuple[trio.SocketListener, tuple[int, int]]:
    """Bind the control socket, replacing a stale file but never a live daemon's socket."""
    p = Path(path)
    p.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise KhoError(Errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening
        else:
            raise KhoError(Errno.EBUSY, f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    st = os.stat(path)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, identity: tuple[int, int]) -> None:
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)
