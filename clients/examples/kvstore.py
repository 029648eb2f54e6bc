"""A small key-value store that comes back warm after the live update.

    python -m khoexamples.kvstore [--keys 20000] [--value-size 400] [--once]

Data pages are preserved order-0 folios holding packed records
(``u16 key length, u16 value length, key, value``). The index is rebuilt
from a compact table kept in a preserved phys range:

    "KVT1", u32 keys, u32 pages, u32 reserved, u64 page phys[pages],
    then per key: u32 page, u16 offset, u16 length

The session subtree says where the table is. As a baseline the store also
writes its data the way it would persist without khod -- a JSON-lines log
on disk -- and measures its own cold start from that file, so the warm vs
cold ratio is visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from khoclient import Client, Folio, KhoError, NotifierEvent

from .common import base_args, connect, report, say

ROLE = "kvstore"
PAGE = 4096
MAGIC = b"KVT1"
HEADER = struct.Struct("<4sIII")
ENTRY = struct.Struct("<IHH")
RECORD = struct.Struct("<HH")


def dataset(n: int, value_size: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        key = f"key-{i:08d}".encode()
        seed = hashlib.sha256(key).digest()
        out.append((key, (seed * (value_size // len(seed) + 1))[:value_size]))
    return out


def pack_pages(items: list[tuple[bytes, bytes]]) -> tuple[bytearray, list[tuple[int, int, int]]]:
    """Records packed into pages (none straddles a page); returns data and (page, offset, length)."""
    data = bytearray()
    where: list[tuple[int, int, int]] = []
    page, off = 0, 0
    for key, value in items:
        rec = RECORD.pack(len(key), len(value)) + key + value
        if off + len(rec) > PAGE:
            page, off = page + 1, 0
        if len(data) < (page + 1) * PAGE:
            data.extend(bytes((page + 1) * PAGE - len(data)))
        data[page * PAGE + off : page * PAGE + off + len(rec)] = rec
        where.append((page, off, len(rec)))
        off += len(rec)
    return data, where


@dataclass
class Store:
    """The live index: key -> (page view, offset within the page)."""

    index: dict[bytes, tuple[memoryview, int]]

    def get(self, key: bytes) -> bytes:
        view, off = self.index[key]
        klen, vlen = RECORD.unpack_from(view, off)
        return bytes(view[off + 4 + klen : off + 4 + klen + vlen])


def build_index(table: memoryview, pages: list[memoryview]) -> Store:
    magic, nkeys, npages, _ = HEADER.unpack_from(table, 0)
    if magic != MAGIC or npages != len(pages):
        raise KhoError("EPROTO", "the kvstore table is damaged")
    at = HEADER.size + 8 * npages
    entries = np.frombuffer(
        table,
        dtype=np.dtype([("page", "<u4"), ("off", "<u2"), ("len", "<u2")]),
        count=nkeys,
        offset=at,
    )
    index: dict[bytes, tuple[memoryview, int]] = {}
    unpack = RECORD.unpack_from
    for page, off in zip(entries["page"].tolist(), entries["off"].tolist(), strict=True):
        view = pages[page]
        klen = unpack(view, off)[0]
        index[view[off + 4 : off + 4 + klen].tobytes()] = (view, off)
    return Store(index)


def map_pages(c: Client, phys: list[int]) -> list[memoryview]:
    """One view per page, with one mmap per run of adjacent pages."""
    views: list[memoryview] = []
    i = 0
    while i < len(phys):
        j = i + 1
        while j < len(phys) and phys[j] == phys[j - 1] + PAGE:
            j += 1
        run = c.map_phys(phys[i], (j - i) * PAGE)
        views.extend(run[k * PAGE : (k + 1) * PAGE] for k in range(j - i))
        i = j
    return views


def write_log(path: str, items: list[tuple[bytes, bytes]]) -> None:
    with open(path, "w") as f:
        for key, value in items:
            f.write(json.dumps({"k": key.decode(), "v": value.hex()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def cold_start(path: str) -> tuple[float, dict[bytes, bytes]]:
    """Reload everything from the on-disk log, as the store would without khod."""
    t0 = time.perf_counter()
    data: dict[bytes, bytes] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            data[rec["k"].encode()] = bytes.fromhex(rec["v"])
    return time.perf_counter() - t0, data


def start(
    c: Client, args: Any, items: list[tuple[bytes, bytes]]
) -> tuple[Store, list[memoryview], memoryview]:
    data, where = pack_pages(items)
    npages = len(data) // PAGE
    t0 = time.perf_counter()
    folios = c.alloc_folios(0, npages)
    pages = map_pages(c, [f.phys for f in folios])
    for i, view in enumerate(pages):
        view[:] = data[i * PAGE : (i + 1) * PAGE]
    c.preserve_folios([f.phys for f in folios], 0)
    table_bytes = HEADER.pack(MAGIC, len(items), npages, 0) + b"".join(
        struct.pack("<Q", f.phys) for f in folios
    )
    table_bytes += b"".join(ENTRY.pack(p, o, n) for p, o, n in where)
    table_size = -(-len(table_bytes) // PAGE) * PAGE
    order = max(0, (table_size // PAGE - 1).bit_length())
    block = c.alloc_folio(order)
    table = c.map(block)
    table[: len(table_bytes)] = table_bytes
    c.preserve_phys(block.phys, table_size)  # exactly the table's pages, as a phys range
    c.add_node("/kv")
    c.add_prop("/kv", "table-phys", struct.pack("<Q", block.phys))
    c.add_prop("/kv", "table-size", struct.pack("<Q", table_size))
    c.add_prop("/kv", "keys", struct.pack("<I", len(items)))
    store = build_index(table, pages)
    say(
        ROLE,
        f"loaded {len(items)} keys into {npages} preserved pages, table {table_size >> 10} KiB as a phys range, in {(time.perf_counter() - t0) * 1e3:.0f} ms",
    )
    return store, pages, table


def resume(c: Client) -> tuple[Store, list[memoryview], memoryview, dict[str, Any]]:
    t0 = time.perf_counter()
    phys = struct.unpack("<Q", c.get_prop("/kv", "table-phys"))[0]
    size = struct.unpack("<Q", c.get_prop("/kv", "table-size"))[0]
    first = c.restore_phys(phys, size)
    first_ts = time.time()
    table = c.map(Folio(phys, max(0, (size // PAGE - 1).bit_length())))[:size]
    npages = HEADER.unpack_from(table, 0)[2]
    page_phys = list(struct.unpack_from(f"<{npages}Q", table, HEADER.size))
    c.restore_folios(page_phys)
    pages = map_pages(c, page_phys)
    store = build_index(table, pages)
    warm = time.perf_counter() - t0
    # ready for the next update: preserve again, describe the table again
    c.preserve_folios(page_phys, 0)
    c.preserve_phys(phys, size)
    c.add_node("/kv")
    for name in ("table-phys", "table-size", "keys"):
        c.add_prop("/kv", name, c.get_prop("/kv", name))
    say(
        ROLE,
        f"warm start: table ({len(first)} folios) and {npages} data pages restored, index of {len(store.index)} keys rebuilt in {warm * 1e3:.1f} ms",
    )
    return (
        store,
        pages,
        table,
        {"warm_start_ms": round(warm * 1e3, 2), "first_restore_ts": first_ts},
    )


def main(argv: list[str] | None = None) -> int:
    ap = base_args("a key-value store whose data survives the live update")
    ap.add_argument("--session", default="kvstore")
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--value-size", type=int, default=400)
    ap.add_argument(
        "--log",
        default=os.path.join(tempfile.gettempdir(), "khod-kvstore.jsonl"),
        help="the on-disk log used for the cold-start baseline",
    )
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    items = dataset(args.keys, args.value_size)
    c = connect(args.socket, args.session, args.wait)
    mode = "resume" if c.hello_info.get("incoming") else "start"
    extra: dict[str, Any] = {}
    if mode == "resume":
        store, pages, table, extra = resume(c)
        bad = sum(store.get(k) != v for k, v in items)
        cold_s, cold = cold_start(args.log)
        assert cold == dict(items)
        extra.update(
            keys_served=len(items) - bad,
            keys_wrong=bad,
            cold_start_ms=round(cold_s * 1e3, 2),
            warm_vs_cold=round(cold_s * 1e3 / extra["warm_start_ms"], 2),
        )
        say(
            ROLE,
            f"served all {len(items)} keys: {bad} wrong; cold start from {args.log} takes {cold_s * 1e3:.1f} ms ({extra['warm_vs_cold']}x the warm start)",
        )
    else:
        write_log(args.log, items)
        store, pages, table = start(c, args, items)

    def on_finalize(ev: NotifierEvent) -> None:
        say(ROLE, "FINALIZE: data pages are already preserved; nothing to flush")

    c.subscribe(on_finalize=on_finalize)
    report(
        role=ROLE,
        mode=mode,
        session=args.session,
        keys=len(items),
        pages=len(pages),
        bytes_copied=0,
        **extra,
    )
    ok = extra.get("keys_wrong", 0) == 0
    if not (mode == "resume" and args.once):
        while not stop.is_set() and not c.handed_over.is_set():
            stop.wait(0.05)
    store.index.clear()
    for v in pages:
        v.release()
    table.release()
    c.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
