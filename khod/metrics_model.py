"""What a scrape of /metrics shows, kept without prometheus_client: counts and sources.

The daemon records requests, finalizes, notifier phases and restored bytes
here as plain counters and :class:`Histogram`s (cheap on the request path,
nothing to import at start-up), and keeps the sources the scrape reads at
scrape time (the engine, the connections, the start-up info). Turning all of
it into metric families is ``khod/metrics_export.py``'s job, at the first
scrape. Sans-I/O; every method runs on the trio thread.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sized

from khod.engine import Engine
from khod.errors import Errno
from khod.startup import StartInfo

STATES = ("active", "finalizing", "frozen", "finalized")
REGION_USES = ("free", "allocated", "preserved", "reserved_incoming", "scratch", "metadata")
FINALIZE_RESULTS = ("ok", "vetoed", "timeout", "error")
NOTIFIER_EVENTS = ("finalize", "unfreeze")
REQUEST_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1, 5)
FINALIZE_BUCKETS = (1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
NOTIFIER_BUCKETS = (1e-3, 1e-2, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60)


def shown_state(state: str) -> str:
    return "finalized" if state == "handed_over" else str(state)


class Histogram:
    """Observations counted into fixed buckets, as a Prometheus histogram counts them.

    ``counts[i]`` is how many were at most ``bounds[i]`` and over the bound
    before (the last: over every bound); the exposition adds them up.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Model:
    """The recorded counts and the sources a scrape reads; the calls that record."""

    def __init__(
        self,
        engine: Engine,
        info: StartInfo | None,
        connections: Sized,
        *,
        ops: Iterable[str],
        notifier_timeout_s: float,
        rejections: dict[str, int],
    ) -> None:
        self.engine = engine
        self.info = info
        self.connections = connections
        self.current_state = "active"
        self.state_since = time.time()
        self.rejections = rejections
        self.notifier_timeout_s = notifier_timeout_s
        # every labelled series exists from the start, at zero (a first increment shows as one)
        ops = [*ops, "unknown", "invalid"]
        codes = ("OK", *Errno.__members__)
        self.requests: dict[tuple[str, str], int] = {(op, c): 0 for op in ops for c in codes}
        self.request_seconds = {op: Histogram(REQUEST_BUCKETS) for op in ops}
        self.finalize_seconds = Histogram(FINALIZE_BUCKETS)
        self.finalizes = dict.fromkeys(FINALIZE_RESULTS, 0)
        self.notifier_seconds = {ev: Histogram(NOTIFIER_BUCKETS) for ev in NOTIFIER_EVENTS}
        self.notifier_last_seconds = dict.fromkeys(NOTIFIER_EVENTS, 0.0)
        self.restored_bytes = 0

    def state(self, state: str) -> None:
        # handed_over is shown as finalized (the daemon is about to exit): no new state
        if shown_state(state) != shown_state(self.current_state):
            self.state_since = time.time()
        self.current_state = state

    def request(self, op: str, code: str, seconds: float) -> None:
        key = (op, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.request_seconds.get(op)
        if h is None:
            h = self.request_seconds[op] = Histogram(REQUEST_BUCKETS)
        h.observe(seconds)

    def finalize(self, result: str, seconds: float) -> None:
        self.finalizes[result] = self.finalizes.get(result, 0) + 1
        self.finalize_seconds.observe(seconds)

    def notifier(self, event: str, seconds: float) -> None:
        h = self.notifier_seconds.get(event)
        if h is None:
            h = self.notifier_seconds[event] = Histogram(NOTIFIER_BUCKETS)
        h.observe(seconds)
        self.notifier_last_seconds[event] = seconds

    def restored(self, nbytes: int) -> None:
        self.restored_bytes += nbytes
