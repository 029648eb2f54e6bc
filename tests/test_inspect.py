"""khoctl inspect: offline, read-only, and it names every fault a successor would refuse."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from khoclient import ctl

from khod.errors import Fault
from khod.pages import PAGE_SHIFT, PAGE_SIZE

from . import test_handover as th
from .test_khoctl import khoctl


def corrupt_too_many(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s) + 12, "<I", 256)


def corrupt_bad_order(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s) + 8, "<I", 19)


def corrupt_loop(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s, 2), "<Q", th.chunk_phys(s, 0))


def corrupt_outside(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s), "<Q", s.region.end + PAGE_SIZE)


def corrupt_scratch(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s), "<Q", s.scratch.phys + PAGE_SIZE)


def corrupt_misaligned(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s), "<Q", th.chunk_phys(s, 1) + 8)


def corrupt_phys_start(s: th.Setup) -> None:
    start = struct.unpack("<Q", s.region.read(th.chunk_phys(s) + 16, 8))[0]
    th.poke(s, th.chunk_phys(s) + 16, "<Q", start + PAGE_SIZE)


def corrupt_garbage(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s) + 16 + 16 * 200, "<Q", 0xDEAD)


def corrupt_folio_bounds(s: th.Setup) -> None:
    th.poke(s, th.chunk_phys(s) + 16, "<Q", s.region.end)


def corrupt_overlap(s: th.Setup) -> None:
    bm = th.order0_bitmap(s)
    start = struct.unpack("<Q", s.region.read(th.chunk_phys(s) + 16, 8))[0]
    bit = s.vmm_folios[0] - (start >> PAGE_SHIFT) + 3
    byte = s.region.read(bm + bit // 8, 1)[0]
    s.region.write(bm + bit // 8, bytes([byte | 1 << (bit % 8)]))


def corrupt_metadata_crc(s: th.Setup) -> None:
    bm = th.order0_bitmap(s)
    byte = s.region.read(bm + 500, 1)[0]
    s.region.write(bm + 500, bytes([byte ^ 0x80]))


def corrupt_fdt_crc(s: th.Setup) -> None:
    rec = th.read_record(s.region)
    assert rec is not None
    byte = s.region.read(rec.fdt_phys + rec.fdt_size - 2, 1)[0]
    s.region.write(rec.fdt_phys + rec.fdt_size - 2, bytes([byte ^ 1]))


def _bad_dtb(s: th.Setup) -> None:
    import zlib
    from dataclasses import replace

    rec = th.read_record(s.region)
    assert rec is not None
    blob = bytearray(s.region.read(rec.fdt_phys, rec.fdt_size))
    blob[8:12] = struct.pack(">I", 1 << 24)
    s.region.write(rec.fdt_phys, bytes(blob))
    th.write_record(s.region, replace(rec, fdt_crc32=zlib.crc32(bytes(blob))))


def corrupt_missing(s: th.Setup) -> None:
    th.rewrite_fdt(s, lambda t: t.children["khod"].props.pop("generation"))  # type: ignore[attr-defined]


def corrupt_sessions(s: th.Setup) -> None:
    corrupt_metadata_crc(s)
    th.reseal_metadata_crc(s)


def corrupt_record(s: th.Setup) -> None:
    raw = bytearray(s.region.read(s.region.base, 96))
    raw[44] ^= 0x10
    s.region.write(s.region.base, bytes(raw))


CASES: list[tuple[Callable[[th.Setup], None], Fault]] = [
    (corrupt_record, Fault.BAD_RECORD),
    (corrupt_outside, Fault.POINTER_OUTSIDE_REGION),
    (corrupt_scratch, Fault.POINTER_IN_SCRATCH),
    (corrupt_misaligned, Fault.POINTER_MISALIGNED),
    (corrupt_bad_order, Fault.BAD_ORDER),
    (corrupt_too_many, Fault.TOO_MANY_ENTRIES),
    (corrupt_phys_start, Fault.MISALIGNED_PHYS_START),
    (corrupt_garbage, Fault.MALFORMED_CHUNK),
    (corrupt_folio_bounds, Fault.FOLIO_OUT_OF_BOUNDS),
    (corrupt_overlap, Fault.OVERLAP),
    (corrupt_loop, Fault.CHUNK_LOOP),
    (_bad_dtb, Fault.BAD_DTB),
    (corrupt_missing, Fault.MISSING_PROPERTY),
    (corrupt_fdt_crc, Fault.CRC_MISMATCH),
    (corrupt_metadata_crc, Fault.CRC_MISMATCH),
    (corrupt_sessions, Fault.SESSION_MISMATCH),
]


@pytest.fixture
def built(make_region: th.MakeRegion) -> th.Setup:
    return th.build(make_region())


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_good_region(built: th.Setup) -> None:
    path = built.region.path
    os.chmod(path, 0o444)  # read-only is all inspect needs
    r = khoctl("inspect", path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: ACCEPT (populate)" in r.stdout
    assert "state handover  generation 1" in r.stdout
    assert 'compatible = "kho-v1";' in r.stdout and "vmm {" in r.stdout
    assert "metadata  CRC32" in r.stdout
    js = json.loads(khoctl("--json", "inspect", path).stdout)
    assert js["verdict"] == "populate" and js["accepted"] is True
    assert {s["name"]: s["bytes"] for s in js["sessions"]} == {"db": 9 * PAGE_SIZE, "vmm": 3 << 21}
    assert js["root"]["orders"]["9"] == {"folios": 3, "bytes": 3 << 21}
    assert khoctl("inspect", "--expect-handover", path).returncode == 0


@pytest.mark.parametrize(("corrupt", "fault"), CASES, ids=[f"{c.__name__}-{f}" for c, f in CASES])
def test_each_fault_is_named_and_nothing_is_written(
    built: th.Setup, corrupt: Callable[[th.Setup], None], fault: Fault
) -> None:
    corrupt(built)
    built.region.flush()
    path = built.region.path
    before = file_bytes(path)
    r = khoctl("inspect", path)
    assert r.returncode == ctl.Exit.REJECT, r.stdout + r.stderr
    assert f"verdict: REFUSE: {fault}" in r.stdout
    js = json.loads(khoctl("--json", "inspect", path).stdout)
    assert js["fault"] == str(fault) and js["accepted"] is False
    assert file_bytes(path) == before


def test_region_without_handover(shm_dir: Path, make_region: th.MakeRegion) -> None:
    region = make_region()
    r = khoctl("inspect", region.path)
    assert r.returncode == 0
    assert "verdict: ACCEPT (format)" in r.stdout
    assert khoctl("inspect", "--expect-handover", region.path).returncode == ctl.Exit.NO_HANDOVER
    _, scratch = th.allocator_for(region)
    th.write_record(region, th.live_record(region, scratch, 0, pid=999_999_999))
    r = khoctl("inspect", region.path)
    assert r.returncode == ctl.Exit.REJECT
    assert "live: owned by pid 999999999 (gone)" in r.stdout
    assert khoctl("inspect", str(shm_dir / "nope")).returncode == ctl.Exit.LOCAL


def test_wrong_base_is_a_region_mismatch(built: th.Setup) -> None:
    r = khoctl("inspect", "--base", hex(built.region.base + (1 << 30)), built.region.path)
    assert r.returncode == ctl.Exit.REJECT
    assert "region_mismatch" in r.stdout


def test_a_devmem_window_is_inspected_where_the_config_puts_it(built: th.Setup) -> None:
    """/dev/mem has no size and no record at offset 0: the window is --base and --size."""
    built.region.flush()
    mem = Path(built.region.path + ".mem")  # stands in for /dev/mem: phys = file offset
    with open(mem, "wb") as f:
        f.truncate(built.region.base + built.region.size)
        f.seek(built.region.base)
        f.write(file_bytes(built.region.path))
    base, size = hex(built.region.base), str(built.region.size)
    r = khoctl("inspect", "--backend", "devmem", "--base", base, "--size", size, str(mem))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: ACCEPT (populate)" in r.stdout and "(from --base)" in r.stdout
    corrupt_too_many(built)
    built.region.flush()
    with open(mem, "r+b") as f:
        f.seek(built.region.base)
        f.write(file_bytes(built.region.path))
    r = khoctl("inspect", "--backend", "devmem", "--base", base, "--size", size, str(mem))
    assert r.returncode == ctl.Exit.REJECT
    assert f"verdict: REFUSE: {Fault.TOO_MANY_ENTRIES}" in r.stdout
    r = khoctl("inspect", "--backend", "devmem", str(mem))
    assert r.returncode == ctl.Exit.LOCAL
    assert "give the region's window with --base and --size" in r.stderr
    r = khoctl("inspect", "--size", "12Q", str(mem))
    assert r.returncode == ctl.Exit.USAGE and "not a size" in r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/mem"), reason="no /dev/mem here")
def test_dev_mem_is_recognized_and_needs_its_window() -> None:
    r = khoctl("inspect", "/dev/mem")  # refused before anything is opened
    assert r.returncode == ctl.Exit.LOCAL
    assert "/dev/mem is physical memory (devmem)" in r.stderr
