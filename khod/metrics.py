"""Prometheus metrics, served over HTTP from the daemon's own trio loop.

One private registry per daemon. Engine state (sessions, preserved bytes,
region use) and the connection count are read at scrape time by a collector
running on the trio thread, so it needs no locks and is never stale; the
lifecycle reports its state as it changes, and request, finalize and
notifier timings are ordinary counters and histograms their owners update.
Labelled series are created at zero at start, so a first increment is
visible as one.

The endpoint speaks HTTP/1.1 (``khod/metrics_http.py``, on h11, loaded with
the first connection). Every connection is bounded in time and count here.

``khod_handover_rejected_total`` counts refused handovers. A refusal makes
the daemon exit, so the counts are kept in ``server.state_dir`` (when set)
and the next daemon to start serves them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path

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
            # h11 and gzip load with the first connection, not on the start-up path
            from khod.metrics_http import HttpConnection

            with trio.move_on_after(self.connection_timeout_s):
                await HttpConnection(self, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception as exc:  # a scrape never takes the daemon down
            self.log.error("metrics.crashed", reason=repr(exc))
        finally:
            self._scrapers -= 1
            await trio.aclose_forcefully(stream)
