"""The trio client: ``async with AsyncClient(path, session="db") as c: ...``.

A reader task routes replies to waiting calls by id; notifier callbacks
(async functions) run as tasks of the client's nursery, so they may call the
daemon themselves. Sends are serialized with a StrictFIFOLock.

The nursery is entered on an :class:`contextlib.AsyncExitStack` in
``__aenter__`` and left in ``__aexit__``. Each of the client's own tasks runs
in a cancel scope of its own, so :meth:`AsyncClient.aclose` stops them (and
closes the socket) without waiting and without cancelling the body of the
``async with``: it is safe from a notifier callback as well as from the body.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
import trio

from khod.errors import Errno, KhoError
from khod.protocol import FrameError

from . import calls as C
from .calls import Call, Folio, NodeInfo, RegionInfo
from .client import _order, _phys
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
AsyncCallback = Callable[[NotifierEvent], Awaitable[None]]


class _Waiter:
    __slots__ = ("done", "progress", "reply")

    def __init__(self, progress: Callable[[dict[str, Any]], None] | None) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.progress = progress


class AsyncClient:
    """``async with AsyncClient(path, session="db") as c: folio = await c.alloc_folio(9)``."""

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
        self.session = session
        self.persistent = persistent
        self.uid = uid
        self.timeout = timeout
        self.on_handover = on_handover
        self.handed_over = trio.Event()
        self.hello_info: dict[str, Any] = {}
        self._core = Core()
        self._sock: trio.socket.SocketType | None = None
        self._lock = trio.StrictFIFOLock()
        self._pending: dict[int, _Waiter] = {}
        self._callbacks: dict[str, AsyncCallback] = {}
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._task_scopes: set[trio.CancelScope] = set()
        self._closed_reason: str | None = None

    async def __aenter__(self) -> AsyncClient:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise KhoError(
                Errno.ENOENT, f"cannot reach khod at {self.socket_path}: {exc.strerror}"
            ) from None
        self._sock = sock
        self._stack = contextlib.AsyncExitStack()
        try:
            self._nursery = await self._stack.enter_async_context(trio.open_nursery())
            self._spawn(self._read_loop)
            if self.session is not None:
                await self.hello(self.session, self.persistent, self.uid)
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def aclose(self) -> None:
        """Close the connection: stop the client's tasks and close the socket.

        Does not wait for the tasks to finish (``__aexit__`` does), so a
        notifier callback may call it; calls made afterwards fail with EPROTO.
        """
        self._closed_reason = self._closed_reason or "connection closed"
        for scope in self._task_scopes:
            scope.cancel()
        if self._sock is not None:
            self._sock.close()

    async def _shutdown(self) -> None:
        """``aclose``, then wait for the client's tasks and release the passed fds."""
        await self.aclose()
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._nursery = None
            self._sock = None
            self._core.close_fds()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start ``fn(*args)`` in the nursery, in a cancel scope :meth:`aclose` cancels."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        if self._closed_reason is not None:
            scope.cancel()
        self._task_scopes.add(scope)
        self._nursery.start_soon(self._run_task, scope, fn, *args, name=fn)

    async def _run_task(
        self, scope: trio.CancelScope, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        try:
            with scope:
                await fn(*args)
        finally:
            self._task_scopes.discard(scope)

    # ----------------------------------------------------------------- plumbing

    async def _read_loop(self) -> None:
        assert self._sock is not None
        try:
            while True:
                data, anc, flags, _ = await self._sock.recvmsg(1 << 16, ANCILLARY, RECV_FLAGS)
                items = self._core.ingest(data, anc, flags)
                if not data:
                    break
                for item in items:
                    if isinstance(item, dict):
                        self._on_event(item)
                        continue
                    req_id, reply = item
                    waiter = self._pending.pop(req_id, None) if isinstance(req_id, int) else None
                    if waiter is None:
                        for fd in reply.fds or []:
                            os.close(fd)
                        continue
                    waiter.reply = reply
                    waiter.done.set()
        except (OSError, FrameError, KhoError) as exc:
            self._closed_reason = self._closed_reason or f"connection lost: {exc}"
        finally:
            self._closed_reason = self._closed_reason or "connection closed"
            for w in self._pending.values():
                w.reply = Reply(error=KhoError(Errno.EPROTO, self._closed_reason))
                w.done.set()
            self._pending.clear()

    def _on_event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("event")
        if kind == "progress":
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
        if ev is not None and self._nursery is not None:
            self._spawn(self._run_callback, ev)

    async def _run_callback(self, ev: NotifierEvent) -> None:
        cb = self._callbacks.get(ev.name)
        ok, reason, error = True, "", None
        try:
            if cb is not None:
                await cb(ev)
        except Veto as v:
            ok, reason = False, str(v) or "vetoed"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(KhoError):
            await self.call(C.notify_reply(ev.token, ok, reason, error))

    async def call(
        self,
        call: Call[T],
        *,
        progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Send one request and wait for its reply."""
        if self._sock is None or self._closed_reason is not None:
            raise KhoError(Errno.EPROTO, self._closed_reason or "not connected")
        req_id, frame = self._core.frame(call)
        waiter = _Waiter(progress)
        self._pending[req_id] = waiter
        limit = self.timeout if timeout is None else timeout
        try:
            try:
                async with self._lock:
                    view = memoryview(frame)
                    while view:
                        sent = await self._sock.send(view)
                        view = view[sent:]
            except OSError as exc:
                raise KhoError(Errno.EPROTO, f"sending {call.op} failed: {exc}") from None
            with trio.move_on_after(math.inf if limit is None else limit):
                await waiter.done.wait()
        finally:
            if waiter.reply is None:  # failed, timed out or cancelled: drop a late reply
                self._pending.pop(req_id, None)
        if waiter.reply is None:
            raise timeout_error(call.op, limit)
        result: T = self._core.finish(call, waiter.reply)
        return result

    # ----------------------------------------------------------------- session and region

    async def hello(
        self, name: str, persistent: bool = False, uid: int | None = None
    ) -> dict[str, Any]:
        """Create or reattach session ``name`` (of ``uid``: root only)."""
        self.hello_info = await self.call(C.hello(name, persistent, uid))
        self.session, self.persistent = name, bool(self.hello_info["persistent"])
        self.uid = int(self.hello_info["uid"])
        return self.hello_info

    async def region(self) -> RegionInfo:
        return await self.call(C.region())

    async def region_fd(self) -> int:
        """The passed region fd (fetched on first use; owned by the client)."""
        if self._core.region is None:
            await self.region()
        assert self._core.region is not None
        return self._core.region[0]

    async def map(self, folio: Folio) -> memoryview:
        """A writable memoryview of the folio's bytes, mapped from the region fd (no copy)."""
        return await self.map_phys(folio.phys, folio.size)

    async def map_phys(self, phys: int, size: int) -> memoryview:
        """A writable memoryview of whole pages at ``phys`` (several adjacent folios in one map)."""
        await self.region_fd()
        return self._core.map(phys, size)

    async def subscribe(
        self, on_finalize: AsyncCallback | None = None, on_unfreeze: AsyncCallback | None = None
    ) -> list[str]:
        """Register notifier callbacks; raise :class:`Veto` in ``on_finalize`` to veto."""
        self._callbacks = {
            k: v for k, v in (("finalize", on_finalize), ("unfreeze", on_unfreeze)) if v is not None
        }
        return await self.call(C.subscribe(sorted(self._callbacks)))

    async def ping(self) -> None:
        await self.call(C.ping())

    # ----------------------------------------------------------------- memory

    async def alloc_folio(self, order: int) -> Folio:
        return await self.call(C.alloc_folio(order))

    async def alloc_folios(self, order: int, count: int) -> list[Folio]:
        return await self.call(C.alloc_folios(order, count))

    async def free_folio(self, phys: int | Folio) -> None:
        await self.call(C.free_folio(_phys(phys)))

    async def free_folios(self, phys: Iterable[int] | np.ndarray[Any, Any]) -> int:
        return await self.call(C.free_folios(phys))

    async def preserve_folio(self, phys: int | Folio, order: int | None = None) -> int:
        return await self.call(C.preserve_folio(_phys(phys), _order(phys, order)))

    async def unpreserve_folio(self, phys: int | Folio, order: int | None = None) -> int:
        return await self.call(C.unpreserve_folio(_phys(phys), _order(phys, order)))

    async def preserve_folios(
        self,
        phys: Iterable[int] | np.ndarray[Any, Any],
        orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
    ) -> int:
        return await self.call(C.preserve_folios(phys, orders))

    async def unpreserve_folios(
        self,
        phys: Iterable[int] | np.ndarray[Any, Any],
        orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
    ) -> int:
        return await self.call(C.unpreserve_folios(phys, orders))

    async def preserve_phys(self, phys: int, size: int) -> list[Folio]:
        return await self.call(C.preserve_phys(phys, size))

    async def unpreserve_phys(self, phys: int, size: int) -> list[Folio]:
        return await self.call(C.unpreserve_phys(phys, size))

    async def preserve_phys_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        return await self.call(C.preserve_phys_ranges(ranges))

    async def unpreserve_phys_ranges(self, ranges: Sequence[tuple[int, int]]) -> int:
        return await self.call(C.unpreserve_phys_ranges(ranges))

    async def restore_folio(self, phys: int) -> Folio:
        return await self.call(C.restore_folio(phys))

    async def restore_folios(self, phys: Iterable[int] | np.ndarray[Any, Any]) -> list[Folio]:
        """Restore many incoming folios in one call (all or none)."""
        phys = list(phys.tolist() if isinstance(phys, np.ndarray) else phys)
        orders = await self.call(C.restore_folios(phys))
        return [Folio(int(p), o) for p, o in zip(phys, orders, strict=True)]

    async def restore_phys(self, phys: int, size: int) -> list[Folio]:
        return await self.call(C.restore_phys(phys, size))

    # ----------------------------------------------------------------- tree

    async def add_node(self, path: str) -> bool:
        return await self.call(C.add_node(path))

    async def add_prop(self, path: str, name: str, value: bytes) -> bool:
        return await self.call(C.add_prop(path, name, value))

    async def add_string_prop(self, path: str, name: str, value: str) -> bool:
        return await self.call(C.add_string_prop(path, name, value))

    async def remove_node(self, path: str) -> None:
        await self.call(C.remove_node(path))

    async def remove_prop(self, path: str, name: str) -> bytes:
        return await self.call(C.remove_prop(path, name))

    async def get_node(self, path: str, tree: str = "in") -> NodeInfo:
        return await self.call(C.get_node(path, tree))

    async def get_prop(self, path: str, name: str, tree: str = "in") -> bytes:
        return await self.call(C.get_prop(path, name, tree))

    # ----------------------------------------------------------------- operator

    async def status(self) -> dict[str, Any]:
        return await self.call(C.status())

    async def fdt(self, which: str = "out") -> bytes:
        return await self.call(C.fdt(which))

    async def finalize(
        self, progress: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self.call(C.finalize(), progress=progress, timeout=timeout)

    async def unfreeze(
        self, progress: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return await self.call(C.unfreeze(), progress=progress, timeout=timeout)

    async def handover(self) -> dict[str, Any]:
        return await self.call(C.handover())

    async def release_unclaimed(
        self, session: str | None = None, uid: int | None = None
    ) -> dict[str, Any]:
        return await self.call(C.release_unclaimed(session, uid))

    async def drop_session(self, session: str, uid: int | None = None) -> dict[str, Any]:
        """Discard a session for good (operator; refused while finalized)."""
        return await self.call(C.drop_session(session, uid))
