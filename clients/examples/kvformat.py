"""The key-value store's bytes: records, the superblock header, the key hash, its errors.

Sans-I/O: nothing here touches a file, a socket or khod. Every layout is
little-endian and fixed by ``VERSION``; a reader refuses anything else by name.

* **Data** is a log-structured space of 2 MiB *segments* (one order-9 folio
  each). A record's location (``loc``) is its byte offset in that space:
  segment ``loc >> 21``, offset ``loc & (2 MiB - 1)``. Records never straddle
  a segment; a header of zeros ends a segment. The on-disk log is a byte
  image of the same space, so a record sits at the same offset in both.
* **Record**: ``u32 crc32, u8 type, u8 key length, u16 value length, key,
  value``, padded to 8 bytes. The CRC covers everything after it (type,
  lengths, key, value). Types: META (the first record, naming the store),
  PUT, DEL.
* **Superblock**: one page; ``HEADER`` below, then zeros. Its CRC32 covers
  the header's first 124 bytes. ``state`` is SEALED only between a seal (the
  FINALIZE notifier) and the next write.
* **Index slots**: 16 bytes, ``u64 hash, u64 loc``; hash 0 is an empty slot,
  1 a tombstone (real hashes are moved out of that range).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

VERSION = 1
SEGMENT_SHIFT = 21
SEGMENT = 1 << SEGMENT_SHIFT  # 2 MiB: one order-9 folio
SEGMENT_ORDER = SEGMENT_SHIFT - 12
PAGE = 4096

MAX_KEY = 255
MAX_VALUE = 8192

EMPTY = 0
TOMBSTONE = 1
SLOT_BYTES = 16

META, PUT, DEL = 1, 2, 3
RECORD = struct.Struct("<IBBH")  # crc32, type, key length, value length
META_KEY = b"khoexamples.kvstore"
UUID_BYTES = 16

MAGIC = b"KHOKVSB\0"
OPEN, SEALED = 1, 2
HEADER = struct.Struct("<8sIIII QQQQQQQQQ 16s 12x I")
HEADER_CRC_AT = HEADER.size - 4
HEADER_FIELDS = [
    "magic",
    "version",
    "state",
    "segment_shift",
    "index_order",
    "index_slots",
    "index_phys",
    "live",
    "tombstones",
    "segments",
    "used",
    "live_bytes",
    "dead_bytes",
    "seals",
    "uuid",
]
assert HEADER.size == 128


class KvError(Exception):
    """A refused store operation: an errno-style ``code`` and a message naming the fault.

    Codes: EINVAL (bad key, value or request), ENOENT (no log to replay),
    EEXIST (a new store's log already holds records), EBUSY (writes paused
    for a live update), ENOSPC (the store cannot grow), EBADMSG (a damaged
    table, record or log). A daemon's refusal stays a ``KhoError``.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class Unsealed(KvError):
    """A table its writer left open (it crashed, or never paused): rebuild it from the log."""

    def __init__(self) -> None:
        super().__init__(
            "EBADMSG",
            "the table was not sealed (its writer stopped without pausing for the live "
            "update, so it may be half-written): recover from the log",
        )


def damaged(message: str) -> KvError:
    return KvError("EBADMSG", message)


def key_hash(key: bytes) -> int:
    """A hash stable across processes (Python's own is salted per process)."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h if h > TOMBSTONE else h + 2


def check_item(key: object, value: object = b"") -> None:
    """Refuse what no record can hold, before anything is written."""
    if not isinstance(key, bytes):
        raise KvError("EINVAL", f"a key must be bytes, got {type(key).__name__}")
    if not isinstance(value, bytes):
        raise KvError("EINVAL", f"a value must be bytes, got {type(value).__name__}")
    if not 1 <= len(key) <= MAX_KEY:
        raise KvError("EINVAL", f"a key has 1..{MAX_KEY} bytes, got {len(key)}")
    if len(value) > MAX_VALUE:
        raise KvError("EINVAL", f"a value has at most {MAX_VALUE} bytes, got {len(value)}")


def record(kind: int, key: bytes, value: bytes = b"") -> bytes:
    """One record, padded to 8 bytes."""
    body = struct.pack("<BBH", kind, len(key), len(value)) + key + value
    pad = -(len(body) + 4) % 8
    return struct.pack("<I", zlib.crc32(body)) + body + bytes(pad)


def record_size(key_len: int, value_len: int) -> int:
    return (RECORD.size + key_len + value_len + 7) & ~7


@dataclass
class Header:
    """The superblock's fields (see the module docstring)."""

    index_order: int
    index_slots: int
    index_phys: int
    uuid: bytes
    state: int = OPEN
    live: int = 0
    tombstones: int = 0
    segments: int = 0
    used: int = 0
    live_bytes: int = 0
    dead_bytes: int = 0
    seals: int = 0

    def pack(self) -> bytes:
        raw = HEADER.pack(
            MAGIC,
            VERSION,
            self.state,
            SEGMENT_SHIFT,
            self.index_order,
            self.index_slots,
            self.index_phys,
            self.live,
            self.tombstones,
            self.segments,
            self.used,
            self.live_bytes,
            self.dead_bytes,
            self.seals,
            self.uuid,
            0,
        )
        return raw[:HEADER_CRC_AT] + struct.pack("<I", zlib.crc32(raw[:HEADER_CRC_AT]))

    @staticmethod
    def index_order_of(raw: bytes | memoryview) -> int:
        """The index's folio order, read before the rest is mapped (checked later by unpack)."""
        order = int(HEADER.unpack_from(raw, 0)[4])
        if not 0 <= order <= 18:
            raise damaged(f"superblock names an order-{order} index")
        return order

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Header:
        """Parse and check a superblock on its own; EBADMSG naming the first fault."""
        if len(raw) < HEADER.size:
            raise damaged(f"superblock of {len(raw)} bytes, need {HEADER.size}")
        f = dict(zip(HEADER_FIELDS, HEADER.unpack_from(raw, 0)[:-1], strict=True))
        if f["magic"] != MAGIC:
            raise damaged(f"superblock magic {f['magic']!r}, expected {MAGIC!r}")
        if f["version"] != VERSION:
            raise damaged(f"superblock version {f['version']}, this store reads {VERSION}")
        want = struct.unpack_from("<I", raw, HEADER_CRC_AT)[0]
        got = zlib.crc32(bytes(raw[:HEADER_CRC_AT]))
        if want != got:
            raise damaged(f"superblock crc32 {want:#010x} does not match its bytes ({got:#010x})")
        if f["state"] not in (OPEN, SEALED):
            raise damaged(f"superblock state {f['state']} is neither open nor sealed")
        if f["segment_shift"] != SEGMENT_SHIFT:
            raise damaged(f"segments of 2^{f['segment_shift']} bytes, expected 2^{SEGMENT_SHIFT}")
        slots = f["index_slots"]
        if slots < 8 or slots & (slots - 1) or slots * SLOT_BYTES > PAGE << f["index_order"]:
            raise damaged(f"{slots} index slots do not fit an order-{f['index_order']} folio")
        if f["live"] + f["tombstones"] >= slots:
            raise damaged(f"{f['live']} keys and {f['tombstones']} tombstones in {slots} slots")
        if f["used"] > f["segments"] << SEGMENT_SHIFT or f["used"] % 8:
            raise damaged(f"data end {f['used']:#x} outside {f['segments']} segments")
        if f["live_bytes"] + f["dead_bytes"] > f["used"]:
            raise damaged(f"{f['live_bytes']} + {f['dead_bytes']} record bytes past {f['used']}")
        del f["magic"], f["version"], f["segment_shift"]
        return cls(**f)
