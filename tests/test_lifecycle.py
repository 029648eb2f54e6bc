"""Finalize, its notifier phases, aborts, unfreeze, and the freeze lock under a race."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from khoclient import AsyncClient, KhoError, NotifierEvent, Veto

from khod.errors import Errno
from khod.freeze import FreezeLock
from khod.handover import read_handover, read_record

from .helpers import inproc_daemon

PAGE = 4096


async def test_finalize_phase_lets_sessions_add_memory_and_nodes(shm_dir: Path) -> None:
    async with (
        inproc_daemon(shm_dir) as d,
        AsyncClient(d.socket, "vmm") as vmm,
        AsyncClient(d.socket) as op,
    ):
        late = await vmm.alloc_folio(9)
        seen: list[NotifierEvent] = []

        async def on_finalize(ev: NotifierEvent) -> None:
            seen.append(ev)
            await vmm.preserve_folio(late)  # still allowed: not frozen yet
            await vmm.add_node("/paused")
            await vmm.add_prop("/paused", "checksum", b"\x12\x34")

        unfrozen: list[str] = []
        unfroze = trio.Event()

        async def on_unfreeze(ev: NotifierEvent) -> None:
            unfrozen.append(ev.name)
            unfroze.set()

        await vmm.subscribe(on_finalize=on_finalize, on_unfreeze=on_unfreeze)
        progress: list[dict[str, Any]] = []
        summary = await op.finalize(progress=progress.append)
        assert [p.get("status") for p in progress] == ["asked", "ok", "freezing", "committed"]
        assert progress[0]["session"] == "vmm"
        assert len(seen) == 1 and seen[0].name == "finalize"
        assert summary["bytes"] == {"9": 2 << 20}
        assert summary["notified"] == {"vmm": "ok"}
        # what the handover holds, read back as a successor would
        region = d.server.engine.region
        incoming = read_handover(region, read_record(region))  # type: ignore[arg-type]
        assert incoming.sessions["vmm"].subtree.children["paused"].props == {
            "checksum": b"\x12\x34"
        }
        await op.unfreeze()
        with trio.fail_after(5):
            await unfroze.wait()
        assert unfrozen == ["unfreeze"]


@pytest.mark.parametrize("how", ["veto", "error", "timeout", "disconnect"])
async def test_aborts_keep_every_preservation(shm_dir: Path, how: str) -> None:
    server_cfg = {"notifier_timeout_s": 0.5}
    async with (
        inproc_daemon(shm_dir, server=server_cfg) as d,
        AsyncClient(d.socket, "db", persistent=True) as db,
    ):
        folio = await db.alloc_folio(3)
        await db.preserve_folio(folio)
        unfrozen = trio.Event()

        async def on_unfreeze(ev: NotifierEvent) -> None:
            unfrozen.set()

        async with AsyncClient(d.socket, "vmm") as vmm:

            async def on_finalize(ev: NotifierEvent) -> None:
                if how == "veto":
                    raise Veto("guest is migrating")
                if how == "error":
                    raise RuntimeError("disk full")
                if how == "timeout":
                    await trio.sleep(30)
                if how == "disconnect":
                    await vmm.aclose()  # the workload goes away mid-finalize

            await vmm.subscribe(on_finalize=on_finalize)
            await db.subscribe(on_unfreeze=on_unfreeze)
            code = {
                "veto": Errno.EBUSY,
                "error": Errno.EPROTO,
                "timeout": Errno.ETIMEDOUT,
                "disconnect": Errno.EPROTO,
            }[how]
            async with AsyncClient(d.socket) as op:
                progress: list[dict[str, Any]] = []
                with pytest.raises(KhoError) as e:
                    await op.finalize(progress=progress.append)
                assert e.value.code is code
                assert "'vmm'" in e.value.message
                statuses = [
                    (p.get("session"), p.get("status"))
                    for p in progress
                    if p["phase"] == "finalize"
                ]
                want = {
                    "veto": "veto",
                    "error": "error",
                    "timeout": "timeout",
                    "disconnect": "disconnected",
                }[how]
                assert ("vmm", want) in statuses
                st = await op.status()
                assert st["state"] == "active"
                assert not st["frozen"]
                assert read_record(d.server.engine.region).state.name == "LIVE"  # type: ignore[union-attr]
        with trio.fail_after(5):
            await unfrozen.wait()  # UNFREEZE notifiers ran
        # everything preserved before is still there, and the daemon can finalize again
        await db.unpreserve_folio(folio)
        await db.preserve_folio(folio)
        async with AsyncClient(d.socket) as op:
            assert (await op.finalize())["bytes"] == {"3": 8 * PAGE}
        assert "finalize.aborted" in d.log.getvalue()


async def test_race_preserves_against_finalize(shm_dir: Path) -> None:
    """Every preserve that succeeded is in the handover; every one refused got EBUSY."""
    async with inproc_daemon(shm_dir, region={"size": "1G"}) as d, AsyncExitStack() as stack:
        succeeded: dict[str, list[int]] = {}
        refused: dict[str, int] = {}
        clients = [
            await stack.enter_async_context(AsyncClient(d.socket, f"w{i}")) for i in range(8)
        ]
        pools = {c.session: await c.alloc_folios(0, 400) for c in clients}
        go = trio.Event()

        async def worker(c: AsyncClient) -> None:
            name = c.session
            assert name is not None
            ok, busy = [], 0
            await go.wait()
            for f in pools[name]:
                try:
                    await c.preserve_folio(f)
                    ok.append(f.phys)
                except KhoError as exc:
                    if exc.code is not Errno.EBUSY:
                        raise
                    busy += 1
                if random.random() < 0.3:
                    await trio.lowlevel.checkpoint()
            succeeded[name], refused[name] = ok, busy

        summary: dict[str, Any] = {}

        async def finalizer() -> None:
            await go.wait()
            await trio.sleep(0.005)
            async with AsyncClient(d.socket) as op:
                summary.update(await op.finalize())

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for c in clients:
                    nursery.start_soon(worker, c)
                nursery.start_soon(finalizer)
                go.set()
        total_ok = sum(len(v) for v in succeeded.values())
        assert total_ok + sum(refused.values()) == 8 * 400
        assert total_ok > 0 and sum(refused.values()) > 0, "the race did not overlap; try again"
        region = d.server.engine.region
        incoming = read_handover(region, read_record(region))  # type: ignore[arg-type]
        for name, phys in succeeded.items():
            got = sorted(p << 12 for p in incoming.sessions[name].memory.folios(0).tolist())
            assert got == sorted(phys), f"session {name}: preserved set differs from what succeeded"
        assert summary["folios"] == {"0": total_ok}


async def test_freeze_lock_waits_for_readers_and_refuses_new_ones() -> None:
    lock = FreezeLock()
    order: list[str] = []

    async def reader() -> None:
        with lock.read():
            order.append("read-start")
            await trio.sleep(0.2)
            order.append("read-end")

    async def writer() -> None:
        await trio.sleep(0.05)
        order.append("freeze-wait")
        await lock.freeze()
        order.append("frozen")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)
        await trio.sleep(0.1)
        with pytest.raises(KhoError) as e, lock.read():
            pass  # a writer waits: new readers fail at once instead of queueing
        assert e.value.code is Errno.EBUSY
    assert order == ["read-start", "freeze-wait", "read-end", "frozen"]
    assert lock.frozen
    lock.thaw()
    with lock.read():
        assert lock.readers == 1


async def test_pushes_to_a_client_that_never_reads_close_it(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, limits={"send_queue": 1}) as d:
        conn_seen = trio.Event()
        async with AsyncClient(d.socket, "fast") as fast:
            raw = await trio.open_unix_socket(d.socket)
            from khod.protocol import encode

            await raw.send_all(encode({"id": 1, "op": "hello", "name": "deaf"}))
            await raw.send_all(encode({"id": 2, "op": "subscribe", "events": ["finalize"]}))
            await trio.sleep(0.1)
            conn = next(
                c for c in d.server.conns.values() if c.session and c.session.name == "deaf"
            )
            conn_seen.set()
            pushed = sum(conn.push({"event": "noise", "pad": "x" * 65536}) for _ in range(64))
            assert pushed < 64  # the queue filled: the connection was dropped, not waited on
            assert conn.closing
            assert "conn.slow_consumer" in d.log.getvalue()
            await fast.ping()  # everyone else carries on
            await raw.aclose()
        assert conn_seen.is_set()
