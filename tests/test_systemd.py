"""systemd: the unit files verify cleanly, and khod speaks the service-manager protocols."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from khoclient import Client

from .helpers import spawn_activated, write_config

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_units_verify_without_any_output(tmp_path: Path) -> None:
    khod = shutil.which("khod") or str(Path(sys.executable).parent / "khod")
    assert os.access(khod, os.X_OK), "the khod console script is not installed"
    for name in ("khod.socket", "khod.service", "khod@.service"):
        text = (UNITS / name).read_text()
        # the unit names /usr/bin/khod; point it at this install so verify can check it exists
        (tmp_path / name).write_text(text.replace("/usr/bin/khod", khod))
    r = subprocess.run(
        [
            ANALYZE or "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "khod.socket"),
            str(tmp_path / "khod.service"),
            str(tmp_path / "khod@blue.service"),  # an instance of the template beside them
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_unit_settings_that_matter() -> None:
    service = (UNITS / "khod.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=3 4",
        "TimeoutStopSec=",
        "User=khod",
        "RuntimeDirectory=khod",
        "StateDirectory=khod",
        "DeviceAllow=/dev/mem rw",
        "CapabilityBoundingSet=CAP_SYS_RAWIO",
        "PrivateDevices=no",
        "ProtectSystem=strict",
    ):
        assert f"\n{line}" in service, line
    devmem = (UNITS / "devmem.conf").read_text()  # /dev/mem is root:kmem 0640; khod writes it
    assert "\nAmbientCapabilities=CAP_SYS_RAWIO CAP_DAC_OVERRIDE" in devmem
    assert "\nCapabilityBoundingSet=CAP_SYS_RAWIO CAP_DAC_OVERRIDE" in devmem
    sock = (UNITS / "khod.socket").read_text()
    assert "\nListenStream=/run/khod/khod.sock" in sock
    assert "\nSocketMode=0660" in sock and "\nSocketGroup=khod" in sock


def test_blue_green_instances_stand_by_in_khod_services_sandbox() -> None:
    service = (UNITS / "khod.service").read_text()
    instance = (UNITS / "khod@.service").read_text()
    sandbox = service[service.index("\nUser=khod") : service.index("[Install]")]
    assert sandbox in instance  # the same user, directories and sandbox, line for line
    for line in (
        "Type=notify",
        "Sockets=khod.socket",  # the listening socket is shared, and no other service is started
        "RuntimeDirectoryPreserve=yes",  # one instance stopping must not remove the socket's dir
        "RestartPreventExitStatus=2 3 4",
        "WatchdogSec=",
    ):
        assert f"\n{line}" in instance, line
    exec_start = next(x for x in instance.splitlines() if x.startswith("ExecStart="))
    assert exec_start.startswith("ExecStart=/usr/bin/khod --standby ")
    assert exec_start.replace(" --standby", "") in service  # otherwise the same command


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/-tmpfiles are not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="the tmpfiles snippet chowns to khod; needs root")
def test_sysusers_and_tmpfiles_snippets_apply(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for f in ("passwd", "group"):
        shutil.copy(f"/etc/{f}", tmp_path / "etc" / f)
    r = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "khod.sysusers.conf")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert any(
        line.startswith("khod:") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
    )
    r = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "khod.tmpfiles.conf")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "dev" / "shm" / "khod").is_dir()


def test_khod_under_a_service_manager(shm_dir: Path) -> None:
    """Play systemd: a notify socket, a passed listening socket, a watchdog."""
    notify_path = str(shm_dir / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.2)
    listen_path = str(shm_dir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(8)
    cfg = write_config(shm_dir)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    env.pop("KHOD_FAULT", None)
    log = shm_dir / "svc.log"
    proc = spawn_activated(
        listener, cfg, log, settings="LISTEN_FDNAMES=control WATCHDOG_PID=$$ ", env=env
    )
    messages: list[str] = []

    def collect(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                messages.append(notify.recv(4096).decode())

    try:
        deadline = time.monotonic() + 20
        while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
            collect(0.2)
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=active" in ready
        with Client(listen_path, timeout=20) as c:  # served on the socket systemd passed
            c.ping()
            with Client(listen_path, session="s") as s:
                s.preserve_folio(s.alloc_folio(0))
            c.finalize()
        collect(0.8)
        pings = sum(m == "WATCHDOG=1" for m in messages)
        assert pings >= 3, messages  # every 0.1 s: half of WATCHDOG_USEC
        assert any(m.startswith("STATUS=finalized") for m in messages), messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        collect(0.3)
        assert any(m.startswith("STOPPING=1") for m in messages), messages
        assert "socket activation" in log.read_text()
        assert not (shm_dir / "khod.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        listener.close()
