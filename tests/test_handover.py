"""A whole handover written and read back, and one refusal per fault class of docs/format.md §8."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from khod.allocator import Allocator
from khod.errors import Fault, HandoverError
from khod.kho.chunklist import deserialize
from khod.kho.dtb import from_dtb, to_dtb
from khod.kho.handover import Committed, SessionImage, commit, read_handover
from khod.kho.memory import ScratchRange
from khod.kho.props import u32
from khod.kho.record import RecordState, live_record, read_record, write_record
from khod.kho.tracker import Tracker
from khod.kho.tree import Tree
from khod.pages import PAGE_SHIFT, PAGE_SIZE, split_range
from khod.region import Region, open_region

from .conftest import BASE, MakeRegion, allocator_for


@dataclass
class Setup:
    region: Region
    alloc: Allocator
    scratch: ScratchRange
    committed: Committed
    vmm_folios: list[int]
    db_folios: list[int]


def build(region: Region) -> Setup:
    """A 'vmm' session with order-9 folios and a subtree, a 'db' with order-0 pages."""
    alloc, scratch = allocator_for(region)
    write_record(region, live_record(region, scratch, 0, os.getpid()))
    vmm, db = Tracker(), Tracker()
    vmm_folios = [alloc.alloc(9) for _ in range(3)]
    for pfn in vmm_folios:
        vmm.preserve_folio(pfn, 9)
    block = alloc.alloc(4)
    split = split_range(block, 5)  # pages 0-3 as order 2, 4 as order 0
    db.preserve_folios([p for p, _ in split], [o for _, o in split])
    db_folios = [alloc.alloc(0) for _ in range(4)]
    db.preserve_folios(db_folios, 0)
    tree = Tree()
    tree.add_node("/machine")
    tree.add_prop("/machine", "vcpus", u32(4))
    committed = commit(
        region,
        alloc,
        scratch,
        1,
        [SessionImage("vmm", 1000, vmm, tree.root), SessionImage("db", 1001, db)],
        owner_pid=os.getpid(),
    )
    return Setup(region, alloc, scratch, committed, vmm_folios, db_folios)


@pytest.fixture
def setup(make_region: MakeRegion) -> Setup:
    return build(make_region())


def read(s: Setup) -> object:
    rec = read_record(s.region)
    assert rec is not None
    return read_handover(s.region, rec)


def test_round_trip(setup: Setup) -> None:
    rec = read_record(setup.region)
    assert rec is not None
    assert rec.state is RecordState.HANDOVER
    assert rec.generation == 1
    inc = read_handover(setup.region, rec)
    assert inc.generation == 1
    assert sorted(inc.sessions) == [(1000, "vmm"), (1001, "db")]
    vmm, db = inc.sessions[(1000, "vmm")], inc.sessions[(1001, "db")]
    assert (vmm.uid, db.uid) == (1000, 1001)
    assert vmm.memory.tracker.folios(9).tolist() == setup.vmm_folios
    assert db.memory.tracker.count() == 2 + 4
    assert vmm.subtree.children["machine"].props == {"vcpus": u32(4)}
    assert "owner-uid" not in vmm.subtree.props  # khod's own props are stripped
    assert inc.root.tracker.count() == 3 + 6
    assert inc.metadata_crc32 == setup.committed.metadata_crc32
    assert setup.committed.bytes_by_order == {0: 5 * PAGE_SIZE, 2: 4 * PAGE_SIZE, 9: 3 << 21}


def test_commit_failure_leaves_no_handover_and_no_pages(make_region: MakeRegion) -> None:
    region = make_region()
    alloc, scratch = allocator_for(region)
    write_record(region, live_record(region, scratch, 0, os.getpid()))
    t = Tracker()
    t.preserve_folio(alloc.alloc(3), 3)
    before = alloc.usage()

    def die(point: str) -> None:
        if point == "commit":
            raise RuntimeError("crash just before the commit point")

    with pytest.raises(RuntimeError):
        commit(region, alloc, scratch, 1, [SessionImage("s", 0, t)], owner_pid=1, hook=die)
    rec = read_record(region)
    assert rec is not None
    assert rec.state is RecordState.LIVE
    assert alloc.usage() == before


def test_unfreeze_gives_every_page_back(setup: Setup) -> None:
    used = setup.alloc.usage().allocated
    setup.committed.free(setup.alloc)
    meta = (setup.committed.metadata_pages + (1 << setup.committed.fdt_block[1])) * PAGE_SIZE
    assert setup.alloc.usage().allocated == used - meta


# --------------------------------------------------------------------------- corruption helpers


def chunk_phys(s: Setup, which: int = 0) -> int:
    """phys of the root list's ``which``-th chunk page."""
    phys = s.committed.root.first_chunk
    for _ in range(which):
        phys = struct.unpack("<Q", s.region.read(phys, 8))[0]
    return int(phys)


def poke(s: Setup, phys: int, fmt: str, *values: int) -> None:
    s.region.write(phys, struct.pack(fmt, *values))


def rewrite_fdt(s: Setup, edit: Callable[[object], None]) -> None:
    """Edit the FDT tree, write it back and reseal the record (so its CRC holds)."""
    rec = read_record(s.region)
    assert rec is not None
    tree = from_dtb(s.region.read(rec.fdt_phys, rec.fdt_size))
    edit(tree)
    blob = to_dtb(tree)
    assert len(blob) <= 1 << (s.committed.fdt_block[1] + PAGE_SHIFT)
    s.region.write(rec.fdt_phys, blob)
    write_record(s.region, replace(rec, fdt_size=len(blob), fdt_crc32=zlib.crc32(blob)))


def reseal_metadata_crc(s: Setup) -> None:
    """Recompute /khod/metadata-crc32 after a deliberate edit of the lists."""
    rec = read_record(s.region)
    assert rec is not None
    tree = from_dtb(s.region.read(rec.fdt_phys, rec.fdt_size))
    crc = deserialize(s.region, s.committed.root.first_chunk, s.scratch).crc32
    for name in sorted(n for n in tree.children if n not in ("khod", "preserved-memory")):
        first = struct.unpack("<Q", tree.children[name].props["metadata"])[0]
        crc = deserialize(s.region, first, s.scratch, crc_seed=crc).crc32

    def edit(t: object) -> None:
        t.children["khod"].props["metadata-crc32"] = u32(crc)  # type: ignore[attr-defined]

    rewrite_fdt(s, edit)


def order0_bitmap(s: Setup) -> int:
    """phys of the root list's (single) order-0 bitmap."""
    return int(struct.unpack("<Q", s.region.read(chunk_phys(s, 0) + 24, 8))[0])


def expect(s: Setup, fault: Fault, match: str = "") -> None:
    with pytest.raises(HandoverError, match=match) as e:
        read(s)
    assert e.value.fault is fault
    assert str(fault) in str(e.value)


# --------------------------------------------------------------------------- one test per fault


def test_bad_record(setup: Setup) -> None:
    raw = bytearray(setup.region.read(setup.region.base, 96))
    raw[44] ^= 0x10  # a bit of the FDT size: the record CRC no longer holds
    setup.region.write(setup.region.base, bytes(raw))
    with pytest.raises(HandoverError, match="record CRC32") as e:
        read_record(setup.region)
    assert e.value.fault is Fault.BAD_RECORD


def test_region_mismatch(setup: Setup, shm_dir: object) -> None:
    other = open_region("file", setup.region.path, base=BASE + (1 << 30), size=setup.region.size)
    try:
        rec = read_record(other)
        assert rec is not None
        with pytest.raises(HandoverError, match="describes region") as e:
            read_handover(other, rec)
        assert e.value.fault is Fault.REGION_MISMATCH
    finally:
        other.close()


def test_pointer_outside_region(setup: Setup) -> None:
    poke(setup, chunk_phys(setup), "<Q", setup.region.end + PAGE_SIZE)
    expect(setup, Fault.POINTER_OUTSIDE_REGION, "outside the region")


def test_pointer_at_the_record_page(setup: Setup) -> None:
    poke(setup, chunk_phys(setup), "<Q", setup.region.base)
    expect(setup, Fault.POINTER_OUTSIDE_REGION, "handover record")


def test_pointer_in_scratch(setup: Setup) -> None:
    poke(setup, chunk_phys(setup), "<Q", setup.scratch.phys + PAGE_SIZE)
    expect(setup, Fault.POINTER_IN_SCRATCH, "scratch")


def test_pointer_misaligned(setup: Setup) -> None:
    poke(setup, chunk_phys(setup), "<Q", chunk_phys(setup, 1) + 8)
    expect(setup, Fault.POINTER_MISALIGNED, "aligned")


def test_bitmap_pointer_misaligned(setup: Setup) -> None:
    poke(setup, chunk_phys(setup) + 24, "<Q", order0_bitmap(setup) + 64)
    expect(setup, Fault.POINTER_MISALIGNED, "bitmap pointer")


def test_bad_order(setup: Setup) -> None:
    poke(setup, chunk_phys(setup) + 8, "<I", 19)
    expect(setup, Fault.BAD_ORDER, "order 19")


def test_too_many_entries(setup: Setup) -> None:
    poke(setup, chunk_phys(setup) + 12, "<I", 256)
    expect(setup, Fault.TOO_MANY_ENTRIES, "256 entries")


def test_misaligned_phys_start(setup: Setup) -> None:
    start = struct.unpack("<Q", setup.region.read(chunk_phys(setup) + 16, 8))[0]
    poke(setup, chunk_phys(setup) + 16, "<Q", start + PAGE_SIZE)
    expect(setup, Fault.MISALIGNED_PHYS_START, "phys_start")


def test_malformed_chunk(setup: Setup) -> None:
    poke(setup, chunk_phys(setup) + 16 + 16 * 200, "<Q", 0xDEAD)  # garbage past num_elms
    expect(setup, Fault.MALFORMED_CHUNK, "non-zero")


def test_chunks_out_of_order(setup: Setup) -> None:
    # the list's orders must ascend: make the order-2 chunk claim order 0 again
    c2 = chunk_phys(setup, 1)
    assert struct.unpack("<I", setup.region.read(c2 + 8, 4))[0] == 2
    start = struct.unpack("<Q", setup.region.read(c2 + 16, 8))[0]
    poke(setup, c2 + 8, "<I", 0)
    poke(setup, c2 + 16, "<Q", start)
    expect(setup, Fault.MALFORMED_CHUNK, "ascending")


def test_folio_outside_region(setup: Setup) -> None:
    poke(setup, chunk_phys(setup) + 16, "<Q", setup.region.end)  # bitmap now covers past the end
    expect(setup, Fault.FOLIO_OUT_OF_BOUNDS, "outside")


def test_folio_in_scratch(setup: Setup) -> None:
    bm = order0_bitmap(setup)
    bit = (setup.scratch.phys - (setup.scratch.phys >> 24 << 24)) >> PAGE_SHIFT
    byte = setup.region.read(bm + bit // 8, 1)[0]
    setup.region.write(bm + bit // 8, bytes([byte | 1 << (bit % 8)]))
    expect(setup, Fault.FOLIO_OUT_OF_BOUNDS, "scratch")


def test_overlapping_folios(setup: Setup) -> None:
    # mark an order-0 page inside the first order-9 folio as preserved too
    bm = order0_bitmap(setup)
    start = struct.unpack("<Q", setup.region.read(chunk_phys(setup) + 16, 8))[0]
    bit = setup.vmm_folios[0] - (start >> PAGE_SHIFT) + 3
    assert 0 <= bit < 4096
    byte = setup.region.read(bm + bit // 8, 1)[0]
    setup.region.write(bm + bit // 8, bytes([byte | 1 << (bit % 8)]))
    expect(setup, Fault.OVERLAP, "overlaps")


def test_chunk_loop(setup: Setup) -> None:
    last = chunk_phys(setup, 2)  # order 0, order 2, order 9
    poke(setup, last, "<Q", chunk_phys(setup, 0))
    expect(setup, Fault.CHUNK_LOOP, "returns to")


def test_bad_dtb(setup: Setup) -> None:
    rec = read_record(setup.region)
    assert rec is not None
    blob = bytearray(setup.region.read(rec.fdt_phys, rec.fdt_size))
    blob[8:12] = struct.pack(">I", 1 << 24)  # structure block offset far outside
    setup.region.write(rec.fdt_phys, bytes(blob))
    write_record(setup.region, replace(rec, fdt_crc32=zlib.crc32(bytes(blob))))
    expect(setup, Fault.BAD_DTB, "outside the blob")


@pytest.mark.parametrize(
    ("node", "prop", "match"),
    [
        ("khod", "generation", "no 'generation'"),
        ("preserved-memory", "metadata", "no 'metadata'"),
        ("u1000,vmm", "owner-uid", "no 'owner-uid'"),
        ("u1001,db", "compatible", "no 'compatible'"),
    ],
)
def test_missing_property(setup: Setup, node: str, prop: str, match: str) -> None:
    rewrite_fdt(setup, lambda t: t.children[node].props.pop(prop))  # type: ignore[attr-defined]
    expect(setup, Fault.MISSING_PROPERTY, match)


def test_a_session_node_must_be_named_for_its_owner(setup: Setup) -> None:
    def rename(t: object) -> None:
        kids = t.children  # type: ignore[attr-defined]
        kids["u1002,vmm"] = kids.pop("u1000,vmm")  # owner-uid still says 1000

    rewrite_fdt(setup, rename)
    expect(setup, Fault.MISSING_PROPERTY, "not named u<owner-uid>")


@pytest.mark.parametrize("name", ["khod", "preserved-memory", "compatible"])
def test_a_session_node_may_not_take_a_name_khod_never_writes(setup: Setup, name: str) -> None:
    """The reader accepts only what the writer could write: hello refuses these names,
    so a successor taking one in could never serve its owner nor finalize again."""

    def rename(t: object) -> None:
        kids = t.children  # type: ignore[attr-defined]
        kids[f"u1000,{name}"] = kids.pop("u1000,vmm")

    rewrite_fdt(setup, rename)
    expect(setup, Fault.MISSING_PROPERTY, "not named u<owner-uid>")


def test_an_older_khods_handover_is_refused_by_name(setup: Setup) -> None:
    rewrite_fdt(setup, lambda t: t.children["khod"].props.update(compatible=b"khod-v1\0"))  # type: ignore[attr-defined]
    expect(setup, Fault.MISSING_PROPERTY, "written by an older khod")


def test_wrong_compatible(setup: Setup) -> None:
    rewrite_fdt(setup, lambda t: t.props.update(compatible=b"kho-v2\0"))  # type: ignore[attr-defined]
    expect(setup, Fault.MISSING_PROPERTY, "kho-v2")


def test_fdt_crc_mismatch(setup: Setup) -> None:
    rec = read_record(setup.region)
    assert rec is not None
    byte = setup.region.read(rec.fdt_phys + rec.fdt_size - 2, 1)[0]
    setup.region.write(rec.fdt_phys + rec.fdt_size - 2, bytes([byte ^ 1]))
    expect(setup, Fault.CRC_MISMATCH, "FDT CRC32")


def test_metadata_crc_mismatch(setup: Setup) -> None:
    # a bit flip that leaves a valid, non-overlapping folio set still breaks the CRC
    bm = order0_bitmap(setup)
    byte = setup.region.read(bm + 500, 1)[0]
    setup.region.write(bm + 500, bytes([byte ^ 0x80]))
    expect(setup, Fault.CRC_MISMATCH, "metadata CRC32")


def test_session_lists_do_not_add_up(setup: Setup) -> None:
    bm = order0_bitmap(setup)  # root list only: sessions no longer cover it
    byte = setup.region.read(bm + 500, 1)[0]
    setup.region.write(bm + 500, bytes([byte ^ 0x80]))
    reseal_metadata_crc(setup)
    expect(setup, Fault.SESSION_MISMATCH, "same set")


def test_session_lists_not_disjoint(setup: Setup) -> None:
    # point db's list at vmm's: both sessions now claim the same folios
    def edit(t: object) -> None:
        kids = t.children  # type: ignore[attr-defined]
        kids["u1001,db"].props["metadata"] = kids["u1000,vmm"].props["metadata"]

    rewrite_fdt(setup, edit)
    reseal_metadata_crc(setup)
    expect(setup, Fault.SESSION_MISMATCH, "another session")
