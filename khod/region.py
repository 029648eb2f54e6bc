"""The memory region: a phys range backed by a file or a device, mmapped.

Three backends share one :class:`Region`:

``file``    a sparse regular file (default ``/dev/shm/khod/region``): the
            simulated region, which survives a daemon restart but not a reboot;
``devmem``  a window of ``/dev/mem`` at the region's real physical base (a
            reserved range, e.g. ``memmap=``), which survives a kexec; tests
            point it at a regular file standing in for the device;
``dax``     a DAX character device or pmem block device, mapped whole.

Every access is bounds-checked against ``[base, base + size)``; the daemon
never hands a raw offset to anyone. With the file backend every byte khod
writes itself (record, chunk pages, bitmaps, FDT) is allocated in the file
first, so a full filesystem is an ``ENOMEM`` naming it, never a SIGBUS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import mmap
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt

from khod.errors import KhoError, ebusy, einval, enoent, enomem
from khod.pages import PAGE_SHIFT, PAGE_SIZE

BACKENDS = ("file", "devmem", "dax")


class Region:
    """A mapped ``[base, base + size)`` with checked phys <-> offset translation."""

    def __init__(
        self,
        fd: int,
        *,
        backend: str,
        path: str,
        base: int,
        size: int,
        map_offset: int = 0,
        writable: bool = True,
    ) -> None:
        if base % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            os.close(fd)
            raise einval(f"region {base:#x}+{size:#x} is not page-aligned or is empty")
        self.backend = backend
        self.path = path
        self.base = base
        self.size = size
        self.map_offset = map_offset  # file offset of the region's first byte
        self.writable = writable
        self._fd = fd
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=map_offset
            )
        except (OSError, ValueError, OverflowError) as exc:
            os.close(fd)
            raise einval(f"cannot map {path} ({backend}) {size:#x} bytes: {exc}") from None
        self._mv: memoryview | None = memoryview(self._mm)
        self._np: npt.NDArray[np.uint8] | None = None
        self._identity = _identity(os.fstat(fd))
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- geometry

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def base_pfn(self) -> int:
        return self.base >> PAGE_SHIFT

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def fileno(self) -> int:
        return self._fd

    def contains(self, phys: int, length: int = 1) -> bool:
        return self.base <= phys and length >= 0 and phys + length <= self.end

    def offset(self, phys: int, length: int = 0) -> int:
        """Offset of ``phys`` in the mapping, refusing anything outside the region."""
        if not isinstance(phys, int) or not isinstance(length, int) or length < 0:
            raise einval(f"bad region access {phys!r}+{length!r}")
        if not (self.base <= phys < self.end and phys + length <= self.end):
            raise einval(
                f"phys {phys:#x}+{length:#x} is outside the region {self.base:#x}+{self.size:#x}"
            )
        return phys - self.base

    # ----------------------------------------------------------------- access

    def _view_all(self) -> memoryview:
        if self._mv is None:
            raise ebusy(f"region {self.path} is closed")
        return self._mv

    def view(self, phys: int, length: int) -> memoryview:
        """A zero-copy view; keep it short-lived (the region cannot close while it lives)."""
        off = self.offset(phys, length)
        return self._view_all()[off : off + length]

    def read(self, phys: int, length: int) -> bytes:
        off = self.offset(phys, length)
        return bytes(self._view_all()[off : off + length])

    def write(self, phys: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise KhoError("EPERM", f"region {self.path} is open read-only")
        mv = memoryview(data).cast("B")
        off = self.offset(phys, mv.nbytes)
        self.allocate(phys, mv.nbytes)
        self._view_all()[off : off + mv.nbytes] = mv

    def allocate(self, phys: int, length: int) -> None:
        """Make sure the backing file holds ``[phys, phys + length)`` (no-op for devices)."""
        if self.backend != "file" or length <= 0:
            return
        off = self.offset(phys, length)
        try:
            os.posix_fallocate(self._fd, self.map_offset + off, length)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise enomem(
                    f"the filesystem of region {self.path} has no room for {length} bytes at "
                    f"phys {phys:#x}: it is full"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def backing_shortfall(self) -> int:
        """Bytes of the region its file's filesystem could not hold if all were written.

        0 when it fits, and always for devices. A sparse region larger than its
        filesystem is allowed (pages cost nothing until touched); khod's own
        writes are allocated first, and clients are told by the caller.
        """
        if self.backend != "file":
            return 0
        st = os.fstat(self._fd)
        vfs = os.fstatvfs(self._fd)
        have = st.st_blocks * 512 + vfs.f_bavail * vfs.f_frsize
        return max(0, self.size - have)

    # ----------------------------------------------------------------- ownership and identity

    def lock(self) -> None:
        """Take the region for this daemon; ``EBUSY`` if another daemon holds it.

        An exclusive ``flock`` on a descriptor of the region's own that is never
        passed to clients, so it dies with the daemon -- SIGKILL included -- and
        a client still mapping the region does not hold it.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ebusy(f"another daemon holds region {self.path}") from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let the region go (a standby waiting for it takes it at once); the mapping
        stays for the caller to close. Only once nothing of this daemon writes to it."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_identity(self) -> None:
        """Refuse if the region's file was deleted, replaced or shrunk while khod ran.

        A successor opens the region by its path: a handover written into a file
        nobody can open again would be lost without a word.
        """
        if self.backend != "file":
            return
        st = os.fstat(self._fd)
        if st.st_nlink == 0:
            raise enoent(f"region file {self.path} was deleted while khod ran")
        try:
            now = os.stat(self.path)
        except OSError:
            raise enoent(f"region file {self.path} is gone from its path") from None
        if _identity(now) != self._identity:
            raise enoent(f"region file {self.path} was replaced by another file")
        if st.st_size < self.map_offset + self.size:
            raise enoent(
                f"region file {self.path} was truncated to {st.st_size:#x} bytes; "
                f"the region needs {self.map_offset + self.size:#x}"
            )

    def array(self) -> npt.NDArray[np.uint8]:
        """The whole region as a uint8 array (for vectorized gathers)."""
        if self._np is None:
            self._np = np.frombuffer(self._view_all(), dtype=np.uint8)
        return self._np

    def flush(self, phys: int | None = None, length: int | None = None) -> None:
        """msync the range (or everything): the commit points call this."""
        if self._mm is None or not self.writable:
            return
        if phys is None or length is None:
            start, stop = 0, self.size
        else:
            off = self.offset(phys, length)
            start = off & ~(mmap.ALLOCATIONGRANULARITY - 1)
            stop = off + length
        try:
            self._mm.flush(start, stop - start)
        except OSError as exc:
            if self.backend != "devmem":  # /dev/mem is coherent memory; msync may refuse
                raise KhoError("EBUSY", f"flushing {self.path} failed: {exc}") from None

    def close(self) -> None:
        """Unmap and close; raises if someone still holds a view into the mapping."""
        if self._mm is None:
            return
        self._np = None
        if self._mv is not None:
            with contextlib.suppress(BufferError):
                self._mv.release()
            self._mv = None
        try:
            self._mm.close()
        except BufferError:
            with warnings.catch_warnings():  # others' finalizers are not this close's business
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
            try:
                self._mm.close()
            except BufferError:
                raise ebusy(f"region {self.path} still has views in use; release them") from None
        self._mm = None
        os.close(self._fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Region {self.backend}:{self.path} {self.base:#x}+{self.size:#x}>"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


# --------------------------------------------------------------------------- backends


def open_region(
    backend: str,
    path: str,
    *,
    base: int,
    size: int | None,
    create: bool = True,
    writable: bool = True,
) -> Region:
    """Open a region by backend name (the ``[region]`` config section)."""
    if backend == "file":
        if size is None:
            size = _existing_size(path)
        return open_file_region(path, base=base, size=size, create=create, writable=writable)
    if backend == "devmem":
        if size is None:
            raise einval("the devmem backend needs an explicit region size")
        return open_devmem_region(path, base=base, size=size, writable=writable)
    if backend == "dax":
        return open_dax_region(path, base=base, size=size, writable=writable)
    raise einval(f"unknown region backend {backend!r} (one of {', '.join(BACKENDS)})")


def _existing_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise einval(f"cannot stat region file {path}: {exc.strerror}") from None


def _open(path: str, writable: bool, create: bool = False) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise einval(f"cannot open region {path}: {exc.strerror}") from None


def open_file_region(
    path: str, *, base: int, size: int, create: bool = True, writable: bool = True
) -> Region:
    """A sparse regular file; created (and sized) if missing and ``create``."""
    if size <= 0 or size % PAGE_SIZE:
        raise einval(f"region size {size:#x} must be a positive multiple of {PAGE_SIZE}")
    if create and writable:
        Path(path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd = _open(path, writable, create=create and writable)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise einval(f"region {path} is not a regular file (use the devmem or dax backend)")
    if st.st_size == 0 and writable:
        os.ftruncate(fd, size)
    elif st.st_size != size:
        os.close(fd)
        raise einval(
            f"region file {path} is {st.st_size:#x} bytes but the configured size is {size:#x}"
        )
    return Region(fd, backend="file", path=path, base=base, size=size, writable=writable)


def open_devmem_region(
    path: str = "/dev/mem", *, base: int, size: int, writable: bool = True
) -> Region:
    """A window of physical memory: the mapping offset is the physical base itself."""
    fd = _open(path, writable)
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < base + size:
        os.close(fd)
        raise einval(
            f"{path} stands in for /dev/mem but is only {st.st_size:#x} bytes; "
            f"the window needs {base + size:#x}"
        )
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        os.close(fd)
        raise einval(f"{path} is neither /dev/mem-like character device nor a file")
    return Region(
        fd, backend="devmem", path=path, base=base, size=size, map_offset=base, writable=writable
    )


def _device_size(path: str, fd: int, st: os.stat_result) -> int:
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    if stat.S_ISCHR(st.st_mode):
        sysfs = Path(f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size")
        try:
            return int(sysfs.read_text().strip(), 0)
        except (OSError, ValueError) as exc:
            raise einval(f"cannot read the size of DAX device {path} from {sysfs}: {exc}") from None
    raise einval(f"{path} is not a DAX character device, a block device or a file")


def open_dax_region(path: str, *, base: int, size: int | None, writable: bool = True) -> Region:
    """A whole DAX/pmem device; ``size`` (if given) must match the device."""
    fd = _open(path, writable)
    st = os.fstat(fd)
    try:
        dev_size = _device_size(path, fd, st)
    except KhoError:
        os.close(fd)
        raise
    dev_size &= ~(PAGE_SIZE - 1)
    if size is not None and size != dev_size:
        os.close(fd)
        raise einval(f"DAX device {path} holds {dev_size:#x} bytes, the config says {size:#x}")
    return Region(fd, backend="dax", path=path, base=base, size=dev_size, writable=writable)
