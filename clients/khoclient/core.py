"""What both clients share: framing, request ids, the fd FIFO, event parsing, mapping."""

from __future__ import annotations

import array
import itertools
import mmap
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack

from khod.errors import Errno, KhoError
from khod.protocol import Decoder, Limits, error_from_reply

from .calls import PAGE_SIZE, Call, RegionInfo

DEFAULT_SOCKET = "/run/khod/khod.sock"
ANCILLARY = socket.CMSG_SPACE(16 * 4)  # room for a few fds per recvmsg
# plain ints: or-ing and and-ing the socket module's enum members costs microseconds per call
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
CTRUNC = int(socket.MSG_CTRUNC)


def default_socket(explicit: str | None = None) -> str:
    """``explicit``, else ``$KHOD_SOCKET``, else the packaged default."""
    return explicit or os.environ.get("KHOD_SOCKET") or DEFAULT_SOCKET


def timeout_error(op: str, limit: float | None) -> KhoError:
    """What a call raises when no reply came within ``limit`` seconds (both clients)."""
    return KhoError(Errno.ETIMEDOUT, f"no reply to {op} within {limit} s")


class Veto(Exception):
    """Raise from a FINALIZE callback to veto the finalize, with a reason."""


@dataclass(frozen=True)
class NotifierEvent:
    """A FINALIZE or UNFREEZE notification (answered when the callback returns)."""

    name: str
    token: int
    generation: int


@dataclass
class Reply:
    result: Any = None
    error: KhoError | None = None
    fds: list[int] | None = None


class Core:
    """Sans-I/O half of a client connection."""

    def __init__(self) -> None:
        # maps as large as a round of 1022 sessions (finalize's `notified`)
        self.decoder = Decoder(Limits(max_frame=256 << 20, max_array=1 << 22, max_map=1 << 12))
        self.ids = itertools.count(1)
        self._packer = msgpack.Packer(use_bin_type=True)  # reused: a third of packb's cost
        self.fds: deque[int] = deque()
        self.region: tuple[int, RegionInfo] | None = None  # the passed region fd and geometry

    def frame(self, call: Call[Any]) -> tuple[int, bytes]:
        """The next request id and the request's bytes (one caller at a time: the packer)."""
        req_id = next(self.ids)
        msg = {"id": req_id, "op": call.op}
        for k, v in call.args.items():  # a loop: half a comprehension's cost for a few keys
            if v is not None:
                msg[k] = v  # noqa: PERF403
        return req_id, self._packer.pack(msg)

    def take_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)

    def items(self, messages: list[Any]) -> list[tuple[int | None, Reply] | dict[str, Any]]:
        """Decoded messages as (id, Reply) for replies, the raw dict for events (fds
        are taken from the FIFO)."""
        out: list[tuple[int | None, Reply] | dict[str, Any]] = []
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            if "event" in msg:
                out.append(msg)
                continue
            nfds = msg.get("nfds")
            fds = self._take(nfds) if nfds else None
            if "error" in msg:
                reply = Reply(None, error_from_reply(msg["error"]), fds)
            else:
                reply = Reply(msg.get("result"), None, fds)
            out.append((msg.get("id"), reply))
        return out

    def _take(self, nfds: object) -> list[int]:
        """The first ``nfds`` fds of the FIFO (as many as there are; none if nfds is not a count)."""
        n = nfds if isinstance(nfds, int) and nfds > 0 else 0
        return [self.fds.popleft() for _ in range(min(n, len(self.fds)))]

    def ingest(
        self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int
    ) -> list[tuple[int | None, Reply] | dict[str, Any]]:
        """One ``recvmsg`` result in: fds to the FIFO, then the decoded messages."""
        return self.items(self.messages(data, ancdata, flags))

    def messages(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> list[Any]:
        """One ``recvmsg`` result in: fds to the FIFO, the messages it completed as
        decoded (:meth:`items` makes replies of them). ``flags`` also echo
        MSG_CMSG_CLOEXEC: only MSG_CTRUNC counts."""
        if ancdata:
            self.take_fds(ancdata)
        if flags & CTRUNC:
            raise KhoError(Errno.EPROTO, "file descriptors were truncated in transit")
        return self.decoder.feed(data)

    def finish(self, call: Call[Any], reply: Reply) -> Any:
        """The result of ``call``: keeps a passed region fd, closes any other fd."""
        fds = reply.fds or []
        if call.op == "region" and fds and reply.error is None:
            info = decode_reply(call, reply)
            for fd in fds[1:]:
                os.close(fd)
            if self.region is not None:
                os.close(self.region[0])
            self.region = (fds[0], info)
            return info
        for fd in fds:
            os.close(fd)
        return decode_reply(call, reply)

    def map(self, phys: int, size: int) -> memoryview:
        if self.region is None:
            raise KhoError(Errno.EINVAL, "no region fd yet: call region() first")
        return map_range(self.region[0], self.region[1], phys, size)

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.popleft())
        if self.region is not None:
            os.close(self.region[0])
            self.region = None


def decode_reply(call: Call[Any], reply: Reply) -> Any:
    if reply.error is not None:
        raise reply.error
    try:
        return call.decode(reply.result)
    except (KeyError, TypeError, ValueError) as exc:
        raise KhoError(Errno.EPROTO, f"malformed {call.op} reply: {exc!r}") from None


def notifier_event(msg: dict[str, Any]) -> NotifierEvent | None:
    token, gen = msg.get("token"), msg.get("generation", 0)
    if msg.get("event") in ("finalize", "unfreeze") and isinstance(token, int):
        return NotifierEvent(str(msg["event"]), token, int(gen) if isinstance(gen, int) else 0)
    return None


def map_range(fd: int, info: RegionInfo, phys: int, size: int) -> memoryview:
    """A writable view of any page-aligned range of the region (one mmap)."""
    if phys % PAGE_SIZE or size <= 0 or size % PAGE_SIZE:
        raise KhoError(Errno.EINVAL, f"range {phys:#x}+{size:#x} is not whole pages")
    if not (info.base <= phys and phys + size <= info.base + info.size):
        raise KhoError(Errno.EINVAL, f"range {phys:#x}+{size:#x} is outside the region")
    m = mmap.mmap(
        fd,
        size,
        flags=mmap.MAP_SHARED,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=info.map_offset + phys - info.base,
    )
    return memoryview(m)
