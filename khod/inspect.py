"""Offline inspection of a region: ``khoctl inspect``.

Read-only by construction: the file or device is opened ``O_RDONLY`` and
mapped ``PROT_READ``; :mod:`khod.kho.report` does the reading and judging.
A region is what khod's backends open: a regular file (``file``), a window
of ``/dev/mem`` (``devmem``: physical memory has no size and no record at
offset 0, so the window must be given), or a whole DAX/pmem device (``dax``).
"""

from __future__ import annotations

import os
import stat
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


DEV_MEM = (1, 1)  # the character device numbers of /dev/mem


def backend_of(path: str, st: os.stat_result) -> str:
    """The backend khod would use for ``path``: /dev/mem is devmem, other devices dax."""
    if stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == DEV_MEM:
        return "devmem"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "dax"
    return "file"


def inspect_region(
    path: str,
    base: int | None = None,
    *,
    size: int | None = None,
    backend: str | None = None,
    pid_alive: Callable[[int], bool] | None = None,
) -> Report:
    """Decode and verify a region; never writes to it.

    ``backend`` defaults to what ``path`` is (:func:`backend_of`); ``devmem``
    needs ``base`` and ``size``, the window khod's config names.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KhoError("ENOENT", f"cannot open {path}: {exc.strerror}") from None
    backend = backend or backend_of(path, st)
    if backend == "devmem":
        if base is None or size is None:
            raise KhoError(
                "EINVAL",
                f"{path} is physical memory (devmem): give the region's window with --base and "
                "--size (region.base and region.size of khod's config)",
            )
        region = open_region("devmem", path, base=base, size=size, writable=False)
        rep = Report(path, size, base, "--base")
    else:
        if size is not None and backend == "file" and size != st.st_size:
            raise KhoError(
                "EINVAL", f"region file {path} is {st.st_size:#x} bytes, not --size {size:#x}"
            )
        claimed = _peek_base(path)
        base_from = (
            "--base" if base is not None else ("the record" if claimed is not None else "default")
        )
        use_base = base if base is not None else (claimed if claimed is not None else 0x1_0000_0000)
        fsize = size if backend == "dax" else st.st_size
        region = open_region(backend, path, base=use_base, size=fsize, create=False, writable=False)
        rep = Report(path, region.size, use_base, base_from)
    try:
        examine(region, rep, pid_alive)
    finally:
        region.close()
    return rep
