"""Blackout benchmark: from the predecessor's handover reply to the successor's first restore.

A workload that keeps running across a daemon update (a VMM, a database)
sees a blackout: from the moment the operator's ``handover`` is answered
until the successor answers its first ``restore_folio``. In one run, on
this machine, each trial builds the same realistic handover -- two
persistent sessions, ``vmm`` with 2,048 order-9 folios (4 GiB) and ``db``
with 6,144 order-0 folios plus a small KHO tree -- on a sparse region file
on tmpfs, finalizes, hands over, and measures that blackout for

* a **cold** successor: a plain ``khod`` spawned once the predecessor has
  exited (what ``systemctl restart`` does), interpreter start and imports
  included;
* a **standby** successor: ``khod --standby`` started beforehand, which
  waits on the region's lock and takes over the moment the predecessor lets
  go of it;

each with metrics off and with metrics served (the packaged default, on an
ephemeral port here), trials interleaved so all four see the same machine.

The workload is this process: it stays connected through the handover,
then reconnects (polling every 0.5 ms) and restores its first folio. Also
reported: the cold successor's time from exec to READY (``READY=1`` on a
``$NOTIFY_SOCKET`` this process listens on), the predecessor's time from
the handover reply to letting go of the region's lock (the standby's
signal) and to its process being reaped, and, as floors, the wall time of
``python -c pass``, of importing khod's dependencies (trio, numpy, msgpack,
fdt) and of importing ``khod.main``. The khod sources are byte-compiled
first, as a package install does, so no trial pays for compiling them.

``--baseline REV`` adds cold trials of another revision (``git archive``d
into a temporary directory), predecessor and successor alike, and of this
tree, both started by the same launcher (which bypasses the editable
install's import hook so either tree can be imported): same run, same
machine, so ``cold_vs_baseline`` is a fair ratio.

    python bench/blackout.py [--json] [--trials N] [--baseline REV]
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from harness import khod_config, kill_all
from khoclient import Client, KhoError
from report import print_figures

ROOT = Path(__file__).resolve().parent.parent
VMM_FOLIOS, VMM_ORDER = 2048, 9
DB_FOLIOS = 6144
POLL_S = 0.0005
# Runs ``python -m khod`` from the source tree given as first argument, whatever the
# editable install maps ``khod`` to.
LAUNCH = (
    "import runpy, sys; root = sys.argv.pop(1); "
    "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]; "
    "sys.path.insert(0, root); runpy.run_module('khod', run_name='__main__', alter_sys=True)"
)


def write_config(d: Path, metrics: bool) -> Path:
    listen = "127.0.0.1:0" if metrics else ""
    return khod_config(d, "8G", scratch="16M", metrics=listen, level="info")


class Notify:
    """A ``$NOTIFY_SOCKET`` of our own: when each READY=1 arrived, and from whom."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def wait(
        self, pid: int, what: str, proc: subprocess.Popen[bytes], timeout: float = 60
    ) -> float:
        """perf_counter time at which ``pid`` sent a datagram containing ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                if proc.poll() is not None:
                    raise RuntimeError(f"khod exited {proc.returncode} before {what}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(what) from None
                continue
            at = time.perf_counter()
            sender = next(
                (
                    int.from_bytes(d[:4], sys.byteorder)
                    for lvl, typ, d in anc
                    if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS
                ),
                None,
            )
            if sender == pid and what.encode() in data.split(b"\n"):
                return at

    def close(self) -> None:
        self.sock.close()


@dataclass
class Trial:
    blackout_ms: float
    lock_released_ms: float | None  # predecessor: handover reply -> lock released
    predecessor_exit_ms: float  # predecessor: handover reply -> its process reaped (cold)
    exec_to_ready_ms: float | None  # cold successor only


class Bench:
    def __init__(self, d: Path, metrics: bool, tree: Path | None = None) -> None:
        """Trials in ``d``; khod as installed, or from source ``tree`` through :data:`LAUNCH`."""
        self.d = d
        self.cfg = write_config(d, metrics)
        self.sock = str(d / "khod.sock")
        self.notify = Notify(str(d / "notify.sock"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.khod = ["-m", "khod"] if tree is None else ["-c", LAUNCH, str(tree)]

    def spawn(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, NOTIFY_SOCKET=self.notify.path)
        with open(self.d / log, "ab") as out:
            p = subprocess.Popen(
                [sys.executable, *self.khod, "-c", str(self.cfg), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(p)
        return p

    def connect(self, session: str, proc: subprocess.Popen[bytes]) -> Client:
        """Poll until the daemon answers ``hello`` for ``session``."""
        while True:
            try:
                return Client(self.sock, session=session, persistent=True, timeout=60)
            except KhoError:
                if proc.poll() is not None:
                    raise RuntimeError(f"khod exited {proc.returncode}") from None
                time.sleep(POLL_S)

    def trial(self, standby: bool) -> Trial:
        region = self.d / "region"
        region.unlink(missing_ok=True)
        shutil.rmtree(self.d / "region.sessions", ignore_errors=True)
        pred = self.spawn(log="predecessor.log")
        self.notify.wait(pred.pid, "READY=1", pred)
        vmm = self.connect("vmm", pred)
        db = self.connect("db", pred)
        big = vmm.alloc_folios(VMM_ORDER, VMM_FOLIOS)
        vmm.preserve_folios(np.array([f.phys for f in big], dtype=np.uint64), VMM_ORDER)
        small = db.alloc_folios(0, DB_FOLIOS)
        db.preserve_folios(np.array([f.phys for f in small], dtype=np.uint64), 0)
        for i in range(16):
            db.add_node(f"/table{i}")
            db.add_prop(f"/table{i}", "root", (i * 4096).to_bytes(8, "little"))
        first = big[0].phys
        succ = None
        if standby:
            succ = self.spawn("--standby", log="standby.log")
            self.notify.wait(succ.pid, "READY=1", succ)  # standing by
        with Client(self.sock, timeout=60) as op:
            op.finalize()
            op.handover()
            t0 = time.perf_counter()  # the reply is in; the operator's close is not counted
        lock_at = ready_ms = None
        if succ is None:  # cold: started once the predecessor is gone, as systemctl restart does
            lock_at = self._wait_lock_free(region)
            pred.wait(30)
            exit_at = t_exec = time.perf_counter()
            succ = self.spawn(log="successor.log")
        c = self.connect("vmm", succ)  # the workload reconnects as soon as it can
        c.restore_folio(first)
        t1 = time.perf_counter()
        if not standby:
            ready_ms = (self.notify.wait(succ.pid, "READY=1", succ) - t_exec) * 1e3
        else:
            pred.wait(30)
            exit_at = time.perf_counter()
        for client in (c, vmm, db):
            client.close()
        succ.terminate()
        succ.wait(30)
        return Trial(
            blackout_ms=(t1 - t0) * 1e3,
            lock_released_ms=None if lock_at is None else (lock_at - t0) * 1e3,
            predecessor_exit_ms=(exit_at - t0) * 1e3,
            exec_to_ready_ms=ready_ms,
        )

    @staticmethod
    def _wait_lock_free(region: Path) -> float:
        """When the predecessor let go of the region's lock (a blocking flock, here)."""
        fd = os.open(region, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            at = time.perf_counter()
            fcntl.flock(fd, fcntl.LOCK_UN)
            return at
        finally:
            os.close(fd)

    def close(self) -> None:
        kill_all(self.procs)
        self.notify.close()


def wall_ms(code: str, n: int) -> float:
    """Median wall ms of ``python -c code``: a floor every cold start pays.

    With OPENBLAS_NUM_THREADS=1, as khod.main sets before it imports numpy.
    """
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def export(rev: str, into: Path) -> Path:
    """The ``khod`` package of revision ``rev``, byte-compiled, under ``into``."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "khod"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    compileall.compile_dir(into / "khod", quiet=1)
    return into


def summary(values: list[float]) -> tuple[float, float, float]:
    return round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--trials", type=int, default=5, help="trials of each kind (default 5)")
    ap.add_argument("--baseline", metavar="REV", help="also cold trials of git revision REV")
    args = ap.parse_args()
    compileall.compile_dir(ROOT / "khod", quiet=1)
    root = Path(
        tempfile.mkdtemp(prefix="khod-bo-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    benches: dict[tuple[str, str], Bench] = {}  # (who, suffix)
    runs: dict[tuple[str, str], list[Trial]] = {}  # (kind, suffix)
    try:
        trees: dict[str, Path | None] = {"": None}
        if args.baseline:
            trees["launched_"] = ROOT
            trees["baseline_"] = export(args.baseline, root / "baseline")
        for who, tree in trees.items():
            for suffix, metrics in (("", False), ("_metrics", True)):
                d = root / f"{who}m{int(metrics)}"
                d.mkdir()
                benches[(who, suffix)] = Bench(d, metrics, tree)
        for _ in range(args.trials):  # interleaved, so every kind sees the same machine
            for (who, suffix), bench in benches.items():
                for kind in ("cold", "standby") if not who else ("cold",):
                    t = bench.trial(standby=kind == "standby")
                    runs.setdefault((who + kind, suffix), []).append(t)
    except BaseException:
        for log in sorted(root.glob("*m[01]/*.log")):
            print(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
        raise
    finally:
        for bench in benches.values():
            bench.close()
        shutil.rmtree(root, ignore_errors=True)

    fig: dict[str, Any] = {"trials": args.trials}
    for (kind, suffix), trials in sorted(runs.items()):
        lo, med, hi = summary([t.blackout_ms for t in trials])
        fig[f"{kind}_blackout_ms{suffix}"] = med
        fig[f"{kind}_blackout_ms{suffix}_range"] = f"{lo}-{hi}"
        if kind.endswith("cold"):
            fig[f"{kind}_exec_to_ready_ms{suffix}"] = summary(
                [t.exec_to_ready_ms or 0.0 for t in trials]
            )[1]
    if args.baseline:
        fig["baseline"] = args.baseline
        for suffix in ("", "_metrics"):
            fig[f"cold_vs_baseline{suffix}"] = round(
                fig[f"launched_cold_blackout_ms{suffix}"]
                / fig[f"baseline_cold_blackout_ms{suffix}"],
                3,
            )
            fig[f"baseline_predecessor_exit_ms{suffix}"] = summary(
                [t.predecessor_exit_ms for t in runs[("baseline_cold", suffix)]]
            )[1]
    cold = runs[("cold", "")] + runs[("cold", "_metrics")]
    fig["predecessor_lock_released_ms"] = summary([t.lock_released_ms or 0.0 for t in cold])[1]
    fig["predecessor_exit_ms"] = summary([t.predecessor_exit_ms for t in cold])[1]
    fig["python_pass_ms"] = round(wall_ms("pass", 9), 1)
    fig["import_deps_ms"] = round(wall_ms("import trio, numpy, msgpack, fdt", 9), 1)
    fig["import_khod_main_ms"] = round(wall_ms("import khod.main", 9), 1)
    targets = {
        "standby_blackout_ms": ("<=", 50),
        "standby_blackout_ms_metrics": ("<=", 50),
        "cold_blackout_ms": ("<=", 250),
        "cold_blackout_ms_metrics": ("<=", 250),
    }
    print_figures(
        f"khod blackout benchmark: handover reply -> first restore_folio "
        f"(medians of {args.trials}; ranges are min-max; imports: median wall of 9, "
        "interpreter start included)",
        fig,
        targets,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
