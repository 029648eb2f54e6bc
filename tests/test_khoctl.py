"""khoctl through a subprocess against a real daemon: output, --json schemas, exit codes."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from khoclient import ctl

from .helpers import Daemon, daemon_running

DTC = shutil.which("dtc")


def khoctl(
    *args: str, socket: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    argv = [sys.executable, "-m", "khoclient.ctl", *(["--socket", socket] if socket else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=full, timeout=60)


def populate(d: Daemon) -> None:
    with d.client("vmm", persistent=True) as vmm, d.client("db", persistent=True) as db:
        for f in vmm.alloc_folios(9, 2):
            vmm.preserve_folio(f)
        db.preserve_folios([f.phys for f in db.alloc_folios(0, 3)], 0)


def test_status_sessions_finalize_handover(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        populate(d)
        r = khoctl("status", socket=d.socket)
        assert r.returncode == 0, r.stderr
        assert "state active" in r.stdout and "generation 0" in r.stdout
        assert "vmm" in r.stdout and "o9: 2 x 2.0 MiB" in r.stdout and "o0: 3 x 4.0 KiB" in r.stdout
        # KHOD_SOCKET works as well as --socket
        js = khoctl("--json", "status", env={"KHOD_SOCKET": d.socket})
        assert js.returncode == 0, js.stderr
        st = json.loads(js.stdout)
        assert {
            "state",
            "generation",
            "pid",
            "region",
            "sessions",
            "incoming",
            "connections",
            "frozen",
            "last_finalize",
        } <= st.keys()
        assert set(st["region"]) >= {
            "free",
            "allocated",
            "preserved",
            "metadata",
            "reserved_incoming",
            "scratch",
            "size",
            "base",
        }
        by_name = {s["name"]: s for s in st["sessions"]}
        assert by_name["vmm"]["preserved"] == {"9": {"folios": 2, "bytes": 4 << 20}}
        assert set(by_name["db"]) >= {
            "name",
            "uid",
            "persistent",
            "connections",
            "allocated_bytes",
            "preserved_bytes",
            "preserved",
        }
        sess = json.loads(khoctl("--json", "sessions", socket=d.socket).stdout)
        assert [s["name"] for s in sess["sessions"]] == ["db", "vmm"]

        fin = khoctl("finalize", socket=d.socket)
        assert fin.returncode == 0, fin.stderr
        assert "finalized: generation 1 committed" in fin.stdout
        again = khoctl("--json", "finalize", socket=d.socket)
        assert again.returncode == ctl.Exit.REFUSED
        assert "EEXIST" in again.stderr and "already finalized" in again.stderr

        out = shm_dir / "out.dtb"
        f = khoctl("fdt", "out", "-o", str(out), socket=d.socket)
        assert f.returncode == 0, f.stderr
        if DTC:
            dts = subprocess.run(
                [DTC, "-I", "dtb", "-O", "dts", str(out)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert 'compatible = "kho-v1";' in dts
        missing = khoctl("fdt", "in", "-o", str(out), socket=d.socket)
        assert missing.returncode == ctl.Exit.REFUSED and "ENOENT" in missing.stderr

        un = khoctl("--json", "unfreeze", socket=d.socket)
        assert json.loads(un.stdout)["state"] == "active"
        fj = json.loads(khoctl("--json", "finalize", socket=d.socket).stdout)
        assert fj["summary"]["generation"] == 1
        assert set(fj["summary"]) >= {
            "generation",
            "folios",
            "bytes",
            "total_bytes",
            "chunk_pages",
            "metadata_pages",
            "fdt_bytes",
            "duration_ms",
            "sessions",
            "notified",
        }
        h = khoctl("handover", socket=d.socket)
        assert h.returncode == 0 and "handed over: generation 1" in h.stdout
        assert d.wait() == 0
    gone = khoctl("status", socket=d.socket)
    assert gone.returncode == ctl.Exit.UNREACHABLE
    assert "unreachable" in gone.stderr
    with daemon_running(shm_dir) as d2:
        text = khoctl("release-unclaimed", "--session", "db", socket=d2.socket).stdout
        assert f"dropped sessions: u{os.getuid()},db\n" in text  # by uid and name
        r = khoctl("--json", "release-unclaimed", socket=d2.socket)
        released = json.loads(r.stdout)
        assert released["dropped"] == [f"u{os.getuid()},vmm"]
        assert released["released_bytes"] == 4 << 20  # vmm's two 2 MiB folios; db's went first
        with open(shm_dir / "in.dtb", "wb"):
            pass
        assert khoctl("fdt", "in", "-o", str(shm_dir / "in.dtb"), socket=d2.socket).returncode == 0
        assert (shm_dir / "in.dtb").read_bytes()[:4] == b"\xd0\r\xfe\xed"
        assert d2.stop() == 0


def test_finalize_shows_the_notifier_phase(shm_dir: Path) -> None:
    from khoclient import Veto

    with daemon_running(shm_dir) as d:
        c = d.client("vmm")
        c.subscribe(on_finalize=lambda ev: (_ for _ in ()).throw(Veto("busy migrating")))
        r = khoctl("finalize", socket=d.socket)
        assert r.returncode == ctl.Exit.REFUSED
        assert "vmm" in r.stdout and "asked" in r.stdout and "VETOED: busy migrating" in r.stdout
        assert "EBUSY" in r.stderr
        c.close()
        assert d.stop() == 0


def test_fdt_refuses_a_terminal(shm_dir: Path) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "khoclient.ctl",
                "--socket",
                str(shm_dir / "none.sock"),
                "fdt",
                "out",
            ],
            stdout=slave,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == ctl.Exit.LOCAL
    assert "refusing to write a binary DTB to a terminal" in proc.stderr
    assert "-o FILE" in proc.stderr and "dtc -I dtb -O dts" in proc.stderr


def test_usage_and_operator_errors(shm_dir: Path) -> None:
    assert khoctl("frobnicate").returncode == ctl.Exit.USAGE
    assert khoctl("fdt", "sideways").returncode == ctl.Exit.USAGE
    with daemon_running(shm_dir) as d:
        r = khoctl("handover", socket=d.socket)
        assert r.returncode == ctl.Exit.REFUSED
        assert r.stderr.startswith("khoctl: handover: EBUSY:")
        assert len(r.stderr.strip().splitlines()) == 1
        r = khoctl("unfreeze", socket=d.socket)
        assert r.returncode == ctl.Exit.REFUSED and "ENOENT" in r.stderr
        assert d.stop() == 0


def test_exit_codes_are_the_documented_ones() -> None:
    table = re.findall(r"^    (\d)  ([A-Z_]+) ", ctl.__doc__ or "", re.MULTILINE)
    assert [(int(n), name) for n, name in table] == [(e.value, e.name) for e in ctl.Exit]
    assert "0  OK " in ctl.parser().format_help()  # the table is khoctl --help's epilog


def test_default_socket_comes_from_the_packaged_config() -> None:
    import tomllib

    from khod.config import DEFAULT_SOCKET

    root = Path(__file__).resolve().parent.parent
    with open(root / "config" / "khod.toml", "rb") as f:
        packaged: dict[str, Any] = tomllib.load(f)
    assert (
        packaged["server"]["socket"]
        == DEFAULT_SOCKET
        == ctl.default_socket.__globals__["DEFAULT_SOCKET"]
    )
    env = {k: v for k, v in os.environ.items() if k != "KHOD_SOCKET"}
    r = subprocess.run(
        [sys.executable, "-m", "khoclient.ctl", "status"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == ctl.Exit.UNREACHABLE
    assert DEFAULT_SOCKET in r.stderr


@pytest.mark.parametrize("size", [1 << 10, 5 << 20, 3 << 30])
def test_human_sizes(size: int) -> None:
    assert ctl.human(size).split()[1] in ("KiB", "MiB", "GiB")
