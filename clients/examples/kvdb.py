"""The key-value store: get/put/delete over a hash table and a record space in one memory.

Three ways to open one, and what each costs before it can answer a get:

* :meth:`Store.create`: a new, empty store;
* :meth:`Store.attach` (the warm start): the memory already holds a sealed
  table and its records (restored from khod, in place). It checks the
  superblock and one record, nothing per key, and serves;
* :meth:`Store.replay` (the cold start): read the on-disk log back into
  memory, scan every record, hash every live key and build the table.

Writes append a record (to memory and to the log) and then update the
table; overwritten and deleted records stay behind as dead bytes, counted in
the header. ``seal`` pauses writes and marks the superblock SEALED with a
fresh CRC: only a sealed table may be attached, so a successor never
serves a table a writer was in the middle of changing. The first write
after a seal marks it OPEN again before it changes anything.

One lock guards every operation: the FINALIZE callback seals from the
client's callback thread while the main thread serves.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .kvformat import (
    DEL,
    META,
    META_KEY,
    OPEN,
    PUT,
    RECORD,
    SEALED,
    SEGMENT,
    SEGMENT_SHIFT,
    SLOT_BYTES,
    UUID_BYTES,
    Header,
    KvError,
    Unsealed,
    check_item,
    damaged,
    key_hash,
    record,
)
from .kvlog import Log, meta_uuid, scan
from .kvmemory import Memory, order_for
from .kvtable import Table, slots_for

FIRST_SLOTS = 1024


class Store:
    """One store over one :class:`kvmemory.Memory`, with an optional log."""

    def __init__(self, mem: Memory, header: Header, log: Log | None) -> None:
        assert mem.index is not None
        self.mem = mem
        self.h = header
        self.log = log
        self.table = Table(mem.index, header.index_slots, header.live, header.tombstones)
        self.segments = mem.segments
        self.lock = threading.RLock()
        self.paused = False
        self.torn_at: int | None = None  # where a replay cut a torn log tail
        self.closed = False

    # ----------------------------------------------------------------- opening

    @classmethod
    def create(cls, mem: Memory, log: Log | None = None, slots: int = FIRST_SLOTS) -> Store:
        uuid = os.urandom(UUID_BYTES)
        order = order_for(slots * SLOT_BYTES)
        view, phys = mem.new_index(order)
        mem.swap_index(view, order, phys)
        store = cls(mem, Header(order, slots, phys, uuid), log)
        with store.lock:
            store._append(META, META_KEY, uuid)
            store._write_header()
        return store

    @classmethod
    def attach(cls, mem: Memory, log_path: str | None = None) -> Store:
        """The warm start: take a sealed table as it is. O(1) in the number of keys.

        Refuses (EBADMSG, naming the fault) a damaged superblock, one that
        does not describe this memory, or a table that was not sealed.
        """
        h = Header.unpack(mem.superblock)
        if h.state != SEALED:
            raise Unsealed()
        if mem.index is None or (h.index_order, h.index_phys) != (
            mem.index_order,
            mem.index_phys,
        ):
            raise damaged(
                f"superblock names an order-{h.index_order} index at {h.index_phys:#x}, "
                f"the memory holds order {mem.index_order} at {mem.index_phys:#x}"
            )
        if h.segments != len(mem.segments):
            raise damaged(
                f"superblock counts {h.segments} segments, the memory has {len(mem.segments)}"
            )
        if not mem.segments or meta_uuid(mem.segments[0]) != h.uuid:
            raise damaged("the first record is not this store's META record")
        log = Log.reopen(log_path, h.used, h.uuid) if log_path else None
        return cls(mem, h, log)

    @classmethod
    def replay(cls, mem: Memory, log_path: str, writable: bool = True) -> Store:
        """The cold start: rebuild the store in ``mem`` from its log (a torn tail is cut).

        ``writable=False`` leaves the log alone: a store that only reads.
        """
        try:
            fd = os.open(log_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KvError("ENOENT", f"cannot open log {log_path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb", buffering=0) as f:
            size = os.fstat(fd).st_size
            mem.add_segments(-(-size // SEGMENT))
            for seg in mem.segments:
                f.readinto(seg)
        found = scan(mem.segments, size, log_path)
        packed = np.fromiter(found.final.values(), dtype=np.uint64, count=len(found.final))
        hashes = np.fromiter(
            (key_hash(k) for k in found.final), dtype=np.uint64, count=len(found.final)
        )
        locs = packed & np.uint64((1 << 48) - 1)
        live_bytes = int((packed >> np.uint64(48)).sum())
        slots = slots_for(len(found.final))
        order = order_for(slots * SLOT_BYTES)
        view, phys = mem.new_index(order)
        table = Table(view, slots)
        table.fill(hashes, locs)
        mem.swap_index(view, order, phys)
        h = Header(
            order,
            slots,
            phys,
            found.uuid,
            live=table.live,
            segments=len(mem.segments),
            used=found.end,
            live_bytes=live_bytes,
            dead_bytes=found.record_bytes - live_bytes,
        )
        log = Log.reopen(log_path, max(size, found.end), found.uuid) if writable else None
        if found.torn_at is not None:  # the torn tail is the last segment's
            if log is not None:
                log.truncate(found.torn_at)
            cut = found.torn_at & (SEGMENT - 1)
            mem.segments[-1][cut:] = bytes(SEGMENT - cut)
        store = cls(mem, h, log)
        with store.lock:
            store._write_header()
        store.torn_at = found.torn_at
        return store

    # ----------------------------------------------------------------- reading

    def _record(self, loc: int) -> tuple[memoryview, int, int, int]:
        """(segment, offset, key length, value length) of the PUT record at ``loc``."""
        if loc >= self.h.used or loc & 7:
            raise damaged(f"a slot points at {loc:#x}, outside the records (end {self.h.used:#x})")
        seg = self.segments[loc >> SEGMENT_SHIFT]
        off = loc & (SEGMENT - 1)
        _, kind, klen, vlen = RECORD.unpack_from(seg, off)
        if kind != PUT or off + RECORD.size + klen + vlen > SEGMENT:
            raise damaged(f"a slot points at {loc:#x}, which is not a PUT record")
        return seg, off, klen, vlen

    def _same(self, key: bytes) -> Callable[[int], bool]:
        def same(loc: int) -> bool:
            seg, off, klen, _ = self._record(loc)
            return klen == len(key) and seg[off + 8 : off + 8 + klen] == key

        return same

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key``, or None; EBADMSG rather than a damaged value."""
        check_item(key)
        h = key_hash(key)
        with self.lock:
            i, _ = self.table.find(h, self._same(key))
            if i < 0:
                return None
            loc = self.table.loc(i)
            seg, off, klen, vlen = self._record(loc)
            end = off + RECORD.size + klen + vlen
            if zlib.crc32(seg[off + 4 : end]) != RECORD.unpack_from(seg, off)[0]:
                raise damaged(f"the record of key {key!r} at {loc:#x} fails its crc32")
            return bytes(seg[end - vlen : end])

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self.table.live

    # ----------------------------------------------------------------- writing

    def put(self, key: bytes, value: bytes) -> None:
        check_item(key, value)
        h = key_hash(key)
        with self.lock:
            self._writable()
            same = self._same(key)
            i, free = self.table.find(h, same)
            if i < 0 and self.table.full_after(1):
                self._rebuild()
                i, free = self.table.find(h, same)
            loc = self._append(PUT, key, value)
            size = (RECORD.size + len(key) + len(value) + 7) & ~7
            if i >= 0:
                old = self._size_at(self.table.loc(i))
                self.table.replace_at(i, loc)
                self.h.dead_bytes += old
                self.h.live_bytes += size - old
            else:
                self.table.put_at(free, h, loc)
                self.h.live_bytes += size

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False if it was not there."""
        check_item(key)
        h = key_hash(key)
        with self.lock:
            self._writable()
            i, _ = self.table.find(h, self._same(key))
            if i < 0:
                return False
            old = self._size_at(self.table.loc(i))
            loc = self._append(DEL, key)
            self.table.remove_at(i)
            self.h.live_bytes -= old
            self.h.dead_bytes += old + self._size_at(loc, DEL)
            return True

    def _size_at(self, loc: int, kind: int = PUT) -> int:
        seg = self.segments[loc >> SEGMENT_SHIFT]
        _, k, klen, vlen = RECORD.unpack_from(seg, loc & (SEGMENT - 1))
        if k != kind:
            raise damaged(f"the record at {loc:#x} has type {k}, expected {kind}")
        return int(RECORD.size + klen + vlen + 7) & ~7

    def _writable(self) -> None:
        if self.paused:
            raise KvError("EBUSY", "writes are paused for a live update (sealed)")
        if self.h.state != OPEN:
            if self.log is not None:
                self.log.catch_up(self.segments, self.h.used)
            self.h.state = OPEN
            self._write_header()

    def _append(self, kind: int, key: bytes, value: bytes = b"") -> int:
        """Write a record after the last one; grows the segments first if need be."""
        rec = record(kind, key, value)
        at = self.h.used
        off = at & (SEGMENT - 1)
        if at == len(self.segments) << SEGMENT_SHIFT or off + len(rec) > SEGMENT:
            nxt = (at + SEGMENT - 1) & ~(SEGMENT - 1)
            if nxt >= len(self.segments) << SEGMENT_SHIFT:
                self.mem.add_segments(1)
            if off:
                self.segments[at >> SEGMENT_SHIFT][off : off + RECORD.size] = bytes(RECORD.size)
            at, off = nxt, 0
        self.segments[at >> SEGMENT_SHIFT][off : off + len(rec)] = rec
        self.h.used = at + len(rec)
        if self.log is not None:
            self.log.append(at, rec)
        return at

    def _rebuild(self) -> None:
        """A new index at most half full, from the live slots (vectorized, no key is read)."""
        hashes, locs = self.table.entries()
        slots = slots_for(hashes.size + 1)
        order = order_for(slots * SLOT_BYTES)
        view, phys = self.mem.new_index(order)
        table = Table(view, slots)
        table.fill(hashes, locs)
        self.mem.swap_index(view, order, phys)
        self.table = table
        self.h.index_order, self.h.index_slots, self.h.index_phys = order, slots, phys
        self._write_header()

    def _write_header(self) -> None:
        self.h.live, self.h.tombstones = self.table.live, self.table.tombstones
        self.h.segments = len(self.segments)
        raw = self.h.pack()
        self.mem.superblock[: len(raw)] = raw

    # ----------------------------------------------------------------- the live update

    def seal(self) -> None:
        """Pause writes and leave a table a successor may attach (the FINALIZE notifier)."""
        with self.lock:
            self.paused = True
            self.mem.rearm()
            self._seal()

    def _seal(self) -> None:
        if self.log is not None:
            self.log.catch_up(self.segments, self.h.used)
        if self.h.state != SEALED:
            self.h.state = SEALED
            self.h.seals += 1
            self._write_header()

    def unseal(self) -> None:
        """Writes may go on (the UNFREEZE notifier: the update was called off)."""
        with self.lock:
            self.paused = False

    def sync(self) -> None:
        with self.lock:
            if self.log is not None:
                self.log.catch_up(self.segments, self.h.used)
                self.log.sync()

    def close(self) -> None:
        """Stop cleanly: the table is sealed, so the next process of this store attaches it."""
        with self.lock:
            if self.closed:
                return
            self._seal()
            if self.log is not None:
                self.log.close()
            self.closed = True
            self.mem.close()

    def stats(self) -> dict[str, Any]:
        h = self.h
        return {
            "keys": self.table.live,
            "tombstones": self.table.tombstones,
            "slots": self.table.slots,
            "segments": len(self.segments),
            "data_bytes": h.used,
            "live_bytes": h.live_bytes,
            "dead_bytes": h.dead_bytes,
            "sealed": h.state == SEALED,
            "paused": self.paused,
        }
