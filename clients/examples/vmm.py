"""A toy VMM whose guest memory survives the live update, in place.

    python -m khoexamples.vmm [--memory 64M] [--vcpus 2] [--verify full|sample] [--once]

Start (no incoming memory): guest memory is allocated as order-9 (2 MiB)
folios in one request, stamped with a deterministic pattern and preserved;
the "machine config" (vCPUs, the guest's memory map as runs of contiguous
folios, later a checksum) lives in the session's subtree. A writer thread
keeps dirtying guest memory. On FINALIZE it pauses the writer, checksums
guest memory, records the checksum and answers ok; on UNFREEZE it resumes.

Resume (the successor, incoming memory present): it reattaches, reads its
config from the incoming tree, restores every folio in one request, maps
each run of folios with one mmap, verifies the checksum, preserves the
memory again for the next update and resumes writing. Nothing it does
before the guest runs again grows with the guest's size but the restore
itself (vectorized in the daemon): a 1 TiB guest is 512k folios and a
handful of mmaps. It reports guest bytes, restore time and bytes copied
(always 0: the folios are mapped where they are).

``--verify full`` stamps and checksums every byte (the default up to
1 GiB); ``sample`` stamps and checksums the first page of up to 4096
folios spread over the guest, so that a guest of a terabyte on a sparse
region costs no more than it has to.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import struct
import sys
import threading
import time
from typing import Any

import numpy as np
from khoclient import Client, KhoError, NotifierEvent
from khoclient import calls as C

from khod.config import parse_size

from .common import base_args, connect, report, say

ROLE = "vmm"
ORDER = 9
FOLIO = 2 << 20
PAGE = 4096
RUN = struct.Struct("<QII")  # memory-map entry: first phys, folios, order
SAMPLES = 4096
U64 = np.dtype("<u8")


def folios_of(runs: list[tuple[int, int]]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """Every folio's address, in guest order (runs expanded without a Python loop per folio)."""
    parts = [phys + np.arange(n, dtype=np.uint64) * np.uint64(FOLIO) for phys, n in runs]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def runs_of(phys: np.ndarray[Any, np.dtype[np.uint64]]) -> list[tuple[int, int]]:
    """Sorted folio addresses as runs of contiguous folios: (first phys, count)."""
    if phys.size == 0:
        return []
    brk = np.flatnonzero(np.diff(phys.astype(np.int64)) != FOLIO) + 1
    firsts = np.concatenate(([0], brk))
    counts = np.diff(np.concatenate((firsts, [phys.size])))
    return list(zip(phys[firsts].tolist(), counts.tolist(), strict=True))


class Guest:
    """Guest memory: runs of contiguous folios, each mapped once, and a writer."""

    def __init__(self, client: Client, runs: list[tuple[int, int]], verify: str) -> None:
        self.client = client
        self.runs = runs
        self.verify = verify
        self.views = [client.map_phys(phys, n * FOLIO) for phys, n in runs]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    @property
    def folios(self) -> int:
        return sum(n for _, n in self.runs)

    @property
    def size(self) -> int:
        return self.folios * FOLIO

    def _stamped(self) -> list[tuple[int, int, int]]:
        """(view, byte offset, length) of what is stamped and checksummed, in guest order."""
        if self.verify == "full":
            return [(v, 0, n * FOLIO) for v, (_, n) in enumerate(self.runs)]
        stride = max(1, self.folios // SAMPLES)
        out, k = [], 0
        for v, (_, n) in enumerate(self.runs):
            first = (-k) % stride
            out += [(v, i * FOLIO, PAGE) for i in range(first, n, stride)]
            k += n
        return out

    def fill(self) -> None:
        for i, (v, off, length) in enumerate(self._stamped()):
            words = np.frombuffer(self.views[v], dtype=U64, count=length // 8, offset=off)
            words[:] = (np.uint64(i) << np.uint64(32)) | np.arange(words.size, dtype=np.uint64)
            del words

    def checksum(self) -> bytes:
        h = hashlib.sha256()
        for v, off, length in self._stamped():
            h.update(self.views[v][off : off + length])
        return h.digest()

    def _write(self) -> None:
        counter = self.views[-1]
        while not self._stop.wait(0.002):
            self.ticks += 1
            counter[-8:] = struct.pack("<Q", self.ticks)

    def resume(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._write, name="vcpu-writer", daemon=True)
            self._thread.start()

    def pause(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        self.pause()
        for v in self.views:
            v.release()
        self.views = []


def publish_config(c: Client, guest: Guest, vcpus: int) -> None:
    c.add_node("/machine")
    c.add_prop("/machine", "vcpus", struct.pack("<I", vcpus))
    c.add_prop("/machine", "guest-bytes", struct.pack("<Q", guest.size))
    c.add_prop("/machine", "memory-map", b"".join(RUN.pack(p, n, ORDER) for p, n in guest.runs))
    c.add_string_prop("/machine", "verify", guest.verify)
    c.add_string_prop("/machine", "model", "khod toy vmm")


def start(c: Client, args: Any) -> Guest:
    n = max(1, args.memory // FOLIO)
    t0 = time.perf_counter()
    phys = np.sort(c.call(C.alloc_folio_array(ORDER, n)))
    verify = args.verify or ("full" if n * FOLIO <= 1 << 30 else "sample")
    guest = Guest(c, runs_of(phys), verify)
    guest.fill()
    c.preserve_folios(phys, ORDER)
    publish_config(c, guest, args.vcpus)
    say(
        ROLE,
        f"guest memory: {n} folios of 2 MiB ({guest.size >> 20} MiB) in {len(guest.runs)} runs, "
        f"stamped ({verify}) and preserved in {(time.perf_counter() - t0) * 1e3:.0f} ms",
    )
    return guest


def resume(c: Client, args: Any) -> tuple[Guest, dict[str, Any]]:
    t0 = time.perf_counter()
    vcpus = struct.unpack("<I", c.get_prop("/machine", "vcpus"))[0]
    raw = c.get_prop("/machine", "memory-map")
    want = c.get_prop("/machine", "checksum")
    verify = c.get_prop("/machine", "verify").rstrip(b"\0").decode()
    if len(raw) % RUN.size or verify not in ("full", "sample"):
        raise KhoError("EPROTO", "the recorded machine config is damaged")
    runs = []
    for phys, n, order in RUN.iter_unpack(raw):
        if order != ORDER:
            raise KhoError("EPROTO", f"memory-map run at {phys:#x} has order {order}")
        runs.append((phys, n))
    phys = folios_of(runs)
    first = c.restore_folio(int(phys[0]))
    first_ts = time.time()
    orders = c.call(C.restore_folio_orders(phys[1:])) if phys.size > 1 else np.empty(0, np.uint8)
    if first.order != ORDER or not np.all(orders == ORDER):
        raise KhoError("EPROTO", "restored folios differ from the recorded memory map")
    restore_ms = (time.perf_counter() - t0) * 1e3
    guest = Guest(c, runs, verify)
    ready_ms = (time.perf_counter() - t0) * 1e3
    mapped_ts = time.time()  # every folio restored and mapped: the guest could run
    ok = guest.checksum() == want
    say(
        ROLE,
        f"restored {guest.folios} folios ({guest.size >> 20} MiB) in {restore_ms:.1f} ms, "
        f"mapped in {len(runs)} maps by {ready_ms:.1f} ms; "
        f"checksum ({verify}) {'matches' if ok else 'DIFFERS'}",
    )
    # ready for the next update: preserve again and describe the machine again
    c.preserve_folios(phys, ORDER)
    publish_config(c, guest, vcpus)
    return guest, {
        "restore_ms": round(restore_ms, 2),
        "restored_and_mapped_ms": round(ready_ms, 2),
        "first_restore_ts": first_ts,
        "mapped_ts": mapped_ts,
        "checksum_ok": ok,
        "vcpus": vcpus,
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_args("a toy VMM keeping guest memory across a live update")
    ap.add_argument("--session", default="vmm")
    ap.add_argument("--memory", type=lambda s: parse_size(s, "--memory"), default=64 << 20)
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument(
        "--verify",
        choices=("full", "sample"),
        default=None,
        help="what is stamped and checksummed (default: full up to 1 GiB, else sample)",
    )
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    c = connect(args.socket, args.session, args.wait)
    mode = "resume" if c.hello_info.get("incoming") else "start"
    extra: dict[str, Any] = {}
    if mode == "resume":
        guest, extra = resume(c, args)
    else:
        guest = start(c, args)

    def on_finalize(ev: NotifierEvent) -> None:
        guest.pause()
        digest = guest.checksum()
        with contextlib.suppress(KhoError):  # an earlier, aborted finalize left one
            c.remove_prop("/machine", "checksum")
        c.add_prop("/machine", "checksum", digest)
        say(
            ROLE,
            f"FINALIZE: writers paused after {guest.ticks} ticks, checksum {digest.hex()[:16]} recorded",
        )

    def on_unfreeze(ev: NotifierEvent) -> None:
        guest.resume()
        say(ROLE, "UNFREEZE: writers resumed")

    c.subscribe(on_finalize=on_finalize, on_unfreeze=on_unfreeze)
    guest.resume()
    report(
        role=ROLE,
        mode=mode,
        session=args.session,
        guest_bytes=guest.size,
        folios=guest.folios,
        bytes_copied=0,
        **extra,
    )
    if mode == "resume" and args.once:
        ok = bool(extra.get("checksum_ok"))
    else:
        while not stop.is_set() and not c.handed_over.is_set():
            stop.wait(0.05)
        ok = True
        if c.handed_over.is_set():
            say(ROLE, "the daemon handed over; exiting as a kexec would end this process")
    guest.release()
    c.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
