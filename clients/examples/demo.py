"""``make demo``: the whole live-update story on a simulated region, with progress.

1. start khod on a temporary region (a sparse file on tmpfs);
2. start two workloads: a toy VMM (64 MiB of order-9 guest memory) and a
   key-value store (20,000 keys with values of 200-4000 bytes; its hash table
   and records in preserved order-9 folios, docs/kvstore.md); and, when a C
   compiler and msgpack-c are there, the C example (clients/c/examples): a
   table of counters written by a thread, built with libkhodclient;
3. finalize, showing the FINALIZE notifier phase as it happens;
4. hand over: the daemon exits and so do the workloads, as a kexec would end them;
5. start the successor daemon and both workloads again: they reattach,
   restore their memory in place and verify every byte and every key;
6. print a summary, then clean up every process and file -- also on Ctrl-C
   or failure. The exit status is non-zero if any verification failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from khoclient import Client, KhoError, ctl

CDIR = Path(__file__).resolve().parent.parent / "c"  # libkhodclient and its example
GUEST = "64M"
KEYS = 20000
VALUES = "200-4000"  # bytes, as bench/warm.py


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Proc:
    """A child process whose ``report`` lines are collected as they come."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log: Path | None = None
    ) -> None:
        self.name = name
        self.reports: list[dict[str, Any]] = []
        self._got = threading.Condition()
        out = open(log, "ab") if log else subprocess.PIPE  # noqa: SIM115 -- handed to the child
        self.p = subprocess.Popen(
            argv,
            stdout=out if log else subprocess.PIPE,
            stderr=subprocess.STDOUT if log else None,
            env=env,
        )
        if log:
            out.close()  # type: ignore[union-attr]
        else:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("report "):
                with self._got:
                    self.reports.append(json.loads(line[7:]))
                    self._got.notify_all()
            else:
                print(f"   {line}", flush=True)

    def wait_report(self, timeout: float) -> dict[str, Any]:
        with self._got:
            if not self._got.wait_for(lambda: self.reports or self.p.poll() is not None, timeout):
                raise TimeoutError(f"{self.name} did not report within {timeout:.0f} s")
            if not self.reports:
                raise RuntimeError(f"{self.name} exited with {self.p.returncode} before reporting")
            return self.reports[-1]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def build_c_example(work: Path) -> tuple[Path | None, str]:
    """The C workload (clients/c/examples), built for this run; or None and why not."""
    exe = work / "c" / "khod-counters"
    if not (CDIR / "Makefile").exists():
        return None, "clients/c is not here"
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        return None, "no C compiler"
    try:
        done = subprocess.run(
            ["make", "-s", "-C", str(CDIR), f"BUILD={work / 'c'}", str(exe)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return None, "building it took too long"
    if done.returncode != 0:
        return None, "it does not build here (msgpack-c missing? Debian: libmsgpack-dev)"
    return exe, ""


def main() -> int:
    work = Path(
        tempfile.mkdtemp(prefix="khod-demo-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    )
    sock = str(work / "khod.sock")
    cfg = work / "khod.toml"
    cfg.write_text(
        f'[region]\npath = "{work}/region"\nsize = "512M"\nscratch_size = "16M"\n'
        f'[server]\nsocket = "{sock}"\nnotifier_timeout_s = 10\n[metrics]\nlisten = ""\n'
    )
    env = {**os.environ, "KHOD_SOCKET": sock, "PYTHONUNBUFFERED": "1"}
    env.pop("KHOD_FAULT", None)
    py = sys.executable
    procs: list[Proc] = []

    def spawn(name: str, *argv: str, log: Path | None = None) -> Proc:
        p = Proc(name, [py, *argv], env, log)
        procs.append(p)
        return p

    def daemon(tag: str) -> Proc:
        log = work / f"khod-{tag}.log"
        d = spawn(f"khod ({tag})", "-m", "khod", "-c", str(cfg), log=log)
        deadline = time.monotonic() + 30
        while "event=ready" not in log.read_text(errors="replace"):
            if d.p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"khod ({tag}) did not start:\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.01)
        return d

    try:
        banner(f"start khod on a simulated 512 MiB region ({work}/region)")
        old = daemon("first")
        print("   khod is ready", flush=True)

        banner(
            f"start the workloads: a VMM with {GUEST} of guest memory, a KV store with {KEYS:,} keys"
        )
        vmm = spawn("vmm", "-m", "khoexamples.vmm", "--memory", GUEST)
        kv = spawn(
            "kvstore",
            "-m",
            "khoexamples.kvstore",
            "--keys",
            str(KEYS),
            "--value-size",
            VALUES,
            "--log",
            str(work / "kv.log"),
        )
        vmm.wait_report(60)
        kv.wait_report(60)

        cexe, why_not = build_c_example(work)
        counters: Proc | None = None
        if cexe is None:
            print(f"   (the C workload is left out: {why_not})", flush=True)
        else:
            banner("start a C workload: khod-counters (libkhodclient), 4 MiB of counters")
            counters = Proc("counters", [str(cexe), "run", "-m", "4", "-w", "1"], env)
            procs.append(counters)
            ready = counters.wait_report(30)
            print(
                f"   {ready['buckets']:,} buckets in {ready['folios']} preserved 2 MiB folios,"
                " one writer thread counting into them",
                flush=True,
            )

        banner("khoctl status")
        ctl.run(["--socket", sock, "status"])

        banner("khoctl finalize (watch the FINALIZE notifier phase)")
        if ctl.run(["--socket", sock, "finalize"]) != 0:
            raise RuntimeError("finalize failed")

        banner("khoctl handover: the daemon exits, and the workloads with it (as a kexec would)")
        with Client(sock) as op:
            gen = op.handover()["generation"]
        handed_over = time.time()
        print(f"   handed over generation {gen}", flush=True)
        old.p.wait(30)
        for p in (vmm, kv, *([counters] if counters else [])):
            p.p.wait(30)

        banner("start the successor daemon and the workloads again")
        new = daemon("successor")
        print(
            "   "
            + next(
                line
                for line in (work / "khod-successor.log").read_text().splitlines()
                if "event=start" in line
            ),
            flush=True,
        )
        vmm2 = spawn("vmm (successor)", "-m", "khoexamples.vmm", "--once")
        rv = vmm2.wait_report(60)
        # one after the other, so the store's warm start is not timed against
        # the VMM's interpreter start on the same two cores
        kv2 = spawn(
            "kvstore (successor)",
            "-m",
            "khoexamples.kvstore",
            "--once",
            "--keys",
            str(KEYS),
            "--value-size",
            VALUES,
            "--log",
            str(work / "kv.log"),
        )
        rk = kv2.wait_report(60)
        vmm2.p.wait(30)
        kv2.p.wait(30)
        rc: dict[str, Any] | None = None
        if counters is not None and cexe is not None:
            counters2 = Proc("counters (successor)", [str(cexe), "verify"], env)
            procs.append(counters2)
            rc = counters2.wait_report(30)
            rc["exit"] = counters2.p.wait(30)

        banner("summary")
        with Client(sock) as op:
            st = op.status()
        sessions = {s["name"]: s for s in st["sessions"]}
        first_restore = min(rv["first_restore_ts"], rk["first_restore_ts"])
        rows = [
            [
                "vmm",
                ctl.human(rv["guest_bytes"]),
                f"{rv['restore_ms']} ms",
                "checksum ok" if rv["checksum_ok"] else "CHECKSUM MISMATCH",
                rv["bytes_copied"],
            ],
            [
                "kvstore",
                ctl.human(sessions["kvstore"]["preserved_bytes"]),
                f"{rk['warm_start_ms']} ms",
                f"{rk['keys_served']:,}/{KEYS:,} keys ok",
                rk["bytes_copied"],
            ],
        ]
        if rc is not None:
            rows.append(
                [
                    "counters (C)",
                    ctl.human(rc["bytes"]),
                    f"{rc['restore_ms']} ms",
                    "checksum ok" if rc["ok"] else "CHECKSUM MISMATCH",
                    0,
                ]
            )
        ctl.table(rows, ["SESSION", "PRESERVED", "RESTORE", "VERIFIED", "BYTES COPIED"], sys.stdout)
        print(
            f"   blackout, handover to first restore in the successor: {(first_restore - handed_over) * 1e3:.0f} ms (interpreter start included)"
        )
        log_mib = (work / "kv.log").stat().st_size / (1 << 20)
        print(
            f"   kvstore warm start {rk['warm_start_ms']} ms (hello, restore_folios, map, first get)"
            f" vs cold start {rk['cold_start_ms']} ms (replay of its {log_mib:.0f} MiB log,"
            f" page cache warm): {rk['warm_vs_cold']}x faster"
        )
        ok = (
            rv["checksum_ok"]
            and rk["keys_wrong"] == 0
            and vmm2.p.returncode == 0
            and kv2.p.returncode == 0
            and (rc is None or (rc["ok"] is True and rc["exit"] == 0))
        )
        new.stop()
        print(
            "\ndemo ok: every byte and every key survived the handover"
            if ok
            else "\ndemo FAILED: a verification did not hold",
            flush=True,
        )
        return 0 if ok else 1
    except (KhoError, RuntimeError, TimeoutError) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
