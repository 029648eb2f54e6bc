"""HTTP/1.1 for the metrics endpoint, on h11 (imported with the first connection).

h11 does the parsing (request line, headers, framing, the head-size limit);
this module moves bytes and answers: keep-alive, pipelined requests answered
in order, gzip for a scraper that accepts it (as Prometheus does), and an
error status for a malformed (400), oversized (413, 431) or unsupported
(405, 501, 505) request, which also closes the connection. A request must
arrive and be answered within the server's ``request_timeout_s``; the
caller bounds the connection's life and the number of connections.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Protocol

import h11
import trio

from khod import __version__

MAX_REQUEST_HEAD = 8192  # request line and headers; more is refused with 431
MAX_REQUEST_BODY = 8192  # a GET carries no body; more than this is refused with 413
RECEIVE_SIZE = 4096


class Exposition(Protocol):
    def exposition(self, accept: str = "") -> tuple[bytes, str]: ...


class Server(Exposition, Protocol):
    request_timeout_s: float


@dataclass
class Reply:
    status: int
    body: bytes
    ctype: str = "text/plain; charset=utf-8"
    extra: list[tuple[str, str]] = field(default_factory=list)
    compressible: bool = False  # served gzipped to a client that accepts it
    close: bool = False


def request_path(target: bytes) -> bytes:
    """The path of an origin-form (``/metrics?x``) or absolute-form request target."""
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        rest = target.split(b"//", 1)[1]
        target = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
    return target.split(b"?", 1)[0]


def accepts_gzip(headers: list[tuple[bytes, bytes]]) -> bool:
    """``Accept-Encoding`` allows gzip (RFC 9110 §12.5.3: a q of 0 refuses it)."""
    q: dict[bytes, float] = {}
    for name, value in headers:
        if name != b"accept-encoding":
            continue
        for item in value.split(b","):
            coding, *params = item.split(b";")
            weight = 1.0
            for p in params:
                key, _, v = p.partition(b"=")
                if key.strip().lower() == b"q":
                    try:
                        weight = float(v.strip())
                    except ValueError:
                        weight = 0.0
            q[coding.strip().lower()] = weight
    for coding in (b"gzip", b"x-gzip", b"*"):
        if coding in q:
            return q[coding] > 0
    return False


class HttpConnection:
    """One HTTP/1.1 connection driven by h11: keep-alive, pipelining, errors by status.

    h11 does the parsing (request line, headers, framing, limits); this loop
    only moves bytes and answers one request at a time, in order, so
    pipelined requests are answered as they came.
    """

    def __init__(self, server: Server, stream: trio.SocketStream) -> None:
        self.m = server
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._begun = False  # bytes of the current request have arrived
        self._fed = 0  # bytes given to h11 in this request's cycle (pipelined ones included)

    async def run(self) -> None:
        while True:
            # a pipelined request may already be buffered: it has begun
            self._fed = len(self.conn.trailing_data[0])
            self._begun = bool(self._fed)
            with trio.move_on_after(self.m.request_timeout_s) as scope:
                keep = await self._one()
            if scope.cancelled_caught:
                return await self._timed_out()
            if not keep:
                return
            self.conn.start_next_cycle()

    async def _receive(self) -> None:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        self._begun = True
        self._fed += len(data)
        self.conn.receive_data(data)  # b"" means the peer closed: h11 reports it

    async def _one(self) -> bool:
        """Read one request and answer it; whether the connection goes on."""
        conn = self.conn
        try:
            event = conn.next_event()
            while event is h11.NEED_DATA:
                await self._receive()
                event = conn.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request), event
            request = event
            # h11 bounds a head still incomplete; one that came whole in a read is measured here
            if self._fed - len(conn.trailing_data[0]) > MAX_REQUEST_HEAD:
                await self._refuse(431, "request header fields too large")
                return False
            if request.http_version not in (b"1.0", b"1.1"):
                await self._refuse(505, "only HTTP/1.0 and HTTP/1.1 are served")
                return False
            if request.method not in (b"GET", b"HEAD"):
                # a body of any length may follow: answer without reading it, and close
                await self._send(respond(self.m, request.method, request.target, []), request)
                return False
            size = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    await self._receive()
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_REQUEST_BODY:
                        await self._send(
                            Reply(413, b"a request body is not expected\n", close=True), request
                        )
                        return False
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed mid-body
                    return False
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc.error_status_hint, str(exc))
            return False
        headers = list(request.headers)
        await self._send(respond(self.m, request.method, request.target, headers), request)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _send(self, reply: Reply, request: h11.Request | None) -> None:
        body = reply.body
        headers = [
            ("Server", f"khod/{__version__}"),
            ("Content-Type", reply.ctype),
            *reply.extra,
        ]
        if reply.compressible:
            headers.append(("Vary", "Accept-Encoding"))
            if request is not None and accepts_gzip(list(request.headers)):
                # level 1: the event loop is shared with clients, and exposition text
                # compresses about tenfold at it anyway
                body = gzip.compress(body, compresslevel=1, mtime=0)
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        if reply.close or request is None or request.method not in (b"GET", b"HEAD"):
            headers.append(("Connection", "close"))
        out = [self.conn.send(h11.Response(status_code=reply.status, headers=headers))]
        if request is None or request.method != b"HEAD":
            out.append(self.conn.send(h11.Data(data=body)))
        out.append(self.conn.send(h11.EndOfMessage()))
        await self.stream.send_all(b"".join(o for o in out if o))

    async def _refuse(self, status: int, reason: str) -> None:
        """A malformed or oversized request: say why (if a reply can still go), then close."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        reason = reason if len(reason) <= 120 else reason[:120] + "..."  # no echo of a flood
        text = f"bad request: {reason}\n" if status == 400 else f"{reason}\n"
        await self._send(Reply(status, text.encode(), close=True), None)

    async def _timed_out(self) -> None:
        """No complete request in time: a started one gets 408, an idle one is just closed."""
        if self._begun and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with trio.move_on_after(1):
                await self._send(Reply(408, b"request not complete in time\n", close=True), None)


def respond(
    source: Exposition, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> Reply:
    """What a well-formed request gets: the exposition, a pointer to it, or an error."""
    if method not in (b"GET", b"HEAD"):
        return Reply(405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
    path = request_path(target)
    if path == b"/metrics":
        accept = b", ".join(v for k, v in headers if k == b"accept").decode("latin-1")
        body, ctype = source.exposition(accept)
        return Reply(200, body, ctype, compressible=True)
    if path == b"/":
        return Reply(200, b"khod: see /metrics\n", compressible=True)
    return Reply(404, b"not found: try /metrics\n")
