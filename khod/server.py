"""The trio server: a thin edge around the engine.

Per connection: one reader task that decodes frames and runs requests in
order, and one writer task draining a bounded queue, so replies and pushed
events never interleave. Identity comes from SO_PEERCRED at accept.

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
import grp
import itertools
import math
import os
import pwd
import signal
import socket
import stat
import struct
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from khod import faults, systemd
from khod.config import Config
from khod.engine import Engine, State
from khod.errors import Errno, KhoError, ebusy
from khod.freeze import FreezeLock
from khod.log import Log
from khod.ops import OPS, Args, WithFds
from khod.protocol import (
    BadRequest,
    Decoder,
    FrameError,
    Limits,
    encode,
    error_reply,
    event,
    parse_request,
    reply,
)
from khod.session import Peer, Session

Frame = tuple[bytes, list[int]]


class Connection:
    def __init__(self, server: Server, stream: trio.SocketStream, peer: Peer, cid: int) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.id = cid
        self.session: Session | None = None
        self.subscriptions: set[str] = set()
        self.after_reply: Callable[[], None] | None = None
        self._send, self._recv = trio.open_memory_channel[Frame](server.config.limits.send_queue)
        self._closing = False

    @property
    def label(self) -> str:
        who = self.session.name if self.session else "-"
        return f"conn{self.id}(uid={self.peer.uid},pid={self.peer.pid},session={who})"

    async def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        """Queue a reply; waits for room (only this connection stalls)."""
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send((encode(message), fds or []))

    def push(self, message: dict[str, Any]) -> bool:
        """Queue an event without waiting; a full queue closes the connection."""
        try:
            self._send.send_nowait((encode(message), []))
        except trio.WouldBlock:
            self.server.log.warning(
                "conn.slow_consumer", conn=self.label, queued=self.server.config.limits.send_queue
            )
            self.close()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        """Stop output after what is queued; the writer then closes the socket."""
        self._closing = True
        self._send.close()

    @property
    def closing(self) -> bool:
        return self._closing

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, nursery.cancel_scope)
            try:
                await self._reader()
            finally:
                self.close()

    async def _reader(self) -> None:
        decoder = Decoder(self.server.wire_limits)
        while True:
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except FrameError as exc:
                self.server.log.warning("conn.bad_frame", conn=self.label, reason=str(exc))
                return
            for msg in messages:
                await self.server.dispatch(self, msg)
                if self.closing:
                    return

    async def _writer(self, scope: trio.CancelScope) -> None:
        try:
            async with self._recv:
                async for data, fds in self._recv:
                    if fds:
                        sent = await self.stream.socket.sendmsg(
                            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        )
                        if sent < len(data):
                            await self.stream.send_all(data[sent:])
                    else:
                        await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await self.stream.aclose()
            scope.cancel()


@dataclass
class NotifyResult:
    failure: tuple[str, str, str] | None  # (session, status, reason)
    answered: dict[str, str]


class Server:
    def __init__(
        self,
        engine: Engine,
        config: Config,
        log: Log,
        *,
        hook: Callable[[str], None] = faults.point,
        metrics: Any = None,
        handle_signals: bool = True,
    ) -> None:
        self.handle_signals = handle_signals
        self.engine = engine
        self.config = config
        self.log = log
        self.hook = hook
        self.metrics = metrics
        self.lock = FreezeLock()
        self.conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._waiters: dict[int, trio.MemorySendChannel[tuple[int, str, str]]] = {}
        self._per_uid: Counter[int] = Counter()
        self._groups: dict[tuple[int, int], frozenset[int]] = {}
        self.lifecycle = trio.Lock()
        self.stopping = trio.Event()
        self._idle = trio.Event()  # set when stopping and the last connection is gone
        self.finished = trio.Event()  # run() has drained every connection
        self.exit_reason = ""
        self.exit_status = 0
        self.wire_limits = Limits(
            max_frame=config.limits.max_frame, max_array=config.limits.max_batch
        )
        og = config.server.operator_group
        self.operator_gid: int | None = grp.getgrnam(og).gr_gid if og else None
        self._nursery: trio.Nursery | None = None
        self.started = time.time()

    # ================================================================= running

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            accept_scope = trio.CancelScope()
            nursery.start_soon(self._accept_all, listeners, accept_scope)
            if self.handle_signals:
                nursery.start_soon(self._signals)
            interval = systemd.watchdog_interval()
            if interval:
                nursery.start_soon(self._watchdog, interval)
            task_status.started()
            await self.stopping.wait()
            accept_scope.cancel()
            systemd.notify("STOPPING=1", f"STATUS=stopping: {self.exit_reason}")
            with trio.move_on_after(2):
                for conn in list(self.conns.values()):
                    conn.close()
                if self.conns:
                    await self._idle.wait()
            nursery.cancel_scope.cancel()
        self.finished.set()

    def request_stop(self, reason: str, status: int = 0) -> None:
        if not self.stopping.is_set():
            self.exit_reason = reason
            self.exit_status = status
            self.log.info("daemon.stopping", reason=reason, state=str(self.engine.state))
            self.stopping.set()

    async def _accept_all(
        self, listeners: list[trio.SocketListener], scope: trio.CancelScope
    ) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self.log.error("accept.failed", reason=str(exc))
                    await trio.sleep(0.1)
                    continue
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, stream)

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
        return Peer(pid, uid, gid, operator, groups)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = self._peer(stream)
        except OSError as exc:
            self.log.warning("conn.no_credentials", reason=str(exc))
            await stream.aclose()
            return
        if self._per_uid[peer.uid] >= self.config.limits.max_connections_per_uid:
            self.log.warning("conn.refused", uid=peer.uid, reason="too many connections")
            err = KhoError(Errno.EBUSY, f"uid {peer.uid} has too many connections")
            with contextlib.suppress(Exception):
                await stream.send_all(encode(error_reply(None, err)))
            await stream.aclose()
            return
        conn = Connection(self, stream, peer, next(self._ids))
        self.conns[conn.id] = conn
        self._per_uid[peer.uid] += 1
        self.log.debug("conn.open", conn=conn.label)
        try:
            await conn.run()
        except Exception as exc:  # a connection never takes the daemon down
            self.log.error(
                "conn.crashed", conn=conn.label, reason=repr(exc), trace=traceback.format_exc()
            )
        finally:
            self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        self.conns.pop(conn.id, None)
        if not self.conns and self.stopping.is_set():
            self._idle.set()
        self._per_uid[conn.peer.uid] -= 1
        for waiter in self._waiters.values():
            with contextlib.suppress(
                trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
            ):
                waiter.send_nowait((conn.id, "disconnected", "the connection closed"))
        s = conn.session
        if s is not None and self.engine.detach(s, conn.id):
            self.log.info(
                "session.discarded", session=s.name, uid=s.uid, reason="last connection closed"
            )
        self.log.debug("conn.close", conn=conn.label)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.log.info(
                    "signal", signal=signal.Signals(signum).name, state=str(self.engine.state)
                )
                await self.terminate()

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    # ================================================================= requests

    async def dispatch(self, conn: Connection, msg: object) -> None:
        t0 = time.perf_counter()
        op_name, code = "invalid", "OK"
        req_id: int | None = None
        try:
            req = parse_request(msg)
            req_id = req.id
            spec = OPS.get(req.op)
            if spec is None:
                op_name = "unknown"
                raise KhoError(Errno.EOPNOTSUPP, f"unknown op {req.op[:64]!r}")
            op_name = req.op
            if spec.operator and not conn.peer.operator:
                raise KhoError(Errno.EPERM, f"{req.op} needs root or the operator group")
            if spec.session and conn.session is None:
                raise KhoError(Errno.EINVAL, f"{req.op} needs a session: send hello first")
            result = spec.fn(self, conn, Args(req.op, req.args), req.id)
            if isinstance(result, Awaitable):
                result = await result
            fds: list[int] = []
            if isinstance(result, WithFds):
                fds, result = result.fds, result.result
            await conn.send(reply(req.id, result, nfds=len(fds)), fds)
        except KhoError as exc:
            code = str(exc.code)
            if isinstance(exc, BadRequest):
                req_id = exc.req_id
            self.log.debug(
                "request.failed", conn=conn.label, op=op_name, code=code, reason=exc.message
            )
            await conn.send(error_reply(req_id, exc))
        except Exception as exc:
            code = "EPROTO"
            self.log.error(
                "request.crashed",
                conn=conn.label,
                op=op_name,
                reason=repr(exc),
                trace=traceback.format_exc(),
            )
            await conn.send(
                error_reply(req_id, KhoError(Errno.EPROTO, f"internal error in {op_name}: {exc!r}"))
            )
        finally:
            if self.metrics is not None:
                self.metrics.request(op_name, code, time.perf_counter() - t0)
        if conn.after_reply is not None:
            after, conn.after_reply = conn.after_reply, None
            after()

    # ================================================================= notifiers

    def answer(self, conn: Connection, token: int, status: str, reason: str) -> None:
        waiter = self._waiters.get(token)
        if waiter is None:
            raise KhoError(Errno.ENOENT, f"no notifier round {token} is waiting for answers")
        with contextlib.suppress(
            trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
        ):
            waiter.send_nowait((conn.id, status, reason))

    async def notify(
        self, name: str, progress: Callable[..., None], *, stop_on_failure: bool
    ) -> NotifyResult:
        """Push ``name`` to every subscribed connection and collect their answers."""
        token = next(self._tokens)
        send, recv = trio.open_memory_channel[tuple[int, str, str]](math.inf)
        self._waiters[token] = send
        pending: dict[int, str] = {}
        answered: dict[str, str] = {}
        failure: tuple[str, str, str] | None = None
        t0 = time.perf_counter()
        try:
            for conn in list(self.conns.values()):
                if name not in conn.subscriptions or conn.session is None:
                    continue
                pending[conn.id] = conn.session.name
                progress(session=conn.session.name, status="asked")
                self.log.info(f"notify.{name}", session=conn.session.name, token=token)
                if not conn.push(event(name, token=token, generation=self.engine.generation)):
                    send.send_nowait((conn.id, "disconnected", "could not deliver the event"))
            with trio.move_on_after(self.config.server.notifier_timeout_s) as scope:
                while pending:
                    cid, status, reason = await recv.receive()
                    session = pending.pop(cid, None)
                    if session is None:
                        continue
                    answered[session] = status
                    progress(session=session, status=status, reason=reason or None)
                    if status != "ok":
                        self.log.warning(f"notify.{name}.{status}", session=session, reason=reason)
                        if failure is None:
                            failure = (session, status, reason)
                        if stop_on_failure:
                            break
            if scope.cancelled_caught:
                for session in pending.values():
                    answered[session] = "timeout"
                    progress(session=session, status="timeout")
                    self.log.warning(
                        f"notify.{name}.timeout",
                        session=session,
                        timeout_s=self.config.server.notifier_timeout_s,
                    )
                    if failure is None:
                        failure = (
                            session,
                            "timeout",
                            f"no answer in {self.config.server.notifier_timeout_s:g} s",
                        )
        finally:
            del self._waiters[token]
            if self.metrics is not None:
                self.metrics.notifier(name, time.perf_counter() - t0)
        return NotifyResult(failure, answered)

    # ================================================================= lifecycle

    def _progress(
        self, conn: Connection | None, req_id: int | None, phase: str
    ) -> Callable[..., None]:
        def progress(**fields: Any) -> None:
            if conn is not None and not conn.closing:
                conn.push(
                    event(
                        "progress",
                        request=req_id,
                        phase=phase,
                        **{k: v for k, v in fields.items() if v is not None},
                    )
                )

        return progress

    async def finalize(self, conn: Connection | None, req_id: int | None) -> dict[str, Any]:
        if self.lifecycle.locked():
            raise ebusy("a finalize, unfreeze or handover is already in progress")
        async with self.lifecycle:
            return await self._finalize(conn, req_id)

    async def _finalize(self, conn: Connection | None, req_id: int | None) -> dict[str, Any]:
        self.engine.begin_finalize()
        t0 = time.perf_counter()
        self.log.info(
            "finalize.start",
            sessions=len(self.engine.sessions),
            generation=self.engine.generation + 1,
        )
        progress = self._progress(conn, req_id, "finalize")
        systemd.notify("STATUS=finalizing: FINALIZE notifiers")
        result = await self.notify("finalize", progress, stop_on_failure=True)
        if result.failure is not None:
            session, status, reason = result.failure
            await self._abort(conn, req_id, f"{status} from {session!r}: {reason}")
            code = {"veto": Errno.EBUSY, "timeout": Errno.ETIMEDOUT}.get(status, Errno.EPROTO)
            outcome = {"veto": "vetoed", "timeout": "timeout"}.get(status, "error")
            self._count_finalize(outcome, t0)
            what = {
                "veto": "vetoed by",
                "timeout": "timed out waiting for",
                "disconnected": "aborted: disconnect of",
            }
            raise KhoError(
                code, f"finalize {what.get(status, 'failed in')} session {session!r}: {reason}"
            )
        self.hook("finalize-notified")
        progress(status="freezing")
        await self.lock.freeze()
        try:
            summary = self.engine.commit_finalize()
        except BaseException as exc:
            self.lock.thaw()
            if isinstance(exc, KhoError):
                self.log.error("finalize.failed", reason=exc.message)
                await self._abort(conn, req_id, exc.message)
                self._count_finalize("error", t0)
            raise
        summary["duration_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        summary["notified"] = result.answered
        self._count_finalize("ok", t0)
        self.log.info(
            "finalize.done",
            generation=summary["generation"],
            bytes=summary["total_bytes"],
            chunk_pages=summary["chunk_pages"],
            fdt_bytes=summary["fdt_bytes"],
            ms=summary["duration_ms"],
        )
        systemd.notify(f"STATUS=finalized: generation {summary['generation']} committed")
        progress(status="committed")
        return summary

    def _count_finalize(self, result: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.finalize(result, time.perf_counter() - t0)

    async def _abort(self, conn: Connection | None, req_id: int | None, reason: str) -> None:
        self.log.warning("finalize.aborted", reason=reason)
        swept = self.engine.abort_finalize()
        for name in swept:
            self.log.info("session.discarded", session=name, reason="no connection after abort")
        await self.notify(
            "unfreeze", self._progress(conn, req_id, "unfreeze"), stop_on_failure=False
        )
        systemd.notify("STATUS=active")

    async def unfreeze(self, conn: Connection | None, req_id: int | None) -> dict[str, Any]:
        if self.lifecycle.locked():
            raise ebusy("a finalize, unfreeze or handover is already in progress")
        async with self.lifecycle:
            swept = self.engine.unfreeze()
            self.lock.thaw()
            self.log.info("unfreeze.done", generation=self.engine.generation)
            for name in swept:
                self.log.info(
                    "session.discarded", session=name, reason="no connection after unfreeze"
                )
            result = await self.notify(
                "unfreeze", self._progress(conn, req_id, "unfreeze"), stop_on_failure=False
            )
            systemd.notify("STATUS=active")
            return {"state": str(self.engine.state), "notified": result.answered}

    def hand_over(self) -> int:
        generation = self.engine.hand_over()
        for conn in list(self.conns.values()):
            conn.push(event("handover", generation=generation))
        self.log.info("handover", generation=generation)
        self.hook("handover")
        return generation

    async def terminate(self) -> None:
        """SIGTERM: hand over when finalized; otherwise stop (or finalize first if configured)."""
        async with self.lifecycle:
            state = self.engine.state
        if state is State.FINALIZED:
            self.hand_over()
            self.request_stop("handover on SIGTERM")
            return
        if state is State.ACTIVE and self.config.server.handover_on_stop:
            try:
                await self.finalize(None, None)
            except KhoError as exc:
                self.log.error("stop.no_handover", reason=exc.message)
                self.request_stop("stop: finalize on stop failed", status=1)
                return
            self.hand_over()
            self.request_stop("handover on stop")
            return
        self.request_stop("stop without handover")


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
