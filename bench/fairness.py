"""Fairness benchmark: how long a bystander's ping waits behind the heaviest legal requests.

In one run, on this machine: khod as a real process on a sparse region; a
bystander process pinging it back to back on its own connection, recording
when each ping was sent and answered; and one client making, one after the
other, the heaviest requests a session may make (1M folios per batch, the
largest the default configuration takes, sent packed, and answered as numpy
arrays, so that the client's own decoding is not the third busy process):

  alloc_folios(0, 1M), preserve_folios, unpreserve_folios,
  preserve_phys_ranges of 1M one-page ranges, unpreserve_phys_ranges,
  free_folios, status, finalize and unfreeze with 1M folios preserved,
  then, in a successor, restore_folios of 1M folios.

For each request it reports how long it took and the longest any of the
bystander's pings took while it ran (``worst_bystander_ms`` is the worst of
them). The floor is the bystander's median ping while nothing else runs.

    python bench/fairness.py [--json] [--count N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import connect, khod_config, kill_all, show_log, start_khod
from khoclient import Client, KhoError
from khoclient import calls as C
from report import print_figures

GIB = 1 << 30


def write_config(d: Path) -> Path:
    return khod_config(d, "16G")


def bystander(sock: str, stop: Any, out: Any) -> None:
    """Ping back to back until told to stop; send (sent, answered) pairs back."""
    pings: list[tuple[float, float]] = []
    with Client(sock, session="bystander") as c:
        ping = C.ping()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                c.call(ping)
            except KhoError:  # the daemon handed over and left
                break
            pings.append((t0, time.perf_counter()))
    out.put(pings)


def run_bystander(sock: str) -> tuple[Any, Any, Any]:
    ctx = mp.get_context("fork")
    stop, out = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=bystander, args=(sock, stop, out))
    p.start()
    return p, stop, out


def worst_during(pings: list[tuple[float, float]], t0: float, t1: float) -> float:
    """The longest ping that was waiting at some moment of ``[t0, t1]``, in ms."""
    waits = [b - a for a, b in pings if a <= t1 and b >= t0]
    return round(max(waits, default=0.0) * 1e3, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--count", type=int, default=1 << 20, help="folios per heavy request")
    args = ap.parse_args()
    n = args.count
    d = Path(tempfile.mkdtemp(prefix="khod-fair-", dir="/dev/shm"))
    fig: dict[str, Any] = {}
    windows: dict[str, tuple[float, float]] = {}
    procs: list[subprocess.Popen[bytes]] = []

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        t1 = time.perf_counter()
        windows[name] = (t0, t1)
        fig[f"{name}_ms"] = round((t1 - t0) * 1e3, 1)
        return result

    try:
        cfg, log = write_config(d), d / "khod.log"
        khod = start_khod(cfg, log)
        procs.append(khod)
        sock = str(d / "khod.sock")
        connect(sock, khod).close()
        by, stop, out = run_bystander(sock)
        time.sleep(1.0)  # the floor: pings with nothing else running
        quiet = (time.perf_counter() - 1.0, time.perf_counter())
        with connect(sock, khod, session="heavy", persistent=True) as c:
            phys = timed("alloc_folios", lambda: c.call(C.alloc_folio_array(0, n)))
            timed("preserve_folios", lambda: c.preserve_folios(phys, 0))
            timed("unpreserve_folios", lambda: c.unpreserve_folios(phys, 0))
            r = n - 1024  # as many ranges as fit in one frame (16 bytes each)
            sizes = np.full(r, 4096, dtype=np.uint64)
            ranges = {"phys": phys[:r].tobytes(), "sizes": sizes.tobytes()}
            timed(
                "preserve_phys_ranges",
                lambda: c.call(C.Call("preserve_phys_ranges", ranges, lambda r: r)),
            )
            timed(
                "unpreserve_phys_ranges",
                lambda: c.call(C.Call("unpreserve_phys_ranges", ranges, lambda r: r)),
            )
            spare = c.call(C.alloc_folio_array(0, n))  # a second million, to free
            timed("free_folios", lambda: c.free_folios(spare))
            timed("status", c.status)
            c.preserve_folios(phys, 0)
            with connect(sock, khod) as op:
                timed("finalize", op.finalize)
                timed("unfreeze", op.unfreeze)
                stop.set()  # the bystander's part of this daemon ends here
                op.finalize()
                op.handover()
        khod.wait(60)
        pings = out.get(timeout=60)
        by.join()

        khod = start_khod(cfg, log)  # the successor
        procs.append(khod)
        connect(sock, khod).close()
        by, stop, out = run_bystander(sock)
        time.sleep(0.3)
        with connect(sock, khod, session="heavy", persistent=True) as c:
            timed("restore_folios", lambda: c.call(C.restore_folio_orders(phys)))
        stop.set()
        pings += out.get(timeout=60)
        by.join()
    except BaseException:
        show_log(d / "khod.log")
        raise
    finally:
        kill_all(procs)
        shutil.rmtree(d, ignore_errors=True)

    floor = [b - a for a, b in pings if quiet[0] <= a and b <= quiet[1]]
    fig["folios_per_request"] = n
    fig["bystander_floor_ms"] = round(float(np.median(floor)) * 1e3, 3)
    for name, (t0, t1) in windows.items():
        fig[f"{name}_worst_bystander_ms"] = worst_during(pings, t0, t1)
    fig["worst_bystander_ms"] = max(v for k, v in fig.items() if k.endswith("_worst_bystander_ms"))
    print_figures(
        "khod fairness benchmark: a bystander's ping behind the heaviest legal requests",
        fig,
        {"worst_bystander_ms": ("<=", 50)},
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
