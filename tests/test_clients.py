"""What both clients do beyond the protocol: timeouts, the region fd, handover, closing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from khoclient import AsyncClient, Client, KhoError, NotifierEvent
from khoclient import calls as C

from khod.errors import Errno

from .helpers import inproc_daemon


def test_blocking_timeouts(silent: str) -> None:
    with Client(silent, timeout=0.05) as c:
        with pytest.raises(KhoError) as e:
            c.ping()
        assert e.value.code is Errno.ETIMEDOUT
        assert e.value.message == "no reply to ping within 0.05 s"
        with pytest.raises(KhoError) as e:
            c.unfreeze(timeout=0.02)
        assert e.value.message == "no reply to unfreeze within 0.02 s"
        assert not c._pending


async def test_async_timeouts(silent: str) -> None:
    async with AsyncClient(silent, timeout=0.05) as c:
        with pytest.raises(KhoError) as e:
            await c.ping()
        assert e.value.code is Errno.ETIMEDOUT
        assert e.value.message == "no reply to ping within 0.05 s"
        with pytest.raises(KhoError) as e:
            await c.finalize(timeout=0.02)
        assert e.value.message == "no reply to finalize within 0.02 s"
        with pytest.raises(KhoError) as e:
            await c.call(C.status(), timeout=0.02)
        assert e.value.message == "no reply to status within 0.02 s"
        assert not c._pending  # the waiters were dropped
        with trio.move_on_after(0.02) as scope:
            await c.call(C.status(), timeout=None)  # the client's timeout; cancelled first
        assert scope.cancelled_caught and not c._pending


async def test_async_region_fd_and_handover(shm_dir: Path) -> None:
    got: list[int] = []
    async with (
        inproc_daemon(shm_dir) as d,
        AsyncClient(d.socket, "w", on_handover=got.append) as c,
    ):
        fd = await c.region_fd()
        assert await c.region_fd() == fd  # fetched once, then kept
        os.fstat(fd)  # open, and owned by the client
        async with AsyncClient(d.socket) as op:
            await op.finalize()
            await op.handover()
        with trio.fail_after(5):
            await c.handed_over.wait()
    assert got == [1]


async def test_aclose_from_the_body_leaves_the_body_running(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        async with AsyncClient(d.socket, "gone") as c:
            await c.ping()
            await c.aclose()
            await trio.lowlevel.checkpoint()  # not cancelled: aclose stops the client only
            with pytest.raises(KhoError) as e:
                await c.ping()
            assert e.value.code is Errno.EPROTO
            assert "connection closed" in e.value.message
            await c.aclose()  # twice is fine
        await trio.testing.wait_all_tasks_blocked()  # the daemon has read the EOF
        async with AsyncClient(d.socket) as op:
            st = await op.status()
        assert "gone" not in [s["name"] for s in st["sessions"]]
        reached_the_end = True
    assert reached_the_end  # a Cancelled leaking out of the block would skip to here


async def test_aclose_from_a_callback_leaves_the_body_running(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        closed = trio.Event()
        async with AsyncClient(d.socket, "vmm") as vmm:

            async def on_finalize(ev: NotifierEvent) -> None:
                await vmm.aclose()
                closed.set()

            await vmm.subscribe(on_finalize=on_finalize)
            async with AsyncClient(d.socket) as op:
                with pytest.raises(KhoError) as e:
                    await op.finalize()  # the reply arrives: the body is not cancelled
                assert e.value.code is Errno.EPROTO and f"'u{os.getuid()},vmm'" in e.value.message
                assert closed.is_set()
                assert (await op.status())["state"] == "active"
            with pytest.raises(KhoError):
                await vmm.ping()
        reached_the_end = True
    assert reached_the_end  # a Cancelled leaking out of the block would skip to here


async def test_a_failed_hello_closes_everything(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir) as d:
        c = AsyncClient(d.socket, "")
        with pytest.raises(KhoError) as e:
            async with c:
                raise AssertionError("entered with an invalid session name")
        assert e.value.code is Errno.EINVAL
        assert c._nursery is None and c._sock is None and not c._task_scopes
