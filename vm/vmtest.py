"""``make vm-test``: khod keeps both workloads' memory across real kexecs of Linux.

    python -m vm.vmtest [--cache DIR] [--accel auto|kvm|tcg] [--timeout S] [--keep]

Builds a Debian guest (``vm/base.py``, ``vm/vmimage.py``), boots it under
QEMU with 256 MiB reserved by ``memmap=`` at 4 GiB, and follows the plan of
``vm/guest/vmguest.py`` -- the deployment of the README under systemd, three
kexecs of the same kernel, every byte and key verified after the first two,
a corrupted third handover refused by name -- from the ``KHOD-VMTEST`` lines
the guest writes on its serial console. The host checks what those lines
report again, prints one line per phase with its timing and a last line
``vm-test: PASS ...`` or ``vm-test: FAIL ...``, and exits non-zero on any
failure, timeout or interruption. QEMU is always stopped and the per-run
files removed (``--keep`` keeps them); the serial log is kept.

Needs root (debootstrap, chroot) and qemu-system-x86, debootstrap and
e2fsprogs. KVM is used only if it boots a kernel (a probe with a timeout);
else TCG, on which a cold run takes about 6½ minutes here, a cached one 4-5.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from vm import base, vmimage

REPO = Path(__file__).resolve().parent.parent
REGION_BASE = 0x1_0000_0000  # RAM on the pc machine with -m 4G (0-3G and 4G-5G), not its top
REGION_SIZE = 256 << 20
MEMMAP = f"memmap={REGION_SIZE >> 20}M${REGION_BASE:#x}"  # an argv element: no shell eats the $
CMDLINE = (
    "console=ttyS0",
    "root=/dev/vda",
    "rw",
    "quiet",
    "panic=-1",  # a panic reboots, and -no-reboot turns that into QEMU exiting: seen at once
    "systemd.show_status=error",
    "tsc=reliable",  # TCG's TSC is steady; without this the kernel falls back to the HPET,
    # whose every read is an emulated device access (Python reads the clock a lot)
    MEMMAP,
)
PARAMS: dict[str, Any] = {  # /etc/khod-vmtest.json: what the guest driver checks against
    "base": REGION_BASE,
    "size": REGION_SIZE,
    "memmap": MEMMAP,
    "memory_group": "khodmem",
    "metrics": "127.0.0.1:9477",
    "vmm_bytes": 64 << 20,  # khod-vmm.service: --memory 64M
    "kv_keys": 10000,  # khod-kvstore.service: --keys 10000
    "corrupt_boot": 3,  # boots 1-3 hand over (generations 1, 2, 3); boot 3's is corrupted
    "fault": "too_many_entries",
}
BOOTS = PARAMS["corrupt_boot"] + 1
# a marker line; KHOD-VMTEST-LOG lines (journal dumps after a failure) may quote one
MARKER = re.compile(r"(?<![\w-])KHOD-VMTEST (\{.*\})\s*$")
GAP_S = 720.0  # longest the guest may go without a marker (the guest's own waits are shorter)
SHUTDOWN_S = 180.0  # from pass/fail to QEMU's exit (a poweroff)
PROBE_S = 30.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Failed(Exception):
    """The test failed; the message is the FAIL line's reason."""


class Interrupted(Exception):
    """SIGINT or SIGTERM: stop QEMU, keep the log, exit non-zero."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def say(text: str) -> None:
    print(f"vm-test: {text}", flush=True)


def load() -> str:
    """The host's load average: timings under TCG follow it (the machine is shared)."""
    return f"host load {os.getloadavg()[0]:.1f}"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# ----------------------------------------------------------------------------- QEMU


def qemu_argv(accel: str, kernel: Path, append: str, memory: str, extra: list[str]) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-machine",
        f"pc,accel={accel}",
        "-cpu",
        "max",  # numpy's wheels need SSE4.2 and friends; qemu64 lacks them
        "-smp",
        "2",
        "-m",
        memory,
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel),
        "-append",
        append,
        *extra,
    ]


def probe_kvm(kernel: Path) -> tuple[bool, str]:
    """Does KVM boot a kernel here? Boot it with no root until it panics, with a timeout.

    On some machines /dev/kvm is a nested hypervisor on which QEMU aborts or
    hangs (shared/reference/real-kexec.md); then TCG it is.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    argv = qemu_argv("kvm", kernel, "console=ttyS0 panic=-1 root=/dev/khod-vm-probe", "512M", [])
    try:
        r = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=PROBE_S,
        )
    except subprocess.TimeoutExpired:
        return False, f"a KVM guest did not reach its kernel panic within {PROBE_S:.0f} s"
    out = r.stdout.decode(errors="replace")
    if "Kernel panic" in out:
        return True, "a KVM guest booted its kernel"
    last = (out.strip().splitlines() or ["no output"])[-1]
    return False, f"QEMU with KVM exited {r.returncode}: {last[:160]}"


class Serial(threading.Thread):
    """Reads the guest's serial console: every line to the log, with host time, and a queue."""

    def __init__(self, proc: subprocess.Popen[bytes], log: TextIO, t0: float) -> None:
        super().__init__(daemon=True, name="serial")
        self.proc = proc
        self.log = log
        self.t0 = t0
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.recent: list[str] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            self.log.write(f"[{now - self.t0:8.2f}] {line}\n")
            self.log.flush()
            self.recent = [*self.recent[-29:], line]
            self.lines.put((now, line))
        self.lines.put(None)


def die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when this driver dies, even by SIGKILL."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def qemu(
    argv: list[str], log: TextIO, t0: float
) -> Iterator[tuple[subprocess.Popen[bytes], Serial]]:
    """QEMU running with its serial console read; stopped on the way out, whatever happens."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    serial = Serial(proc, log, t0)
    serial.start()
    try:
        yield proc, serial
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        serial.join(timeout=10)


# ----------------------------------------------------------------------------- the run


@dataclass
class Boot:
    n: int
    zero: float  # host time of the guest's CLOCK_MONOTONIC 0 (kernel start)
    userspace: float = 0.0  # guest CLOCK_MONOTONIC of systemd's start on the root file system
    cpus: str = "?"  # the guest's online CPUs, as /sys/devices/system/cpu/online says
    khod: dict[str, Any] = field(default_factory=dict)
    workloads: dict[str, Any] = field(default_factory=dict)

    def host(self, mono: float) -> float:
        return self.zero + mono


@dataclass
class Run:
    """What the guest has reported so far, checked as it comes."""

    t0: float
    boots: dict[int, Boot] = field(default_factory=dict)
    kexec_at: dict[int, float] = field(default_factory=dict)
    finalize: dict[int, dict[str, Any]] = field(default_factory=dict)
    verified: set[int] = field(default_factory=set)
    refused: dict[str, Any] | None = None
    passed: bool = False
    failed: str | None = None

    def handle(self, ev: dict[str, Any], now: float) -> None:
        kind, n = ev.get("ev"), int(ev.get("boot", 0))
        if self.failed is not None:
            return  # the guest is powering off; its first failure is the verdict
        if kind == "fail":
            self.failed = f"boot {n}, {ev.get('step')}: {ev.get('reason')}"
            return
        if kind == "boot":
            expected = len(self.boots) + 1
            if n != expected:
                raise Failed(f"the guest started boot {n}, expected boot {expected}")
            new = Boot(
                n, now - float(ev["t"]), float(ev.get("userspace_mono", 0.0)), str(ev.get("cpus"))
            )
            self.boots[n] = new
            if n == 1:
                say(
                    f"boot 1: kernel started {new.zero - self.t0:.1f} s after QEMU "
                    f"({ev.get('release')}, CPUs {ev.get('cpus')} online, clocksource {ev.get('clocksource')})"
                )
            return
        b = self.boots.get(n)
        if b is None:
            raise Failed(f"a {kind} line for boot {n} before that boot started")
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            raise Failed(f"the guest reported {kind!r}, which this host side does not know")
        handler(b, ev, now)

    def on_khod(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        start = ev["start"]
        gen = int(start.get("generation", -1))
        if gen != b.n - 1 or start.get("mode") != ("format" if b.n == 1 else "populate"):
            raise Failed(f"boot {b.n}: khod started as {start}, expected generation {b.n - 1}")
        b.khod = ev
        ready = b.host(ev["ready_mono"])
        if b.n == 1:
            say(
                f"boot 1: khod ready {ready - b.zero:.1f} s after the kernel started "
                f"(format, generation 0, process start to READY {ev['ready_mono'] - ev['exec_mono']:.1f} s; "
                f"{load()})"
            )
            return
        kexec = self.kexec_at[b.n - 1]
        say(
            f"kexec {b.n - 1} -> khod ready: {ready - kexec:.1f} s (shutdown and kexec "
            f"{b.zero - kexec:.1f} s, kernel start to READY {ready - b.zero:.1f} s of which "
            f"kernel and initramfs {b.userspace:.1f} s, systemd to khod's start "
            f"{b.khod['exec_mono'] - b.userspace:.1f} s, khod's start {ready - b.host(b.khod['exec_mono']):.1f} s; populate "
            f"{start.get('populate_ms')} ms: generation {gen}, {start.get('incoming_sessions')} "
            f"sessions, {mib(int(start.get('incoming_bytes', 0)))}; CPUs {b.cpus}; {load()})"
        )

    def on_workloads(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        vmm, kv = ev["vmm"], ev["kvstore"]
        ready = b.host(max(vmm["mono"], kv["mono"]))
        khod_ready = b.host(b.khod["ready_mono"])
        b.workloads = ev
        if b.n == 1:
            say(
                f"boot 1: workloads ready {ready - b.zero:.1f} s after the kernel started: vmm "
                f"{mib(vmm['guest_bytes'])} stamped and preserved, kvstore {kv['keys']} keys "
                f"loaded, as users of their own in group {PARAMS['memory_group']}"
            )
            return
        if vmm.get("checksum_ok") is not True:
            raise Failed(f"boot {b.n}: the VMM's guest memory differs after the kexec")
        if (kv.get("keys_wrong"), kv.get("keys_served"), kv.get("keys_extra")) != (
            0,
            PARAMS["kv_keys"],
            0,
        ):
            raise Failed(f"boot {b.n}: the key-value store's keys after the kexec: {kv}")
        self.verified.add(b.n)
        say(
            f"restore {b.n - 1}: {ready - khod_ready:.1f} s from khod ready to both verified "
            f"(vmm: {mib(vmm['guest_bytes'])} restored in {vmm.get('restore_ms')} ms, sha256 of "
            f"every byte matches; kvstore: {kv['keys_served']}/{PARAMS['kv_keys']} keys, warm "
            f"start {kv.get('warm_start_ms')} ms vs cold {kv.get('cold_start_ms')} ms)"
        )

    def on_metrics(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        if ev.get("generation") != b.n - 1:
            raise Failed(f"boot {b.n}: khod_handover_generation is {ev.get('generation')}")
        restored = ev.get("restored_bytes")
        say(
            f"metrics {b.n}: khod_preserved_bytes {mib(ev['preserved_bytes'])} in "
            f"{ev.get('sessions'):.0f} sessions, khod_handover_generation {ev['generation']:.0f}"
            + (f", khod_restored_bytes_total {mib(restored)}" if b.n > 1 and restored else "")
        )

    def on_finalize(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        if ev.get("generation") != b.n or sorted(ev.get("notified", {}).values()) != ["ok", "ok"]:
            raise Failed(f"boot {b.n}: finalize: {ev}")
        self.finalize[b.n] = ev
        notified = ", ".join(f"{k} {v}" for k, v in sorted(ev["notified"].items()))
        say(
            f"finalize {b.n}: {ev['seconds']:.1f} s for khoctl finalize (commit "
            f"{ev.get('duration_ms')} ms; notifiers: {notified}; generation {ev['generation']}, "
            f"{mib(ev['total_bytes'])})"
        )

    def on_inspect(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        say(f"inspect {b.n}: khoctl inspect /dev/mem: {ev['verdict']}: {ev['reason']}")

    def on_corrupt(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        say(
            f"corrupt {b.n}: flipped the byte at phys {ev['phys']:#x} (root chunk list's num_elms, "
            f"{ev['before']:#04x} -> {ev['after']:#04x}: {ev['num_elms']} entries claimed)"
        )

    def on_kexec(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        if MEMMAP not in ev.get("cmdline", "").split():
            raise Failed(f"boot {b.n}: the next kernel's command line lacks {MEMMAP}")
        self.kexec_at[b.n] = now

    def on_refused(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        reason = ev.get("journal", {}).get("reason", "")
        if (
            ev.get("status") != 3
            or ev.get("nrestarts") != 0
            or PARAMS["fault"] not in reason
            or ev.get("inspect_status") != 5
            or ev.get("inspect_fault") != PARAMS["fault"]
            or any(s == "active" for s in ev.get("workloads", {}).values())
        ):
            raise Failed(f"boot {b.n}: the corrupted handover was not refused as it should: {ev}")
        self.refused = ev
        kexec = self.kexec_at[b.n - 1]
        refused = b.host(ev["journal_mono"])
        say(
            f"kexec {b.n - 1} -> refusal: {refused - kexec:.1f} s; khod.service exit status 3 "
            f"({ev['result']}), not restarted (NRestarts=0 after {10:.0f} s), workloads not "
            f"started; journal: {reason}"
        )
        say(
            f"inspect {b.n}: khoctl inspect /dev/mem exits 5 naming {ev['inspect_fault']}: "
            f"{ev['inspect_reason']}"
        )

    def on_pass(self, b: Boot, ev: dict[str, Any], now: float) -> None:
        missing = [n for n in range(2, BOOTS) if n not in self.verified]
        if self.refused is None or missing or len(self.kexec_at) != BOOTS - 1:
            raise Failed(f"the guest said pass, but boots {missing} were not verified")
        self.passed = True


def marker(line: str) -> dict[str, Any] | None:
    """The report on a serial line, if it is a marker line."""
    m = MARKER.search(line)
    if not m or "KHOD-VMTEST-LOG" in line:
        return None
    try:
        ev = json.loads(m.group(1))
    except ValueError:
        say(f"warning: a garbled marker line on the serial console: {line[:200]}")
        return None
    return ev if isinstance(ev, dict) else None


def run_guest(image: vmimage.Image, accel: str, serial_log: Path, timeout: float) -> Run:
    append = " ".join(CMDLINE)
    argv = qemu_argv(
        accel,
        image.kernel,
        append,
        "4G",
        [
            "-initrd",
            str(image.initrd),
            "-drive",
            f"file={image.disk},format=raw,if=virtio,snapshot=on",
        ],
    )
    t0 = time.monotonic()
    run = Run(t0)
    with open(serial_log, "w") as log:
        log.write(f"# {' '.join(argv)}\n")
        with qemu(argv, log, t0) as (proc, serial):
            deadline = t0 + timeout
            last = t0
            while True:
                now = time.monotonic()
                finishing = run.passed or run.failed is not None
                wait_until = deadline if not finishing else min(deadline, last + SHUTDOWN_S)
                if not finishing:
                    wait_until = min(wait_until, last + GAP_S)
                try:
                    item = serial.lines.get(timeout=max(0.0, wait_until - now))
                except queue.Empty:
                    if run.passed:
                        say(
                            f"warning: the guest did not power off within {SHUTDOWN_S:.0f} s; QEMU stopped"
                        )
                        return run
                    if run.failed is not None:
                        return run
                    what = "in all" if time.monotonic() >= deadline else f"for {GAP_S:.0f} s"
                    raise Failed(
                        f"timeout: no progress from the guest {what} (boots seen: "
                        f"{sorted(run.boots)}); last serial lines: {' | '.join(serial.recent[-5:])}"
                    ) from None
                if item is None:
                    status = proc.wait()
                    if run.passed or run.failed is not None:
                        return run
                    raise Failed(
                        f"QEMU exited ({status}) before the test finished (boots seen: "
                        f"{sorted(run.boots)}); last serial lines: {' | '.join(serial.recent[-8:])}"
                    )
                when, line = item
                ev = marker(line)
                if ev is None:
                    continue
                last = when
                run.handle(ev, when)


# ----------------------------------------------------------------------------- main


def remove_stale_work(parent: Path) -> None:
    """Per-run directories (a disk image each) of runs whose driver is gone (killed)."""
    for d in parent.glob("run-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def preflight() -> None:
    if os.geteuid() != 0:
        raise Failed("needs root: debootstrap and chroot build the guest")
    missing = [
        tool
        for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "chroot")
        if shutil.which(tool) is None
    ]
    if missing:
        raise Failed(
            f"not installed: {', '.join(missing)} (apt-get install qemu-system-x86 debootstrap e2fsprogs)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vm-test", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("KHOD_VM_CACHE", "/var/cache/khod-vm")),
        help="downloads and the built base tree (default $KHOD_VM_CACHE or /var/cache/khod-vm)",
    )
    ap.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        default=os.environ.get("KHOD_VM_ACCEL", "auto"),
        help="auto: KVM if a probe boots, else TCG",
    )
    ap.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds for the guest part, all boots"
    )
    ap.add_argument("--out", type=Path, default=REPO / "build" / "vm-test", help="logs")
    ap.add_argument("--keep", action="store_true", help="keep the run's disk image and kernel")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    serial_log = args.out / "serial.log"
    build_log = args.out / "build.log"
    build_log.write_text("")
    work: Path | None = None
    accel = "?"
    t_guest = t0
    try:
        preflight()
        (args.cache / "work").mkdir(parents=True, exist_ok=True)
        remove_stale_work(args.cache / "work")
        work = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=args.cache / "work"))
        image = vmimage.build(
            REPO, args.cache, work, PARAMS, build_log, lambda s: say(f"build: {s}")
        )
        t_build = time.monotonic()
        say(
            f"build: {t_build - t0:.1f} s (base tree {'built' if image.base_built else 'cached'}, "
            f"wheels {'downloaded' if image.wheels_downloaded else 'cached'}, kernel "
            f"{image.release}, image {image.disk.stat().st_size >> 20} MiB; log {build_log})"
        )
        if args.accel == "auto":
            ok, why = probe_kvm(image.kernel)
            accel = "kvm" if ok else "tcg"
            say(f"accel: {accel} ({why}; probe {time.monotonic() - t_build:.1f} s)")
        else:
            accel = args.accel
            say(f"accel: {accel} (as asked)")
        t_guest = time.monotonic()
        run = run_guest(image, accel, serial_log, args.timeout)
        if run.failed is not None:
            raise Failed(run.failed)
        total = time.monotonic() - t0
        say(
            f"PASS in {total:.0f} s (build {t_build - t0:.0f} s, guest {time.monotonic() - t_guest:.0f} s "
            f"under {accel}): {BOOTS - 1} real kexecs, generations 1 and 2 verified byte for byte and "
            f"key for key, the corrupted generation 3 refused as {PARAMS['fault']}; serial log {serial_log}"
        )
        return 0
    except (Failed, base.BuildError) as exc:
        say(f"FAIL after {time.monotonic() - t0:.0f} s: {exc}; serial log {serial_log}")
        return 1
    except OSError as exc:  # a tool or file the steps above did not expect to miss
        say(f"FAIL after {time.monotonic() - t0:.0f} s: {exc}; serial log {serial_log}")
        return 1
    except (KeyboardInterrupt, Interrupted) as exc:
        say(
            f"FAIL: interrupted ({exc or 'SIGINT'}) after {time.monotonic() - t0:.0f} s; QEMU stopped; serial log {serial_log}"
        )
        return 130
    finally:
        if work is not None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
