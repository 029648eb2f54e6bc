"""/metrics over HTTP: values move with real operations; promtool and Prometheus agree."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from khoclient import AsyncClient, KhoError, Veto
from prometheus_client.parser import text_string_to_metric_families

from khod.kho.record import decode_record

from .helpers import daemon_running, inproc_daemon, start_daemon, write_config

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


async def scrape(
    addr: tuple[str, int], path: str = "/metrics", accept: str = ""
) -> tuple[str, str]:
    stream = await trio.open_tcp_stream(*addr)
    headers = f"Accept: {accept}\r\n" if accept else ""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


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
                await vmm.subscribe()
                await op.finalize()
                _, body = await scrape(d.metrics_url)
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


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: Debian's prometheus package is not installed"
)
def test_a_real_prometheus_scrapes_khod(shm_dir: Path) -> None:
    mport, pport = free_port(), free_port()
    cfg = write_config(shm_dir, metrics={"listen": f"127.0.0.1:{mport}"})
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("vmm", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(9))
        prom_cfg = shm_dir / "prometheus.yml"
        prom_cfg.write_text(
            "global:\n  scrape_interval: 1s\n"
            f"scrape_configs:\n  - job_name: khod\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n"
        )
        prom = subprocess.Popen(
            [PROMETHEUS or "prometheus", f"--config.file={prom_cfg}", f"--storage.tsdb.path={shm_dir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{pport}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{pport}/api/v1/query?query=khod_preserved_bytes%7Border%3D%229%22%7D"
            deadline = time.monotonic() + 60
            result: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        result = json.load(resp)["data"]["result"]
                except OSError:
                    result = []
                if result:
                    break
                time.sleep(0.5)
            assert result, "Prometheus never returned khod_preserved_bytes"
            assert result[0]["value"][1] == str(2 << 20)  # type: ignore[index]
            assert result[0]["metric"]["job"] == "khod"  # type: ignore[index]
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
