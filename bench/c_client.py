"""C client benchmark: libkhodclient beside the Python client and the transport floor.

In one run, on this machine:

* builds clients/c (plain -O2) into a temporary directory;
* the floor: ping round trips against bench/echo.py (a bare trio msgpack echo
  server on the same kind of Unix socket), from C and from the Python client;
* khod, started as a real process on a sparse 8 GiB region file on tmpfs:
  - unbatched preserve_folio + unpreserve_folio round trips per second, one
    client, from C and from Python;
  - one batched preserve_folios call of 1M order-0 folios (folios/s, best and
    median of several calls), from C and from Python.

    python bench/c_client.py [--json] [--seconds S] [--repeats N]

Without a C compiler or msgpack-c (Debian: libmsgpack-dev) it says so and
prints no figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import khod_config, kill_all, rate, start_khod, wait_for_socket
from khoclient import Client
from khoclient import calls as C
from report import print_figures

HERE = Path(__file__).resolve().parent
CDIR = HERE.parent / "clients" / "c"
BATCH = 1 << 20
GIB = 1 << 30


def build(out: Path) -> str | None:
    """Build the C client's programs into ``out``; why not, or None."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None or shutil.which("make") is None:
        return f"no C compiler ({cc}) or make"
    done = subprocess.run(
        ["make", "-s", "-j2", "-C", str(CDIR), f"BUILD={out}", f"CC={cc}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return f"the C client does not build here (msgpack-c missing?):\n{done.stderr[-2000:]}"
    return None


def c_figures(bench: Path, *args: str) -> dict[str, Any]:
    """Run the C benchmark program; its last line is a JSON object."""
    done = subprocess.run([str(bench), *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def py_ping(path: str, seconds: float) -> float:
    with Client(path) as c:
        ping = C.ping()
        return rate(lambda: c.call(ping), seconds)


def py_preserve_rtt(path: str, seconds: float) -> float:
    with Client(path, session="pybench-rtt") as c:
        f = c.alloc_folio(0)
        state = [False]

        def flip() -> None:
            if state[0]:
                c.unpreserve_folio(f.phys, 0)
            else:
                c.preserve_folio(f.phys, 0)
            state[0] = not state[0]

        return rate(flip, seconds)


def py_batch(path: str, repeats: int) -> tuple[float, float]:
    with Client(path, session="pybench-batch", timeout=600) as c:
        big = c.alloc_folios(18, BATCH * 4096 // GIB)
        pfns = np.concatenate([np.arange(f.phys, f.phys + GIB, 4096, dtype=np.uint64) for f in big])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            assert c.preserve_folios(pfns, 0) == BATCH
            times.append(time.perf_counter() - t0)
            c.unpreserve_folios(pfns, 0)
        c.free_folios([f.phys for f in big])
        return BATCH / min(times), BATCH / float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--seconds", type=float, default=2.0, help="each round-trip measurement")
    ap.add_argument("--repeats", type=int, default=5, help="batched preserve calls to time")
    args = ap.parse_args()
    d = Path(
        tempfile.mkdtemp(prefix="khod-cb-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    procs: list[subprocess.Popen[bytes]] = []
    fig: dict[str, Any] = {}
    try:
        why = build(d / "build")
        if why:
            print(f"C client benchmark skipped: {why}")
            return 0
        bench = d / "build" / "khod-c-bench"
        secs = str(args.seconds)

        # ---------------------------------------------------------------- the floor
        echo_sock = str(d / "echo.sock")
        echo = subprocess.Popen(
            [sys.executable, str(HERE / "echo.py"), echo_sock], stdout=subprocess.DEVNULL
        )
        procs.append(echo)
        wait_for_socket(echo_sock, echo)
        fig["echo_rtt_per_s_c"] = round(c_figures(bench, "ping", echo_sock, secs)["ping_rtt_per_s"])
        fig["echo_rtt_per_s_python"] = round(py_ping(echo_sock, args.seconds))
        echo.terminate()
        echo.wait()

        # ---------------------------------------------------------------- khod
        khod = start_khod(khod_config(d, "16G", scratch="16M"), d / "khod.log")
        procs.append(khod)
        sock = str(d / "khod.sock")
        wait_for_socket(sock, khod)
        rtt = c_figures(bench, "rtt", sock, secs)["preserve_rtt_per_s"]
        fig["preserve_rtt_per_s_c"] = round(rtt)
        fig["preserve_rtt_per_s_python"] = round(py_preserve_rtt(sock, args.seconds))
        fig["preserve_rtt_c_vs_echo_c"] = round(rtt / fig["echo_rtt_per_s_c"], 3)
        fig["preserve_rtt_c_vs_python"] = round(rtt / fig["preserve_rtt_per_s_python"], 2)
        batch = c_figures(bench, "batch", sock, str(BATCH), str(args.repeats))
        fig["batched_preserve_folios"] = BATCH
        fig["batched_preserve_folios_per_s_c"] = round(batch["batched_preserve_folios_per_s"])
        fig["batched_preserve_folios_per_s_c_median"] = round(
            batch["batched_preserve_folios_per_s_median"]
        )
        best, median = py_batch(sock, args.repeats)
        fig["batched_preserve_folios_per_s_python"] = round(best)
        fig["batched_preserve_folios_per_s_python_median"] = round(median)
        khod.terminate()
        khod.wait(60)
    finally:
        kill_all(procs)
        shutil.rmtree(d, ignore_errors=True)

    targets = {
        "preserve_rtt_c_vs_python": (">=", 1.0),
        "batched_preserve_folios_per_s_c": (">=", 2_000_000),
    }
    print_figures(
        "libkhodclient benchmark (floor: bench/echo.py on the same kind of socket)",
        fig,
        targets,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
