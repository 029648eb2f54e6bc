"""The handover story on a simulated region, told step by step.

Two workloads keep memory across a handover: a "vmm" with order-9 (2 MiB)
guest-memory folios and a "db" with order-0 pages and a phys range. Their
bytes are written into the region, preserved, serialized as KHO metadata
and committed; a successor then reopens the region, validates everything
and finds every folio, with its owner and order, holding the same bytes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

from khod.abi import PAGE_SHIFT, PAGE_SIZE
from khod.allocator import Allocator
from khod.dtb import to_dts
from khod.handover import (
    SessionImage,
    commit,
    live_record,
    read_handover,
    read_record,
    write_record,
)
from khod.region import Region, open_region
from khod.serial import ScratchRange
from khod.tracker import Tracker
from khod.tree import Tree, u32, u64

BASE = 0x1_0000_0000
SIZE = 256 << 20
SCRATCH = 16 << 20


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def pattern(tag: str, pfn: int, order: int) -> bytes:
    seed = hashlib.sha256(f"{tag}:{pfn}".encode()).digest()
    return (seed * ((PAGE_SIZE << order) // len(seed)))[: PAGE_SIZE << order]


def fresh_allocator(region: Region, scratch: ScratchRange) -> Allocator:
    a = Allocator(
        region.base_pfn,
        region.npages,
        scratch=(scratch.phys >> PAGE_SHIFT, scratch.size >> PAGE_SHIFT),
    )
    a.reserve_pages(region.base_pfn, 1)
    return a


def main() -> int:
    workdir = Path(
        tempfile.mkdtemp(prefix="khod-demo-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    path = str(workdir / "region")
    try:
        step(f"region: {SIZE >> 20} MiB simulated at phys {BASE:#x} ({path})")
        region = open_region("file", path, base=BASE, size=SIZE)
        scratch = ScratchRange(BASE + PAGE_SIZE, SCRATCH)
        alloc = fresh_allocator(region, scratch)
        write_record(region, live_record(region, scratch, 0))

        step("vmm: 8 guest-memory folios of order 9 (2 MiB each), written and preserved")
        vmm, expect = Tracker(), {}
        for _ in range(8):
            pfn = alloc.alloc(9)
            region.write(pfn << PAGE_SHIFT, pattern("vmm", pfn, 9))
            vmm.preserve_folio(pfn, 9)
            expect[(pfn, 9)] = ("vmm", hashlib.sha256(pattern("vmm", pfn, 9)).hexdigest())
        cfg = Tree(reserved_props=frozenset({"compatible", "owner-uid", "metadata"}))
        cfg.add_node("/machine")
        cfg.add_prop("/machine", "vcpus", u32(4))
        cfg.add_prop("/machine", "guest-bytes", u64(8 << 21))
        print(f"   preserved {vmm.total_bytes() >> 20} MiB; config kept in its subtree /machine")

        step("db: 64 order-0 pages plus a 5-page phys range")
        db = Tracker()
        for _ in range(64):
            pfn = alloc.alloc(0)
            region.write(pfn << PAGE_SHIFT, pattern("db", pfn, 0))
            db.preserve_folio(pfn, 0)
            expect[(pfn, 0)] = ("db", hashlib.sha256(pattern("db", pfn, 0)).hexdigest())
        block = alloc.alloc(3)
        for pfn, order in db.preserve_phys(block << PAGE_SHIFT, 5 * PAGE_SIZE):
            region.write(pfn << PAGE_SHIFT, pattern("db", pfn, order))
            expect[(pfn, order)] = ("db", hashlib.sha256(pattern("db", pfn, order)).hexdigest())
        print(
            f"   preserved {db.count()} folios, {db.total_bytes() >> 10} KiB (range split as order 2 + order 0)"
        )

        step("finalize: serialize bitmaps, write the KHO FDT, flush, commit the record")
        t0 = time.perf_counter()
        done = commit(
            region,
            alloc,
            scratch,
            1,
            [SessionImage("vmm", 1000, vmm, cfg.root), SessionImage("db", 1001, db)],
        )
        ms = (time.perf_counter() - t0) * 1e3
        rec = done.record
        print(
            f"   committed generation {rec.generation} in {ms:.1f} ms: {done.chunk_pages} chunk pages, "
            f"{done.metadata_pages} metadata pages, FDT {rec.fdt_size} bytes at {rec.fdt_phys:#x}"
        )
        region.close()

        step("successor: reopen the region, validate and read the handover")
        region = open_region("file", path, base=BASE, size=SIZE)
        rec2 = read_record(region)
        assert rec2 is not None
        t0 = time.perf_counter()
        incoming = read_handover(region, rec2)
        ms = (time.perf_counter() - t0) * 1e3
        print(
            f"   record: {rec2.state.name}, generation {rec2.generation}; validated in {ms:.1f} ms"
        )
        print("   the incoming KHO tree:")
        for line in to_dts(incoming.tree).splitlines():
            print(f"      {line}")

        step("restore: every folio back to its owner, with its order, bytes unchanged")
        ok = bad = 0
        for name, sess in sorted(incoming.sessions.items()):
            for phys, order in sess.memory.tracker.iter_folios():
                pfn = phys >> PAGE_SHIFT
                owner, digest = expect.pop((pfn, order), ("?", ""))
                same = hashlib.sha256(region.read(phys, PAGE_SIZE << order)).hexdigest() == digest
                ok += owner == name and same
                bad += not (owner == name and same)
            print(
                f"   {name:4} uid {sess.uid}: {sess.memory.tracker.count():3} folios, "
                f"{sess.memory.tracker.total_bytes() >> 10:6} KiB"
            )
        region.close()
        print(
            f"   verified {ok} folios byte for byte, {bad} mismatches, {len(expect)} missing; bytes copied: 0"
        )
        if bad or expect:
            print("demo FAILED", file=sys.stderr)
            return 1
        print("\ndemo ok")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
