"""Region backends: bounds checks, sparse files, devmem and dax stand-ins, clean close."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from khod.errors import Errno, KhoError
from khod.region import open_region

from .conftest import BASE


def test_file_backend_is_sparse_and_checked(shm_dir: Path) -> None:
    path = shm_dir / "sub" / "region"
    r = open_region("file", str(path), base=BASE, size=64 << 30)  # 64 GiB costs nothing
    try:
        assert os.stat(path).st_size == 64 << 30
        assert os.stat(path).st_blocks == 0
        r.write(BASE + 4096, b"hello")
        assert r.read(BASE + 4096, 5) == b"hello"
        last = r.end - 8
        r.write(last, b"12345678")
        assert r.read(last, 8) == b"12345678"
        for phys, n in ((BASE - 1, 1), (r.end, 1), (r.end - 4, 8), (BASE, -1)):
            with pytest.raises(KhoError, match=r"outside the region|bad region access") as e:
                r.read(phys, n)
            assert e.value.code is Errno.EINVAL
        r.flush()
        r.flush(BASE + 4096, 5)
    finally:
        r.close()
    # reopening sees the same bytes; a size mismatch is refused, naming both sizes
    with open_region("file", str(path), base=BASE, size=64 << 30) as again:
        assert again.read(BASE + 4096, 5) == b"hello"
    with pytest.raises(KhoError, match="configured size"):
        open_region("file", str(path), base=BASE, size=1 << 30)


def test_geometry_must_be_page_aligned(shm_dir: Path) -> None:
    with pytest.raises(KhoError, match="page"):
        open_region("file", str(shm_dir / "a"), base=BASE + 1, size=1 << 20)
    with pytest.raises(KhoError, match="multiple"):
        open_region("file", str(shm_dir / "b"), base=BASE, size=(1 << 20) + 1)
    with pytest.raises(KhoError, match="unknown region backend"):
        open_region("tape", str(shm_dir / "c"), base=BASE, size=1 << 20)


def test_devmem_maps_at_the_physical_base(shm_dir: Path) -> None:
    # a sparse file standing in for /dev/mem: offset == physical address
    mem = shm_dir / "mem"
    with open(mem, "wb") as f:
        f.truncate(BASE + (16 << 20))
    r = open_region("devmem", str(mem), base=BASE, size=16 << 20)
    try:
        assert r.map_offset == BASE
        r.write(BASE + 0x2000, b"phys")
    finally:
        r.close()
    with open(mem, "rb") as f:
        f.seek(BASE + 0x2000)
        assert f.read(4) == b"phys"
    with pytest.raises(KhoError, match="only"):
        open_region("devmem", str(mem), base=BASE, size=32 << 20)
    with pytest.raises(KhoError, match="explicit region size"):
        open_region("devmem", str(mem), base=BASE, size=None)


def test_dax_maps_the_whole_device(shm_dir: Path) -> None:
    dev = shm_dir / "pmem0"
    with open(dev, "wb") as f:
        f.truncate(8 << 20)
    with open_region("dax", str(dev), base=BASE, size=None) as r:
        assert r.size == 8 << 20
    with pytest.raises(KhoError, match="holds"):
        open_region("dax", str(dev), base=BASE, size=4 << 20)


def test_close_refuses_while_views_are_alive(shm_dir: Path) -> None:
    r = open_region("file", str(shm_dir / "r"), base=BASE, size=1 << 20)
    view = r.view(BASE, 4096)
    with pytest.raises(KhoError, match="views in use") as e:
        r.close()
    assert e.value.code is Errno.EBUSY
    view.release()
    r.close()
    r.close()  # idempotent
    with pytest.raises(KhoError, match="closed"):
        r.read(BASE, 1)


def test_read_only_mapping(shm_dir: Path) -> None:
    path = shm_dir / "ro"
    open_region("file", str(path), base=BASE, size=1 << 20).close()
    with open_region("file", str(path), base=BASE, size=None, writable=False) as r:
        assert r.read(BASE, 4) == b"\0\0\0\0"
        with pytest.raises(KhoError) as e:
            r.write(BASE, b"x")
        assert e.value.code is Errno.EPERM
        assert r.array().flags.writeable is False


def test_the_fd_maps_the_same_memory(shm_dir: Path) -> None:
    # what a client does with the passed fd: map at map_offset + (phys - base)
    with open_region("file", str(shm_dir / "r"), base=BASE, size=1 << 20) as r:
        r.write(BASE + 0x3000, b"shared")
        m = mmap.mmap(r.fileno(), 4096, offset=r.map_offset + 0x3000)
        try:
            assert m[:6] == b"shared"
            m[:6] = b"SHARED"
        finally:
            m.close()
        assert r.read(BASE + 0x3000, 6) == b"SHARED"
