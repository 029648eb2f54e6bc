"""What a scrape of /metrics shows: the daemon's counts and state as metric families.

Loaded with the first scrape, not at start-up (prometheus_client imports some
60 modules; see ``khod/metrics.py``). The collector runs on the trio thread,
inside the scrape, so engine state is read without locks and is never stale.
The series, their names, help texts, labels and order are the same as those
of the prometheus_client Counter, Histogram and Gauge objects khod used
before, down to the bucket bounds' spelling.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from khod import __version__, status
from khod.kho.record import RECORD_VERSION
from khod.metrics_model import REGION_USES, STATES, Histogram, Model, shown_state
from khod.pages import PAGE_SHIFT


def _histogram(family: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets, total = [], 0
    for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
        total += n
        buckets.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
    family.add_metric(labels, buckets, h.sum)


class _Collector(Collector):
    def __init__(self, metrics: Model) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._recorded()
        yield from self._engine()

    def _recorded(self) -> Iterator[Metric]:
        m = self.m
        requests = CounterMetricFamily(
            "khod_requests", "Requests handled, by op and result code", labels=["op", "code"]
        )
        for (op, code), n in m.requests.items():
            requests.add_metric([op, code], n)
        yield requests
        seconds = HistogramMetricFamily(
            "khod_request_duration_seconds", "Time to handle one request", labels=["op"]
        )
        for op, h in m.request_seconds.items():
            _histogram(seconds, [op], h)
        yield seconds
        fin_s = HistogramMetricFamily(
            "khod_finalize_duration_seconds", "Finalize from request to outcome, notifiers included"
        )
        _histogram(fin_s, [], m.finalize_seconds)
        yield fin_s
        fin = CounterMetricFamily(
            "khod_finalize", "Finalize attempts by outcome", labels=["result"]
        )
        for result, n in m.finalizes.items():
            fin.add_metric([result], n)
        yield fin
        notifier = HistogramMetricFamily(
            "khod_notifier_duration_seconds",
            "One notifier phase, from the first event pushed to the last answer",
            labels=["event"],
        )
        for ev, h in m.notifier_seconds.items():
            _histogram(notifier, [ev], h)
        yield notifier
        last = GaugeMetricFamily(
            "khod_notifier_last_duration_seconds",
            "The last notifier phase of each event, from the first event pushed to the last "
            "answer (0 before the first)",
            labels=["event"],
        )
        for ev, s in m.notifier_last_seconds.items():
            last.add_metric([ev], s)
        yield last
        yield GaugeMetricFamily(
            "khod_notifier_timeout_seconds",
            "How long a notifier phase may take (server.notifier_timeout_s)",
            value=m.notifier_timeout_s,
        )
        yield CounterMetricFamily(
            "khod_restored_bytes",
            "Incoming bytes restored to their sessions",
            value=m.restored_bytes,
        )

    def _engine(self) -> Iterator[Metric]:
        m, e = self.m, self.m.engine
        shown = shown_state(m.current_state)
        yield StateSetMetricFamily(
            "khod_state", "Lifecycle state of the daemon", {s: s == shown for s in STATES}
        )
        yield GaugeMetricFamily(
            "khod_state_since_timestamp_seconds",
            "Unix time the daemon entered its current state (finalized for how long?)",
            value=m.state_since,
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
            "khod_clients_connected", "Open client connections", value=len(m.connections)
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
            value=m.info.populate_s if m.info else 0.0,
        )
        rej = CounterMetricFamily(
            "khod_handover_rejected", "Incoming handovers refused, by fault", labels=["reason"]
        )
        for reason, n in sorted(m.rejections.items()):
            rej.add_metric([reason], n)
        yield rej


class Export:
    """One registry per daemon, made at the first scrape."""

    def __init__(self, metrics: Model) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(metrics))

    def render(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
