"""Finalize through the socket: notifier phases, aborts, unfreeze, and the freeze under a race."""

from __future__ import annotations

import os
import random
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from khoclient import AsyncClient, KhoError, NotifierEvent, Veto

from khod import status
from khod.errors import Errno
from khod.kho.handover import read_handover
from khod.kho.record import read_record
from khod.protocol import encode

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
        assert progress[0]["session"] == f"u{os.getuid()},vmm"
        assert len(seen) == 1 and seen[0].name == "finalize"
        assert summary["bytes"] == {"9": 2 << 20}
        assert summary["notified"] == {f"u{os.getuid()},vmm": "ok"}
        # what the handover holds, read back as a successor would
        region = d.server.engine.region
        incoming = read_handover(region, read_record(region))  # type: ignore[arg-type]
        assert incoming.sessions[(os.getuid(), "vmm")].subtree.children["paused"].props == {
            "checksum": b"\x12\x34"
        }
        await op.unfreeze()
        with trio.fail_after(5):
            await unfroze.wait()
        assert unfrozen == ["unfreeze"]


async def test_a_round_names_sessions_by_uid_and_name_and_any_number_fit(
    shm_dir: Path,
) -> None:
    """Two users' "db" are two entries; 70 answers fit in the reply a client reads."""
    limits = {"max_connections_per_uid": 128}
    async with inproc_daemon(shm_dir, limits=limits) as d, AsyncExitStack() as stack:
        op = await stack.enter_async_context(AsyncClient(d.socket))

        async def ok(_ev: NotifierEvent) -> None:
            return None

        for uid, name in [(0, "db"), (65534, "db")] + [(0, f"s{i}") for i in range(68)]:
            c = await stack.enter_async_context(AsyncClient(d.socket))
            await c.hello(name, persistent=True, uid=uid)  # root may speak for another uid
            await c.subscribe(on_finalize=ok)
        summary = await op.finalize()
        assert len(summary["notified"]) == 70
        assert summary["notified"]["u0,db"] == summary["notified"]["u65534,db"] == "ok"
        st = status.snapshot(d.server.engine, d.server.lifecycle, 0, viewer=65534)
        assert st.last_finalize is not None
        assert dict(st.last_finalize.notified) == {"u65534,db": "ok"}  # not other users' names
        await op.unfreeze()


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
                assert f"'u{os.getuid()},vmm'" in e.value.message
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
                assert (f"u{os.getuid()},vmm", want) in statuses
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
    """Every preserve that succeeded is in the handover; every one refused got EBUSY.

    Eight workers preserve while a finalize runs. A subscribed session holds the
    FINALIZE phase open until the workers have preserved 200 folios (those must be
    in), the freeze then lands among the workers' requests at a seeded, random
    interleaving, and one preserve per worker after finalize returned must be
    refused: both outcomes happen in every run.
    """
    rng = random.Random(20261127)
    workers, per_worker = 8, 300
    async with inproc_daemon(shm_dir, region={"size": "1G"}) as d, AsyncExitStack() as stack:
        names = [f"w{i}" for i in range(workers)]
        clients = {n: await stack.enter_async_context(AsyncClient(d.socket, n)) for n in names}
        pools = {n: await c.alloc_folios(0, per_worker + 1) for n, c in clients.items()}
        succeeded: dict[str, list[int]] = {n: [] for n in names}
        refused: dict[str, int] = dict.fromkeys(names, 0)
        finalizing, enough, committed = trio.Event(), trio.Event(), trio.Event()
        during = 0

        gate = await stack.enter_async_context(AsyncClient(d.socket, "gate"))

        async def hold_finalize(ev: NotifierEvent) -> None:
            finalizing.set()
            await enough.wait()

        await gate.subscribe(on_finalize=hold_finalize)

        async def worker(name: str) -> None:
            nonlocal during
            c, pool = clients[name], pools[name]
            await finalizing.wait()
            for f in pool[:per_worker]:
                try:
                    await c.preserve_folio(f)
                except KhoError as exc:
                    if exc.code is not Errno.EBUSY:
                        raise
                    refused[name] += 1
                else:
                    succeeded[name].append(f.phys)
                    during += 1
                    if during == 200:
                        enough.set()
                if rng.random() < 0.3:
                    await trio.lowlevel.checkpoint()
            await committed.wait()
            with pytest.raises(KhoError) as late:
                await c.preserve_folio(pool[per_worker])
            assert late.value.code is Errno.EBUSY
            refused[name] += 1

        summary: dict[str, Any] = {}

        async def finalizer() -> None:
            async with AsyncClient(d.socket) as op:
                summary.update(await op.finalize())
            committed.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(worker, name)
                nursery.start_soon(finalizer)
        total_ok = sum(len(v) for v in succeeded.values())
        assert total_ok + sum(refused.values()) == workers * (per_worker + 1)
        assert total_ok >= 200 and sum(refused.values()) >= workers
        region = d.server.engine.region
        incoming = read_handover(region, read_record(region))  # type: ignore[arg-type]
        for name, phys in succeeded.items():
            got = sorted(
                p << 12
                for p in incoming.sessions[(os.getuid(), name)].memory.tracker.folios(0).tolist()
            )
            assert got == sorted(phys), f"session {name}: preserved set differs from what succeeded"
        assert summary["folios"] == {"0": total_ok}


async def test_pushes_to_a_client_that_never_reads_close_it(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, limits={"send_queue": 1}) as d:
        conn_seen = trio.Event()
        async with AsyncClient(d.socket, "fast") as fast:
            raw = await trio.open_unix_socket(d.socket)
            await raw.send_all(encode({"id": 1, "op": "hello", "name": "deaf"}))
            await raw.send_all(encode({"id": 2, "op": "subscribe", "events": ["finalize"]}))
            await trio.testing.wait_all_tasks_blocked()
            conn = next(
                c for c in d.server.conns if c.caller.session and c.caller.session.name == "deaf"
            )
            conn_seen.set()
            pushed = sum(conn.push({"event": "noise", "pad": "x" * 65536}) for _ in range(64))
            assert pushed < 64  # the queue filled: the connection was dropped, not waited on
            assert conn.closing
            assert "conn.slow_consumer" in d.log.getvalue()
            await fast.ping()  # everyone else carries on
            await raw.aclose()
        assert conn_seen.is_set()


async def test_an_operator_gone_mid_finalize_aborts_it(shm_dir: Path) -> None:
    """The requester's connection breaks while the notifiers run: the finalize is
    cancelled, and it must abort -- not leave the daemon holding or frozen."""
    async with (
        inproc_daemon(shm_dir) as d,
        AsyncClient(d.socket, "vmm", persistent=True) as vmm,
        AsyncClient(d.socket, "db", persistent=True) as db,
    ):
        folio = await vmm.alloc_folio(0)
        await vmm.preserve_folio(folio)
        asked, op_gone, both_unfrozen = trio.Event(), trio.Event(), trio.Event()
        unfrozen: list[str] = []

        async def vmm_answers_late(ev: NotifierEvent) -> None:
            asked.set()
            await op_gone.wait()  # its ok becomes a progress event to a closed socket

        async def db_never_answers(ev: NotifierEvent) -> None:
            if not op_gone.is_set():
                await trio.sleep_forever()

        async def note(ev: NotifierEvent) -> None:
            unfrozen.append(ev.name)
            if len(unfrozen) == 2:
                both_unfrozen.set()

        await vmm.subscribe(on_finalize=vmm_answers_late, on_unfreeze=note)
        await db.subscribe(on_finalize=db_never_answers, on_unfreeze=note)  # the first time
        op = await trio.open_unix_socket(d.socket)
        await op.send_all(encode({"id": 1, "op": "finalize"}))
        with trio.fail_after(5):
            await asked.wait()
        await op.aclose()
        op_gone.set()
        with trio.fail_after(5):
            await both_unfrozen.wait()
        async with AsyncClient(d.socket) as again:
            st = await again.status()
            assert st["state"] == "active" and not st["frozen"]
            assert st["sessions"][1]["preserved_bytes"] == PAGE
            await again.finalize()  # and the daemon can finalize again
        assert "finalize.aborted" in d.log.getvalue()
