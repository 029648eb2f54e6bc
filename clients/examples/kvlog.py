"""The store's on-disk log: a byte image of its data segments, appended as records are written.

Every record goes to the same offset in the file as in memory (the tail of a
segment a record did not fit in reads as zeros in both), so replaying the log
is reading the file back into segments and scanning them (:func:`scan`).
That replay is the store's cold start, and the baseline its warm start is
measured against.

Each record is written (to the OS) before the write that made it returns,
so a crash of the store loses nothing it acknowledged; ``sync`` fsyncs.
When the log is behind the preserved memory after a warm start (writes the
old kernel never put on disk), the missing bytes are copied from memory
before the next write.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

from .kvformat import (
    DEL,
    META,
    META_KEY,
    PUT,
    RECORD,
    SEGMENT,
    SEGMENT_SHIFT,
    UUID_BYTES,
    KvError,
    damaged,
)


class Log:
    """Appends at data offsets; ``pos`` is where the file ends."""

    def __init__(self, path: str, fd: int, pos: int) -> None:
        self.path = path
        self.fd = fd
        self.pos = pos

    @classmethod
    def create(cls, path: str) -> Log:
        """A new, empty log; refuses to overwrite one that holds records."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(fd).st_size
        if size:
            os.close(fd)
            raise KvError(
                "EEXIST", f"log {path} already holds {size} bytes: replay it, or remove it"
            )
        return cls(path, fd, 0)

    @classmethod
    def reopen(cls, path: str, end: int, uuid: bytes) -> Log:
        """The log of a store whose data ends at ``end``; O(1): a stat and one record read."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise KvError("EINVAL", f"cannot open log {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size > end:
                raise damaged(
                    f"log {path} has {size} bytes, more than the preserved store's {end}: "
                    "it is not this store's log, or the store lost writes"
                )
            if size:
                head = os.pread(fd, RECORD.size + len(META_KEY) + UUID_BYTES, 0)
                if meta_uuid(memoryview(head)) != uuid:
                    raise damaged(f"log {path} belongs to another store")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size)

    def append(self, loc: int, rec: bytes) -> None:
        """Write ``rec`` at ``loc`` (>= the end so far; a gap is a hole that reads as zeros)."""
        if os.pwrite(self.fd, rec, loc) != len(rec):
            raise KvError("ENOSPC", f"short write to log {self.path}")
        self.pos = loc + len(rec)

    def catch_up(self, segments: list[memoryview], end: int) -> None:
        """Copy what memory holds past the file's end (after a warm start)."""
        at = self.pos
        while at < end:
            seg, off = segments[at >> SEGMENT_SHIFT], at & (SEGMENT - 1)
            n = min(SEGMENT - off, end - at)
            os.pwrite(self.fd, seg[off : off + n], at)
            at += n
        self.pos = max(self.pos, end)

    def sync(self) -> None:
        os.fsync(self.fd)

    def truncate(self, end: int) -> None:
        """Cut a torn tail found by the replay."""
        os.ftruncate(self.fd, end)
        self.pos = end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def meta_uuid(head: memoryview) -> bytes | None:
    """The store's uuid from its first record, or None if it is not a META record."""
    if len(head) < RECORD.size + len(META_KEY) + UUID_BYTES:
        return None
    crc, kind, klen, vlen = RECORD.unpack_from(head, 0)
    end = RECORD.size + klen + vlen
    if kind != META or klen != len(META_KEY) or vlen != UUID_BYTES or len(head) < end:
        return None
    if zlib.crc32(head[4:end]) != crc or head[RECORD.size : RECORD.size + klen] != META_KEY:
        return None
    return bytes(head[RECORD.size + klen : end])


@dataclass
class Scan:
    """What a replay found: each live key's ``size << 48 | loc``, and the totals."""

    final: dict[bytes, int] = field(default_factory=dict)
    uuid: bytes = b""
    end: int = 0  # after the last good record
    records: int = 0
    record_bytes: int = 0  # of PUT and DEL records
    torn_at: int | None = None  # a damaged tail was cut here


def scan(segments: list[memoryview], size: int, path: str) -> Scan:
    """Replay records in order: the last PUT of a key wins, a DEL removes it.

    A record that fails its checks in the last segment is a torn tail: the
    scan stops there. Anywhere else the log is damaged and refused.
    """
    out = Scan()
    uuid = meta_uuid(segments[0]) if segments else None
    if uuid is None:
        raise damaged(f"log {path} does not start with a kvstore META record")
    out.uuid = uuid
    unpack, crc32, final = RECORD.unpack_from, zlib.crc32, out.final
    last = len(segments) - 1
    records = 0
    total = 0
    for s, seg in enumerate(segments):
        base = s << SEGMENT_SHIFT
        stop = min(SEGMENT, size - base)
        off = 0
        while off + RECORD.size <= stop:
            crc, kind, klen, vlen = unpack(seg, off)
            if kind == 0 and crc == 0:
                break  # the rest of the segment is empty
            end = off + RECORD.size + klen + vlen
            bad = ""
            if end > stop:
                bad = "runs past the end"
            elif crc32(seg[off + 4 : end]) != crc:
                bad = "fails its crc32"
            elif kind == PUT:
                final[bytes(seg[off + 8 : off + 8 + klen])] = ((end - off + 7) & ~7) << 48 | (
                    base + off
                )
            elif kind == DEL:
                final.pop(bytes(seg[off + 8 : off + 8 + klen]), None)
            elif not (kind == META and base + off == 0):
                bad = f"has type {kind}"
            if bad:
                if s != last:
                    raise damaged(f"log {path}: the record at {base + off:#x} {bad}")
                out.torn_at = base + off
                out.end = base + off
                out.records, out.record_bytes = records, total
                return out
            rec = (end - off + 7) & ~7
            if kind != META:
                records += 1
                total += rec
            off += rec
        if off:
            out.end = base + off
    out.records, out.record_bytes = records, total
    return out
