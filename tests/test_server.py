"""The daemon's surface, in process: every error path a client can reach over the socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from khoclient import AsyncClient, Folio, KhoError

from khod.errors import Errno
from khod.protocol import Decoder, Limits, encode
from khod.server import Turn

from .helpers import inproc_daemon

PAGE = 4096


async def raw_call(
    stream: trio.SocketStream, message: Any, decoder: Decoder | None = None
) -> dict[str, Any]:
    """Send bytes or a message on a raw connection and read one reply."""
    decoder = decoder or Decoder()
    await stream.send_all(message if isinstance(message, bytes) else encode(message))
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            assert data, "connection closed"
            out = decoder.feed(data)
            if out:
                return out[0]  # type: ignore[no-any-return]


async def expect(code: Errno, coro: Any, match: str | None = None) -> KhoError:
    with pytest.raises(KhoError, match=match) as e:
        await coro
    assert e.value.code is code, e.value
    return e.value


async def test_requests_and_malformed_input(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        stream = await trio.open_unix_socket(d.socket)
        r = await raw_call(stream, {"id": 1, "op": "ping"})
        assert r == {"id": 1, "result": {}}
        cases = [
            ({"id": 2, "op": "frobnicate"}, "EOPNOTSUPP", "unknown op 'frobnicate'"),
            ({"id": 3, "op": "alloc_folio", "order": 1}, "EINVAL", "send hello first"),
            ({"id": 4, "op": "hello"}, "EINVAL", "missing argument 'name'"),
            ({"id": 5, "op": "hello", "name": 7}, "EINVAL", "argument 'name' must be a string"),
            ({"id": 6, "op": "hello", "name": "a/b"}, "EINVAL", "not a devicetree node name"),
            ({"id": 7, "op": "hello", "name": "khod"}, "EINVAL", "reserved"),
            ({"id": 8, "op": "ping", "extra": 1}, "EINVAL", "unknown argument 'extra'"),
            ({"op": "ping"}, "EPROTO", "integer 'id'"),
            ({"id": -1, "op": "ping"}, "EPROTO", "integer 'id'"),
            ({"id": 9}, "EPROTO", "string 'op'"),
            ([1, 2, 3], "EPROTO", "must be a map"),
        ]
        for msg, code, text in cases:
            r = await raw_call(stream, msg)
            assert r["error"]["code"] == code, (msg, r)
            assert text in r["error"]["message"], (msg, r)
            assert r["id"] == (
                msg.get("id")
                if isinstance(msg, dict) and isinstance(msg.get("id"), int) and msg["id"] >= 0
                else None
            )
        assert (await raw_call(stream, {"id": 10, "op": "hello", "name": "s"}))["result"][
            "created"
        ] is True
        for msg, text in [
            ({"id": 11, "op": "alloc_folio", "order": 19}, "order in 0..18"),
            ({"id": 12, "op": "alloc_folio", "order": True}, "order in 0..18"),
            ({"id": 13, "op": "free_folio", "phys": -5}, "0..2**64-1"),
            ({"id": 14, "op": "preserve_folio", "phys": (1 << 64) - 4096}, "outside the region"),
            ({"id": 15, "op": "preserve_folio", "phys": 0x1000}, "outside the region"),
            ({"id": 16, "op": "preserve_folio", "phys": 0x1_0000_0123}, "not page-aligned"),
            ({"id": 17, "op": "preserve_folios", "phys": b"123"}, "multiple of 8"),
            ({"id": 18, "op": "preserve_folios", "phys": "x"}, "list of integers"),
            (
                {"id": 19, "op": "add_prop", "path": "/", "name": "x", "value": "str"},
                "must be bytes",
            ),
            ({"id": 20, "op": "alloc_folios", "order": 0, "count": 0}, "count in 1.."),
        ]:
            r = await raw_call(stream, msg)
            assert r["error"]["code"] == "EINVAL", (msg, r)
            assert text in r["error"]["message"], (msg, r)
        await stream.aclose()


async def test_broken_frames_close_only_that_connection(shm_dir: Path) -> None:
    async with (
        inproc_daemon(shm_dir, limits={"max_frame": "64K"}) as d,
        AsyncClient(d.socket, "good") as good,
    ):
        folio = await good.alloc_folio(0)
        for garbage in (
            b"\xc1",
            msgpack.packb([1] * 70000),
            b"\xdb\xff\xff\xff\xff" + b"x" * 70000,
        ):
            bad = await trio.open_unix_socket(d.socket)
            with trio.fail_after(5):
                try:  # the daemon hangs up, with a reset if it left bytes unread
                    await bad.send_all(garbage)
                    assert await bad.receive_some(100) == b""
                except trio.BrokenResourceError:
                    pass
            await bad.aclose()
            await good.preserve_folio(folio)  # the others are untouched
            await good.unpreserve_folio(folio)
        assert "conn.bad_frame" in d.log.getvalue()
        # a slow half-frame does not stall anyone else either
        slow = await trio.open_unix_socket(d.socket)
        await slow.send_all(encode({"id": 1, "op": "ping", "pad": "x" * 1000})[:50])
        await good.ping()
        await slow.aclose()


async def test_memory_ops_and_their_errors(shm_dir: Path) -> None:
    async with (
        inproc_daemon(shm_dir) as d,
        AsyncClient(d.socket, "a") as a,
        AsyncClient(d.socket, "b") as b,
    ):
        big = await a.alloc_folio(9)
        page = await a.alloc_folio(0)
        assert big.phys % (2 << 20) == 0
        # preserve inside one's own allocation, at any order that fits
        assert await a.preserve_folio(big.phys + 8 * PAGE, 3) == 3
        await expect(Errno.EEXIST, a.preserve_folio(big.phys + 8 * PAGE, 0), "lies inside")
        await expect(Errno.EEXIST, a.preserve_folio(big), "overlaps")
        await expect(Errno.EINVAL, a.preserve_folio(big.phys + PAGE), "give the order")
        await expect(Errno.EBUSY, a.free_folio(big), "unpreserve first")
        # another session cannot touch a's memory
        await expect(Errno.EPERM, b.preserve_folio(page.phys, 0), "not memory session 'b'")
        await expect(Errno.ENOENT, b.free_folio(page), "no allocation")
        await expect(Errno.ENOENT, b.unpreserve_folio(big.phys + 8 * PAGE), "no folio")
        await expect(Errno.ENOENT, a.unpreserve_folio(big.phys + 8 * PAGE, 0), "not preserved")
        assert await a.unpreserve_folio(big.phys + 8 * PAGE) == 3
        # batches are atomic
        pages = await a.alloc_folios(0, 64)
        phys = [f.phys for f in pages]
        theirs = await b.alloc_folio(0)
        await expect(
            Errno.EPERM, a.preserve_folios([*phys, theirs.phys], 0), "not memory session 'a'"
        )
        await expect(
            Errno.EINVAL, a.preserve_folios([*phys, big.phys + (1 << 30)], 0), "past the end"
        )
        await expect(Errno.EEXIST, a.preserve_folios([*phys, phys[0]], 0), "twice")
        assert (await a.status())["sessions"][0]["preserved_bytes"] == 0
        import numpy as np

        assert await a.preserve_folios(np.array(phys, dtype=np.uint64), 0) == 64
        await expect(Errno.ENOENT, a.unpreserve_folios([phys[0], page.phys]), "not preserved")
        assert await a.unpreserve_folios(phys) == 64  # orders looked up
        # ranges: split per docs/format.md §5, exact unpreserve
        block = await a.alloc_folio(4)
        got = await a.preserve_phys(block.phys + PAGE, 6 * PAGE)
        assert [(f.phys - block.phys, f.order) for f in got] == [
            (PAGE, 0),
            (2 * PAGE, 1),
            (4 * PAGE, 1),
            (6 * PAGE, 0),
        ]
        await expect(Errno.ENOENT, a.unpreserve_phys(block.phys + PAGE, 2 * PAGE))
        await expect(Errno.EINVAL, a.preserve_phys(block.phys, 100), "page size")
        assert len(await a.unpreserve_phys(block.phys + PAGE, 6 * PAGE)) == 4
        assert (
            await a.preserve_phys_ranges(
                [(block.phys, 2 * PAGE), (block.phys + 8 * PAGE, 8 * PAGE)]
            )
            == 2
        )
        assert (
            await a.unpreserve_phys_ranges(
                [(block.phys, 2 * PAGE), (block.phys + 8 * PAGE, 8 * PAGE)]
            )
            == 2
        )
        await a.free_folio(block)
        assert await a.free_folios([f.phys for f in pages]) == 64
        await expect(Errno.ENOMEM, a.alloc_folio(18), "no free order-18")
        # a's memory really is a's: mapping it from b's fd works (trust is the socket's
        # group), but the daemon never lets b preserve, free or restore it
        view = await a.map(Folio(page.phys, 0))
        view[:4] = b"mine"
        del view


async def test_tree_ops(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket, "t") as t:
        assert await t.add_node("/cfg") is True
        assert await t.add_node("/cfg") is False
        assert await t.add_prop("/cfg", "x", b"\x01") is True
        assert await t.add_prop("/cfg", "x", b"\x01") is False
        await expect(Errno.EEXIST, t.add_prop("/cfg", "x", b"\x02"))
        await expect(Errno.EPERM, t.add_prop("/", "owner-uid", b"\0\0\0\0"), "written by khod")
        await expect(Errno.ENOENT, t.add_node("/a/b"))
        assert await t.add_string_prop("/cfg", "s", "v") is True
        assert (await t.get_node("/cfg", tree="out")).props == ["s", "x"]
        assert await t.get_prop("/cfg", "s", tree="out") == b"v\0"
        await expect(Errno.ENOENT, t.get_node("/", tree="in"), "no memory was handed over")
        await expect(Errno.EINVAL, t.get_node("/", tree="sideways"))
        assert await t.remove_prop("/cfg", "x") == b"\x01"
        await t.remove_node("/cfg")
        await expect(Errno.ENOENT, t.remove_node("/cfg"))


async def test_sessions_persist_or_vanish(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        async with AsyncClient(d.socket, "temp") as c:
            f = await c.alloc_folio(2)
            await c.preserve_folio(f)
        async with AsyncClient(d.socket, "keep", persistent=True) as c:
            kept = await c.alloc_folio(2)
            await c.preserve_folio(kept)
        # the discard follows the disconnect once the daemon has read the EOF
        await trio.testing.wait_all_tasks_blocked()
        async with AsyncClient(d.socket) as op:
            st = await op.status()
            assert [s["name"] for s in st["sessions"]] == ["keep"]
            assert st["sessions"][0]["preserved_bytes"] == 4 * PAGE
            assert st["region"]["allocated"] == 4 * PAGE  # temp's memory went back
        assert "session.discarded session=temp" in d.log.getvalue()
        async with AsyncClient(d.socket, "keep", persistent=True) as c:
            assert c.hello_info["created"] is False
            await c.unpreserve_folio(kept)  # reattached with everything intact


async def test_operator_ops_need_an_operator_and_state(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket) as op:
        await expect(Errno.EBUSY, op.handover(), "run finalize first")
        await expect(Errno.ENOENT, op.unfreeze(), "not finalized")
        await expect(Errno.ENOENT, op.fdt("out"), "not finalized")
        await expect(Errno.ENOENT, op.fdt("in"), "did not start from a handover")
        await expect(Errno.EINVAL, op.fdt("up"))
        await op.finalize()
        await expect(Errno.EEXIST, op.finalize(), "already finalized")
        blob = await op.fdt("out")
        assert blob[:4] == b"\xd0\r\xfe\xed"
        async with AsyncClient(d.socket, "late") as late:
            f = await late.alloc_folio(0)  # allocation still works
            await expect(Errno.EBUSY, late.preserve_folio(f), "frozen")
            await expect(Errno.EBUSY, late.add_node("/x"), "frozen")
        await expect(Errno.EBUSY, op.release_unclaimed(), "finalized")
        await op.unfreeze()
        assert (await op.status())["state"] == "active"


async def test_region_fd_is_passed(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d, AsyncClient(d.socket, "m") as m:
        info = await m.region()
        assert (info.base, info.size, info.backend) == (0x1_0000_0000, 256 << 20, "file")
        f = await m.alloc_folio(1)
        view = await m.map(f)
        view[:] = b"z" * f.size
        del view
        # the bytes live in the session's own file; the region file has only khod's
        async with await trio.open_file(shm_dir / f"region.sessions/{os.getuid()}.m", "rb") as mem:
            await mem.seek(f.phys - info.base)
            assert await mem.read(8) == b"z" * 8
        assert d.server.engine.region.read(f.phys, 8) == bytes(8)


async def test_connection_limit_per_uid(shm_dir: Path) -> None:
    limits = {"max_connections_per_uid": 2}
    async with (
        inproc_daemon(shm_dir, limits=limits) as d,
        AsyncClient(d.socket) as one,
        AsyncClient(d.socket) as two,
    ):
        third = await trio.open_unix_socket(d.socket)
        r = Decoder().feed(await third.receive_some(4096))[0]
        assert r["error"]["code"] == "EBUSY"
        assert "too many connections" in r["error"]["message"]
        await third.aclose()
        await one.ping()
        await two.ping()


async def test_replies_keep_their_order_when_the_socket_fills(shm_dir: Path) -> None:
    """Small replies go straight into the socket, the rest through the writer: never reordered.

    One write carries pings around a reply larger than the socket buffer and a
    reply with an fd; the peer reads nothing until every request is in. The
    big reply fills the socket, so it and every reply after it must queue
    behind it, and then the socket takes replies directly again.
    """
    big = bytes(range(256)) * 1024  # 256 KiB: twice that is more than a Unix socket buffers
    async with inproc_daemon(shm_dir) as d:
        async with AsyncClient(d.socket, "order") as c:
            await c.add_node("/n")
            await c.add_prop("/n", "big", big)
        stream = await trio.open_unix_socket(d.socket)
        batch: list[dict[str, Any]] = [{"op": "hello", "name": "order"}]
        for part in range(3):
            batch += [{"op": "ping"}] * 300
            if part == 0:
                batch += [{"op": "get_prop", "path": "/n", "name": "big", "tree": "out"}] * 2
            else:
                batch.append({"op": "region"})
        batch += [{"op": "ping"}] * 300
        await stream.send_all(b"".join(encode({"id": i, **m}) for i, m in enumerate(batch)))
        decoder, replies = Decoder(Limits(max_frame=4 << 20)), []
        with trio.fail_after(10):
            while len(replies) < len(batch):
                data = await stream.receive_some(1 << 16)
                assert data, "connection closed"
                replies += decoder.feed(data)
        await stream.aclose()
    assert [r["id"] for r in replies] == list(range(len(batch)))
    assert all("result" in r for r in replies), [r for r in replies if "result" not in r][:1]
    assert replies[301]["result"]["value"] == replies[302]["result"]["value"] == big
    assert [i for i, r in enumerate(replies) if "nfds" in r] == [603, 904]


async def test_a_session_turn_is_taken_in_arrival_order() -> None:
    """Server.serial: one holder per session, waiters served first come first, cancels leave."""
    turns: dict[tuple[int, str], Any] = {}
    log: list[str] = []
    release = {name: trio.Event() for name in ("a", "b", "c", "d", "other")}
    gone = trio.CancelScope()

    async def request(name: str, key: tuple[int, str] = (1, "s")) -> None:
        with gone if name == "c" else trio.CancelScope():
            async with Turn(turns, key):
                log.append(f"{name}+")
                await release[name].wait()
                log.append(f"{name}-")

    async with trio.open_nursery() as n:
        for name in "abcd":
            n.start_soon(request, name)
            await trio.testing.wait_all_tasks_blocked()
        release["other"].set()
        n.start_soon(request, "other", (2, "s"))  # another session does not wait
        await trio.testing.wait_all_tasks_blocked()
        assert log == ["a+", "other+", "other-"]
        gone.cancel()  # c gives up while waiting
        await trio.testing.wait_all_tasks_blocked()
        for name in "abd":
            release[name].set()
    assert log == ["a+", "other+", "other-", "a-", "b+", "b-", "d+", "d-"]
    assert turns == {}
