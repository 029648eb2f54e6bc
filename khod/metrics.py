"""Prometheus metrics, served over HTTP from the daemon's own trio loop.

The lifecycle reports its state as it changes, and the server, the lifecycle
and the engine's owners count requests, finalizes, notifier phases and
restored bytes, all in :class:`khod.metrics_model.Model`, which this class
extends: plain counters and histograms, created at zero for every label at
start, so a first increment is visible as one. Engine state (sessions,
preserved bytes, region use) and the connection count are read at scrape
time, on the trio thread, so they need no locks and are never stale.

Nothing of prometheus_client is imported at start-up (some 60 modules, ~20
ms of a cold start whose target is 250 ms; README, Performance): one
private registry per daemon is made at the first scrape, by
``khod/metrics_export.py``. The endpoint speaks HTTP/1.1
(``khod/metrics_http.py``, on h11, also loaded with the first connection).
Every connection is bounded in time and count here.

``khod_handover_rejected_total`` counts refused handovers. A refusal makes
the daemon exit, so the counts are kept in ``server.state_dir`` (when set)
and the next daemon to start serves them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any

import trio

from khod.engine import Engine
from khod.errors import Fault
from khod.log import Log
from khod.metrics_model import Model
from khod.startup import StartInfo, StartupRefused

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


class Metrics(Model):
    """What the daemon records (:class:`Model`) and the endpoint that serves it."""

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
        super().__init__(
            engine,
            info,
            connections,
            ops=ops,
            notifier_timeout_s=notifier_timeout_s,
            rejections=load_rejections(state_dir),
        )
        self.listen = listen
        self.log = log or Log()
        self._scrapers = 0
        self.max_scrapers = MAX_SCRAPERS
        self.request_timeout_s = SCRAPE_TIMEOUT_S
        self.connection_timeout_s = CONNECTION_TIMEOUT_S
        self.bound: tuple[str, int] = ("", 0)  # where serve() listens (port 0 picks one)
        self._export: Any = None  # khod.metrics_export.Export, made at the first scrape

    # ----------------------------------------------------------------- a scrape

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The text a scrape gets, in the format ``accept`` asks for (prometheus_client
        is loaded here, the first time)."""
        if self._export is None:
            from khod.metrics_export import Export

            self._export = Export(self)
        body: bytes
        content_type: str
        body, content_type = self._export.render(accept)
        return body, content_type

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
