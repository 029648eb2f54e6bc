"""The VM test's host side without a VM: its config edits, mirror lookup, units and verdicts.

``make vm-test`` itself boots QEMU (minutes); these check, in milliseconds,
the parts of it that decide what the guest runs and whether a run passed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the vm package is not installed: it only runs from a checkout

from vm import base, vmimage, vmtest  # noqa: E402

GUEST = ROOT / "vm" / "guest"


def test_the_reserved_range_is_one_argv_element_with_its_dollar() -> None:
    assert vmtest.MEMMAP == "memmap=256M$0x100000000"
    assert vmtest.MEMMAP in vmtest.CMDLINE
    assert vmtest.PARAMS["memmap"] == vmtest.MEMMAP


def test_guest_config_is_the_shipped_one_on_devmem() -> None:
    text = (ROOT / "config" / "khod.toml").read_text()
    out = vmimage.guest_config(text, vmtest.PARAMS)
    cfg = tomllib.loads(out)
    assert cfg["region"]["backend"] == "devmem"
    assert cfg["region"]["path"] == "/dev/mem"
    assert cfg["region"]["base"] == vmtest.REGION_BASE
    assert cfg["region"]["size"] == "256M"
    assert cfg["server"]["memory_group"] == "khodmem"
    assert cfg["metrics"]["listen"] == vmtest.PARAMS["metrics"]
    # everything else is the shipped file, line for line
    changed = [(a, b) for a, b in zip(text.splitlines(), out.splitlines(), strict=True) if a != b]
    edited = ("backend = ", "path = ", "base = ", "size = ", "memory_group = ")
    assert changed and all(a.startswith(edited) for a, _ in changed), changed


def test_guest_config_refuses_a_key_it_cannot_find() -> None:
    text = (ROOT / "config" / "khod.toml").read_text().replace("\nbackend = ", "\n# backend = ")
    with pytest.raises(base.BuildError, match=r"\[region\] backend found 0 times"):
        vmimage.guest_config(text, vmtest.PARAMS)


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    d = tmp_path / "apt" / "sources.list.d"
    d.mkdir(parents=True)
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "# a comment\nTypes: deb deb-src\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
    )
    assert base.apt_mirror("bookworm", (str(tmp_path / "apt"),)) == "http://mirror.example/debian"
    (d / "debian.sources").unlink()
    (tmp_path / "apt" / "sources.list").write_text(
        "deb [arch=amd64] http://old.example/debian bookworm main\n"
    )
    assert base.apt_mirror("bookworm", (str(tmp_path / "apt"),)) == "http://old.example/debian"
    assert base.apt_mirror("trixie", (str(tmp_path / "apt"),)) is None


def test_workload_units_agree_with_what_the_guest_checks() -> None:
    vmm = (GUEST / "khod-vmm.service").read_text()
    kv = (GUEST / "khod-kvstore.service").read_text()
    assert f"--memory {vmtest.PARAMS['vmm_bytes'] >> 20}M" in vmm
    assert f"--keys {vmtest.PARAMS['kv_keys']}" in kv
    for unit in (vmm, kv):
        # not root: the memory group is what lets them map the devmem region
        assert re.search(r"(?m)^User=khod-", unit)
        assert "\nRequires=khod.service\n" in unit and "\nAfter=khod.service\n" in unit
    users = (GUEST / "sysusers.conf").read_text()
    for user in ("khod-vmm", "khod-kv"):
        for group in ("khod", vmtest.PARAMS["memory_group"]):
            assert re.search(rf"(?m)^m\s+{user}\s+{group}$", users)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_guest_units_verify_beside_khods(tmp_path: Path) -> None:
    khod = shutil.which("khod") or str(Path(sys.executable).parent / "khod")
    for name in ("khod.socket", "khod.service"):
        text = (ROOT / "systemd" / name).read_text().replace("/usr/bin/khod", khod)
        (tmp_path / name).write_text(text)
    for name in vmimage.GUEST_UNITS:
        text = (GUEST / name).read_text().replace("/usr/bin/python3", sys.executable)
        (tmp_path / name).write_text(text)
    r = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            *(str(tmp_path / n) for n in vmimage.GUEST_UNITS),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr


# ----------------------------------------------------------------------------- verdicts


def marker_run(corrupt: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What a passing guest reports, boot by boot (vm/guest/vmguest.py's lines)."""
    evs: list[dict[str, Any]] = []
    kv_keys, vmm_bytes = vmtest.PARAMS["kv_keys"], vmtest.PARAMS["vmm_bytes"]
    for n in (1, 2, 3):
        gen = n - 1
        evs.append({"ev": "boot", "boot": n, "t": 2.0, "release": "6.1"})
        start = {"mode": "format" if n == 1 else "populate", "generation": str(gen)}
        if n > 1:
            start.update(populate_ms="3.1", incoming_sessions="2", incoming_bytes=str(90 << 20))
        evs.append(
            {
                "ev": "khod",
                "boot": n,
                "t": 40.0,
                "exec_mono": 10.0,
                "ready_mono": 39.0,
                "start": start,
            }
        )
        vmm = {"mode": "start" if n == 1 else "resume", "guest_bytes": vmm_bytes, "mono": 60.0}
        kv = {"mode": vmm["mode"], "keys": kv_keys, "mono": 61.0}
        if n > 1:
            vmm.update(checksum_ok=True, restore_ms=9.0)
            kv.update(keys_wrong=0, keys_served=kv_keys, keys_extra=0, warm_start_ms=30.0)
        evs.append({"ev": "workloads", "boot": n, "t": 62.0, "vmm": vmm, "kvstore": kv})
        evs.append(
            {"ev": "metrics", "boot": n, "t": 63.0, "generation": gen, "sessions": 2.0,
             "preserved_bytes": float(90 << 20), "restored_bytes": float(90 << 20) if n > 1 else 0.0}
        )  # fmt: skip
        evs.append(
            {"ev": "finalize", "boot": n, "t": 65.0, "seconds": 2.0, "duration_ms": 5.0,
             "generation": n, "total_bytes": 90 << 20, "notified": {"kvstore": "ok", "vmm": "ok"}}
        )  # fmt: skip
        if n == 3:
            evs.append(corrupt or {"ev": "corrupt", "boot": 3, "t": 66.0, "phys": 0x100400000 + 13,
                                   "before": 0, "after": 1, "num_elms": 259})  # fmt: skip
        evs.append({"ev": "kexec", "boot": n, "t": 67.0, "cmdline": " ".join(vmtest.CMDLINE)})
    evs.append({"ev": "boot", "boot": 4, "t": 2.0})
    evs.append(
        {"ev": "refused", "boot": 4, "t": 70.0, "status": 3, "nrestarts": 0, "result": "exit-code",
         "journal": {"reason": "chunk page at 0x1004000: num_elms 259 > 255 (too_many_entries)"},
         "journal_mono": 40.0, "inspect_status": 5, "inspect_fault": "too_many_entries",
         "inspect_reason": "...", "workloads": {"vmm": "inactive", "kvstore": "inactive"}}
    )  # fmt: skip
    evs.append({"ev": "pass", "boot": 4, "t": 71.0})
    return evs


def feed(evs: list[dict[str, Any]]) -> vmtest.Run:
    run = vmtest.Run(0.0)
    for i, ev in enumerate(evs):
        run.handle(ev, 100.0 + i)
    return run


def test_a_whole_passing_run_passes(capsys: pytest.CaptureFixture[str]) -> None:
    run = feed(marker_run())
    assert run.passed and run.failed is None
    out = capsys.readouterr().out
    for phase in ("boot 1:", "finalize 1:", "kexec 1 -> khod ready:", "restore 1:", "restore 2:",
                  "kexec 3 -> refusal:", "inspect 4:"):  # fmt: skip
        assert f"vm-test: {phase}" in out, phase


@pytest.mark.parametrize(
    "damage",
    [
        lambda evs: evs[8]["vmm"].update(checksum_ok=False),  # boot 2's workloads
        lambda evs: evs[8]["kvstore"].update(keys_wrong=1),
        lambda evs: evs[7]["start"].update(generation="0"),  # boot 2's khod
        lambda evs: evs[-2].update(nrestarts=1),
        lambda evs: evs[-2].update(inspect_fault="crc_mismatch"),
        lambda evs: evs[-2]["workloads"].update(vmm="active"),
        lambda evs: evs[5].update(cmdline="console=ttyS0 root=/dev/vda"),  # boot 1's kexec
        lambda evs: evs.pop(8),  # boot 2 never verified
    ],
)
def test_any_wrong_report_fails_the_run(damage: Any) -> None:
    evs = marker_run()
    assert (evs[5]["ev"], evs[7]["ev"], evs[8]["ev"]) == ("kexec", "khod", "workloads")
    assert evs[8]["boot"] == 2
    damage(evs)
    with pytest.raises(vmtest.Failed):
        feed(evs)


def test_a_guest_failure_is_the_runs_reason() -> None:
    evs = [*marker_run()[:3], {"ev": "fail", "boot": 1, "t": 9.0, "step": "boot 1: finalize",
                               "reason": "FINALIZE notifiers: ..."}]  # fmt: skip
    run = feed(evs)
    assert not run.passed and run.failed == "boot 1, boot 1: finalize: FINALIZE notifiers: ..."


def test_marker_lines_and_not_their_echoes_in_journal_dumps() -> None:
    assert vmtest.marker('[  1.0] KHOD-VMTEST {"ev": "boot", "boot": 1}') == {
        "ev": "boot",
        "boot": 1,
    }
    assert vmtest.marker('KHOD-VMTEST-LOG khod-vmtest.service: KHOD-VMTEST {"ev": "boot"}') is None
    assert vmtest.marker("KHOD-VMTEST {garbled") is None
    assert vmtest.marker("Debian GNU/Linux 12 khod-vm ttyS0") is None
