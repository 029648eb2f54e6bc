"""The blocking client: one socket, a reader thread, a callback thread.

Calls may come from any thread (a FINALIZE callback may preserve more memory
while the main thread waits on another call): the reader thread routes each
reply to its caller by id, and notifier callbacks run on their own thread so
a callback that calls the daemon never blocks the reader.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from khod.errors import Errno, KhoError
from khod.protocol import FrameError

from . import calls as C
from .calls import Call, Folio, NodeInfo, RegionInfo
from .core import (
    ANCILLARY,
    RECV_FLAGS,
    Core,
    NotifierEvent,
    Reply,
    Veto,
    default_socket,
    notifier_event,
    timeout_error,
)

T = TypeVar("T")
Callback = Callable[[NotifierEvent], None]


class _Pending:
    __slots__ = ("done", "progress", "reply")

    def __init__(self, progress: Callable[[dict[str, Any]], None] | None) -> None:
        self.done = threading.Event()
        self.reply: Reply | None = None
        self.progress = progress


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
    ) -> None:
        self.socket_path = default_socket(socket_path)
        self.timeout = timeout
        self.on_handover = on_handover
        self.handed_over = threading.Event()
        self._core = Core()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self._sock.close()
            raise KhoError(
                Errno.ENOENT, f"cannot reach khod at {self.socket_path}: {exc.strerror}"
            ) from None
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._plock = threading.Lock()
        self._closed = False
        self._close_reason = "connection closed"
        self._callbacks: dict[str, Callback] = {}
        self._events: queue.Queue[NotifierEvent | None] = queue.Queue()
        self._reader = threading.Thread(
            target=self._read_loop, name="khoclient-reader", daemon=True
        )
        self._reader.start()
        self._dispatcher = threading.Thread(
            target=self._callback_loop, name="khoclient-callbacks", daemon=True
        )
        self._dispatcher.start()
        self.session: str | None = None
        self.persistent = persistent
        self.uid = uid
        self.hello_info: dict[str, Any] = {}
        if session is not None:
            try:
                self.hello(session, persistent, uid)
            except BaseException:
                self.close()
                raise

    # ----------------------------------------------------------------- plumbing

    def _read_loop(self) -> None:
        try:
            while True:
                data, anc, flags, _ = self._sock.recvmsg(1 << 16, ANCILLARY, RECV_FLAGS)
                items = self._core.ingest(data, anc, flags)
                if not data:
                    break
                for item in items:
                    if isinstance(item, dict):
                        self._on_event(item)
                        continue
                    req_id, reply = item
                    with self._plock:
                        waiter = (
                            self._pending.pop(req_id, None) if isinstance(req_id, int) else None
                        )
                    if waiter is None:
                        for fd in reply.fds or []:
                            os.close(fd)
                        continue
                    waiter.reply = reply
                    waiter.done.set()
        except (OSError, FrameError, KhoError) as exc:
            self._close_reason = f"connection lost: {exc}"
        finally:
            self._fail_all()
            self._events.put(None)

    def _fail_all(self) -> None:
        self._closed = True
        with self._plock:
            waiters, self._pending = list(self._pending.values()), {}
        for w in waiters:
            w.reply = Reply(error=KhoError(Errno.EPROTO, self._close_reason))
            w.done.set()

    def _on_event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("event")
        if kind == "progress":
            with self._plock:
                waiter = self._pending.get(msg.get("request"))  # type: ignore[arg-type]
            if waiter is not None and waiter.progress is not None:
                waiter.progress(msg)
            return
        if kind == "handover":
            self.handed_over.set()
            if self.on_handover is not None:
                self.on_handover(int(msg.get("generation", 0)))
            return
        ev = notifier_event(msg)
        if ev is not None:
            self._events.put(ev)

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

    def call(
        self,
        call: Call[T],
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Send one request and wait for its reply."""
        if self._closed:
            raise KhoError(Errno.EPROTO, self._close_reason)
        req_id, frame = self._core.frame(call)
        waiter = _Pending(progress)
        with self._plock:
            self._pending[req_id] = waiter
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            with self._plock:
                self._pending.pop(req_id, None)
            raise KhoError(Errno.EPROTO, f"sending {call.op} failed: {exc}") from None
        limit = self.timeout if timeout is None else timeout
        if not waiter.done.wait(limit):
            with self._plock:
                self._pending.pop(req_id, None)
            raise timeout_error(call.op, limit)
        assert waiter.reply is not None
        result: T = self._core.finish(call, waiter.reply)
        return result

    def close(self) -> None:
        if self._sock.fileno() != -1:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        if threading.current_thread() is not self._dispatcher:
            self._dispatcher.join(timeout=5)
        self._sock.close()
        self._core.close_fds()

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
