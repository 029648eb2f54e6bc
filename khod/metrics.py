"""Prometheus metrics, served over HTTP from the daemon's own trio loop.

One private registry per daemon. Engine state (sessions, preserved bytes,
region use) and the connection count are read at scrape time by a collector
running on the trio thread, so it needs no locks and is never stale; the
lifecycle reports its state as it changes, and request, finalize and
notifier timings are ordinary counters and histograms their owners update.
Labelled series are created at zero at start, so a first increment is
visible as one.

The endpoint speaks HTTP/1.1 through h11 (the parsing, framing and limits
are its), with keep-alive, pipelining answered in order, gzip for a scraper
that accepts it (as Prometheus does), and an error status for a malformed
(400), oversized (413, 431) or unsupported (405, 501, 505) request, which
also closes the connection. Every connection is bounded in time and count.

``khod_handover_rejected_total`` counts refused handovers. A refusal makes
the daemon exit, so the counts are kept in ``server.state_dir`` (when set)
and the next daemon to start serves them.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from khod import __version__, status
from khod.engine import Engine
from khod.errors import Errno, Fault
from khod.kho.record import RECORD_VERSION
from khod.log import Log
from khod.pages import PAGE_SHIFT
from khod.startup import StartInfo, StartupRefused

STATES = ("active", "finalizing", "frozen", "finalized")
REGION_USES = ("free", "allocated", "preserved", "reserved_incoming", "scratch", "metadata")
FINALIZE_RESULTS = ("ok", "vetoed", "timeout", "error")
REJECTIONS_FILE = "handover-rejections.json"
MAX_SCRAPERS = 16  # connections served at once; more are closed at once
SCRAPE_TIMEOUT_S = 5.0  # for each request to arrive and be answered (and for an idle keep-alive)
CONNECTION_TIMEOUT_S = 60.0  # the whole life of one connection
MAX_REQUEST_HEAD = 8192  # request line and headers; more is refused with 431
MAX_REQUEST_BODY = 8192  # a GET carries no body; more than this is refused with 413
RECEIVE_SIZE = 4096


def load_rejections(state_dir: str) -> dict[str, int]:
    counts = dict.fromkeys((str(f) for f in Fault), 0)
    if state_dir:
        with contextlib.suppress(OSError, ValueError, TypeError):
            saved = json.loads((Path(state_dir) / REJECTIONS_FILE).read_text())
            for k, v in saved.items():
                if k in counts and isinstance(v, int) and v >= 0:
                    counts[k] = v
    return counts


def record_rejection(state_dir: str, error: StartupRefused, log: Log) -> None:
    """Count a refused handover where the next daemon will find it."""
    if not state_dir or error.fault is None:
        return
    counts = load_rejections(state_dir)
    counts[str(error.fault)] += 1
    path = Path(state_dir) / REJECTIONS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("metrics.state_unwritable", path=str(path), reason=exc.strerror)


def shown_state(state: str) -> str:
    return "finalized" if state == "handed_over" else str(state)


class _EngineCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        e = self.m.engine
        shown = shown_state(self.m.current_state)
        yield StateSetMetricFamily(
            "khod_state", "Lifecycle state of the daemon", {s: s == shown for s in STATES}
        )
        yield GaugeMetricFamily(
            "khod_state_since_timestamp_seconds",
            "Unix time the daemon entered its current state (finalized for how long?)",
            value=self.m.state_since,
        )
        yield GaugeMetricFamily(
            "khod_handover_generation", "Handovers this region has been through", value=e.generation
        )
        yield InfoMetricFamily(
            "khod_build",
            "khod version and handover format version",
            value={
                "version": __version__,
                "format_version": str(RECORD_VERSION),
                "python": platform.python_version(),
            },
        )
        folios = status.preserved_folios(e)
        pb = GaugeMetricFamily(
            "khod_preserved_bytes",
            "Bytes preserved for the next handover, by folio order",
            labels=["order"],
        )
        pf = GaugeMetricFamily(
            "khod_preserved_folios",
            "Folios preserved for the next handover, by order",
            labels=["order"],
        )
        for order, n in enumerate(folios):
            pb.add_metric([str(order)], n << (order + PAGE_SHIFT))
            pf.add_metric([str(order)], n)
        yield pb
        yield pf
        yield GaugeMetricFamily("khod_sessions", "Sessions the daemon knows", value=len(e.sessions))
        yield GaugeMetricFamily(
            "khod_clients_connected", "Open client connections", value=len(self.m.connections)
        )
        region = status.region_usage(e)
        yield GaugeMetricFamily(
            "khod_region_size_bytes", "Size of the region khod manages", value=region.size
        )
        rb = GaugeMetricFamily("khod_region_bytes", "Region bytes by use", labels=["use"])
        for use in REGION_USES:
            rb.add_metric([use], getattr(region, use))
        yield rb
        yield GaugeMetricFamily(
            "khod_incoming_unclaimed_bytes",
            "Handed-over bytes not restored yet",
            value=status.incoming_unclaimed_bytes(e),
        )
        yield GaugeMetricFamily(
            "khod_populate_duration_seconds",
            "How long taking in the incoming handover took at start-up (0 when formatted)",
            value=self.m.info.populate_s if self.m.info else 0.0,
        )
        rej = CounterMetricFamily(
            "khod_handover_rejected", "Incoming handovers refused, by fault", labels=["reason"]
        )
        for reason, n in sorted(self.m.rejections.items()):
            rej.add_metric([reason], n)
        yield rej


class Metrics:
    """The daemon's registry and the calls the server and the lifecycle make into it."""

    def __init__(
        self,
        engine: Engine,
        info: StartInfo | None,
        connections: Sized,
        *,
        ops: Iterable[str],
        listen: str,
        notifier_timeout_s: float,
        state_dir: str = "",
        log: Log | None = None,
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.engine = engine
        self.info = info
        self.connections = connections
        self.current_state = "active"
        self.state_since = time.time()
        self.listen = listen
        self.log = log or Log()
        self._scrapers = 0
        self.max_scrapers = MAX_SCRAPERS
        self.request_timeout_s = SCRAPE_TIMEOUT_S
        self.connection_timeout_s = CONNECTION_TIMEOUT_S
        self.bound: tuple[str, int] = ("", 0)  # where serve() listens (port 0 picks one)
        self.rejections = load_rejections(state_dir)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "khod_requests", "Requests handled, by op and result code", ["op", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "khod_request_duration_seconds",
            "Time to handle one request",
            ["op"],
            buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.finalize_seconds = Histogram(
            "khod_finalize_duration_seconds",
            "Finalize from request to outcome, notifiers included",
            buckets=(1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.finalizes = Counter(
            "khod_finalize", "Finalize attempts by outcome", ["result"], registry=r
        )
        self.notifier_seconds = Histogram(
            "khod_notifier_duration_seconds",
            "One notifier phase, from the first event pushed to the last answer",
            ["event"],
            buckets=(1e-3, 1e-2, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.notifier_last_seconds = Gauge(
            "khod_notifier_last_duration_seconds",
            "The last notifier phase of each event, from the first event pushed to the last "
            "answer (0 before the first)",
            ["event"],
            registry=r,
        )
        self.notifier_timeout = Gauge(
            "khod_notifier_timeout_seconds",
            "How long a notifier phase may take (server.notifier_timeout_s)",
            registry=r,
        )
        self.notifier_timeout.set(notifier_timeout_s)
        self._request_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.restored_bytes = Counter(
            "khod_restored_bytes", "Incoming bytes restored to their sessions", registry=r
        )
        for op in [*ops, "unknown", "invalid"]:
            self.request_seconds.labels(op)
            for code in ("OK", *Errno.__members__):
                self.requests.labels(op, code)
        for result in FINALIZE_RESULTS:
            self.finalizes.labels(result)
        for ev in ("finalize", "unfreeze"):
            self.notifier_seconds.labels(ev)
            self.notifier_last_seconds.labels(ev)
        r.register(_EngineCollector(self))

    # ----------------------------------------------------------------- what the daemon reports

    def state(self, state: str) -> None:
        # handed_over is shown as finalized (the daemon is about to exit): no new state
        if shown_state(state) != shown_state(self.current_state):
            self.state_since = time.time()
        self.current_state = state

    def request(self, op: str, code: str, seconds: float) -> None:
        # labels() costs a lock and a dict lookup per call: keep the children (op and
        # code are closed sets, so this cache is bounded)
        key = (op, code)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(op, code), self.request_seconds.labels(op))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def finalize(self, result: str, seconds: float) -> None:
        self.finalizes.labels(result).inc()
        self.finalize_seconds.observe(seconds)

    def notifier(self, event: str, seconds: float) -> None:
        self.notifier_seconds.labels(event).observe(seconds)
        self.notifier_last_seconds.labels(event).set(seconds)

    def restored(self, nbytes: int) -> None:
        self.restored_bytes.inc(nbytes)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    # ----------------------------------------------------------------- HTTP

    async def serve(self, nursery: trio.Nursery, listeners: list[trio.SocketListener]) -> None:
        """Serve the endpoint in ``nursery`` on listeners bound at start-up."""
        await nursery.start(functools.partial(trio.serve_listeners, self._handle, listeners))
        host, port = listeners[0].socket.getsockname()[:2]
        self.bound = (str(host), int(port))
        self.log.info("metrics.listen", address=f"{host}:{port}")

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection: at most ``max_scrapers`` at a time, each bounded in time.

        The endpoint is open to every local user, so nobody may hold its
        connections (and the daemon's descriptors) for long: a request must
        arrive and be answered within ``request_timeout_s`` (an idle
        keep-alive connection is closed after as long), and a connection
        lives at most ``connection_timeout_s``.
        """
        if self._scrapers >= self.max_scrapers:
            await trio.aclose_forcefully(stream)
            return
        self._scrapers += 1
        try:
            with trio.move_on_after(self.connection_timeout_s):
                await _HttpConnection(self, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:  # a scrape never takes the daemon down
            self.log.error("metrics.crashed", reason=repr(exc))
        finally:
            self._scrapers -= 1
            await trio.aclose_forcefully(stream)

    def respond(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Reply:
        """What a well-formed request gets: the exposition, a pointer to it, or an error."""
        if method not in (b"GET", b"HEAD"):
            return Reply(405, b"only GET and HEAD\n", extra=[("Allow", "GET, HEAD")])
        path = request_path(target)
        if path == b"/metrics":
            accept = b", ".join(v for k, v in headers if k == b"accept").decode("latin-1")
            body, ctype = self.exposition(accept)
            return Reply(200, body, ctype, compressible=True)
        if path == b"/":
            return Reply(200, b"khod: see /metrics\n", compressible=True)
        return Reply(404, b"not found: try /metrics\n")


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


class _HttpConnection:
    """One HTTP/1.1 connection driven by h11: keep-alive, pipelining, errors by status.

    h11 does the parsing (request line, headers, framing, limits); this loop
    only moves bytes and answers one request at a time, in order, so
    pipelined requests are answered as they came.
    """

    def __init__(self, metrics: Metrics, stream: trio.SocketStream) -> None:
        self.m = metrics
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
                await self._send(self.m.respond(request.method, request.target, []), request)
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
        await self._send(self.m.respond(request.method, request.target, headers), request)
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
