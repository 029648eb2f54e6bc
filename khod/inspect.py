"""Offline inspection of a region file: ``khoctl inspect``.

Read-only by construction: the file is opened ``O_RDONLY`` and mapped
``PROT_READ``; :mod:`khod.kho.report` does the reading and judging.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from khod.errors import HandoverError, KhoError
from khod.kho.record import RECORD_BYTES, decode_record, record_present
from khod.kho.report import Report, examine
from khod.region import open_region

__all__ = ["Report", "inspect_region"]


def _peek_base(path: str) -> int | None:
    """The base a record claims, read without trusting anything else in it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(RECORD_BYTES)
        if record_present(raw):
            return decode_record(raw).region_base
    except (OSError, HandoverError):
        return None
    return None


def inspect_region(
    path: str, base: int | None = None, *, pid_alive: Callable[[int], bool] | None = None
) -> Report:
    """Decode and verify a region file; never writes to it."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise KhoError("ENOENT", f"cannot open {path}: {exc.strerror}") from None
    claimed = _peek_base(path)
    base_from = (
        "--base" if base is not None else ("the record" if claimed is not None else "default")
    )
    use_base = base if base is not None else (claimed if claimed is not None else 0x1_0000_0000)
    rep = Report(path, size, use_base, base_from)
    region = open_region("file", path, base=use_base, size=size, create=False, writable=False)
    try:
        examine(region, rep, pid_alive)
    finally:
        region.close()
    return rep
