"""Warm restart benchmark: the key-value store's warm start after a handover vs its cold start.

For each size (default 128 MiB and 1 GiB of keys and values, values of
200-4000 bytes), in one run, on this machine:

1. khod runs as a real process on a sparse region file in /dev/shm; the
   store (``python -m khoexamples.kvstore``) loads the data set into
   preserved memory and its log (on disk, in $TMPDIR), then khod is
   finalized and hands over, and a successor khod starts;
2. **warm**: a store process is started with ``--serve`` and waits, its
   interpreter started and modules imported. ``warm_start_ms`` is from
   writing its ``open`` request to reading the reply to the ``get`` sent
   right behind it: hello, ``get_prop``, ``restore_folios``, mmap, the
   superblock check and one get. Then every key is verified, the store
   preserves its folios again, and the next round hands over once more
   (``--rounds`` handovers, 5 by default; the median is the figure);
3. **cold**: the same measure for a store started with ``--serve --cold``:
   replay the log from disk into anonymous memory (read, scan and check
   every record, hash every live key, build the table), then one get.
   The page cache is warm (the log was just written; dropping all caches
   needs privileges this benchmark does not assume); ``cold_dropped_ms``
   repeats it once after fsync and ``posix_fadvise(DONTNEED)`` on the log,
   which drops that file's pages (``cold_dropped_cache_mib``: how much the
   page cache shrank, about the log's size when it worked).

``*_with_spawn_ms`` add the process start (interpreter and imports) to
either figure. ``warm_vs_cold`` divides the medians.

Last, ``vmm_restore_ms``: the example VMM with 1 TiB of guest memory in
2 MiB folios, from the successor khod's start to the guest memory restored
and mapped (``bench/vmm_restore.py``, ``--vmm-memory``).

    python bench/warm.py [--json] [--sizes 128M,1G] [--rounds 5] [--cold-rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import harness
import vmm_restore
from khoclient import Client
from report import print_figures

from khod.config import parse_size

KEY_BYTES = 14  # key-%010d
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def write_config(d: Path, region: int) -> Path:
    return harness.khod_config(d, f"{region >> 20}M", server="notifier_timeout_s = 60")


def start_khod(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """khod on ``cfg``, once its socket answers."""
    proc = harness.start_khod(cfg, log)
    harness.wait_for_socket(str(cfg.parent / "khod.sock"), proc, timeout=60, log=log)
    return proc


def handover(sock: str, khod: subprocess.Popen[bytes]) -> None:
    with Client(sock, timeout=600) as op:
        op.finalize()
        op.handover()
    khod.wait(120)


class Store:
    """A ``kvstore --serve`` process; requests are JSON lines on its stdin."""

    def __init__(self, argv: list[str], env: dict[str, str], errlog: IO[bytes]) -> None:
        self.spawned = time.perf_counter()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "khoexamples.kvstore", "--serve", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            env=env,
            text=True,
        )
        assert self.read() == {"ready": True}
        self.ready = time.perf_counter()

    def read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the store exited with {self.p.wait()}")
        msg: dict[str, Any] = json.loads(line)
        if msg.get("ok") is False:
            raise RuntimeError(f"the store refused: {msg['error']}")
        return msg

    def send(self, *reqs: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("".join(json.dumps(r) + "\n" for r in reqs))
        self.p.stdin.flush()

    def call(self, **req: Any) -> dict[str, Any]:
        self.send(req)
        return self.read()

    def start(self, key: str) -> tuple[float, float, dict[str, Any]]:
        """(ms from asking it to open to its first get answered, the same from spawn, open's reply)."""
        t0 = time.perf_counter()
        self.send({"op": "open"}, {"op": "get", "key": key})
        opened = self.read()
        got = self.read()
        t1 = time.perf_counter()
        if got.get("value") is None:
            raise RuntimeError(f"the first get of {key} found nothing")
        return (t1 - t0) * 1e3, (t1 - self.spawned) * 1e3, opened

    def quit(self) -> None:
        self.call(op="quit")
        self.p.wait(60)


def cached_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) >> 10 for x in f if x.startswith("Cached:"))


def drop_cached(path: str) -> int:
    """Ask the kernel to drop the file's pages; returns how much the page cache shrank (MiB)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        before = cached_mib()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return before - cached_mib()
    finally:
        os.close(fd)


def one_size(size: int, args: Any, tag: str) -> dict[str, Any]:
    lo, hi = args.value_lo, args.value_hi
    keys = size // ((lo + hi) // 2 + KEY_BYTES)
    shm = Path(tempfile.mkdtemp(prefix="khod-warm-", dir=SHM))
    disk = Path(tempfile.mkdtemp(prefix="khod-warm-log-"))
    cfg = write_config(shm, size + size // 4 + (256 << 20))
    sock = str(shm / "khod.sock")
    kvlog = str(disk / "kv.log")
    env = {**os.environ, "KHOD_SOCKET": sock, "PYTHONUNBUFFERED": "1"}
    data = ["--keys", str(keys), "--value-size", f"{lo}-{hi}", "--log", kvlog]
    probe = "key-0000000001"
    fig: dict[str, Any] = {f"keys_{tag}": keys}
    procs: list[subprocess.Popen[Any]] = []
    errlog = open(shm / "stores.log", "ab")  # noqa: SIM115 -- shared by every store process
    try:
        khod = start_khod(cfg, shm / "khod.log")
        procs.append(khod)
        t0 = time.perf_counter()
        loader = subprocess.Popen(
            [sys.executable, "-m", "khoexamples.kvstore", *data],
            stdout=subprocess.PIPE,
            stderr=errlog,
            env=env,
            text=True,
        )
        procs.append(loader)
        assert loader.stdout is not None
        rep = next(json.loads(x[7:]) for x in loader.stdout if x.startswith("report "))
        fig[f"load_s_{tag}"] = round(time.perf_counter() - t0, 1)
        fig[f"data_bytes_{tag}"] = os.path.getsize(kvlog)
        fig[f"segments_{tag}"] = rep["segments"]
        handover(sock, khod)
        loader.wait(60)

        warm, warm_spawn, opens = [], [], []
        for r in range(args.rounds):
            khod = start_khod(cfg, shm / "khod.log")
            procs.append(khod)
            st = Store(data, env, errlog)
            procs.append(st.p)
            ms, spawn_ms, opened = st.start(probe)
            if opened["mode"] != "warm":
                raise RuntimeError(f"round {r}: the store opened {opened['mode']}, not warm")
            warm.append(ms)
            warm_spawn.append(spawn_ms)
            opens.append(opened)
            check = st.call(op="verify")
            if check["keys_wrong"] or check["keys_served"] != keys:
                raise RuntimeError(f"round {r}: warm store lost keys: {check}")
            while not st.call(op="stats")["armed"]:
                time.sleep(0.01)
            if r + 1 < args.rounds:
                handover(sock, khod)
            st.quit()
        if khod.poll() is None:
            khod.terminate()
            khod.wait(60)

        cold, cold_spawn = [], []
        for r in range(args.cold_rounds):
            st = Store(["--cold", *data], env, errlog)
            procs.append(st.p)
            ms, spawn_ms, opened = st.start(probe)
            cold.append(ms)
            cold_spawn.append(spawn_ms)
            if r == 0:
                check = st.call(op="verify")
                if check["keys_wrong"] or check["keys_served"] != keys:
                    raise RuntimeError(f"the cold store lost keys: {check}")
            st.quit()
        fig[f"cold_dropped_cache_mib_{tag}"] = drop_cached(kvlog)
        st = Store(["--cold", *data], env, errlog)
        procs.append(st.p)
        dropped = st.start(probe)[0]
        st.quit()
    finally:
        harness.kill_all(procs)
        errlog.close()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)

    med = statistics.median
    fig[f"warm_start_ms_{tag}"] = round(med(warm), 2)
    fig[f"warm_start_ms_{tag}_range"] = f"{min(warm):.1f}-{max(warm):.1f}"
    for step in ("hello", "restore", "map"):  # parts of the warm start
        fig[f"warm_{step}_ms_{tag}"] = round(med(o[f"{step}_ms"] for o in opens), 2)
    fig[f"cold_start_ms_{tag}"] = round(med(cold), 1)
    fig[f"cold_start_ms_{tag}_range"] = f"{min(cold):.0f}-{max(cold):.0f}"
    fig[f"cold_dropped_ms_{tag}"] = round(dropped, 1)
    fig[f"warm_vs_cold_{tag}"] = round(med(cold) / med(warm), 1)
    fig[f"warm_start_with_spawn_ms_{tag}"] = round(med(warm_spawn), 1)
    fig[f"cold_start_with_spawn_ms_{tag}"] = round(med(cold_spawn), 1)
    fig[f"cold_page_cache_{tag}"] = "warm"
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--sizes", default="128M,1G", help="data set sizes, comma separated")
    ap.add_argument("--rounds", type=int, default=5, help="handovers (warm starts) per size")
    ap.add_argument("--cold-rounds", type=int, default=3, help="cold starts per size")
    ap.add_argument("--value-size", default="200-4000", help="value bytes LOW-HIGH")
    ap.add_argument(
        "--vmm-memory", default="1T", help="the VMM's guest memory for vmm_restore_ms ('' skips)"
    )
    args = ap.parse_args()
    lo, _, hi = args.value_size.partition("-")
    args.value_lo, args.value_hi = int(lo), int(hi or lo)
    sizes = [(s.strip(), parse_size(s.strip(), "--sizes")) for s in args.sizes.split(",")]
    fig: dict[str, Any] = {}
    for text, size in sizes:
        fig.update(one_size(size, args, text.lower().replace("i", "")))

    # ---------------------------------------------------------------- vmm_restore_ms
    # A VMM with 1 TiB of 2 MiB folios: successor start to guest memory restored
    # and mapped (bench/vmm_restore.py, which also runs on its own).
    if args.vmm_memory:
        fig.update(vmm_restore.measure(args.vmm_memory))

    targets: dict[str, tuple[str, float]] = {"vmm_restore_ms": ("<=", 1000)}
    tags = [t.lower().replace("i", "") for t, _ in sizes]
    if "1g" in tags:
        targets["warm_vs_cold_1g"] = (">=", 50)
        if "128m" in tags:
            fig["warm_1g_vs_128m"] = round(fig["warm_start_ms_1g"] / fig["warm_start_ms_128m"], 2)
            targets["warm_1g_vs_128m"] = ("<=", 2)
    print_figures(
        "kvstore warm start after a handover vs cold start from its log "
        "(warm: open request to first get answered; cold: page cache warm)",
        fig,
        targets,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
