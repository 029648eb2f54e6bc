"""What the format core needs from the daemon: memory to read and write, pages to take.

The core never opens a file or owns an allocator; it works on any object
with these shapes (the daemon's ``Region`` and ``Allocator``; a test's
stand-in), so it can be read, reused and tested without the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt


class Memory(Protocol):
    """A phys range ``[base, end)`` that can be read, written and flushed."""

    @property
    def base(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def end(self) -> int: ...

    def read(self, phys: int, length: int) -> bytes: ...

    def view(self, phys: int, length: int) -> memoryview: ...

    def write(self, phys: int, data: bytes | bytearray | memoryview) -> None: ...

    def array(self) -> npt.NDArray[np.uint8]:
        """The whole range as one uint8 array, for vectorized gathers."""
        ...

    def flush(self, phys: int | None = None, length: int | None = None) -> None: ...


class Pages(Protocol):
    """Where metadata pages come from, and go back to on failure or unfreeze."""

    @property
    def scratch_only(self) -> bool: ...

    def alloc(self, order: int) -> int: ...

    def alloc_pages(self, count: int) -> list[int]: ...

    def free(self, pfn: int) -> None: ...

    def free_many(self, pfns: Iterable[int]) -> None: ...


@dataclass(frozen=True)
class ScratchRange:
    """The range a successor allocates from before it has read the metadata."""

    phys: int
    size: int

    def overlaps(self, phys: int, length: int) -> bool:
        return self.size > 0 and phys < self.phys + self.size and self.phys < phys + length
