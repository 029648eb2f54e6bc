"""Daemon benchmark: round trips against a raw socket floor, batches, finalize, successor blackout.

In one run, on this machine:

* the floor: bench/echo.py, a bare trio server echoing msgpack frames over a
  Unix socket through trio's stream API, driven by a minimal blocking client
  -- a plain socket and msgpack with khod's framing (docs/protocol.md §2), no
  khoclient -- with one client and with 8 client processes. Beside it the
  lean floor, ``bench/echo.py --lean``: the same server with the transport
  shortcuts khod's connections take (a read from the trio socket, a reply
  written straight into it), so that khod's own transport is no cheaper
  than the floor it is compared with. khoclient against the plain echo
  server is measured too: what the client library itself adds. And the
  spin floor: the raw client polling its socket for 100 µs before it sleeps,
  as khoclient does by default (clients/khoclient/spin.py), so that the
  figure khoclient gains from busy polling is also compared like for like;
* khod, started as a real process on a sparse region file on tmpfs:
  - unbatched preserve_folio + unpreserve_folio round trips per second through
    khoclient, one client and 8 client processes (each call is one round
    trip), the same with khoclient's busy polling off, and through the
    minimal client (what the daemon alone costs);
  - one batched preserve_folios call of 1M order-0 folios (folios/s);
  - finalize with 64 GiB of order-0 folios (16M) preserved;
  - the successor's blackout: from spawning the new daemon process to its
    first successful restore_folio, interpreter start included.

The echo servers and khod run side by side and the round-trip figures are
taken in alternating rounds, so floors and khod see the same load on a shared
machine. Each rate is the median of its rounds; each ratio is the median of
the per-round ratios, with the lowest and highest round after it. The
one-client runs also give the CPU time a round trip costs the client and the
server (``*_cpu_us``), which scheduling on a busy machine does not blur.

``--profile N`` instead runs khod under cProfile for N round trips and
prints where its time goes per request, by layer and by function.

    python bench/rpc.py [--json] [--seconds S] [--rounds N] [--rtt-only] [--profile N]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from harness import khod_config, kill_all, rate, start_khod, wait_for_socket
from khoclient import Client, KhoError, spin
from khoclient import calls as C
from report import print_figures

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
REGION = 72 * GIB  # 64 GiB preserved + room for scratch, metadata, allocations
CLIENTS = 8


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawClient:
    """The floor's client: a blocking socket, msgpack, one request in flight. Nothing else.

    With ``busy_poll_us`` it polls the socket that long before it sleeps, as
    khoclient does by default (clients/khoclient/spin.py): the like-for-like floor.
    """

    def __init__(self, path: str, busy_poll_us: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.ids = itertools.count(1)
        self.spin = busy_poll_us / 1e6

    def call(self, op: str, **args: Any) -> Any:
        req = next(self.ids)
        self.sock.sendall(msgpack.packb({"id": req, "op": op, **args}))
        while True:
            for msg in self.unpacker:
                if msg.get("id") != req or "result" not in msg:
                    raise RuntimeError(f"{op}: unexpected reply {msg!r:.200}")
                return msg["result"]
            data = self._spin() if self.spin else None
            if data is None:
                data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError(f"{op}: connection closed")
            self.unpacker.feed(data)

    def _spin(self) -> bytes | None:
        end = time.perf_counter() + self.spin
        while True:
            try:
                return self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    return None

    def close(self) -> None:
        self.sock.close()


def flipper(preserve: Callable[[], object], unpreserve: Callable[[], object]) -> Callable[[], None]:
    """One unbatched round trip per call: preserve, then unpreserve, the same folio."""
    state = [False]

    def flip() -> None:
        if state[0]:
            unpreserve()
        else:
            preserve()
        state[0] = not state[0]

    return flip


def one_client(path: str, seconds: float, kind: str, name: str) -> float:
    """Round trips per second of one client of ``kind``.

    ``floor``: the raw client pings the echo server; ``spin-floor``: the raw
    client busy-polling as khoclient does, pings it; ``client-echo``: khoclient
    does; ``khod``: khoclient preserves and unpreserves; ``khod-no-poll``:
    khoclient with busy polling off does; ``khod-raw``: the raw client does.
    """
    if kind in ("floor", "spin-floor", "khod-raw"):
        raw = RawClient(path, spin.DEFAULT_US if kind == "spin-floor" else 0)
        try:
            if kind in ("floor", "spin-floor"):
                return rate(lambda: raw.call("ping"), seconds)
            raw.call("hello", name=name)
            phys = raw.call("alloc_folio", order=0)["phys"]
            return rate(
                flipper(
                    lambda: raw.call("preserve_folio", phys=phys, order=0),
                    lambda: raw.call("unpreserve_folio", phys=phys, order=0),
                ),
                seconds,
            )
        finally:
            raw.close()
    poll = 0 if kind == "khod-no-poll" else None
    with Client(path, session=None if kind == "client-echo" else name, busy_poll_us=poll) as c:
        if kind == "client-echo":
            ping = C.ping()
            return rate(lambda: c.call(ping), seconds)
        f = c.alloc_folio(0)
        return rate(
            flipper(lambda: c.preserve_folio(f.phys, 0), lambda: c.unpreserve_folio(f.phys, 0)),
            seconds,
        )


def _worker(path: str, seconds: float, kind: str, name: str, start: Any, out: Any) -> None:
    start.wait()
    out.put(one_client(path, seconds, kind, name))


def many_clients(path: str, seconds: float, kind: str, tag: str, n: int = CLIENTS) -> float:
    """Round trips per second of ``n`` client processes together."""
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(path, seconds, kind, f"{tag}{i}", start, out))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    time.sleep(0.3)
    start.set()
    total = sum(out.get(timeout=seconds * 10 + 60) for _ in procs)
    for p in procs:
        p.join()
    return float(total)


def round_trips(servers: dict[str, tuple[str, int]], seconds: float, rounds: int) -> dict[str, Any]:
    """The round-trip figures, floor and khod in alternating rounds.

    ``servers`` maps "echo", "lean-echo" and "khod" to ``(socket, pid)``.
    One-client runs also record the CPU time each round trip costs the
    client and the server, which a busy machine's scheduling does not blur
    as it blurs rates.
    """
    runs_of = {  # label: (client kind, server)
        "floor": ("floor", "echo"),
        "spin_floor": ("spin-floor", "echo"),
        "lean_floor": ("floor", "lean-echo"),
        "khoclient_echo": ("client-echo", "echo"),
        "preserve": ("khod", "khod"),
        "preserve_no_busy_poll": ("khod-no-poll", "khod"),
        "preserve_raw_client": ("khod-raw", "khod"),
    }
    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds):
        for label, (kind, server) in runs_of.items():
            path, pid = servers[server]
            mine, theirs, t0 = time.process_time(), cpu_seconds(pid), time.perf_counter()
            per_s = one_client(path, seconds, kind, f"s{r}")
            trips = per_s * (time.perf_counter() - t0)
            cpu.setdefault(label, []).append(
                ((time.process_time() - mine) / trips, (cpu_seconds(pid) - theirs) / trips)
            )
            runs.setdefault(label, []).append(per_s)
            runs.setdefault(f"{label}_8", []).append(
                many_clients(path, seconds, kind, f"m{r}-{label}-")
            )
    fig: dict[str, Any] = {}
    for label in runs_of:
        fig[f"{label}_rtt_per_s"] = round(statistics.median(runs[label]))
        fig[f"{label}_rtt_per_s_8clients"] = round(statistics.median(runs[f"{label}_8"]))
    for num, den in [
        ("preserve", "floor"),
        ("preserve", "spin_floor"),
        ("preserve_no_busy_poll", "floor"),
        ("preserve", "lean_floor"),
        ("khoclient_echo", "floor"),
        ("preserve", "khoclient_echo"),
        ("preserve_raw_client", "floor"),
    ]:
        for n in ("", "_8"):
            each = sorted(a / b for a, b in zip(runs[num + n], runs[den + n], strict=True))
            key = f"{num}_rtt_vs_{den}{'_8clients' if n else ''}"
            fig[key] = round(statistics.median(each), 3)
            fig[f"{key}_range"] = f"{each[0]:.3f}-{each[-1]:.3f}"
    for label in runs_of:
        fig[f"{label}_client_cpu_us"] = round(statistics.median(c for c, _ in cpu[label]) * 1e6, 1)
        fig[f"{label}_server_cpu_us"] = round(statistics.median(s for _, s in cpu[label]) * 1e6, 1)
    return fig


def write_config(d: Path) -> Path:
    return khod_config(d, f"{REGION >> 30}G")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument(
        "--seconds", type=float, default=1.0, help="duration of each round-trip measurement"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of floor and khod measurements"
    )
    ap.add_argument(
        "--rtt-only", action="store_true", help="only the round-trip figures (no 64 GiB part)"
    )
    ap.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="instead: run khod under cProfile for N raw preserve/unpreserve round trips and "
        "print where its time goes per request",
    )
    args = ap.parse_args()
    if args.profile:
        return profile_daemon(args.profile)
    d = Path(
        tempfile.mkdtemp(prefix="khod-rpc-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    fig: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers: dict[str, tuple[str, int]] = {}
        for name, extra in (("echo", []), ("lean-echo", ["--lean"])):
            path = str(d / f"{name}.sock")
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(HERE / "echo.py"), path, *extra], stdout=subprocess.DEVNULL
                )
            )
            servers[name] = (path, procs[-1].pid)
        cfg = write_config(d)
        log = d / "khod.log"
        khod = start_khod(cfg, log)
        procs.append(khod)
        sock = str(d / "khod.sock")
        servers["khod"] = (sock, khod.pid)
        for p, (path, _) in zip(procs, servers.values(), strict=True):
            wait_for_socket(path, p)
        fig.update(round_trips(servers, args.seconds, args.rounds))
        for p in procs[:2]:
            p.terminate()
            p.wait()
        if not args.rtt_only:
            bulk(fig, sock, khod, cfg, log, procs)
    finally:
        kill_all(procs)
        shutil.rmtree(d, ignore_errors=True)

    targets = {
        "preserve_rtt_vs_floor": (">=", 0.5),
        "preserve_rtt_vs_floor_8clients": (">=", 0.5),
        "batched_preserve_folios_per_s": (">=", 2_000_000),
        "finalize_ms": ("<=", 250),
        "successor_first_restore_ms": ("<=", 1500),
    }
    print_figures(
        "khod rpc benchmark (floor: a raw socket client against bench/echo.py)",
        fig,
        targets,
        args.json,
    )
    return 0


def bulk(
    fig: dict[str, Any],
    sock: str,
    khod: subprocess.Popen[bytes],
    cfg: Path,
    log: Path,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """A batch of 1M folios, finalize with 64 GiB preserved, handover, the successor's start."""
    with Client(sock, session="bulk", persistent=True, timeout=300) as c:
        big = c.alloc_folios(18, 64)  # 64 GiB, as 1 GiB folios
        pfns = np.concatenate([np.arange(f.phys, f.phys + GIB, 4096, dtype=np.uint64) for f in big])
        batch = 1 << 20
        times = []
        for at in range(0, pfns.size, batch):
            t0 = time.perf_counter()
            assert c.preserve_folios(pfns[at : at + batch], 0) == batch
            times.append(time.perf_counter() - t0)
        fig["batched_preserve_folios"] = batch
        fig["batched_preserve_folios_per_s"] = round(batch / min(times))
        fig["batched_preserve_folios_per_s_median"] = round(batch / float(np.median(times)))
        fig["preserved_bytes"] = int(pfns.size) * 4096
        with Client(sock, timeout=300) as op:
            t0 = time.perf_counter()
            summary = op.finalize()
            fig["finalize_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            fig["finalize_commit_ms"] = summary["commit_ms"]
            fig["metadata_pages"] = summary["metadata_pages"]
            op.handover()
    khod.wait(60)

    # ---------------------------------------------------------------- the successor's blackout
    first = int(pfns[0])
    t0 = time.perf_counter()
    succ = start_khod(cfg, log)
    procs.append(succ)
    while True:
        try:
            with Client(sock, session="bulk", persistent=True, timeout=30) as c:
                c.restore_folio(first)
            break
        except KhoError:
            if succ.poll() is not None:
                raise RuntimeError(
                    f"successor exited {succ.returncode}:\n{log.read_text()}"
                ) from None
            time.sleep(0.002)
    fig["successor_first_restore_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    succ.terminate()
    succ.wait(60)


# the daemon's time per request, by the code it is spent in (first match wins)
LAYERS = [
    ("transport: khod/server.py", "/khod/server.py"),
    ("framing: khod/protocol.py", "/khod/protocol.py"),
    ("dispatch: khod/dispatch.py", "/khod/dispatch.py"),
    ("ops and arguments: khod/ops.py, args.py", "/khod/ops.py", "/khod/args.py"),
    ("engine and session: khod/engine.py, session.py", "/khod/engine.py", "/khod/session.py"),
    ("preservation set: khod/kho/", "/khod/kho/"),
    ("other khod", "/khod/"),
    ("trio (scheduler, sockets)", "/trio/", "/outcome/", "/sniffio/"),
    ("msgpack", "/msgpack/"),
    ("numpy", "/numpy/", "numpy.", "'reduce' of"),
    ("epoll wait (idle, waiting for the client)", "'poll' of 'select.epoll'"),
    ("socket system calls", "of '_socket.socket'", "posix.write"),
]


# khod's main() ends with os._exit (no teardown), which would lose cProfile's output: profile run()
PROFILED_KHOD = (
    "import cProfile, sys; from khod.main import run; out, cfg = sys.argv[1:]; "
    "sys.argv = ['khod', '-c', cfg]; cProfile.run('run()', out)"
)


def _profiled(n: int) -> tuple[dict[str, tuple[int, float]], float]:
    """Own time and calls of every function of a khod run under cProfile with ``n`` round
    trips after hello and alloc_folio; and the round trips' wall time."""
    d = Path(
        tempfile.mkdtemp(prefix="khod-prof-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    out = d / "khod.prof"
    try:
        cfg = write_config(d)
        with open(d / "khod.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", PROFILED_KHOD, str(out), str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            sock = str(d / "khod.sock")
            wait_for_socket(sock, proc)
            raw = RawClient(sock)
            raw.call("hello", name="profile")
            phys = raw.call("alloc_folio", order=0)["phys"]
            flip = flipper(
                lambda: raw.call("preserve_folio", phys=phys, order=0),
                lambda: raw.call("unpreserve_folio", phys=phys, order=0),
            )
            t0 = time.perf_counter()
            for _ in range(n):
                flip()
            wall = time.perf_counter() - t0
            raw.close()
        finally:
            proc.terminate()
            proc.wait(60)
        table: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    own = {
        f"{file}:{line}({func})": (calls, tottime)
        for (file, line, func), (_, calls, tottime, _, _) in table.items()
    }
    return own, wall


def profile_daemon(n: int) -> int:
    """khod under cProfile: its time per unbatched preserve/unpreserve request, by layer.

    Two runs, one with ``n`` round trips and one with none; the difference is
    what the round trips cost (start-up and shutdown cancel out). cProfile adds
    its own cost to every Python call, so the absolute figures are inflated
    (Python calls several times, system calls hardly); the shares show where
    the time goes.
    """
    base, _ = _profiled(0)
    runs, wall = _profiled(n)
    per_layer = dict.fromkeys([name for name, *_ in LAYERS], 0.0)
    per_layer["other (builtins: isinstance, dict and list methods, ...)"] = 0.0
    rows = []
    for where, (calls, tottime) in runs.items():
        calls0, tottime0 = base.get(where, (0, 0.0))
        calls, tottime = calls - calls0, tottime - tottime0
        if calls <= 0:
            continue
        layer = next((name for name, *marks in LAYERS if any(m in where for m in marks)), None)
        per_layer[layer or "other (builtins: isinstance, dict and list methods, ...)"] += tottime
        rows.append((tottime, calls, where))
    total = sum(per_layer.values())
    print(
        f"khod under cProfile: {n} unbatched preserve/unpreserve round trips from a raw client, "
        f"{n / wall:,.0f}/s while profiled; {total / n * 1e6:.0f} us of daemon time per request"
    )
    print(f"{'layer':58} {'us/request':>10}  share")
    for name, t in per_layer.items():
        print(f"{name:58} {t / n * 1e6:10.1f}  {t / total:5.1%}")
    print(f"\n{'function (top 25 by own time)':80} {'us/request':>10} {'calls/req':>9}")
    for tottime, calls, where in sorted(rows, reverse=True)[:25]:
        short = where.split("site-packages/")[-1].split("/khod/")[-1][-80:]
        print(f"{short:80} {tottime / n * 1e6:10.2f} {calls / n:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
