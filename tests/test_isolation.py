"""Isolation and fairness, attacked as an unprivileged member of the socket group would.

Each test has an attacker (a forked client under uid 65534 where the uid
matters) and a bystander; it asserts what the attacker got (refused, or
harmless) and that the bystander was served, in time and with its bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from khoclient import AsyncClient, Client, KhoError

from khod.errors import Errno
from khod.pages import PAGE_SHIFT
from khod.protocol import Decoder, encode

from .helpers import (
    UNPRIVILEGED,
    as_nobody,
    daemon_running,
    inproc_daemon,
    needs_root,
    start_daemon,
    write_config,
)

PAGE = 4096
SECRET = b"SECRET-of-the-vmm"


def open_to_all(d: Path, **sections: dict[str, Any]) -> Path:
    os.chmod(d, 0o755)
    server = {"socket_mode": 0o666, **sections.pop("server", {})}
    return write_config(d, server=server, **sections)


ATTACK_MEMORY = """
c = Client(path, session="db", persistent=True)
info = c.region()
fd = c.region_fd()
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=info.map_offset)
out["sees_secret"] = m.find(SECRET) >= 0
out["sees_metadata"] = m.find(b"kho-v1") >= 0 or m.find(b"KHODREC") >= 0
for off in range(0, size, 64 << 20):  # write all over what the fd reaches
    m[off : off + 4] = b"EVIL"
m.close()
os.ftruncate(fd, 4096)  # and shrink it
try:
    open(region_path, "rb")
    out["opens_region_file"] = True
except OSError:
    out["opens_region_file"] = False
f = c.alloc_folio(0)
out["own_folio"] = f.phys
c.close()
"""


@needs_root
def test_a_client_reaches_only_its_own_session_memory(shm_dir: Path) -> None:
    cfg = open_to_all(shm_dir)
    with daemon_running(shm_dir, config=cfg) as d:
        with d.client("vmm", persistent=True) as vmm:
            f = vmm.alloc_folio(2)
            view = vmm.map(f)
            view[: len(SECRET)] = SECRET
            del view
            vmm.preserve_folio(f)
        with d.client() as op:
            op.finalize()
        got = as_nobody(
            d.socket,
            ATTACK_MEMORY,
            {"mmap": mmap, "os": os, "SECRET": SECRET, "region_path": str(shm_dir / "region")},
        )
        assert "crash" not in got, got
        assert got == {
            "sees_secret": False,
            "sees_metadata": False,
            "opens_region_file": False,
            "own_folio": got["own_folio"],
        }
        with d.client() as op:  # the daemon is none the worse
            op.ping()
            op.handover()
        assert d.wait() == 0
    with daemon_running(shm_dir, config=cfg) as succ:
        with succ.client("vmm") as vmm:  # ownership came through: the vmm's, intact
            view = vmm.map(vmm.restore_folio(f.phys))
            assert bytes(view[: len(SECRET)]) == SECRET
            del view
        assert succ.stop() == 0


@needs_root
def test_with_devmem_only_root_or_the_memory_group_gets_the_region(shm_dir: Path) -> None:
    fake = shm_dir / "mem"
    with open(fake, "wb") as f:
        f.truncate((1 << 32) + (64 << 20))  # a file standing in for /dev/mem
    cfg = open_to_all(
        shm_dir,
        region={"backend": "devmem", "path": str(fake), "size": "64M", "scratch_size": "1M"},
    )
    with daemon_running(shm_dir, config=cfg) as d:
        got = as_nobody(
            d.socket,
            "c = Client(path, session='x')\n"
            "try:\n    c.region(); out['got'] = 'fd'\n"
            "except KhoError as e:\n    out['got'] = [str(e.code), e.message]\n",
        )
        assert got["got"][0] == "EPERM" and "server.memory_group" in got["got"][1]
        with d.client("root-vmm") as c:
            assert c.region().backend == "devmem"  # root maps it
        assert d.stop() == 0


@needs_root
def test_names_are_per_user_and_status_shows_a_user_its_own(shm_dir: Path) -> None:
    cfg = open_to_all(shm_dir)
    with daemon_running(shm_dir, config=cfg) as d:
        got = as_nobody(
            d.socket,
            "c = Client(path, session='db', persistent=True)\n"
            "c.preserve_folio(c.alloc_folio(0))\n"
            "out['created'] = c.hello_info['created']\n",
        )
        assert got["created"] is True
        with d.client("db", persistent=True) as db:  # root's own "db": not taken, not refused
            assert db.hello_info["created"] is True and db.hello_info["uid"] == 0
        seen = as_nobody(d.socket, "out['sessions'] = Client(path).status()['sessions']")
        assert [(s["name"], s["uid"]) for s in seen["sessions"]] == [("db", UNPRIVILEGED)]
        with d.client() as op:
            assert {(s["name"], s["uid"]) for s in op.status()["sessions"]} == {
                ("db", 0),
                ("db", UNPRIVILEGED),
            }
        assert d.stop() == 0


# ----------------------------------------------------------------------------- quotas


@needs_root
def test_one_user_cannot_take_the_region_sessions_or_trees(shm_dir: Path) -> None:
    cfg = open_to_all(
        shm_dir, limits={"uid_max_bytes": "25%", "uid_max_sessions": 4, "uid_max_tree_bytes": "8K"}
    )
    greedy = """
def code(fn):
    try:
        fn()
        return "ok"
    except KhoError as e:
        return [str(e.code), e.message]
c = Client(path, session="s0", persistent=True)
out["region"] = code(lambda: [c.alloc_folios(9, 8) for _ in range(100)])
out["sessions"] = code(lambda: [Client(path, session=f"s{i}", persistent=True).close() for i in range(1, 10)])
out["tree"] = code(lambda: [c.add_prop("/", f"p{i}", bytes(1000)) for i in range(100)])
"""
    with daemon_running(shm_dir, config=cfg) as d:
        got = as_nobody(d.socket, greedy)
        assert got["region"][0] == "ENOMEM" and "limits.uid_max_bytes" in got["region"][1]
        assert got["sessions"][0] == "ENOMEM" and "limits.uid_max_sessions" in got["sessions"][1]
        assert got["tree"][0] == "ENOMEM" and "limits.uid_max_tree_bytes" in got["tree"][1]
        with d.client("bystander") as b:  # everyone else still has room
            b.alloc_folios(9, 16)
            b.add_prop("/", "p", bytes(4000))
            for i in range(8):
                Client(d.socket, session=f"b{i}").close()
        assert d.stop() == 0


@needs_root
def test_an_operator_drops_a_session_and_its_memory(shm_dir: Path) -> None:
    cfg = open_to_all(shm_dir)
    with daemon_running(shm_dir, config=cfg) as d:
        hog = Client(d.socket)  # keep a connection of the attacker's session open
        as_nobody(
            d.socket,
            "c = Client(path, session='hog', persistent=True)\n"
            "c.preserve_folios([f.phys for f in c.alloc_folios(9, 16)], 9)\n",
        )
        files = shm_dir / "region.sessions"
        assert (files / f"{UNPRIVILEGED}.hog").exists()
        with d.client() as op:
            op.finalize()
            with pytest.raises(KhoError, match="cannot drop a session while finalized") as e:
                op.drop_session("hog", UNPRIVILEGED)
            assert e.value.code is Errno.EBUSY
            op.unfreeze()
            before = op.status()["region"]["allocated"]
            out = op.drop_session("hog", UNPRIVILEGED)
            assert out["freed_bytes"] == 16 << 21
            assert op.status()["region"]["allocated"] == before - (16 << 21)
            assert [s["name"] for s in op.status()["sessions"]] == []
        assert not (files / f"{UNPRIVILEGED}.hog").exists()
        hog.close()
        assert d.stop() == 0


async def test_a_drop_waits_for_the_request_running_and_leaks_nothing(shm_dir: Path) -> None:
    """Dropped in the middle of a long allocation, a session still gives back all of it."""
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket) as op:
        engine = d.server.engine
        base = engine.allocator.usage().allocated
        outcome: list[object] = []
        async with AsyncClient(d.socket, "big", persistent=True) as big:

            async def allocate() -> None:
                try:
                    outcome.append(len(await big.alloc_folios(0, 30_000)))
                except (KhoError, OSError) as exc:  # its connection may go with the session
                    outcome.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(allocate)
                while engine.allocator.usage().allocated == base:
                    await trio.lowlevel.checkpoint()
                out = await op.drop_session("big")
                assert out["freed_bytes"] == 30_000 << PAGE_SHIFT, (out, outcome)  # all of it
        assert engine.allocator.usage().allocated == base
        assert engine.sessions == {}
        assert outcome
        # the operator dropped a session it is not bound to; dropping its own keeps it served
        await op.hello("mine")
        await op.alloc_folio(0)
        assert (await op.drop_session("mine"))["freed_bytes"] == 1 << PAGE_SHIFT
        with pytest.raises(KhoError, match="send hello first"):
            await op.alloc_folio(0)
        await op.ping()


def test_freed_memory_goes_back_to_the_system(shm_dir: Path) -> None:
    with daemon_running(shm_dir) as d, d.client("big", persistent=True) as c:
        f = c.alloc_folio(9)
        c.map(f)[:] = b"\xff" * f.size
        own = shm_dir / f"region.sessions/{os.getuid()}.big"
        assert os.stat(own).st_blocks * 512 >= f.size
        c.free_folio(f)
        assert os.stat(own).st_blocks * 512 < f.size  # the hole was punched


# ----------------------------------------------------------------------------- connections


async def test_silence_in_the_middle_of_a_frame_is_cut_off(shm_dir: Path) -> None:
    async with (
        inproc_daemon(shm_dir, limits={"request_timeout_s": 0.3}) as d,
        AsyncClient(d.socket, "bystander") as b,
    ):
        half = await trio.open_unix_socket(d.socket)
        await half.send_all(encode({"id": 1, "op": "ping", "pad": "x" * 100})[:20])
        mute = await trio.open_unix_socket(d.socket)  # never says anything
        t0 = trio.current_time()
        with trio.fail_after(5):
            assert await half.receive_some(10) == b""
            assert await mute.receive_some(10) == b""
        assert trio.current_time() - t0 < 2
        await b.ping()  # served all along
        assert d.log.getvalue().count("conn.timeout") == 2
        await half.aclose()
        await mute.aclose()


async def test_time_spent_serving_a_request_is_not_charged_to_the_next_frame(
    shm_dir: Path,
) -> None:
    """A frame pipelined behind a slow request gets the whole deadline once that is answered."""
    async with (
        inproc_daemon(shm_dir, limits={"request_timeout_s": 0.3}) as d,
        AsyncClient(d.socket, "slow", persistent=True) as w,
    ):

        async def ready_late(_event: dict[str, object]) -> None:
            await trio.sleep(0.6)  # finalize waits for this: longer than the frame deadline

        await w.subscribe(on_finalize=ready_late)
        s = await trio.open_unix_socket(d.socket)
        ping = encode({"id": 2, "op": "ping"})
        await s.send_all(encode({"id": 1, "op": "finalize"}) + ping[:1])  # and a frame begun
        decoder = Decoder()

        async def reply() -> dict[str, Any]:
            while True:  # progress events come too
                data = await s.receive_some(4096)
                assert data, "the connection was closed: the finalize's time was charged to it"
                for m in decoder.feed(data):
                    if "id" in m:
                        return m  # type: ignore[no-any-return]

        with trio.fail_after(5):
            done = await reply()
            assert done["id"] == 1 and "error" not in done, done
            await s.send_all(ping[1:])
            assert (await reply())["id"] == 2
        await s.aclose()


async def test_unfinished_frames_are_capped_for_all_connections(shm_dir: Path) -> None:
    limits = {"max_frame": "1M", "max_buffered": "2M", "request_timeout_s": 30}
    async with inproc_daemon(shm_dir, limits=limits) as d, AsyncClient(d.socket, "b") as b:
        partial = encode({"id": 1, "op": "ping", "pad": b"x" * (900 << 10)})[:-10]
        held = []
        for _ in range(4):  # 4 x 900K unfinished: more than the 2M the daemon holds
            s = await trio.open_unix_socket(d.socket)
            held.append(s)
            with contextlib.suppress(trio.BrokenResourceError):  # the one cut off
                await s.send_all(partial)
        await trio.testing.wait_all_tasks_blocked()
        assert "conn.buffer_cap" in d.log.getvalue()
        assert d.server.buffered.total <= 2 << 20
        await b.ping()
        for s in held:
            await s.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert d.server.buffered.total == 0


async def test_too_many_connections_leave_operators_a_way_in(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, limits={"max_connections": 4}) as d:
        held = [await trio.open_unix_socket(d.socket) for _ in range(4)]
        await trio.testing.wait_all_tasks_blocked()
        assert len(d.server.conns) == 4
        async with AsyncClient(d.socket) as op:  # root is an operator: still served
            await op.ping()
        for s in held:
            await s.aclose()


async def test_a_consumer_that_never_reads_is_cut_off_and_its_session_released(
    shm_dir: Path,
) -> None:
    limits = {"send_timeout_s": 0.5, "send_queue": 2}
    async with inproc_daemon(shm_dir, limits=limits) as d, AsyncClient(d.socket, "b") as b:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(d.socket)
        raw = trio.SocketStream(sock)
        big = {"op": "add_prop", "path": "/", "name": "big", "value": bytes(200 << 10)}
        await raw.send_all(encode({"id": 1, "op": "hello", "name": "deaf"}))
        await raw.send_all(encode({"id": 2, **big}))
        for i in range(3, 40):  # 200K replies it never reads
            req = {"id": i, "op": "get_prop", "path": "/", "name": "big", "tree": "out"}
            with contextlib.suppress(trio.BrokenResourceError):
                await raw.send_all(encode(req))
        with trio.fail_after(10):
            while "conn.slow_consumer" not in d.log.getvalue():  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.testing.wait_all_tasks_blocked()
        st = await b.status()
        assert [s["name"] for s in st["sessions"]] == ["b"]  # deaf's session is gone
        assert "session.discarded session=deaf" in d.log.getvalue()
        await raw.aclose()


# ----------------------------------------------------------------------------- the loop


async def test_a_huge_range_request_of_unowned_memory_is_refused_before_any_split(
    shm_dir: Path,
) -> None:
    async with (
        inproc_daemon(shm_dir, region={"size": "4G"}) as d,
        AsyncClient(d.socket, "attacker") as bad,
        AsyncClient(d.socket, "bystander") as b,
    ):
        import numpy as np

        n = (1 << 20) - 1024  # the most ranges one 16M frame carries
        phys = np.full(n, d.server.engine.region.base + (8 << 20) + PAGE, dtype=np.uint64)
        sizes = np.full(n, 3 * PAGE, dtype=np.uint64)  # misaligned: 2 folios each if split
        worst = 0.0

        async def ping() -> None:
            nonlocal worst
            for _ in range(50):
                t0 = time.perf_counter()
                await b.ping()
                worst = max(worst, time.perf_counter() - t0)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            with pytest.raises(KhoError, match="is not memory session 'attacker'") as e:
                await bad.call(
                    __import__("khoclient").calls.Call(
                        "preserve_phys_ranges", {"phys": phys.tobytes(), "sizes": sizes.tobytes()}
                    )
                )
        assert e.value.code is Errno.EPERM
        assert time.perf_counter() - t0 < 5  # not the 40 s it took to split first
        assert worst < 1.0


def test_the_metrics_endpoint_is_bounded(shm_dir: Path) -> None:
    cfg = write_config(shm_dir, metrics={"listen": "127.0.0.1:0"})
    d = start_daemon(shm_dir, config=cfg)
    try:
        port = int(d.logs().split("event=metrics.listen address=127.0.0.1:")[1].split()[0])
        hogs = []
        for _ in range(40):  # ask and never read, or never ask
            s = socket.create_connection(("127.0.0.1", port))
            hogs.append(s)
        t0 = time.monotonic()
        while True:  # a bystander's scrape gets through within the per-scrape bound
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() - t0 < 12
        with Client(d.socket) as c:  # and the daemon itself never stopped serving
            c.ping()
        for s in hogs:
            s.close()
        assert d.stop() == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()


async def test_lists_longer_than_the_wire_allows_close_only_that_connection(
    shm_dir: Path,
) -> None:
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket, "b") as b:
        s = await trio.open_unix_socket(d.socket)
        await s.send_all(encode({"id": 1, "op": "hello", "name": "x"}))
        decoder, got = Decoder(), []
        with trio.fail_after(5):
            while not got:  # the hello reply first: a hang-up with our bytes unread resets
                got += decoder.feed(await s.receive_some(4096))
        with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
            await s.send_all(encode({"id": 2, "op": "free_folios", "phys": [0] * 70000}))
            while data := await s.receive_some(4096):  # until the daemon hangs up
                got += decoder.feed(data)
        assert [m["id"] for m in got] == [1]  # hello answered, then the frame refused
        await b.ping()
        await s.aclose()
