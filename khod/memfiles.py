"""Where clients' memory lives, and which descriptor a client gets to map it.

``file`` backend: every session ``(uid, name)`` has a sparse file of its own in
``<region path>.sessions/``, as large as the region and laid out like it (the
byte of phys ``p`` is at offset ``p - base``), which holds that session's
folios and nothing else. khod creates it, passes it to the session's clients,
punches freed folios out of it and never maps it. The region file keeps only
what khod writes itself -- the record, chunk lists, bitmaps, the FDT -- and is
passed to nobody. So a client's descriptor reaches its own session's memory
and no one else's, nor any metadata, and whatever it does to that file
(write, truncate, punch) touches only its own session.

``devmem`` and ``dax``: one physical memory, with no narrower object to pass;
the region's descriptor itself goes, whole, to root and to members of
``server.memory_group`` only (docs/design.md §3).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
from pathlib import Path
from typing import Any

from khod.errors import enoent
from khod.kho.handover import SessionKey
from khod.pages import PAGE_SHIFT
from khod.region import Region

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _libc() -> Any:
    """libc, looked up at the first free (``find_library`` runs ldconfig: not at start-up)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return libc


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset + length)`` of a file, keeping its size (fallocate(2))."""
    if _libc().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class MemoryFiles:
    """The descriptors clients map; the shared region's own unless per-session files exist."""

    shared = True

    def __init__(self, region: Region) -> None:
        self.region = region

    def fd(self, key: SessionKey) -> int:
        """The descriptor session ``key``'s clients map (opened on first use)."""
        return self.region.fileno()

    def ensure(self, key: SessionKey) -> None:
        """Make sure ``key``'s memory exists (a new session)."""
        return None

    def exists(self, key: SessionKey) -> bool:
        return True

    def punch(self, key: SessionKey, runs: list[tuple[int, int]]) -> None:
        """Give freed ``(pfn, pages)`` runs of ``key``'s memory back to the system."""
        return None

    def drop(self, key: SessionKey) -> None:
        """``key`` is gone for good: its memory too."""
        return None

    def close(self) -> None:
        return None


class SessionFiles(MemoryFiles):
    """One sparse file per session, beside the region file."""

    shared = False

    def __init__(self, region: Region, directory: str | None = None) -> None:
        super().__init__(region)
        self.dir = Path(directory or f"{region.path}.sessions")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._fds: dict[SessionKey, int] = {}

    def path(self, key: SessionKey) -> Path:
        uid, name = key
        return self.dir / f"{uid}.{name}"

    def fd(self, key: SessionKey) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self.path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise enoent(f"{self.path(key)} is not a regular file")
            if st.st_size < self.region.size:
                os.ftruncate(fd, self.region.size)
            self._fds[key] = fd
        return fd

    def ensure(self, key: SessionKey) -> None:
        if not self.exists(key):
            fd = os.open(self.path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.region.size)
            finally:
                os.close(fd)

    def exists(self, key: SessionKey) -> bool:
        return key in self._fds or self.path(key).exists()

    def punch(self, key: SessionKey, runs: list[tuple[int, int]]) -> None:
        if not runs or not self.exists(key):
            return
        fd = self.fd(key)
        base = self.region.base
        for pfn, npages in runs:
            try:
                punch_hole(fd, (pfn << PAGE_SHIFT) - base, npages << PAGE_SHIFT)
            except OSError as exc:  # a filesystem that cannot punch keeps the bytes
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise

    def drop(self, key: SessionKey) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def memory_files(region: Region) -> MemoryFiles:
    return SessionFiles(region) if region.backend == "file" else MemoryFiles(region)


def runs_of(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(pfn, order)`` blocks as coalesced ``(pfn, pages)`` runs, ascending."""
    out: list[tuple[int, int]] = []
    for pfn, order in sorted(blocks):
        n = 1 << order
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((pfn, n))
    return out
