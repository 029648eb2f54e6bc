"""The example workloads' full cycle, at small sizes, through real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import daemon_running

STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_example_left_running() -> Iterator[None]:
    """A failed test must not leave a workload waiting for a handover that never comes."""
    yield
    while STARTED:
        p = STARTED.pop()
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def run_example(module: str, *args: str, sock: str) -> subprocess.Popen[str]:
    env = {**os.environ, "KHOD_SOCKET": sock}
    p = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    STARTED.append(p)
    return p


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait, drain and close the pipes; returns (exit status, stderr)."""
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def report_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("report "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise AssertionError(f"no report; stderr:\n{proc.stderr.read() if proc.stderr else ''}")


def test_vmm_and_kvstore_survive_the_handover(shm_dir: Path) -> None:
    log = str(shm_dir / "kv.log")
    with daemon_running(shm_dir) as d:
        vmm = run_example("khoexamples.vmm", "--memory", "8M", "--vcpus", "3", sock=d.socket)
        kv = run_example("khoexamples.kvstore", "--keys", "600", "--log", log, sock=d.socket)
        rv, rk = report_of(vmm), report_of(kv)
        assert rv["mode"] == "start" and rv["guest_bytes"] == 8 << 20 and rv["folios"] == 4
        assert rk["mode"] == "start" and rk["keys"] == 600
        with d.client() as op:
            summary = op.finalize()
            assert summary["notified"] == {
                f"u{os.getuid()},vmm": "ok",
                f"u{os.getuid()},kvstore": "ok",
            }
            op.handover()
        (vrc, verr), (krc, _) = finish(vmm), finish(kv)
        assert vrc == 0 and krc == 0  # they exit with the daemon, as after a kexec
        assert "writers paused" in verr
        assert d.wait() == 0

    with daemon_running(shm_dir) as d2:
        vmm = run_example("khoexamples.vmm", "--once", sock=d2.socket)
        kv = run_example(
            "khoexamples.kvstore", "--once", "--keys", "600", "--log", log, sock=d2.socket
        )
        rv, rk = report_of(vmm), report_of(kv)
        assert finish(vmm)[0] == 0 and finish(kv)[0] == 0
        assert rv["mode"] == "resume" and rv["checksum_ok"] is True and rv["vcpus"] == 3
        assert rv["bytes_copied"] == 0 and rv["restore_ms"] > 0
        assert rk["mode"] == "resume" and rk["keys_served"] == 600 and rk["keys_wrong"] == 0
        assert rk["warm_start_ms"] > 0 and rk["cold_start_ms"] > 0 and rk["warm_vs_cold"] > 0
        # both preserved their memory again for the next update
        with d2.client() as op:
            st = {s["name"]: s for s in op.status()["sessions"]}
        assert st["vmm"]["preserved_bytes"] == 8 << 20
        assert st["kvstore"]["preserved_bytes"] > 600 * 400
        assert d2.stop() == 0
