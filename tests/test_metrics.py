"""/metrics over HTTP: values move with real operations; promtool and Prometheus agree."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from khoclient import AsyncClient, KhoError, Veto
from prometheus_client.parser import text_string_to_metric_families

from khod.kho.record import decode_record
from khod.metrics_http import request_path
from khod.metrics_model import REQUEST_BUCKETS, Histogram

from .helpers import InProc, daemon_running, inproc_daemon, start_daemon, write_config

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


class Responses:
    """Reads HTTP/1.1 responses off one stream, by their Content-Length."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buf += chunk
        return bool(chunk)

    async def next(self, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(10):
            while b"\r\n\r\n" not in self.buf:
                assert await self._fill(), f"closed before a response: {self.buf!r}"
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, _, val = line.partition(":")
                headers[name.strip().lower()] = val.strip()
            n = 0 if head_request else int(headers["content-length"])
            while len(self.buf) < n:
                assert await self._fill(), "closed inside a body"
            body, self.buf = self.buf[:n], self.buf[n:]
        return int(status_line.split()[1]), headers, body

    async def closed(self) -> bool:
        """The server hangs up (nothing more than what was read arrives)."""
        with trio.fail_after(10):
            try:
                return not await self._fill() and not self.buf
            except trio.BrokenResourceError:  # a reset is a hang-up too
                return not self.buf


async def scrape(
    addr: tuple[str, int], path: str = "/metrics", accept: str = ""
) -> tuple[str, str]:
    """One GET on a fresh connection: (status line and headers, body)."""
    stream = await trio.open_tcp_stream(*addr)
    headers = f"Accept: {accept}\r\n" if accept else ""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    status, head, body = await Responses(stream).next()
    await stream.aclose()
    shown = "\r\n".join(f"{k}: {v}" for k, v in head.items())
    return f"HTTP/1.1 {status}\r\n{shown}", body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


@given(
    st.lists(
        st.one_of(
            st.sampled_from(REQUEST_BUCKETS),  # on a bound: counted in that bound's bucket
            st.floats(min_value=0, max_value=10, allow_nan=False),
        ),
        max_size=50,
    )
)
def test_a_histogram_counts_as_prometheus_client_counts(values: list[float]) -> None:
    ours = Histogram(REQUEST_BUCKETS)
    registry = prometheus_client.CollectorRegistry()
    theirs = prometheus_client.Histogram("h", "h", buckets=REQUEST_BUCKETS, registry=registry)
    for v in values:
        ours.observe(v)
        theirs.observe(v)
    total, cumulative = 0, []
    for n in ours.counts:
        total += n
        cumulative.append(float(total))
    expected = [
        registry.get_sample_value("h_bucket", {"le": str(float(b))}) for b in REQUEST_BUCKETS
    ]
    assert cumulative == [*expected, registry.get_sample_value("h_count")]
    assert ours.sum == pytest.approx(registry.get_sample_value("h_sum"))


def test_prometheus_client_loads_with_the_first_scrape_not_at_start(shm_dir: Path) -> None:
    """Counting needs none of it: a cold start with metrics on does not pay for its imports."""
    code = f"""
import sys, trio
from tests.helpers import inproc_daemon
from khoclient import AsyncClient

async def main():
    async with inproc_daemon(__import__("pathlib").Path("{shm_dir}"), with_metrics=True) as d:
        async with AsyncClient(d.socket, "s") as s:
            await s.preserve_folio(await s.alloc_folio(0))
        print("prometheus_client" in sys.modules)
        body, _ = d.metrics.exposition()
        print("prometheus_client" in sys.modules)
        print(b'khod_requests_total{{code="OK",op="preserve_folio"}} 1.0' in body)

trio.run(main)
"""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "True"]


async def test_metrics_follow_the_daemon(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        head, body = await scrape(d.metrics_url)
        assert head.startswith("HTTP/1.1 200") and "text/plain" in head
        assert value(body, "khod_state", khod_state="active") == 1
        assert value(body, "khod_preserved_bytes", order="9") == 0
        assert (
            value(body, "khod_finalize_total", result="vetoed") == 0
        )  # labelled series exist at zero
        assert value(body, "khod_handover_rejected_total", reason="crc_mismatch") == 0
        assert value(body, "khod_region_size_bytes") == d.config.region.size
        assert value(body, "khod_notifier_timeout_seconds") == d.config.server.notifier_timeout_s
        assert value(body, "khod_notifier_last_duration_seconds", event="finalize") == 0
        started = value(body, "khod_state_since_timestamp_seconds")
        assert 0 < time.time() - started < 60
        assert (
            value(
                body,
                "khod_build_info",
                version="0.1.0",
                format_version="1",
                python=__import__("platform").python_version(),
            )
            == 1
        )

        async with AsyncClient(d.socket, "vmm") as vmm:
            for f in await vmm.alloc_folios(9, 3):
                await vmm.preserve_folio(f)
            with pytest.raises(KhoError):
                await vmm.free_folio(4096)
            _, body = await scrape(d.metrics_url)
            assert value(body, "khod_preserved_bytes", order="9") == 3 << 21
            assert value(body, "khod_preserved_folios", order="9") == 3
            assert value(body, "khod_sessions") == 1
            assert value(body, "khod_clients_connected") == 1
            assert value(body, "khod_requests_total", op="preserve_folio", code="OK") == 3
            assert value(body, "khod_requests_total", op="free_folio", code="EINVAL") == 1
            assert value(body, "khod_request_duration_seconds_count", op="preserve_folio") == 3
            assert value(body, "khod_region_bytes", use="preserved") == 3 << 21
            assert value(body, "khod_region_bytes", use="allocated") == 3 << 21

            async def veto(ev: object) -> None:
                raise Veto("not now")

            await vmm.subscribe(on_finalize=veto)
            async with AsyncClient(d.socket) as op:
                with pytest.raises(KhoError):
                    await op.finalize()
                _, body = await scrape(d.metrics_url)  # vetoed: active again, and since then
                assert value(body, "khod_state_since_timestamp_seconds") > started
                assert value(body, "khod_notifier_last_duration_seconds", event="unfreeze") > 0
                await vmm.subscribe()
                before = time.time()
                await op.finalize()
                _, body = await scrape(d.metrics_url)
                assert before <= value(body, "khod_state_since_timestamp_seconds") <= time.time()
                assert 0 < value(body, "khod_notifier_last_duration_seconds", event="finalize") < 5
                assert value(body, "khod_finalize_total", result="vetoed") == 1
                assert value(body, "khod_finalize_total", result="ok") == 1
                assert value(body, "khod_finalize_duration_seconds_count") == 2
                assert value(body, "khod_notifier_duration_seconds_count", event="finalize") == 2
                assert value(body, "khod_state", khod_state="finalized") == 1
                assert value(body, "khod_region_bytes", use="metadata") > 0
        # OpenMetrics too, and the small HTTP surface
        head, body = await scrape(
            d.metrics_url, accept="application/openmetrics-text; version=1.0.0"
        )
        assert "application/openmetrics-text" in head and body.rstrip().endswith("# EOF")
        head, _ = await scrape(d.metrics_url, path="/nope")
        assert head.startswith("HTTP/1.1 404")


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: Debian's prometheus package is not installed"
)
async def test_exposition_passes_promtool(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d, AsyncClient(d.socket, "s") as s:
        await s.preserve_folio(await s.alloc_folio(0))
        _, body = await scrape(d.metrics_url)
    check = await trio.run_process(
        [PROMTOOL or "promtool", "check", "metrics"],
        stdin=body.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = check.stdout.decode() + check.stderr.decode()
    assert check.returncode == 0, out
    assert out.strip() == "", out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prometheus_api(port: int, path: str) -> Any:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=2) as resp:
            return json.load(resp)["data"]
    except OSError:
        return None


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: Debian's prometheus package is not installed"
)
def test_a_real_prometheus_scrapes_khod_and_evaluates_its_rules(shm_dir: Path) -> None:
    mport, pport = free_port(), free_port()
    cfg = write_config(shm_dir, metrics={"listen": f"127.0.0.1:{mport}"})
    rules = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "khod.rules.yml"
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("vmm", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(9))
        prom_cfg = shm_dir / "prometheus.yml"
        prom_cfg.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{rules}']\n"
            f"scrape_configs:\n  - job_name: khod\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
        )
        prom = subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={shm_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{pport}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            query = "query?query=khod_preserved_bytes%7Border%3D%229%22%7D"
            deadline = time.monotonic() + 60
            result: list[dict[str, Any]] = []
            ratio: list[dict[str, Any]] = []
            health: dict[str, str] = {}
            while time.monotonic() < deadline:
                result = (prometheus_api(pport, query) or {}).get("result", [])
                ratio = (prometheus_api(pport, "query?query=khod:region_free:ratio") or {}).get(
                    "result", []
                )
                groups = (prometheus_api(pport, "rules") or {}).get("groups", [])
                health = {
                    r["name"]: r["health"] + r.get("lastError", "")
                    for g in groups
                    for r in g["rules"]
                }
                if result and ratio and health and set(health.values()) == {"ok"}:
                    break
                time.sleep(0.5)
            assert result, "Prometheus never returned khod_preserved_bytes"
            assert result[0]["value"][1] == str(2 << 20)
            assert result[0]["metric"]["job"] == "khod"
            # every rule evaluates cleanly against what khod serves, and the records hold
            defined = re.findall(r"^\s+- (?:record|alert): (\S+)", rules.read_text(), re.M)
            assert sorted(health) == sorted(defined) and set(health.values()) == {"ok"}, health
            assert ratio and 0.5 < float(ratio[0]["value"][1]) < 1
            targets = prometheus_api(pport, "targets")["activeTargets"]
            assert [t["health"] for t in targets] == ["up"], targets
            firing = [a["labels"]["alertname"] for a in prometheus_api(pport, "alerts")["alerts"]]
            assert firing == [], firing
        finally:
            prom.terminate()
            prom.wait(30)
        assert d.stop() == 0


def test_refused_handovers_are_counted_across_restarts(shm_dir: Path) -> None:
    state = shm_dir / "state"
    mport = free_port()
    cfg = write_config(
        shm_dir, server={"state_dir": str(state)}, metrics={"listen": f"127.0.0.1:{mport}"}
    )
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("s", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(0))
        with d.client() as op:
            op.finalize()
            op.handover()
        assert d.wait() == 0
    # break the FDT's CRC: the successor refuses with crc_mismatch and exits 3
    with open(shm_dir / "region", "r+b") as f:
        rec = decode_record(f.read(128))
        f.seek(rec.fdt_phys - rec.region_base + 8)
        (off,) = struct.unpack(">I", f.read(4))
        f.seek(rec.fdt_phys - rec.region_base + 8)
        f.write(struct.pack(">I", off ^ 4))
    for _ in range(2):
        refused = start_daemon(shm_dir, config=cfg, wait_ready=False)
        assert refused.wait() == 3
        assert "crc_mismatch" in refused.logs()
    with daemon_running(shm_dir, "--reset", config=cfg) as d2:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert value(body, "khod_handover_rejected_total", reason="crc_mismatch") == 2
        assert value(body, "khod_handover_rejected_total", reason="bad_dtb") == 0
        assert d2.stop() == 0


# ----------------------------------------------------------------------------- HTTP (h11)


async def connect(d: InProc) -> tuple[trio.SocketStream, Responses]:
    stream = await trio.open_tcp_stream(*d.metrics_url)
    return stream, Responses(stream)


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        stream, r = await connect(d)
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, body = await r.next()
        assert status == 200 and head["content-type"].startswith("text/plain")
        assert head.get("connection") != "close" and "khod_sessions" in body.decode()
        # three requests in one write: answered one by one, in order, then the close asked for
        await stream.send_all(
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        status, head, body = await r.next(head_request=True)
        assert (status, body) == (200, b"") and int(head["content-length"]) > 1000
        status, _, body = await r.next()
        assert status == 404 and b"/metrics" in body
        status, head, body = await r.next()
        assert status == 200 and head["connection"] == "close" and b"khod_state" in body
        assert await r.closed()
        await stream.aclose()


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),  # what Prometheus sends
        ("deflate, gzip;q=1.0, *;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0, *", False),  # a named coding wins over the wildcard
        ("identity", False),
        ("br", False),
        ("gzip;q=nonsense", False),
        (None, False),
    ],
)
async def test_the_exposition_is_gzipped_when_the_scraper_accepts_it(
    shm_dir: Path, accept_encoding: str | None, gzipped: bool
) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        stream, r = await connect(d)
        extra = f"Accept-Encoding: {accept_encoding}\r\n" if accept_encoding is not None else ""
        await stream.send_all(f"GET /metrics HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        status, head, body = await r.next()
        await stream.aclose()
    assert status == 200 and head["vary"] == "Accept-Encoding"
    if gzipped:
        assert head["content-encoding"] == "gzip"
        text = gzip.decompress(body).decode()
        assert len(body) * 3 < len(text)
    else:
        assert "content-encoding" not in head
        text = body.decode()
    assert value(text, "khod_state", khod_state="active") == 1


MALFORMED = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="no-request-line"),
    pytest.param(b"\x00\xff\xfe\x16\x03\x01junk\r\n\r\n", 400, id="binary"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), 400, id="tls"),
    pytest.param(b"GET /metrics HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400, id="bad-header"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, id="bad-length"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, id="coding"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431, id="huge-head"),
    pytest.param(b"GET /" + b"m" * 20000, 431, id="endless-line"),
    pytest.param(b"GET /" + b"m" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, id="long-target"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + bytes(9000), 413, id="body"),
    pytest.param(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 405, id="post"),
    pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, id="http2-preface"),
]  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status"), MALFORMED)
async def test_a_malformed_or_oversized_request_gets_an_error_and_a_close(
    shm_dir: Path, request_bytes: bytes, status: int
) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        stream, r = await connect(d)
        # a request after the bad one must not be answered: the connection is done
        await stream.send_all(request_bytes + b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        got, head, body = await r.next()
        assert got == status, body
        assert head["connection"] == "close" and body.endswith(b"\n") and len(body) < 300
        if status == 405:
            assert head["allow"] == "GET, HEAD"
        assert await r.closed()
        await stream.aclose()
        _, text = await scrape(d.metrics_url)  # and the endpoint serves on
        assert value(text, "khod_state", khod_state="active") == 1
        assert "metrics.crashed" not in d.log.getvalue()


async def test_an_http10_request_is_answered_and_closed(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        stream, r = await connect(d)
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        status, _, body = await r.next()
        assert status == 200 and b"khod_state" in body
        assert await r.closed()
        await stream.aclose()


async def test_every_connection_is_bounded_in_time(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d, contextlib.AsyncExitStack() as ex:
        assert d.metrics is not None
        d.metrics.request_timeout_s = 0.3

        async def fresh() -> tuple[trio.SocketStream, Responses]:
            stream, r = await connect(d)
            ex.push_async_callback(stream.aclose)
            return stream, r

        # a request begun and never finished: 408, then the close
        stream, r = await fresh()
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        status, head, _ = await r.next()
        assert status == 408 and head["connection"] == "close"
        assert await r.closed()
        # nothing sent at all, or idle after a request (keep-alive): closed without a word
        stream, r = await fresh()
        assert await r.closed()
        stream, r = await fresh()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await r.next())[0] == 200
        assert await r.closed()
        # a connection that keeps asking still ends when its lifetime is up
        d.metrics.request_timeout_s, d.metrics.connection_timeout_s = 5.0, 0.5
        stream, r = await fresh()
        answered = 0
        with trio.fail_after(10):
            while True:
                try:
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    await r.next()
                except (AssertionError, trio.BrokenResourceError):
                    break
                answered += 1
        assert answered > 0


async def test_connections_are_bounded_in_count(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d, contextlib.AsyncExitStack() as ex:
        assert d.metrics is not None
        d.metrics.max_scrapers = 2
        ask = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

        async def fresh() -> tuple[trio.SocketStream, Responses]:
            stream, r = await connect(d)
            ex.push_async_callback(stream.aclose)
            return stream, r

        held = []
        for _ in range(2):  # two keep-alive connections, each answered once: both are held
            stream, r = await fresh()
            await stream.send_all(ask)
            assert (await r.next())[0] == 200
            held.append((stream, r))
        stream, r = await fresh()  # a third is closed at once
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(ask)
        assert await r.closed()
        await held[0][0].aclose()
        with trio.fail_after(10):  # one let go: room for another once the daemon has seen it
            while True:
                stream, r = await fresh()
                try:
                    await stream.send_all(ask)
                    status, _, _ = await r.next()
                    break
                except (AssertionError, trio.BrokenResourceError):
                    await trio.sleep(0.01)
        assert status == 200
        await held[1][0].send_all(ask)  # and the one still held is served as before
        assert (await held[1][1].next())[0] == 200


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/metrics", b"/metrics"),
        (b"/metrics?name[]=x", b"/metrics"),
        (b"http://host:9477/metrics?x", b"/metrics"),
        (b"HTTPS://host", b"/"),
        (b"*", b"*"),
    ],
)
def test_request_paths(target: bytes, path: bytes) -> None:
    assert request_path(target) == path
