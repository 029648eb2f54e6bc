"""Daemon benchmark: round trips against an echo floor, batches, finalize, successor blackout.

In one run, on this machine:

* the transport floor: bench/echo.py, a bare trio server echoing msgpack frames
  over the same kind of Unix socket, driven by the same client library;
* khod, started as a real process on a sparse region file on tmpfs:
  - unbatched preserve_folio + unpreserve_folio round trips per second, one
    client and 8 concurrent client processes (each call is one round trip);
  - one batched preserve_folios call of 1M order-0 folios (folios/s);
  - finalize with 64 GiB of order-0 folios (16M) preserved;
  - the successor's blackout: from spawning the new daemon process to its
    first successful restore_folio, interpreter start included.

    python bench/rpc.py [--json] [--seconds S]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from khoclient import Client, KhoError
from khoclient import calls as C
from report import print_figures

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
REGION = 72 * GIB  # 64 GiB preserved + room for scratch, metadata, allocations


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            Client(path, timeout=5).close()
            return
        except KhoError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(path) from None
            time.sleep(0.005)


def rate(fn: Callable[[], None], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= end:
            return n / (now - t0)


def one_client(path: str, seconds: float, kind: str, name: str) -> float:
    with Client(path, session=name if kind == "khod" else None) as c:
        if kind == "echo":
            ping = C.ping()
            return rate(lambda: c.call(ping), seconds)
        f = c.alloc_folio(0)
        state = [False]

        def flip() -> None:
            if state[0]:
                c.unpreserve_folio(f.phys, 0)
            else:
                c.preserve_folio(f.phys, 0)
            state[0] = not state[0]

        return rate(flip, seconds)


def _worker(path: str, seconds: float, kind: str, name: str, start: Any, out: Any) -> None:
    start.wait()
    out.put(one_client(path, seconds, kind, name))


def many_clients(path: str, seconds: float, kind: str, n: int = 8) -> float:
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(path, seconds, kind, f"b{i}", start, out))
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


def write_config(d: Path) -> Path:
    cfg = d / "khod.toml"
    cfg.write_text(
        f'[region]\npath = "{d}/region"\nsize = "{REGION >> 30}G"\nscratch_size = "64M"\n'
        f'[server]\nsocket = "{d}/khod.sock"\n[metrics]\nlisten = ""\n'
        '[limits]\nuid_max_bytes = "100%"\n[logging]\nlevel = "warning"\n'
    )
    return cfg


def start_khod(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "khod", "-c", str(cfg)], stdout=out, stderr=subprocess.STDOUT
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument(
        "--seconds", type=float, default=3.0, help="duration of each round-trip measurement"
    )
    args = ap.parse_args()
    d = Path(
        tempfile.mkdtemp(prefix="khod-rpc-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    fig: dict[str, Any] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # ---------------------------------------------------------------- the floor
        echo_sock = str(d / "echo.sock")
        echo = subprocess.Popen(
            [sys.executable, str(HERE / "echo.py"), echo_sock], stdout=subprocess.DEVNULL
        )
        procs.append(echo)
        wait_for_socket(echo_sock, echo)
        fig["echo_rtt_per_s"] = round(one_client(echo_sock, args.seconds, "echo", ""))
        fig["echo_rtt_per_s_8clients"] = round(many_clients(echo_sock, args.seconds, "echo"))
        echo.terminate()
        echo.wait()

        # ---------------------------------------------------------------- khod
        cfg = write_config(d)
        log = d / "khod.log"
        khod = start_khod(cfg, log)
        procs.append(khod)
        sock = str(d / "khod.sock")
        wait_for_socket(sock, khod)
        fig["preserve_rtt_per_s"] = round(one_client(sock, args.seconds, "khod", "solo"))
        fig["preserve_rtt_per_s_8clients"] = round(many_clients(sock, args.seconds, "khod"))
        fig["preserve_rtt_vs_echo"] = round(fig["preserve_rtt_per_s"] / fig["echo_rtt_per_s"], 3)
        fig["preserve_rtt_vs_echo_8clients"] = round(
            fig["preserve_rtt_per_s_8clients"] / fig["echo_rtt_per_s_8clients"], 3
        )

        with Client(sock, session="bulk", persistent=True, timeout=300) as c:
            big = c.alloc_folios(18, 64)  # 64 GiB, as 1 GiB folios
            pfns = np.concatenate(
                [np.arange(f.phys, f.phys + GIB, 4096, dtype=np.uint64) for f in big]
            )
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
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)

    targets = {
        "preserve_rtt_vs_echo": (">=", 0.5),
        "batched_preserve_folios_per_s": (">=", 2_000_000),
        "finalize_ms": ("<=", 250),
        "successor_first_restore_ms": ("<=", 1500),
    }
    print_figures(
        "khod rpc benchmark (floor: bench/echo.py on the same kind of socket)",
        fig,
        targets,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
