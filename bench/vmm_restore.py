"""A VMM with 1 TiB of guest memory after a live update: successor start to guest mapped.

khod runs as a process on a sparse 1.1 TiB region in /dev/shm (nothing is
touched but what the VMM stamps). The example VMM (``khoexamples.vmm``)
allocates 1 TiB as 524,288 folios of 2 MiB, stamps a sample of them and
preserves them; the operator finalizes and hands over. Then, at the same
moment, the successor khod and the VMM again are started; the figure is
from that moment until the VMM has restored every folio and mapped its
guest memory (it then checks its sample checksum, reported too).

    python bench/vmm_restore.py [--json] [--memory 1T]
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

from harness import connect, khod_config, kill_all, show_log, start_khod
from report import print_figures

from khod.config import parse_size

VMM = [sys.executable, "-m", "khoexamples.vmm"]


def config(d: Path, region: str) -> Path:
    return khod_config(d, region)


def report_of(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("report ")]
    if not lines:
        raise RuntimeError(f"the VMM reported nothing:\n{out[-2000:]}")
    return json.loads(lines[-1][len("report ") :])  # type: ignore[no-any-return]


def measure(memory: str = "1T") -> dict[str, Any]:
    """One live update of a VMM with ``memory`` of guest memory; its figures."""
    region = str((parse_size(memory, "--memory") * 11 // 10 >> 30) + 1 << 30)
    d = Path(tempfile.mkdtemp(prefix="khod-vmm-", dir="/dev/shm"))
    cfg, log = config(d, region), d / "khod.log"
    sock = str(d / "khod.sock")
    env = {**os.environ, "KHOD_SOCKET": sock}
    procs: list[subprocess.Popen[Any]] = []
    try:
        khod = start_khod(cfg, log)
        procs.append(khod)
        connect(sock, khod).close()
        vmm = subprocess.Popen(
            [*VMM, "--memory", memory, "--once", "--socket", sock],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        procs.append(vmm)
        assert vmm.stdout is not None
        for line in vmm.stdout:  # started: its memory is preserved and it is subscribed
            if line.startswith("report "):
                break
        with connect(sock, khod) as op:
            op.finalize()
            op.handover()
        khod.wait(60)
        vmm.wait(60)
        t0 = time.time()
        khod = start_khod(cfg, log)
        procs.append(khod)
        resumed = subprocess.run(
            [*VMM, "--once", "--socket", sock, "--wait", "60"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        rv = report_of(resumed.stdout)
        if resumed.returncode != 0 or not rv.get("checksum_ok"):
            raise RuntimeError(f"the VMM did not verify its memory:\n{resumed.stderr[-2000:]}")
        return {
            "vmm_guest_bytes": rv["guest_bytes"],
            "vmm_folios": rv["folios"],
            "vmm_restore_ms": round((rv["mapped_ts"] - t0) * 1e3, 1),
            "vmm_restore_folios_ms": rv["restore_ms"],
            "vmm_first_restore_ms": round((rv["first_restore_ts"] - t0) * 1e3, 1),
        }
    except BaseException:
        show_log(log)
        raise
    finally:
        kill_all(procs)
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--memory", default="1T", help="guest memory (the region is 10%% larger)")
    args = ap.parse_args()
    fig = measure(args.memory)
    print_figures(
        "khod VMM benchmark: successor start to 1 TiB of guest memory restored and mapped",
        fig,
        {"vmm_restore_ms": ("<=", 1000)},
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
