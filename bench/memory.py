"""Memory benchmark: a million folios allocated and freed, half a million restored, in one request each.

khod runs as a process on a sparse region in /dev/shm; the client sends
the requests the way a VMM or a database would at scale, packed (one
bytes array instead of a list), and decodes the replies into numpy arrays,
so the figures are the daemon's and the socket's, not a Python list's:

  alloc_folios(0, 2^20) and free_folios of them, on a 16 GiB region;
  restore_folios of 2^19 order-9 folios (1 TiB) in a successor, on a
  1.1 TiB region, after preserve_folios, finalize and handover.

Each figure is the best of ``--runs`` (the successor's restore happens once).

    python bench/memory.py [--json] [--runs N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import connect, khod_config, kill_all, show_log, start_khod
from khoclient import calls as C
from report import print_figures

MIB = 1 << 20


def config(d: Path, size: str) -> Path:
    return khod_config(d, size, name=f"khod-{size}.toml", region=f"region-{size}")


def raw(op: str, **args: Any) -> C.Call[Any]:
    return C.Call(op, args, lambda r: r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="khod-mem-", dir="/dev/shm"))
    fig: dict[str, Any] = {}
    procs = []
    try:
        cfg = config(d, "16G")
        khod = start_khod(cfg, d / "khod.log")
        procs.append(khod)
        sock = str(d / "khod.sock")
        n = 1 << 20
        allocs, frees = [], []
        with connect(sock, khod, session="db", persistent=True) as c:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                r = c.call(raw("alloc_folios", order=0, count=n, packed=True))
                t1 = time.perf_counter()
                phys = np.frombuffer(r["phys"], dtype="<u8")
                assert phys.size == n
                t2 = time.perf_counter()
                c.call(raw("free_folios", phys=phys.tobytes()))
                t3 = time.perf_counter()
                allocs.append(t1 - t0)
                frees.append(t3 - t2)
            c.call(raw("ping"))
        khod.terminate()
        khod.wait(60)
        fig["alloc_folios_1m_ms"] = round(min(allocs) * 1e3, 1)
        fig["free_folios_1m_ms"] = round(min(frees) * 1e3, 1)

        cfg = config(d, "1100G")
        khod = start_khod(cfg, d / "khod.log")
        procs.append(khod)
        m = 1 << 19  # 1 TiB of 2 MiB folios
        with connect(sock, khod, session="vmm", persistent=True) as c:
            r = c.call(raw("alloc_folios", order=9, count=m, packed=True))
            guest = np.frombuffer(r["phys"], dtype="<u8")
            c.call(raw("preserve_folios", phys=guest.tobytes(), orders=9))
            with connect(sock, khod) as op:
                t0 = time.perf_counter()
                op.finalize()
                fig["finalize_1tib_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
                op.handover()
        khod.wait(60)
        khod = start_khod(cfg, d / "khod.log")
        procs.append(khod)
        with connect(sock, khod, session="vmm", persistent=True) as c:
            t0 = time.perf_counter()
            r = c.call(raw("restore_folios", phys=guest.tobytes(), packed=True))
            fig["restore_folios_512k_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
            assert np.all(np.frombuffer(r["orders"], dtype=np.uint8) == 9)
    except BaseException:
        show_log(d / "khod.log")
        raise
    finally:
        kill_all(procs)
        shutil.rmtree(d, ignore_errors=True)
    print_figures(
        "khod memory benchmark: batches of folios in one request (packed)",
        fig,
        {
            "alloc_folios_1m_ms": ("<=", 100),
            "free_folios_1m_ms": ("<=", 100),
            "restore_folios_512k_ms": ("<=", 100),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
