"""The guest side of ``make vm-test``: one run of this per boot, as ``khod-vmtest.service``.

The plan, one QEMU guest, three real kexecs (``kexec -s``, same command line):

* boot 1: khod formats the reserved range (generation 0); the VMM stamps and
  preserves 64 MiB, the key-value store loads its keys; metrics scraped;
  ``khoctl finalize`` (both notifiers answer); ``khoctl inspect /dev/mem``
  sees the committed handover; kexec.
* boot 2 (generation 1) and boot 3 (generation 2): khod populates from
  /dev/mem before anything can allocate; both workloads restore, the VMM
  checks every byte of guest memory, the store every key; khod's metrics
  agree (generation, bytes restored, nothing unclaimed); finalize, kexec.
  Boot 3 flips one byte of the root chunk list through /dev/mem after the
  finalize (its ``num_elms`` gains 256).
* boot 4: khod refuses that handover, exit 3, with the fault named in the
  journal; the unit is not restarted; the workloads never start;
  ``khoctl inspect /dev/mem`` names the same fault. Then power off.

Each step reports one ``KHOD-VMTEST {json}`` line on the serial console; the
host (``vm/vmtest.py``) parses them, checks them again and times the phases
from them. Any failure reports ``fail`` with the step and reason, dumps the
journal of every unit involved to the console and powers off.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

PARAMS = json.loads(Path("/etc/khod-vmtest.json").read_text())
STATE = Path("/var/lib/khod-vmtest/state.json")
CONSOLE = "/dev/ttyS0"
MARK = "KHOD-VMTEST"
UNITS = ("khod.service", "khod-vmm.service", "khod-kvstore.service")
WORKLOADS = {"vmm": "khod-vmm.service", "kvstore": "khod-kvstore.service"}
KHOD_WAIT_S = 420.0  # kernel start to READY=1 is ~50 s under TCG on a quiet machine
WORKLOAD_WAIT_S = 600.0  # imports, 64 MiB stamped or checked, every key loaded or checked
SETTLE_S = 10.0  # after a refusal: long enough for systemd to have restarted it, were it to


class Fail(Exception):
    """A check failed: ``step`` names it, the message says what was seen."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


def mono() -> float:
    """CLOCK_MONOTONIC, the clock of systemd's *TimestampMonotonic and the journal."""
    return time.monotonic()


def emit(ev: str, **fields: Any) -> None:
    """One marker line for the host, on the serial console (and in the journal)."""
    line = f"{MARK} " + json.dumps({"ev": ev, "t": round(mono(), 3), **fields}, sort_keys=True)
    print(line, flush=True)
    console(line)


def console(text: str) -> None:
    try:
        fd = os.open(CONSOLE, os.O_WRONLY | os.O_NOCTTY)
    except OSError:
        return
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def sh(
    argv: list[str], timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Fail(argv[0], f"{' '.join(argv)} took longer than {timeout:.0f} s") from None
    if check and r.returncode:
        raise Fail(
            argv[0],
            f"{' '.join(argv)} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}",
        )
    return r


def show(unit: str) -> dict[str, str]:
    props = (
        "ActiveState,SubState,Result,ExecMainStatus,NRestarts,InvocationID,"
        "ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic"
    )
    out = sh(["systemctl", "show", unit, "-p", props]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(unit: str) -> list[dict[str, Any]]:
    """This boot's journal entries of ``unit``: MESSAGE and __MONOTONIC_TIMESTAMP."""
    out = sh(["journalctl", "-b", "-u", unit, "-o", "json", "--no-pager"]).stdout
    entries = []
    for line in out.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        msg = e.get("MESSAGE")
        if isinstance(msg, list):  # journald gives non-UTF-8 messages as byte lists
            msg = bytes(msg).decode(errors="replace")
        if isinstance(msg, str):
            entries.append({"msg": msg, "mono": int(e.get("__MONOTONIC_TIMESTAMP", 0)) / 1e6})
    return entries


def logfmt(line: str) -> dict[str, str]:
    return {
        k: v[1:-1].replace('\\"', '"') if v.startswith('"') else v
        for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    }


def wait_for(step: str, timeout: float, check: Any, poll: float = 1.0) -> Any:
    """Poll ``check()`` until it returns something (it raises Fail to give up early)."""
    deadline = mono() + timeout
    while True:
        got = check()
        if got is not None:
            return got
        if mono() > deadline:
            raise Fail(step, f"not within {timeout:.0f} s")
        time.sleep(poll)


def tail(unit: str, n: int = 12) -> str:
    return " | ".join(e["msg"] for e in journal(unit)[-n:])


# ----------------------------------------------------------------------------- khod


def khod_ready(step: str) -> dict[str, Any]:
    """Wait for khod.service to be active (READY=1); its start line and timestamps."""

    def check() -> dict[str, str] | None:
        p = show("khod.service")
        if p.get("ActiveState") == "active" and p.get("NRestarts") == "0":
            return p
        if p.get("ActiveState") == "failed" or p.get("NRestarts") != "0":
            raise Fail(
                step,
                f"khod.service failed ({p.get('Result')}, status {p.get('ExecMainStatus')}, "
                f"{p.get('NRestarts')} restarts): {tail('khod.service')}",
            )
        return None

    p = wait_for(step, KHOD_WAIT_S, check)
    starts = [logfmt(e["msg"]) for e in journal("khod.service") if "event=start " in e["msg"] + " "]
    if len(starts) != 1:
        raise Fail(
            step,
            f"expected one khod start this boot, the journal has {len(starts)}: {tail('khod.service')}",
        )
    return {
        "exec_mono": int(p["ExecMainStartTimestampMonotonic"]) / 1e6,
        "ready_mono": int(p["ActiveEnterTimestampMonotonic"]) / 1e6,
        "start": starts[0],
        "nrestarts": int(p.get("NRestarts", "0") or 0),
    }


def metrics() -> dict[str, float]:
    """khod's /metrics, scraped once: each family summed over its labels, some kept by label."""
    listen = PARAMS["metrics"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=60) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name] = out.get(name, 0.0) + value
        if name == "khod_region_bytes":
            use = re.search(r'use="(\w+)"', labels)
            if use:
                out[f"khod_region_bytes.{use.group(1)}"] = value
    return out


def finalize(step: str) -> dict[str, Any]:
    t0 = mono()
    r = sh(["khoctl", "--json", "finalize"], timeout=300)
    seconds = mono() - t0
    summary = json.loads(r.stdout)["summary"]
    notified = summary.get("notified", {})
    names = sorted(notified)
    if (
        len(names) != 2
        or any(v != "ok" for v in notified.values())
        or not all(any(w in n for n in names) for w in WORKLOADS)
    ):
        raise Fail(
            step, f"FINALIZE notifiers: expected vmm and kvstore to answer ok, got {notified}"
        )
    return {
        "seconds": round(seconds, 2),
        "duration_ms": summary.get("duration_ms"),
        "generation": summary["generation"],
        "total_bytes": summary["total_bytes"],
        "notified": notified,
        "sessions": {s["name"]: s["bytes"] for s in summary["sessions"]},
    }


def inspect_devmem() -> tuple[int, dict[str, Any], str]:
    """``khoctl inspect /dev/mem``, human and JSON: (exit status, report, text)."""
    window = ["/dev/mem", "--base", hex(PARAMS["base"]), "--size", str(PARAMS["size"])]
    text = sh(["khoctl", "inspect", *window], check=False)
    js = sh(["khoctl", "--json", "inspect", *window], check=False)
    if js.returncode != text.returncode:
        raise Fail(
            "inspect", f"khoctl inspect exited {text.returncode}, with --json {js.returncode}"
        )
    try:
        report = json.loads(js.stdout)
    except ValueError:
        raise Fail(
            "inspect", f"khoctl --json inspect: {js.stderr.strip() or js.stdout[:300]}"
        ) from None
    return js.returncode, report, text.stdout


# ----------------------------------------------------------------------------- workloads


def workload_report(step: str, name: str) -> dict[str, Any]:
    unit = WORKLOADS[name]

    def check() -> dict[str, Any] | None:
        for e in journal(unit):
            if e["msg"].startswith("report "):
                rep: dict[str, Any] = json.loads(e["msg"][len("report ") :])
                rep["mono"] = e["mono"]
                return rep
        p = show(unit)
        if p.get("ActiveState") in ("failed", "inactive") and p.get("Result") not in (
            None,
            "",
            "success",
        ):
            raise Fail(step, f"{unit} {p.get('ActiveState')} ({p.get('Result')}): {tail(unit)}")
        if (
            p.get("ActiveState") == "inactive"
            and p.get("ExecMainStartTimestampMonotonic", "0") != "0"
        ):
            raise Fail(step, f"{unit} exited without a report: {tail(unit)}")
        return None

    return wait_for(f"{step}: {unit} report", WORKLOAD_WAIT_S, check)  # type: ignore[no-any-return]


def check_workloads(step: str, boot: int) -> dict[str, Any]:
    vmm = workload_report(step, "vmm")
    kv = workload_report(step, "kvstore")
    want_mode = "start" if boot == 1 else "resume"
    for rep in (vmm, kv):
        if rep.get("mode") != want_mode:
            raise Fail(
                step, f"{rep.get('role')} started in mode {rep.get('mode')}, expected {want_mode}"
            )
    if vmm.get("guest_bytes") != PARAMS["vmm_bytes"]:
        raise Fail(
            step,
            f"vmm guest memory is {vmm.get('guest_bytes')} bytes, expected {PARAMS['vmm_bytes']}",
        )
    if kv.get("keys") != PARAMS["kv_keys"]:
        raise Fail(step, f"kvstore holds {kv.get('keys')} keys, expected {PARAMS['kv_keys']}")
    if boot > 1:
        if vmm.get("checksum_ok") is not True:
            raise Fail(step, f"vmm: guest memory checksum differs after the kexec: {vmm}")
        if (kv.get("keys_wrong"), kv.get("keys_served"), kv.get("keys_extra")) != (
            0,
            PARAMS["kv_keys"],
            0,
        ):
            raise Fail(step, f"kvstore: keys after the kexec: {kv}")
    return {"vmm": vmm, "kvstore": kv}


# ----------------------------------------------------------------------------- kexec


def load_next_kernel() -> dict[str, Any]:
    """``kexec -s`` (kexec_file_load: segments only in System RAM) with this command line."""
    cmdline = Path("/proc/cmdline").read_text().strip()
    if PARAMS["memmap"] not in cmdline.split():
        raise Fail("kexec", f"{PARAMS['memmap']!r} is not on this kernel's command line: {cmdline}")
    release = os.uname().release
    sh(
        [
            "kexec",
            "-s",
            "-l",
            f"/boot/vmlinuz-{release}",
            f"--initrd=/boot/initrd.img-{release}",
            f"--command-line={cmdline}",
        ],
        timeout=300,
    )
    if Path("/sys/kernel/kexec_loaded").read_text().strip() != "1":
        raise Fail("kexec", "kexec -s -l succeeded but /sys/kernel/kexec_loaded is not 1")
    return {"cmdline": cmdline, "release": release}


def corrupt_chunk_list() -> dict[str, Any]:
    """Flip one byte of the root chunk list's first page, through /dev/mem.

    Byte 13 is the second byte of ``num_elms`` (docs/format.md §4.1): a list
    of at most 255 entries now claims 256 more, which a successor must
    refuse as ``too_many_entries`` (the first check it fails).
    """
    from khod.kho.dtb import from_dtb
    from khod.kho.record import RECORD_BYTES, decode_record

    base, size = PARAMS["base"], PARAMS["size"]
    fd = os.open("/dev/mem", os.O_RDWR)  # cached, as khod maps it: PAT refuses a mix
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    finally:
        os.close(fd)
    try:
        rec = decode_record(bytes(mm[:RECORD_BYTES]))
        blob = bytes(mm[rec.fdt_phys - base : rec.fdt_phys - base + rec.fdt_size])
        raw = from_dtb(blob).children["preserved-memory"].props["metadata"]
        first = struct.unpack("<Q", bytes(raw))[0]
        off = first - base + 13
        before = mm[off]
        mm[off] = before ^ 0x01
        after = mm[off]
        num_elms = struct.unpack("<I", mm[first - base + 12 : first - base + 16])[0]
    finally:
        mm.close()
    if after != before ^ 0x01:
        raise Fail(
            "corrupt", f"the byte at {first + 13:#x} reads {after:#x} after writing {before ^ 1:#x}"
        )
    return {"phys": first + 13, "before": before, "after": after, "num_elms": num_elms}


def kexec(state: dict[str, Any], boot: int, info: dict[str, Any]) -> None:
    state["boot"] = boot
    STATE.write_text(json.dumps(state))
    os.sync()
    emit("kexec", boot=boot, **info)
    sh(["systemctl", "--no-block", "kexec"])


# ----------------------------------------------------------------------------- boots


def live_boot(boot: int, state: dict[str, Any]) -> None:
    """Boots 1-3: khod up, workloads verified, metrics, finalize, (corrupt,) kexec."""
    gen = boot - 1
    k = khod_ready(f"boot {boot}: khod")
    mode = k["start"].get("mode")
    if (
        mode != ("format" if boot == 1 else "populate")
        or int(k["start"].get("generation", -1)) != gen
    ):
        raise Fail(
            f"boot {boot}: khod",
            f"khod started {k['start']}, expected generation {gen} {'format' if boot == 1 else 'populate'}",
        )
    if boot > 1 and int(k["start"].get("incoming_bytes", -1)) != state["finalized_bytes"]:
        raise Fail(
            f"boot {boot}: khod",
            f"khod took in {k['start'].get('incoming_bytes')} bytes, the finalize committed {state['finalized_bytes']}",
        )
    chain = sh(["systemd-analyze", "critical-chain", "khod.service"], check=False)
    emit("khod", boot=boot, critical_chain=chain.stdout.splitlines()[-12:], **k)
    w = check_workloads(f"boot {boot}: workloads", boot)
    m = metrics()
    checks = {
        "khod_handover_generation": (m.get("khod_handover_generation"), gen),
        "khod_sessions": (m.get("khod_sessions"), 2),
        "khod_incoming_unclaimed_bytes": (m.get("khod_incoming_unclaimed_bytes"), 0),
    }
    if boot > 1:
        checks["khod_restored_bytes_total"] = (
            m.get("khod_restored_bytes_total"),
            state["finalized_bytes"],
        )
    bad = {k_: v for k_, v in checks.items() if v[0] != v[1]}
    if bad:
        raise Fail(f"boot {boot}: metrics", f"(seen, expected): {bad}")
    preserved = m.get("khod_preserved_bytes", 0.0)
    if preserved < PARAMS["vmm_bytes"]:
        raise Fail(
            f"boot {boot}: metrics",
            f"khod_preserved_bytes {preserved} is less than the VMM's {PARAMS['vmm_bytes']}",
        )
    emit("workloads", boot=boot, **w)
    emit(
        "metrics",
        boot=boot,
        preserved_bytes=preserved,
        region_preserved=m.get("khod_region_bytes.preserved"),
        generation=m.get("khod_handover_generation"),
        sessions=m.get("khod_sessions"),
        restored_bytes=m.get("khod_restored_bytes_total"),
        populate_s=m.get("khod_populate_duration_seconds"),
    )
    f = finalize(f"boot {boot}: finalize")
    if f["generation"] != gen + 1:
        raise Fail(
            f"boot {boot}: finalize", f"committed generation {f['generation']}, expected {gen + 1}"
        )
    state["finalized_bytes"] = f["total_bytes"]
    emit("finalize", boot=boot, **f)
    if boot == 1:
        status, report, _ = inspect_devmem()
        if (
            status != 0
            or report.get("verdict") != "populate"
            or report.get("generation") != gen + 1
        ):
            raise Fail(
                "boot 1: inspect",
                f"khoctl inspect /dev/mem after finalize: exit {status}, {report.get('verdict')} {report.get('reason')}",
            )
        emit("inspect", boot=boot, verdict=report["verdict"], reason=report["reason"])
    if boot == PARAMS["corrupt_boot"]:
        emit("corrupt", boot=boot, **corrupt_chunk_list())
    kexec(state, boot, load_next_kernel())


def refused_boot(boot: int) -> None:
    """Boot 4: the corrupted handover is refused by name, once, and stays refused."""
    step = f"boot {boot}: refusal"
    fault = PARAMS["fault"]

    def check() -> dict[str, str] | None:
        p = show("khod.service")
        if p.get("ActiveState") == "active":
            raise Fail(step, f"khod accepted the corrupted handover: {tail('khod.service')}")
        return p if p.get("ActiveState") == "failed" else None

    p = wait_for(step, KHOD_WAIT_S, check)
    if (p.get("Result"), p.get("ExecMainStatus")) != ("exit-code", "3"):
        raise Fail(
            step,
            f"khod.service failed with {p.get('Result')} status {p.get('ExecMainStatus')}, expected exit-code 3",
        )
    refusals = [e for e in journal("khod.service") if "event=start.refused" in e["msg"]]
    if len(refusals) != 1 or fault not in refusals[0]["msg"]:
        raise Fail(step, f"expected one start.refused naming {fault}: {tail('khod.service')}")
    time.sleep(SETTLE_S)
    q = show("khod.service")
    again = [e for e in journal("khod.service") if "event=start.refused" in e["msg"]]
    if (
        q.get("NRestarts") != "0"
        or q.get("InvocationID") != p.get("InvocationID")
        or len(again) != 1
        or q.get("ActiveState") != "failed"
    ):
        raise Fail(
            step,
            f"khod.service was started again: NRestarts {q.get('NRestarts')}, {len(again)} refusals, {q.get('ActiveState')}",
        )
    for name, unit in WORKLOADS.items():
        u = show(unit)
        if u.get("ActiveState") == "active" or any(
            e["msg"].startswith("report ") for e in journal(unit)
        ):
            raise Fail(step, f"{name} started although khod refused: {tail(unit)}")
    status, report, text = inspect_devmem()
    if status != 5 or report.get("fault") != fault or f"REFUSE: {fault}" not in text:
        raise Fail(
            f"boot {boot}: inspect",
            f"khoctl inspect /dev/mem: exit {status}, fault {report.get('fault')}, {report.get('reason')}",
        )
    emit(
        "refused",
        boot=boot,
        result=p.get("Result"),
        status=int(p["ExecMainStatus"]),
        nrestarts=int(q["NRestarts"]),
        exit_mono=int(p.get("ActiveEnterTimestampMonotonic", "0") or 0) / 1e6,
        journal=logfmt(refusals[0]["msg"]),
        journal_mono=refusals[0]["mono"],
        inspect_status=status,
        inspect_fault=report.get("fault"),
        inspect_reason=report.get("reason"),
        workloads={n: show(u).get("ActiveState") for n, u in WORKLOADS.items()},
    )


def dump_journals() -> None:
    for unit in (*UNITS, "khod.socket"):  # this driver's own lines are on the console already
        try:
            lines = journal(unit)[-40:]
        except Fail:
            continue
        for e in lines:
            console(f"{MARK}-LOG {unit}: {e['msg']}")


def previous_shutdown() -> None:
    """The end of the previous kernel's journal for khod and the workloads: how they stopped."""
    units = [arg for unit in UNITS for arg in ("-u", unit)]
    r = sh(["journalctl", "-b", "-1", "-o", "short-monotonic", "--no-pager", *units], check=False)
    for line in r.stdout.splitlines()[-16:]:
        console(f"{MARK}-LOG previous boot: {line}")


def main() -> int:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    state = json.loads(STATE.read_text()) if STATE.exists() else {"boot": 0}
    boot = int(state["boot"]) + 1
    manager = sh(
        ["systemctl", "show", "-p", "UserspaceTimestampMonotonic"],
        check=False,
    ).stdout
    stamps = dict(line.split("=", 1) for line in manager.splitlines() if "=" in line)
    emit(
        "boot",
        boot=boot,
        userspace_mono=int(stamps.get("UserspaceTimestampMonotonic", "0") or 0) / 1e6,
        release=os.uname().release,
        cpus=Path("/sys/devices/system/cpu/online").read_text().strip(),
        loadavg=Path("/proc/loadavg").read_text().split()[:3],
        clocksource=Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        .read_text()
        .strip(),
    )
    if boot > 1:
        previous_shutdown()
    try:
        if boot <= PARAMS["corrupt_boot"]:
            live_boot(boot, state)
            return 0
        if boot == PARAMS["corrupt_boot"] + 1:
            refused_boot(boot)
            emit("pass", boot=boot)
        else:
            raise Fail("plan", f"boot {boot} is past the plan")
    except Fail as exc:
        emit("fail", boot=boot, step=exc.step, reason=exc.reason)
        dump_journals()
    except Exception as exc:  # a bug here must still reach the host, with its traceback
        emit("fail", boot=boot, step="guest driver", reason=f"{type(exc).__name__}: {exc}")
        for line in traceback.format_exc().splitlines():
            console(f"{MARK}-LOG vmguest: {line}")
        dump_journals()
    subprocess.run(["systemctl", "--no-block", "poweroff"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
