"""Shared fixtures: scratch directories on tmpfs, region factories, hypothesis profiles."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from khod.allocator import Allocator
from khod.kho.memory import ScratchRange
from khod.region import Region, open_region
from khod.startup import allocator_for as engine_allocator
from khod.startup import layout

settings.register_profile(
    "khod",
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("khod"), max_examples=600)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "khod"))

BASE = 0x1_0000_0000  # regions in tests sit at 4 GiB, as in docs/format.md §9


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory on tmpfs (short path: Unix sockets need < 108 bytes)."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="khodt-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def silent(shm_dir: Path) -> Iterator[str]:
    """A socket that accepts connections (in its backlog) and never answers."""
    path = str(shm_dir / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(8)
        yield path


MakeRegion = Callable[..., Region]


@pytest.fixture
def make_region(shm_dir: Path) -> Iterator[MakeRegion]:
    opened: list[Region] = []

    def make(size: int = 64 << 20, base: int = BASE, name: str = "region") -> Region:
        r = open_region("file", str(shm_dir / name), base=base, size=size)
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.close()


def allocator_for(
    region: Region, scratch_size: int = 4 << 20, *, scratch_at_end: bool = False
) -> tuple[Allocator, ScratchRange]:
    """khod's layout (record page reserved, scratch right after it), or scratch at the end."""
    if not scratch_at_end:
        return layout(region, scratch_size)
    scratch = ScratchRange(region.end - scratch_size, scratch_size)
    return engine_allocator(region, scratch), scratch
