"""The whole story through real processes: two workloads, three daemons, two handovers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from khoclient import Client, Folio, KhoError

from khod.errors import Errno

from .helpers import daemon_running, pattern, sha

PAGE = 4096


def test_two_handovers_with_carried_forward_memory(shm_dir: Path) -> None:
    expect: dict[int, str] = {}

    # --- generation 0: a vmm with order-9 folios, a db with pages and a phys range
    with daemon_running(shm_dir) as d1:
        vmm = d1.client("vmm", persistent=True)
        guest = vmm.alloc_folios(9, 4)
        for f in guest:
            view = vmm.map(f)
            view[:] = pattern("vmm", f.phys, f.size)
            expect[f.phys] = sha(view)
            del view
            assert vmm.preserve_folio(f) == 9
        vmm.add_node("/machine")
        vmm.add_prop("/machine", "vcpus", (4).to_bytes(4, "little"))
        vmm.add_string_prop("/machine", "model", "guest0")

        db = d1.client("db", persistent=True)
        pages = [db.alloc_folio(0) for _ in range(8)]
        for f in pages:
            view = db.map(f)
            view[:] = pattern("db", f.phys, PAGE)
            expect[f.phys] = sha(view)
            del view
        assert db.preserve_folios([f.phys for f in pages], 0) == 8
        table = db.alloc_folio(3)  # 8 pages; the index table lives in the first 5
        view = db.map(table)
        view[: 5 * PAGE] = pattern("table", table.phys, 5 * PAGE)
        del view
        assert [(f.phys - table.phys, f.order) for f in db.preserve_phys(table.phys, 5 * PAGE)] == [
            (0, 2),
            (4 * PAGE, 0),
        ]

        op = d1.client()
        summary = op.finalize()
        assert summary["generation"] == 1
        assert summary["bytes"] == {"0": 9 * PAGE, "2": 4 * PAGE, "9": 4 << 21}
        assert op.handover() == {"generation": 1}
        assert d1.wait() == 0
        assert vmm.handed_over.wait(5) and db.handed_over.wait(5)
        for c in (vmm, db, op):
            c.close()

    # --- generation 1: the successor; the vmm restores everything, the db only its table
    with daemon_running(shm_dir) as d2:
        assert "mode=populate" in d2.logs()
        vmm = d2.client("vmm", persistent=True)
        assert vmm.hello_info["incoming"] and vmm.hello_info["generation"] == 1
        assert vmm.get_node("/").children == ["machine"]
        assert vmm.get_prop("/machine", "vcpus") == (4).to_bytes(4, "little")
        assert vmm.get_prop("/machine", "model") == b"guest0\0"
        for f in guest:
            back = vmm.restore_folio(f.phys)
            assert back == Folio(f.phys, 9)
            view = vmm.map(back)
            assert sha(view) == expect[f.phys], "guest memory changed across the handover"
            del view
        with pytest.raises(KhoError) as e:
            vmm.restore_folio(guest[0].phys)  # only once
        assert e.value.code is Errno.ENOENT
        with pytest.raises(KhoError) as e:
            vmm.restore_folio(pages[0].phys)  # not the vmm's
        assert e.value.code is Errno.ENOENT

        db = d2.client("db", persistent=True)
        restored = db.restore_phys(table.phys, 5 * PAGE)
        assert [(f.order) for f in restored] == [2, 0]
        view = db.map(Folio(table.phys, 2))
        assert bytes(view) == pattern("table", table.phys, 5 * PAGE)[: 4 * PAGE]
        del view
        # the vmm preserves its guest memory again for the next update
        assert vmm.preserve_folios([f.phys for f in guest], 9) == 4
        vmm.add_node("/machine")
        vmm.add_prop("/machine", "vcpus", (8).to_bytes(4, "little"))

        op = d2.client()
        st = op.status()
        assert st["generation"] == 1
        assert st["incoming"]["unclaimed_bytes"] == 8 * PAGE  # db's pages, not restored
        summary = op.finalize()
        assert summary["generation"] == 2
        # db's unrestored pages are carried forward into generation 2
        assert summary["bytes"] == {"0": 8 * PAGE, "9": 4 << 21}
        op.handover()
        assert d2.wait() == 0
        for c in (vmm, db, op):
            c.close()

    # --- generation 2: the carried pages are still there, byte for byte
    with daemon_running(shm_dir) as d3:
        db = d3.client("db", persistent=True)
        assert db.hello_info["generation"] == 2
        assert db.hello_info["incoming_bytes"] == 8 * PAGE
        for f in pages:
            assert db.restore_folio(f.phys).order == 0
            view = db.map(f)
            assert sha(view) == expect[f.phys]
            del view
        vmm = d3.client("vmm", persistent=True)
        assert vmm.get_prop("/machine", "vcpus") == (8).to_bytes(4, "little")
        for f in guest:
            view = vmm.map(vmm.restore_folio(f.phys))
            assert sha(view) == expect[f.phys]
            del view
        op = d3.client()
        assert op.status()["incoming"]["unclaimed_bytes"] == 0
        for c in (vmm, db, op):
            c.close()
        assert d3.stop() == 0
        assert 'reason="stop without handover"' in d3.logs()


def test_unclaimed_session_is_carried_then_released(shm_dir: Path) -> None:
    me, other = os.getuid(), 65534
    with daemon_running(shm_dir) as d1:
        with d1.client("cache", persistent=True) as c:
            f = c.alloc_folio(4)
            c.preserve_folio(f)
            c.add_node("/meta")
        if me == 0:  # root makes the same name under another uid: names alone are ambiguous
            with d1.client() as theirs:
                theirs.hello("cache", True, other)
                theirs.preserve_folio(theirs.alloc_folio(0))
        with d1.client() as op:
            op.finalize()
            op.handover()
        assert d1.wait() == 0
    with daemon_running(shm_dir) as d2:
        with d2.client() as op:
            # nobody reattaches 'cache': the next handover still carries it
            theirs_bytes = {"0": PAGE} if me == 0 else {}
            assert op.finalize()["bytes"] == {"4": 16 * PAGE, **theirs_bytes}
            op.unfreeze()
            out = op.release_unclaimed()
            both = [(me, "cache")] + ([(other, "cache")] if me == 0 else [])
            assert out == {
                "released_bytes": 16 * PAGE + (PAGE if me == 0 else 0),
                "dropped_sessions": [name for _, name in both],
                "dropped": [f"u{uid},{name}" for uid, name in both],  # by uid, then name
            }
            assert op.status()["incoming"]["sessions"] == []
            assert op.finalize()["bytes"] == {}
            op.unfreeze()
        with d2.client("cache") as c, pytest.raises(KhoError) as e:
            c.restore_folio(f.phys)
        assert e.value.code is Errno.ENOENT
        assert d2.stop() == 0


def test_client_sees_handover_event(shm_dir: Path) -> None:
    got: list[int] = []
    with daemon_running(shm_dir) as d:
        c = Client(d.socket, session="w", on_handover=got.append)
        with d.client() as op:
            op.finalize()
            op.handover()
        assert c.handed_over.wait(5)
        assert got == [1]
        c.close()
        assert d.wait() == 0


def test_blocking_client_callbacks_can_veto_and_preserve(shm_dir: Path) -> None:
    from khoclient import NotifierEvent, Veto

    with daemon_running(shm_dir) as d:
        vmm = d.client("vmm")
        extra = vmm.alloc_folio(1)
        mode = ["veto"]
        calls: list[str] = []

        def on_finalize(ev: NotifierEvent) -> None:
            calls.append(ev.name)
            if mode[0] == "veto":
                raise Veto("writers still running")
            vmm.preserve_folio(extra)  # a callback may call the daemon itself

        vmm.subscribe(on_finalize=on_finalize, on_unfreeze=lambda ev: calls.append(ev.name))
        with d.client() as op:
            with pytest.raises(KhoError, match="writers still running") as e:
                op.finalize()
            assert e.value.code is Errno.EBUSY
            mode[0] = "ok"
            assert op.finalize()["bytes"] == {"1": 2 * PAGE}
        assert calls == ["finalize", "unfreeze", "finalize"]
        vmm.close()
        assert d.stop() == 0
