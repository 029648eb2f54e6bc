"""The daemon as a process: start-up refusals, signals, sockets, and uid isolation."""

from __future__ import annotations

import os
import signal
import socket
import struct
from pathlib import Path

import pytest
from khoclient import Client, KhoError

from khod.errors import Errno
from khod.kho.record import RecordState, decode_record

from .helpers import (
    UNPRIVILEGED,
    as_nobody,
    daemon_running,
    sha,
    spawn_activated,
    start_daemon,
    write_config,
)

PAGE = 4096


def record_state(d: Path) -> RecordState:
    with open(d / "region", "rb") as f:
        return decode_record(f.read(128)).state


def file_sha(path: Path) -> str:
    return sha(path.read_bytes())


def test_sigterm_while_active_stops_clean(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        with d.client("s") as c:
            c.preserve_folio(c.alloc_folio(0))
        assert d.stop() == 0
    assert record_state(shm_dir) is RecordState.CLEAN
    assert not (shm_dir / "khod.sock").exists()
    assert 'reason="stop without handover"' in d.logs()
    with daemon_running(shm_dir) as d2:  # a clean region formats again, no questions asked
        assert "mode=format" in d2.logs()
        assert d2.stop() == 0


def test_sigterm_while_finalized_hands_over(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        with d.client("s", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(2))
        with d.client() as op:
            op.finalize()
        assert d.stop() == 0
        assert "handover on SIGTERM" in d.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER
    with daemon_running(shm_dir) as d2:
        assert "mode=populate" in d2.logs()
        with d2.client("s") as c:
            assert c.hello_info["incoming_bytes"] == 4 * PAGE
        assert d2.stop() == 0


def test_handover_on_stop_finalizes_first(shm_dir: Path) -> None:
    cfg = write_config(shm_dir, server={"handover_on_stop": True})
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("s", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(1))
        assert d.stop() == 0
        assert "finalize.done" in d.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER


def test_corrupted_handover_is_refused_and_left_alone(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        with d.client("s", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(3))
        with d.client() as op:
            op.finalize()
            meta = op.status()["last_finalize"]
            assert meta["chunk_pages"] == 2
            op.handover()
        assert d.wait() == 0
    # damage the root list's first chunk page: claim 300 entries
    region = shm_dir / "region"
    with open(region, "r+b") as f:
        rec = decode_record(f.read(128))
        fdt_phys = rec.fdt_phys
        f.seek(fdt_phys - rec.region_base)
        blob = f.read(rec.fdt_size)
    from khod.kho.dtb import from_dtb

    first = struct.unpack("<Q", from_dtb(blob).children["preserved-memory"].props["metadata"])[0]
    with open(region, "r+b") as f:
        f.seek(first - rec.region_base + 12)
        f.write(struct.pack("<I", 300))
    before = file_sha(region)
    d2 = start_daemon(shm_dir, wait_ready=False)
    assert d2.wait() == 3
    assert "too_many_entries" in d2.logs()
    assert "nothing was reserved" in d2.logs()
    assert file_sha(region) == before  # untouched, for inspection
    assert record_state(shm_dir) is RecordState.HANDOVER
    d3 = start_daemon(shm_dir, "--reset")  # the operator decides to throw it away
    assert "start.reset" in d3.logs()
    assert d3.stop() == 0


def test_crashed_owner_needs_reset(shm_dir: Path) -> None:
    d = start_daemon(shm_dir)
    with d.client("s", persistent=True) as c:
        c.preserve_folio(c.alloc_folio(0))
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert record_state(shm_dir) is RecordState.LIVE
    d2 = start_daemon(shm_dir, wait_ready=False)
    assert d2.wait() == 4
    assert "is gone without a handover" in d2.logs()
    with daemon_running(shm_dir, "--reset") as d3:
        assert "start.reset" in d3.logs()
        assert "live pid" in d3.logs()
        assert d3.stop() == 0


def test_a_running_daemon_keeps_its_region_and_socket(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        twin = start_daemon(shm_dir, "--reset", wait_ready=False)
        assert twin.wait() == 4
        assert "in use by a running daemon" in twin.logs()
        other = shm_dir / "other"
        other.mkdir()
        cfg = write_config(other, server={"socket": d.socket})
        twin2 = start_daemon(other, config=cfg, wait_ready=False)
        assert twin2.wait() == 2
        assert "another daemon is listening" in twin2.logs()
        with d.client() as c:
            c.ping()
        assert d.stop() == 0


def test_stale_socket_file_is_replaced(shm_dir: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(shm_dir / "khod.sock"))
    s.close()  # a socket file nobody listens on
    with daemon_running(shm_dir) as d:
        with d.client() as c:
            c.ping()
        assert d.stop() == 0


def test_socket_activation(shm_dir: Path) -> None:
    path = str(shm_dir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    cfg = write_config(shm_dir)
    log = shm_dir / "act.log"
    proc = spawn_activated(listener, cfg, log)
    try:
        with Client(path, timeout=20) as c:
            c.ping()
            assert c.status()["state"] == "active"
        text = log.read_text()
        assert "socket activation" in text
        assert not (shm_dir / "khod.sock").exists()  # it did not bind its own
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        listener.close()


# ----------------------------------------------------------------------------- other users

NOBODY_ACTIONS = """
def code(fn):
    try:
        fn()
        return "ok"
    except KhoError as e:
        return str(e.code)
c = Client(path)
out["hello_root_session"] = code(lambda: Client(path, session="rootsess").close())
out["finalize"] = code(lambda: c.finalize())
out["fdt"] = code(lambda: c.fdt("out"))
out["release"] = code(lambda: c.release_unclaimed())
c.hello("mine", persistent=True)
f = c.alloc_folio(0)
out["preserve_own"] = code(lambda: c.preserve_folio(f))
out["preserve_roots"] = code(lambda: c.preserve_folio(ROOT_PHYS, 0))
out["free_roots"] = code(lambda: c.free_folio(ROOT_PHYS))
out["status"] = code(lambda: c.status())
out["sessions_seen"] = [[s["name"], s["uid"]] for s in c.status()["sessions"]]
out["uid"] = c.hello_info["uid"]
out["mine_phys"] = f.phys
c.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_uid_isolation(shm_dir: Path) -> None:
    os.chmod(shm_dir, 0o755)
    cfg = write_config(shm_dir, server={"socket_mode": 0o666})
    with daemon_running(shm_dir, config=cfg) as d:
        root = d.client("rootsess", persistent=True)
        folio = root.alloc_folio(0)
        root.preserve_folio(folio)
        got = as_nobody(d.socket, NOBODY_ACTIONS.replace("ROOT_PHYS", str(folio.phys)))
        assert "crash" not in got, got
        assert got["uid"] == UNPRIVILEGED
        # a name is per user: nobody's "rootsess" is a session of its own, not root's
        assert got["hello_root_session"] == "ok"
        assert got["finalize"] == got["fdt"] == got["release"] == "EPERM"
        assert got["preserve_own"] == "ok"
        assert got["preserve_roots"] == "EPERM"
        assert got["free_roots"] == "ENOENT"
        assert got["status"] == "ok"
        assert got["sessions_seen"] == [["mine", UNPRIVILEGED]]  # its own only
        # root may act for anyone, naming the user
        with d.client("mine", uid=UNPRIVILEGED) as as_root:
            assert as_root.hello_info["uid"] == UNPRIVILEGED
            assert as_root.hello_info["created"] is False
            assert as_root.unpreserve_folio(got["mine_phys"]) == 0
        # and the root session still holds exactly what it preserved
        with pytest.raises(KhoError) as e:
            root.preserve_folio(folio)
        assert e.value.code is Errno.EEXIST
        root.close()
        assert d.stop() == 0


def test_operator_group_may_finalize(shm_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    import grp

    try:
        group = grp.getgrgid(UNPRIVILEGED).gr_name
    except KeyError:
        pytest.skip("no group 65534 on this machine")
    os.chmod(shm_dir, 0o755)
    cfg = write_config(shm_dir, server={"socket_mode": 0o666, "operator_group": group})
    with daemon_running(shm_dir, config=cfg) as d:
        got = as_nobody(
            d.socket, "c = Client(path)\nout['summary'] = c.finalize()\nc.unfreeze()\nc.close()"
        )
        assert "crash" not in got, got
        assert got["summary"]["generation"] == 1
        assert d.stop() == 0
