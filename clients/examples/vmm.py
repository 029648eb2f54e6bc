"""A toy VMM whose guest memory survives the live update, in place.

    python -m khoexamples.vmm [--memory 64M] [--vcpus 2] [--once]

Start (no incoming memory): guest memory is allocated as order-9 (2 MiB)
folios, filled with a deterministic pattern and preserved; the "machine
config" (vCPUs, the guest's memory map, later a checksum) lives in the
session's subtree. A writer thread keeps dirtying guest memory. On FINALIZE
it pauses the writer, checksums guest memory, records the checksum and
answers ok; on UNFREEZE it resumes.

Resume (the successor, incoming memory present): it reattaches, reads its
config from the incoming tree, restores every folio, verifies the checksum,
preserves the memory again for the next update and resumes writing. It
reports guest bytes, restore time and bytes copied (always 0: the folios are
mapped where they are).
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
from khoclient import Client, Folio, KhoError, NotifierEvent

from khod.config import parse_size

from .common import base_args, connect, report, say

ROLE = "vmm"


class Guest:
    """Guest memory: mapped folios and a writer that keeps touching them."""

    def __init__(self, client: Client, folios: list[Folio]) -> None:
        self.client = client
        self.folios = folios
        self.views = [client.map(f) for f in folios]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    @property
    def size(self) -> int:
        return sum(f.size for f in self.folios)

    def fill(self) -> None:
        for i, view in enumerate(self.views):
            words = np.frombuffer(view, dtype="<u8")
            words[:] = (np.uint64(i) << np.uint64(32)) | np.arange(words.size, dtype=np.uint64)
            del words

    def checksum(self) -> bytes:
        h = hashlib.sha256()
        for view in self.views:
            h.update(view)
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
    c.add_prop(
        "/machine",
        "memory-map",
        b"".join(struct.pack("<QI", f.phys, f.order) + bytes(4) for f in guest.folios),
    )
    c.add_string_prop("/machine", "model", "khod toy vmm")


def start(c: Client, args: Any) -> Guest:
    n = max(1, args.memory // (2 << 20))
    t0 = time.perf_counter()
    guest = Guest(c, c.alloc_folios(9, n))
    guest.fill()
    c.preserve_folios([f.phys for f in guest.folios], 9)
    publish_config(c, guest, args.vcpus)
    say(
        ROLE,
        f"guest memory: {n} folios of 2 MiB ({guest.size >> 20} MiB) filled and preserved in {(time.perf_counter() - t0) * 1e3:.0f} ms",
    )
    return guest


def resume(c: Client, args: Any) -> tuple[Guest, dict[str, Any]]:
    t0 = time.perf_counter()
    vcpus = struct.unpack("<I", c.get_prop("/machine", "vcpus"))[0]
    raw = c.get_prop("/machine", "memory-map")
    want = c.get_prop("/machine", "checksum")
    layout = [struct.unpack_from("<QI", raw, i) for i in range(0, len(raw), 16)]
    first = c.restore_folio(layout[0][0])
    first_ts = time.time()
    rest = c.restore_folios([p for p, _ in layout[1:]]) if len(layout) > 1 else []
    folios = [first, *rest]
    if [(f.phys, f.order) for f in folios] != layout:
        raise KhoError("EPROTO", "restored folios differ from the recorded memory map")
    restore_ms = (time.perf_counter() - t0) * 1e3
    guest = Guest(c, folios)
    ok = guest.checksum() == want
    say(
        ROLE,
        f"restored {len(folios)} folios ({guest.size >> 20} MiB) in {restore_ms:.1f} ms; checksum {'matches' if ok else 'DIFFERS'}",
    )
    # ready for the next update: preserve again and describe the machine again
    c.preserve_folios([f.phys for f in folios], 9)
    publish_config(c, guest, vcpus)
    return guest, {
        "restore_ms": round(restore_ms, 2),
        "first_restore_ts": first_ts,
        "checksum_ok": ok,
        "vcpus": vcpus,
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_args("a toy VMM keeping guest memory across a live update")
    ap.add_argument("--session", default="vmm")
    ap.add_argument("--memory", type=lambda s: parse_size(s, "--memory"), default=64 << 20)
    ap.add_argument("--vcpus", type=int, default=2)
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
        folios=len(guest.folios),
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
