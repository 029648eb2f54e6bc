"""What a successor would find in a region, and whether it would accept it.

The report walks the same checks as start-up (record, FDT, every chunk
list, the session lists against the root list) and says which fault would
make a successor refuse, keeping whatever it could decode before that point
so an operator can see how far the handover got. It only reads.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from khod.errors import HandoverError
from khod.kho.dtb import DtbError, from_dtb, to_dts
from khod.kho.handover import MAX_FDT_BYTES, read_handover
from khod.kho.memory import Memory
from khod.kho.record import RecordState, read_record
from khod.kho.tracker import Tracker


@dataclass
class Report:
    path: str
    size: int
    base: int
    base_from: str
    verdict: str = "refuse"  # populate | format | refuse
    reason: str = ""
    fault: str | None = None
    record: dict[str, Any] | None = None
    fdt_text: str | None = None
    fdt_size: int = 0
    generation: int | None = None
    metadata_crc32: int | None = None
    root: dict[str, Any] | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.verdict in ("populate", "format")

    def as_dict(self) -> dict[str, Any]:
        return {
            "region": {
                "path": self.path,
                "size": self.size,
                "base": self.base,
                "base_from": self.base_from,
            },
            "verdict": self.verdict,
            "accepted": self.accepted,
            "reason": self.reason,
            "fault": self.fault,
            "record": self.record,
            "generation": self.generation,
            "metadata_crc32": self.metadata_crc32,
            "fdt_bytes": self.fdt_size,
            "fdt_dts": self.fdt_text,
            "root": self.root,
            "sessions": self.sessions,
        }


def _totals(t: Tracker) -> dict[str, Any]:
    return {
        "folios": t.count(),
        "bytes": t.total_bytes(),
        "orders": {str(s.order): {"folios": s.folios, "bytes": s.bytes} for s in t.stats()},
    }


def examine(region: Memory, rep: Report, pid_alive: Callable[[int], bool] | None = None) -> None:
    """Fill ``rep`` with what ``region`` holds; ``pid_alive`` judges a live record's owner."""
    try:
        rec = read_record(region)
    except HandoverError as exc:
        rep.fault, rep.reason = str(exc.fault), exc.detail
        return
    if rec is None:
        rep.verdict, rep.reason = "format", "no handover record: a successor formats this region"
        return
    rep.record = {
        "state": rec.state.name.lower(),
        "owner_pid": rec.owner_pid,
        "region_base": rec.region_base,
        "region_size": rec.region_size,
        "fdt_phys": rec.fdt_phys,
        "fdt_size": rec.fdt_size,
        "fdt_crc32": rec.fdt_crc32,
        "scratch_phys": rec.scratch_phys,
        "scratch_size": rec.scratch_size,
        "generation": rec.generation,
        "version": rec.version,
    }
    rep.generation = rec.generation
    if rec.state is RecordState.CLEAN:
        rep.verdict, rep.reason = "format", "clean: no handover; a successor formats this region"
        return
    if rec.state is RecordState.LIVE:
        alive = pid_alive(rec.owner_pid) if pid_alive else False
        who = "running" if alive else "gone"
        rep.reason = f"live: owned by pid {rec.owner_pid} ({who}) with no handover; a successor refuses without --reset"
        return
    # a committed handover: show the FDT if it decodes, then run every check
    if (
        0 < rec.fdt_size <= MAX_FDT_BYTES
        and region.base <= rec.fdt_phys <= region.end - rec.fdt_size
    ):
        blob = region.read(rec.fdt_phys, rec.fdt_size)
        rep.fdt_size = len(blob)
        if zlib.crc32(blob) == rec.fdt_crc32:
            with contextlib.suppress(DtbError):
                rep.fdt_text = to_dts(from_dtb(blob))
    try:
        inc = read_handover(region, rec)
    except HandoverError as exc:
        rep.fault, rep.reason = str(exc.fault), exc.detail
        return
    rep.metadata_crc32 = inc.metadata_crc32
    rep.root = _totals(inc.root.tracker)
    rep.sessions = [
        {
            "name": s.name,
            "uid": s.uid,
            **_totals(s.memory.tracker),
            "subtree_nodes": s.subtree.count_nodes() - 1,
        }
        for _, s in sorted(inc.sessions.items())
    ]
    rep.verdict = "populate"
    rep.reason = (
        f"a committed handover of generation {inc.generation}: {len(inc.sessions)} sessions, "
        f"{inc.root.tracker.total_bytes()} bytes preserved; a successor takes it in"
    )
