"""The standby successor (``khod --standby``) and what a cold start imports.

Real processes, through the command and the socket, as an operator drives
them: a standby waits beside a serving daemon without binding or writing
anything, takes over the moment the handover is done, and otherwise does
exactly what a plain start would -- including refusing a region its
predecessor left live by dying. The waiting itself is also tested in
process, ordered with events rather than sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from khoclient import Client, KhoError

from khod import standby
from khod.errors import Errno
from khod.kho.record import RecordState, decode_record
from khod.region import open_region
from khod.startup import Exit, StartupRefused

from .conftest import BASE, MakeRegion
from .helpers import Daemon, pattern, spawn_activated, start_daemon, write_config

PAGE = 4096


def record_page(d: Path) -> bytes:
    with open(d / "region", "rb") as f:
        return f.read(PAGE)


def wait_log(d: Daemon, mark: str, timeout: float = 20) -> None:
    """Poll a daemon's log for ``mark`` (bounded: it runs as a separate process)."""
    deadline = time.monotonic() + timeout
    while mark not in d.logs():
        if d.proc.poll() is not None:
            raise AssertionError(f"khod exited {d.proc.returncode} before {mark!r}:\n{d.logs()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {mark!r} in:\n{d.logs()}")
        time.sleep(0.01)


def reconnect(path: str, session: str, d: Daemon, timeout: float = 20) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(path, session=session, persistent=True, timeout=20)
        except KhoError:
            if d.proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def killing(*daemons: Daemon) -> Iterator[None]:
    try:
        yield
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)


# ----------------------------------------------------------------------------- the whole story


def test_a_standby_waits_untouching_then_takes_the_handover_over(shm_dir: Path) -> None:
    port = free_port()
    cfg = write_config(shm_dir, metrics={"listen": f"127.0.0.1:{port}"})
    pred = start_daemon(shm_dir, config=cfg)
    succ = start_daemon(shm_dir, "--standby", config=cfg, wait_ready=False)
    with killing(pred, succ):
        with pred.client("vmm", persistent=True) as c:
            folio = c.alloc_folio(4)
            c.map(folio)[:] = pattern("vmm", folio.phys, folio.size)
            c.preserve_folio(folio)
        sock_ino = os.stat(pred.socket).st_ino
        wait_log(succ, "event=standby.waiting")
        record = record_page(shm_dir)
        assert f'holder="pid {pred.proc.pid} ' in succ.logs()

        # standing by: the predecessor keeps its socket, its metrics port and its record
        assert succ.proc.poll() is None
        assert os.stat(pred.socket).st_ino == sock_ino
        with Client(pred.socket) as op:
            assert op.status()["pid"] == pred.proc.pid
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"khod_handover_generation 0.0" in r.read()
        assert record_page(shm_dir) == record

        with Client(pred.socket) as op:
            op.finalize()
            assert op.handover()["generation"] == 1
        assert pred.wait() == 0
        assert "event=exit" in pred.logs().splitlines()[-1]  # its last line, though no teardown
        wait_log(succ, "event=ready")
        assert "event=standby.take_over" in succ.logs()
        assert "mode=populate" in succ.logs()

        with reconnect(pred.socket, "vmm", succ) as c:
            assert c.hello_info["incoming"]
            back = c.restore_folio(folio.phys)
            assert bytes(c.map(back)) == pattern("vmm", folio.phys, folio.size)
            assert c.status()["pid"] == succ.proc.pid
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert b"khod_handover_generation 1.0" in r.read()  # the successor's, same port
        assert succ.stop() == 0


def test_a_standby_refuses_a_region_its_predecessor_left_live_by_dying(shm_dir: Path) -> None:
    pred = start_daemon(shm_dir)
    succ = start_daemon(shm_dir, "--standby", wait_ready=False)
    with killing(pred, succ):
        with pred.client("db", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(0))
        wait_log(succ, "event=standby.waiting")
        record = record_page(shm_dir)
        assert decode_record(record).state is RecordState.LIVE
        pred.proc.kill()  # SIGKILL: no handover, the region stays live
        assert succ.wait() == Exit.REGION_BUSY
        assert "event=standby.take_over" in succ.logs()
        assert f"live under pid {pred.proc.pid}" in succ.logs()
        assert "event=ready" not in succ.logs()
        assert record_page(shm_dir) == record  # nothing written
        plain = start_daemon(shm_dir, wait_ready=False)  # what a plain start does: the same
        assert plain.wait() == Exit.REGION_BUSY
        assert f"live under pid {pred.proc.pid}" in plain.logs()
        assert record_page(shm_dir) == record


def test_one_standby_per_region_and_a_clean_stop_is_taken_over_as_a_plain_start_would(
    shm_dir: Path,
) -> None:
    pred = start_daemon(shm_dir)
    first = start_daemon(shm_dir, "--standby", wait_ready=False)
    with killing(pred, first):
        wait_log(first, "event=standby.waiting")
        second = start_daemon(shm_dir, "--standby", wait_ready=False)
        assert second.wait() == Exit.REGION_BUSY
        assert "another khod --standby is already waiting for region" in second.logs()
        assert first.proc.poll() is None
        with pred.client("s") as c:
            c.ping()

        assert pred.stop() == 0  # SIGTERM, nothing finalized: a clean stop, no handover
        wait_log(first, "event=ready")
        assert "mode=format" in first.logs()
        with reconnect(pred.socket, "s", first) as c:
            assert not c.hello_info["incoming"]
            c.ping()
        assert first.stop() == 0


def test_a_standby_with_a_bad_config_or_region_fails_at_once(shm_dir: Path) -> None:
    with contextlib.ExitStack() as stack:
        pred = start_daemon(shm_dir)
        stack.enter_context(killing(pred))
        bad = write_config(shm_dir, "bad.toml", limits={"max_connectoins": 4})
        s1 = start_daemon(shm_dir, "--standby", config=bad, wait_ready=False)
        assert s1.wait() == Exit.CONFIG
        assert "max_connectoins" in s1.logs()
        wrong = write_config(shm_dir, "wrong.toml", region={"size": "128M"})
        s2 = start_daemon(shm_dir, "--standby", config=wrong, wait_ready=False)
        assert s2.wait() == Exit.CONFIG
        assert "but the configured size is" in s2.logs()
        s3 = start_daemon(shm_dir, "--standby", "--reset", wait_ready=False)
        assert s3.wait() == Exit.CONFIG
        assert "--standby and --reset exclude each other" in s3.logs()
        for s in (s1, s2, s3):
            assert "standby.waiting" not in s.logs()
        with pred.client("s") as c:  # the daemon being replaced never noticed
            c.ping()
        assert pred.stop() == 0


def test_a_region_file_replaced_while_standing_by_is_refused_by_name(shm_dir: Path) -> None:
    pred = start_daemon(shm_dir)
    succ = start_daemon(shm_dir, "--standby", wait_ready=False)
    with killing(pred, succ):
        wait_log(succ, "event=standby.waiting")
        region = shm_dir / "region"
        region.rename(shm_dir / "old-region")  # someone swaps the file under both daemons
        region.write_bytes(b"")
        os.truncate(region, (shm_dir / "old-region").stat().st_size)
        assert pred.stop() == 0
        assert succ.wait() == Exit.CONFIG
        assert f"region file {region} was replaced by another file" in succ.logs()
        assert "event=ready" not in succ.logs()
        assert record_page(shm_dir) == bytes(PAGE)  # the new file: nothing written to it


def test_a_standby_with_nobody_to_wait_for_starts_at_once(shm_dir: Path) -> None:
    d = start_daemon(shm_dir, "--standby")
    with killing(d):
        assert "event=standby.no_predecessor" in d.logs()
        assert "standby.waiting" not in d.logs()
        with d.client("s") as c:
            c.ping()
        assert d.stop() == 0


def test_sigterm_ends_a_waiting_standby_and_nothing_else(shm_dir: Path) -> None:
    pred = start_daemon(shm_dir)
    succ = start_daemon(shm_dir, "--standby", wait_ready=False)
    with killing(pred, succ):
        wait_log(succ, "event=standby.waiting")
        record = record_page(shm_dir)
        assert succ.stop() == 0
        assert "event=standby.stopped signal=SIGTERM" in succ.logs()
        assert record_page(shm_dir) == record
        with pred.client("s") as c:
            c.ping()
        again = start_daemon(shm_dir, "--standby", wait_ready=False)  # its claim went with it
        with killing(again):
            wait_log(again, "event=standby.waiting")
            assert again.stop(signal.SIGINT) == 0
        assert pred.stop() == 0


def test_a_standby_under_a_service_manager_is_ready_fed_and_inherits_the_queue(
    shm_dir: Path,
) -> None:
    """Play systemd for a blue/green pair: both get the same listening socket (Sockets=)."""
    notify_path = str(shm_dir / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(0.1)
    listen_path = str(shm_dir / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen(64)
    cfg = write_config(shm_dir)

    def spawn(name: str, *args: str, watchdog: bool = False) -> subprocess.Popen[bytes]:
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        env.pop("KHOD_FAULT", None)
        extra = "WATCHDOG_PID=$$ WATCHDOG_USEC=200000 " if watchdog else ""
        return spawn_activated(
            listener, cfg, shm_dir / f"{name}.log", *args, settings=extra, env=env
        )

    messages: list[tuple[int, str]] = []

    def collect_until(pred: object, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:  # type: ignore[operator]
            with contextlib.suppress(TimeoutError):
                messages.append((time.monotonic_ns(), notify.recv(4096).decode()))

    blue = spawn("blue")
    green = None
    try:
        collect_until(lambda: any("STATUS=active" in m for _, m in messages))
        with Client(listen_path, session="vm", persistent=True) as c:
            folio = c.alloc_folio(1)
            c.map(folio)[:] = pattern("vm", folio.phys, folio.size)
            c.preserve_folio(folio)
        green = spawn("green", "--standby", watchdog=True)
        collect_until(lambda: any("STATUS=standby" in m for _, m in messages))
        ready = next(m for _, m in messages if "STATUS=standby" in m)
        assert "READY=1" in ready and f"pid {blue.pid}" in ready
        n = len(messages)
        collect_until(lambda: sum(m == "WATCHDOG=1" for _, m in messages[n:]) >= 2)
        assert sum(m == "WATCHDOG=1" for _, m in messages[n:]) >= 2  # fed while it waits

        with Client(listen_path) as op:
            op.finalize()
            op.handover()
        assert blue.wait(20) == 0
        # Connected in the blackout, to the socket both held: queued, then served -- no retry.
        with Client(listen_path, session="vm", persistent=True, timeout=20) as c:
            back = c.restore_folio(folio.phys)
            assert bytes(c.map(back)) == pattern("vm", folio.phys, folio.size)
        collect_until(lambda: sum("READY=1" in m for _, m in messages) >= 3)
        assert "STATUS=active" in [m for _, m in messages if "READY=1" in m][-1]
        green.send_signal(signal.SIGTERM)
        assert green.wait(20) == 0
        assert "socket activation" in (shm_dir / "green.log").read_text()
    finally:
        for p in (blue, green):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        notify.close()
        listener.close()


# ----------------------------------------------------------------------------- the wait, in process


def hold(path: str) -> int:
    """Hold ``path``'s exclusive flock on a descriptor of our own, as a running daemon does."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_take_waits_for_the_holder_and_then_holds_the_region(make_region: MakeRegion) -> None:
    region = make_region()
    held = hold(region.path)
    assert standby.holder(region.path) == os.getpid()
    told: list[str] = []

    def let_go() -> None:  # standing by: now the predecessor lets go, from another thread
        told.append("waiting")
        threading.Thread(target=os.close, args=(held,)).start()

    waited = standby.take(region, let_go, lambda: told.append("overtaken"))  # main thread
    assert told == ["waiting"] and waited is not None and waited >= 0
    assert standby.holder(region.path) == os.getpid()
    with pytest.raises(BlockingIOError):  # ours now: nobody else gets it
        hold(region.path)


def test_take_without_a_holder_returns_at_once(make_region: MakeRegion) -> None:
    region = make_region()
    assert standby.take(region, lambda: pytest.fail("nobody holds it"), lambda: None) is None
    assert standby.holder(region.path) == os.getpid()


def test_a_daemon_that_gets_in_first_is_waited_for_in_turn(
    make_region: MakeRegion, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predecessor lets go and a plain start takes the region before the standby does."""
    region = make_region()
    held = [hold(region.path)]
    told: list[str] = []
    real_wait = standby.wait_until_free

    def let_go_and_race(path: str) -> None:
        os.close(held.pop())
        if len(told) == 1:  # the first time, someone else grabs it at once
            held.append(hold(path))
            return
        real_wait(path)

    monkeypatch.setattr(standby, "wait_until_free", let_go_and_race)
    waited = standby.take(region, lambda: told.append("waiting"), lambda: told.append("overtaken"))
    assert told == ["waiting", "overtaken"] and waited is not None
    assert standby.holder(region.path) == os.getpid() and not held


def test_a_signal_ends_the_wait_and_restores_the_handlers(make_region: MakeRegion) -> None:
    region = make_region()
    held = hold(region.path)
    before = signal.getsignal(signal.SIGTERM)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main  # signals reach the main thread

    def stop_when_waiting() -> None:  # as the service manager would, once READY is sent
        threading.Thread(target=signal.pthread_kill, args=(main, signal.SIGTERM)).start()

    try:
        with pytest.raises(standby.StandbyStopped) as stopped:
            standby.take(region, stop_when_waiting, lambda: None)
        assert stopped.value.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        os.close(held)


def test_one_claim_per_region(make_region: MakeRegion) -> None:
    region = make_region()
    first = standby.claim(region)
    try:
        with pytest.raises(StartupRefused) as refused:
            standby.claim(region)
        assert refused.value.exit_status == Exit.REGION_BUSY
        assert "another khod --standby" in refused.value.message
        held = hold(region.path)  # a claim is no flock: the daemon's own lock is unaffected
        os.close(held)
    finally:
        os.close(first)
    os.close(standby.claim(region))  # released with its descriptor


def test_a_region_gone_while_standing_by_is_named(shm_dir: Path) -> None:
    region = open_region("file", str(shm_dir / "r"), base=BASE, size=1 << 20)
    try:
        os.unlink(region.path)
        with pytest.raises(KhoError) as gone:
            standby.wait_until_free(region.path)
        assert gone.value.code == Errno.ENOENT and region.path in gone.value.message
    finally:
        region.close()


# ----------------------------------------------------------------------------- cold-start imports


def test_a_cold_start_imports_only_what_start_up_and_serving_need(shm_dir: Path) -> None:
    cfg = write_config(shm_dir, metrics={"listen": "127.0.0.1:0"})
    code = f"""
import sys
import khod.main
lazy = ("prometheus_client", "khod.metrics", "khod.metrics_export", "khod.metrics_http", "h11", "gzip", "fdt", "tomllib", "http.server", "json")
print(sorted(m for m in lazy if m in sys.modules))
khod.main.preload(khod.main.effective_config(khod.main.parse_args(["-c", "{cfg}"])))
print(sorted(m for m in (*lazy, "encodings.idna") if m not in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[]", "[]"]


@pytest.mark.parametrize(("given", "kept"), [(None, "1"), ("3", "3")])
def test_the_daemon_starts_no_blas_threads_unless_told(given: str | None, kept: str) -> None:
    """khod does no linear algebra: numpy's OpenBLAS starts no worker threads in it."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    code = (
        "import os, khod.main; "
        "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    value, threads = r.stdout.split()
    assert value == kept
    if given is None:
        assert threads == "1"  # the main thread alone


# ----------------------------------------------------------------------------- a hostile peer


def test_a_peer_that_never_reads_does_not_hold_the_region_from_the_standby(
    shm_dir: Path,
) -> None:
    """Its replies pile up unread, so the predecessor cannot flush them for its
    two seconds of grace; the region is let go before that, once no request of
    anyone can run any more, and the standby serves at once."""
    cfg = write_config(shm_dir)
    pred = start_daemon(shm_dir, config=cfg)
    succ = start_daemon(shm_dir, "--standby", config=cfg, wait_ready=False)
    with killing(pred, succ):
        with pred.client("vmm", persistent=True) as c:
            c.preserve_folio(c.alloc_folio(0))
            c.add_node("/big")
            c.add_prop("/big", "blob", b"\xab" * (256 << 10))
        wait_log(succ, "event=standby.waiting")
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hostile.connect(pred.socket)
        hostile.sendall(msgpack.packb({"id": 1, "op": "hello", "name": "vmm", "persistent": True}))
        asks = b"".join(
            msgpack.packb(
                {"id": i, "op": "get_prop", "path": "/big", "name": "blob", "tree": "out"}
            )
            for i in range(2, 40)
        )
        hostile.sendall(asks)  # 9.5 MiB of replies it will never read
        with Client(pred.socket) as op:
            op.finalize()
            t0 = time.monotonic()
            op.handover()
        with reconnect(pred.socket, "vmm", succ) as c:
            served = time.monotonic() - t0
            assert c.hello_info["incoming"]
        assert served < 1.0, f"the standby served {served:.2f} s after the handover"
        assert pred.wait() == 0
        logs = pred.logs()
        assert logs.index("event=region.released") < logs.index("event=exit")
        hostile.close()
        assert succ.stop() == 0
