"""The handover record: the region's first page, khod's commit point.

khod's stand-in for the kexec boot parameters that carry the FDT's address
to the next kernel (docs/format.md §7). It says who owns the region (a live
daemon's pid), or that a committed handover waits, and where its FDT and
scratch are. Written last on commit; rewritten by unfreeze, by a clean stop
and by a successor once it has taken the handover in.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from khod.errors import Fault, HandoverError
from khod.kho.memory import Memory, ScratchRange
from khod.pages import PAGE_SIZE

RECORD_MAGIC = b"KHODREC\0"
RECORD_VERSION = 1


class RecordState(IntEnum):
    """What the region's first page says about its metadata."""

    CLEAN = 0  # no daemon owns it; nothing handed over
    LIVE = 1  # a daemon (owner_pid) is running on it
    HANDOVER = 2  # a committed handover waits for a successor


# magic, version, state, owner pid, region base, region size, fdt phys, fdt size,
# fdt crc32, reserved, scratch phys, scratch size, generation; then the record crc32.
_RECORD = struct.Struct("<8sIIQQQQQIIQQQ")
_RECORD_CRC = struct.Struct("<I")
RECORD_BYTES = _RECORD.size + _RECORD_CRC.size + 4  # 96: crc, then 4 reserved zero bytes


@dataclass(frozen=True)
class HandoverRecord:
    """One decoded record; ``encode`` gives its bytes."""

    state: RecordState
    owner_pid: int
    region_base: int
    region_size: int
    fdt_phys: int
    fdt_size: int
    fdt_crc32: int
    scratch_phys: int
    scratch_size: int
    generation: int
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        body = _RECORD.pack(
            RECORD_MAGIC,
            self.version,
            int(self.state),
            self.owner_pid,
            self.region_base,
            self.region_size,
            self.fdt_phys,
            self.fdt_size,
            self.fdt_crc32,
            0,
            self.scratch_phys,
            self.scratch_size,
            self.generation,
        )
        return body + _RECORD_CRC.pack(zlib.crc32(body)) + bytes(4)


def record_present(buf: bytes | memoryview) -> bool:
    """Whether the page starts with the record magic (a fresh region does not)."""
    return bytes(buf[: len(RECORD_MAGIC)]) == RECORD_MAGIC


def decode_record(buf: bytes | memoryview) -> HandoverRecord:
    """Decode and check a record; any damage is a ``bad_record`` fault."""
    if len(buf) < RECORD_BYTES:
        raise HandoverError(Fault.BAD_RECORD, f"record needs {RECORD_BYTES} bytes, got {len(buf)}")
    fields = _RECORD.unpack_from(buf, 0)
    (magic, version, state, pid, rbase, rsize, fphys, fsize, fcrc, rsv, sphys, ssize, gen) = fields
    if magic != RECORD_MAGIC:
        raise HandoverError(Fault.BAD_RECORD, f"bad magic {magic!r}")
    (crc,) = _RECORD_CRC.unpack_from(buf, _RECORD.size)
    want = zlib.crc32(bytes(buf[: _RECORD.size]))
    if crc != want:
        raise HandoverError(
            Fault.BAD_RECORD, f"record CRC32 is {crc:#010x}, its bytes give {want:#010x}"
        )
    if version != RECORD_VERSION:
        raise HandoverError(
            Fault.BAD_RECORD, f"record format version {version}, this khod reads {RECORD_VERSION}"
        )
    if state not in RecordState._value2member_map_:
        raise HandoverError(Fault.BAD_RECORD, f"unknown record state {state}")
    if rsv != 0 or any(bytes(buf[_RECORD.size + _RECORD_CRC.size : RECORD_BYTES])):
        raise HandoverError(Fault.BAD_RECORD, "reserved record bytes are not zero")
    return HandoverRecord(
        state=RecordState(state),
        owner_pid=pid,
        region_base=rbase,
        region_size=rsize,
        fdt_phys=fphys,
        fdt_size=fsize,
        fdt_crc32=fcrc,
        scratch_phys=sphys,
        scratch_size=ssize,
        generation=gen,
        version=version,
    )


def live_record(
    mem: Memory,
    scratch: ScratchRange,
    generation: int,
    pid: int,
    state: RecordState = RecordState.LIVE,
) -> HandoverRecord:
    """The record of a region without a handover: ``LIVE`` under ``pid``, or ``CLEAN``."""
    return HandoverRecord(
        state=state,
        owner_pid=pid,
        region_base=mem.base,
        region_size=mem.size,
        fdt_phys=0,
        fdt_size=0,
        fdt_crc32=0,
        scratch_phys=scratch.phys,
        scratch_size=scratch.size,
        generation=generation,
    )


def read_record(mem: Memory) -> HandoverRecord | None:
    """The record on the first page, None if the page holds none (a fresh region)."""
    page = mem.read(mem.base, RECORD_BYTES)
    if not record_present(page):
        return None
    return decode_record(page)


def write_record(mem: Memory, record: HandoverRecord) -> None:
    """Write the record and flush its page: the commit point of every state change."""
    mem.write(mem.base, record.encode())
    mem.flush(mem.base, PAGE_SIZE)
