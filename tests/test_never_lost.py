"""The handover is never lost: one regression test per way it used to be.

Each drives khod through its public surface (the socket, a khod process,
its config) the way an attacker or an unlucky operator did, and checks what
the successor gets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from khoclient import AsyncClient, KhoError

from khod.config import ConfigError, from_mapping
from khod.engine import Engine
from khod.errors import Errno
from khod.kho.handover import read_handover
from khod.kho.record import RecordState, decode_record, read_record
from khod.protocol import Decoder

from .helpers import config_mapping, daemon_running, inproc_daemon, sha, start_daemon, write_config

PAGE = 4096


def record_state(d: Path) -> RecordState:
    with open(d / "region", "rb") as f:
        return decode_record(f.read(128)).state


def region_sha(d: Path) -> str:
    return sha((d / "region").read_bytes())


def finalized_region(d: Path) -> dict[int, bytes]:
    """A daemon that preserved a folio of 'vmm' and handed over; returns phys -> bytes."""
    with daemon_running(d) as first:
        with first.client("vmm", persistent=True) as vmm:
            f = vmm.alloc_folio(2)
            view = vmm.map(f)
            view[:] = os.urandom(f.size)
            kept = {f.phys: bytes(view)}
            del view
            vmm.preserve_folio(f)
        with first.client() as op:
            op.finalize()
            op.handover()
        assert first.wait() == 0
    assert record_state(d) is RecordState.HANDOVER
    return kept


def restore_all(d: Path, kept: dict[int, bytes]) -> None:
    with daemon_running(d) as succ:
        assert "mode=populate" in succ.logs()
        with succ.client("vmm") as vmm:
            for phys, data in kept.items():
                view = vmm.map(vmm.restore_folio(phys))
                assert bytes(view) == data
                del view
        assert succ.stop() == 0


# ----------------------------------------------------------------------------- bounds


async def test_sessions_beyond_what_a_handover_carries_are_refused_at_hello(
    shm_dir: Path,
) -> None:
    """1022 session nodes fit at the root of a KHO FDT; the 1023rd is refused when made."""
    async with inproc_daemon(shm_dir) as d:
        for i in range(1022):
            s = await trio.open_unix_socket(d.socket)
            await s.send_all(
                msgpack.packb({"id": 1, "op": "hello", "name": f"s{i}", "persistent": True})
            )
            reply = Decoder().feed(await s.receive_some(4096))[0]
            assert "result" in reply, reply
            await s.aclose()
        with pytest.raises(KhoError, match=r"limits\.max_sessions") as e:
            async with AsyncClient(d.socket, "one-too-many"):
                pass
        assert e.value.code is Errno.ENOMEM
        async with AsyncClient(d.socket) as op:
            await op.finalize()  # and what was accepted is what a successor reads
        region = d.server.engine.region
        rec = read_record(region)
        assert rec is not None
        assert len(read_handover(region, rec).sessions) == 1022


async def test_trees_beyond_what_a_handover_carries_are_refused_when_edited(
    shm_dir: Path,
) -> None:
    limits = {"tree_max_nodes": 100, "tree_total_nodes": 250}
    async with inproc_daemon(shm_dir, limits=limits) as d:
        done = 0

        async def grow() -> None:
            nonlocal done
            for i in range(9):  # 9 sessions, each within its own limit
                async with AsyncClient(d.socket, f"s{i}", persistent=True) as c:
                    for j in range(99):
                        await c.add_node(f"/n{j}")
                        done += 1

        with pytest.raises(KhoError, match=r"limits\.tree_total_nodes") as e:
            await grow()
        assert e.value.code is Errno.ENOMEM
        assert done == 250 - 3  # three session nodes, then their trees
        async with AsyncClient(d.socket) as op:
            await op.finalize()
        region = d.server.engine.region
        rec = read_record(region)
        assert rec is not None
        assert (
            sum(s.subtree.count_nodes() - 1 for s in read_handover(region, rec).sessions.values())
            == done
        )


async def test_a_session_node_keeps_room_for_khods_properties(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket, "wide", persistent=True) as c:
        for i in range(1021):
            await c.add_prop("/", f"p{i}", b"")
        with pytest.raises(KhoError, match="already has 1021 properties") as e:
            await c.add_prop("/", "p1021", b"")
        assert e.value.code is Errno.ENOMEM
        async with AsyncClient(d.socket) as op:
            await op.finalize()  # 1021 + compatible, owner-uid, metadata: readable


def test_config_cannot_ask_for_more_than_a_reader_accepts(shm_dir: Path) -> None:
    for limits, key in (
        ({"max_sessions": 1023}, "limits.max_sessions"),
        ({"tree_total_nodes": 65534}, "limits.tree_total_nodes"),
        ({"tree_total_bytes": "64M"}, "limits.tree_total_bytes"),
    ):
        with pytest.raises(ConfigError, match=key):
            from_mapping(config_mapping(shm_dir, limits=limits), source="test")


async def test_reserved_root_names_are_not_session_names(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        for name in ("compatible", "khod", "preserved-memory"):
            with pytest.raises(KhoError, match="reserved") as e:
                async with AsyncClient(d.socket, name):
                    pass
            assert e.value.code is Errno.EINVAL


# ----------------------------------------------------------------------------- start-up


def test_a_busy_metrics_port_stops_start_up_before_the_handover_is_touched(
    shm_dir: Path,
) -> None:
    kept = finalized_region(shm_dir)
    before = region_sha(shm_dir)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = write_config(shm_dir, "busy.toml", metrics={"listen": f"127.0.0.1:{port}"})
        d = start_daemon(shm_dir, config=cfg, wait_ready=False)
        assert d.wait() == 2
    assert "serve.failed" in d.logs() and "Traceback" not in d.logs()
    assert region_sha(shm_dir) == before  # not a byte changed
    restore_all(shm_dir, kept)


def test_an_impossible_socket_path_stops_start_up_before_the_handover_is_touched(
    shm_dir: Path,
) -> None:
    kept = finalized_region(shm_dir)
    before = region_sha(shm_dir)
    (shm_dir / "notadir").write_text("")
    cfg = write_config(shm_dir, "bad.toml", server={"socket": str(shm_dir / "notadir" / "s")})
    d = start_daemon(shm_dir, config=cfg, wait_ready=False)
    assert d.wait() == 2
    assert "serve.failed" in d.logs() and "Traceback" not in d.logs()
    assert region_sha(shm_dir) == before
    restore_all(shm_dir, kept)


def test_a_second_daemon_on_a_finalized_region_is_refused_untouched(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as first:
        with first.client("vmm", persistent=True) as vmm:
            f = vmm.alloc_folio(0)
            vmm.preserve_folio(f)
        with first.client() as op:
            op.finalize()
        before = region_sha(shm_dir)
        other = shm_dir / "other"
        other.mkdir()
        cfg = write_config(
            other, region={"path": str(shm_dir / "region")}, server={"socket": str(other / "s")}
        )
        twin = start_daemon(other, config=cfg, wait_ready=False)
        assert twin.wait() == 4
        assert "in use by a running daemon" in twin.logs()
        assert region_sha(shm_dir) == before
        with first.client() as op:
            op.handover()  # the real handover still goes through
        assert first.wait() == 0
    restore_all(shm_dir, {f.phys: bytes(PAGE)})


def test_a_successor_stopped_before_taking_over_keeps_the_handover(shm_dir: Path) -> None:
    kept = finalized_region(shm_dir)
    with daemon_running(shm_dir) as succ:
        with succ.client("vmm") as vmm:  # reattach, look, restore nothing
            assert vmm.hello_info["incoming_bytes"] == 4 * PAGE
        assert succ.stop() == 0
        assert "stop.handover_kept" in succ.logs()
    assert record_state(shm_dir) is RecordState.HANDOVER
    restore_all(shm_dir, kept)


# ----------------------------------------------------------------------------- while finalized


async def test_committed_memory_cannot_be_freed_until_unfreeze(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        async with AsyncClient(d.socket, "vmm", persistent=True) as vmm:
            f = await vmm.alloc_folio(0)
            view = await vmm.map(f)
            view[:5] = b"VMM!!"
            del view
            await vmm.preserve_folio(f)
        async with AsyncClient(d.socket) as op:
            await op.finalize()
            await op.handover()
    async with inproc_daemon(shm_dir) as d:  # the successor: vmm does not come back yet
        async with AsyncClient(d.socket) as op:
            await op.finalize()  # carries vmm's folio forward
        async with AsyncClient(d.socket, "vmm", persistent=True) as vmm:
            got = await vmm.restore_folio(f.phys)  # allowed: it stays vmm's
            with pytest.raises(KhoError, match="committed handover of generation 2") as e:
                await vmm.free_folio(got)
            assert e.value.code is Errno.EBUSY
        async with AsyncClient(d.socket, "other") as other:
            for _ in range(64):  # nobody else can be handed that page
                assert (await other.alloc_folio(0)).phys != f.phys
        async with AsyncClient(d.socket) as op:
            await op.handover()
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket, "vmm") as vmm:
        view = await vmm.map(await vmm.restore_folio(f.phys))
        assert bytes(view[:5]) == b"VMM!!"
        del view


def test_a_deleted_or_truncated_region_file_is_refused_by_name(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d:
        with d.client("vmm", persistent=True) as vmm:
            vmm.preserve_folio(vmm.alloc_folio(0))
        (shm_dir / "region").unlink()
        with d.client() as op:
            with pytest.raises(KhoError, match="was deleted while khod ran") as e:
                op.finalize()
            assert e.value.code is Errno.ENOENT
            assert op.status()["state"] == "active"
        assert d.stop() == 0
    other = shm_dir / "t"
    other.mkdir()
    with daemon_running(other) as d:
        with d.client() as op:
            op.finalize()
            os.truncate(other / "region", 64 << 20)
            with pytest.raises(KhoError, match="truncated") as e:
                op.handover()
            assert e.value.code is Errno.ENOENT
            assert op.status()["state"] == "finalized"  # nothing handed over into the void
        d.proc.kill()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_backing_store_fails_finalize_by_name_not_by_sigbus(shm_dir: Path) -> None:
    with small_tmpfs(shm_dir / "small", "64M") as small:
        cfg = write_config(shm_dir, region={"path": str(small / "region"), "size": "256M"})
        with daemon_running(shm_dir, config=cfg) as d:
            assert "region.sparse" in d.logs()  # said at start-up
            with d.client("vmm", persistent=True) as vmm:
                folios = vmm.alloc_folios(9, 40)  # 80 MiB: more than the filesystem holds
                filler = open(small / "filler", "wb", buffering=0)  # noqa: SIM115 -- closed below
                for f in folios[:31]:
                    vmm.map(f)[:] = b"\xab" * f.size
                vmm.preserve_folios([f.phys for f in folios[:31]], 9)
                with contextlib.suppress(OSError), filler:  # and the rest: full
                    while True:
                        filler.write(bytes(PAGE))
                with d.client() as op:
                    with pytest.raises(KhoError, match="is full") as e:
                        op.finalize()
                    assert e.value.code is Errno.ENOMEM
                    assert op.status()["state"] == "active"
            assert d.proc.poll() is None  # alive: no SIGBUS
            assert d.stop() == 0
        strict = write_config(
            shm_dir,
            "strict.toml",
            region={"path": str(small / "r2"), "size": "256M", "preallocate": True},
        )
        refused = start_daemon(shm_dir, config=strict, wait_ready=False)
        assert refused.wait() == 2
        assert "is full" in refused.logs()


# ----------------------------------------------------------------------------- sessions and wire


async def test_a_reattach_never_makes_a_session_non_persistent(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        async with AsyncClient(d.socket, "db", persistent=True) as db:
            f = await db.alloc_folio(0)
            await db.preserve_folio(f)
        async with AsyncClient(d.socket, "db") as again:  # persistent=False by default
            assert again.hello_info["persistent"] is True
        await trio.testing.wait_all_tasks_blocked()
        async with AsyncClient(d.socket) as op:
            st = await op.status()
        assert [(s["name"], s["preserved_bytes"]) for s in st["sessions"]] == [("db", PAGE)]


async def test_non_string_map_keys_get_an_error_reply_not_a_traceback(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        s = await trio.open_unix_socket(d.socket)
        decoder = Decoder()
        for message in (
            {"id": 1, "op": "ping", b"x": 1},
            {"id": 2, b"op": "ping"},
            {"id": 3, "op": "ping", 7: 1},
        ):
            for _ in range(500):
                await s.send_all(msgpack.packb(message, use_bin_type=True))
                with trio.fail_after(5):
                    while not (got := decoder.feed(await s.receive_some(4096))):
                        pass
                reply = got[0]
                assert reply["id"] == message["id"]
                assert reply["error"]["code"] == "EPROTO"
                assert "map keys must be strings" in reply["error"]["message"]
        await s.aclose()
        log = d.log.getvalue()
        assert "request.crashed" not in log and "Traceback" not in log
        async with AsyncClient(d.socket) as op:
            await op.ping()


# ----------------------------------------------------------------------------- the successor


def test_a_successor_killed_after_restoring_leaves_the_handover_whole(shm_dir: Path) -> None:
    kept = finalized_region(shm_dir)
    succ = start_daemon(shm_dir)
    with succ.client("vmm", persistent=True) as vmm:
        for phys in kept:
            vmm.map(vmm.restore_folio(phys))[:4] = b"NEW!"  # restored and written in place
    succ.proc.kill()
    assert succ.wait() == -signal.SIGKILL
    assert record_state(shm_dir) is RecordState.HANDOVER
    restore_all(shm_dir, {p: b"NEW!" + data[4:] for p, data in kept.items()})


def test_an_unfreeze_in_the_successor_offers_its_own_handover_again(shm_dir: Path) -> None:
    kept = finalized_region(shm_dir)
    with daemon_running(shm_dir) as succ:
        with succ.client() as op:
            assert op.finalize()["generation"] == 2  # carries vmm's folio forward
            op.unfreeze()
        assert succ.stop() == 0
    with open(shm_dir / "region", "rb") as f:
        rec = decode_record(f.read(128))
    assert (rec.state, rec.generation) == (RecordState.HANDOVER, 1)
    restore_all(shm_dir, kept)


def test_freeing_handed_over_memory_takes_the_handover_over(shm_dir: Path) -> None:
    kept = finalized_region(shm_dir)
    with daemon_running(shm_dir) as succ:
        with succ.client("vmm", persistent=True) as vmm:
            for phys in kept:
                vmm.free_folio(vmm.restore_folio(phys))  # done with it: the old handover is void
        assert record_state(shm_dir) is RecordState.LIVE
        assert succ.stop() == 0
    assert record_state(shm_dir) is RecordState.CLEAN


async def test_the_metadata_reserve_counts_a_reattached_session_once(shm_dir: Path) -> None:
    """Handed-over sessions, reattached or not, are one chunk list each in the reserve
    (counted without building the set of their names on every preserve)."""

    def reserve_matches(e: Engine) -> bool:
        b = e._bitmaps_total
        lists = len(e._session_keys()) + 1
        return e.metadata_need() == -(-2 * b // 8) + -(-2 * b // 255) + 20 * lists + e._fdt_pages

    async with inproc_daemon(shm_dir) as d:
        for name in ("a", "b"):
            async with AsyncClient(d.socket, name, persistent=True) as c:
                await c.preserve_folio(await c.alloc_folio(0))
        assert reserve_matches(d.server.engine)
        async with AsyncClient(d.socket) as op:
            await op.finalize()
            await op.handover()
    async with inproc_daemon(shm_dir) as d:
        e = d.server.engine
        assert len(e._session_keys()) == 2 and reserve_matches(e)
        async with AsyncClient(d.socket, "a", persistent=True):  # reattaches "a"
            assert len(e._session_keys()) == 2 and reserve_matches(e)
            async with AsyncClient(d.socket, "c") as c:
                await c.ping()
                assert len(e._session_keys()) == 3 and reserve_matches(e)
        await trio.testing.wait_all_tasks_blocked()
        assert len(e._session_keys()) == 2 and reserve_matches(e)  # "c" went, "a" stays
        async with AsyncClient(d.socket) as op:
            await op.release_unclaimed()
        assert len(e._session_keys()) == 1 and reserve_matches(e)  # "b" released
