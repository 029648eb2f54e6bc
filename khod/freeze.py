"""The freeze lock: a writer-preferring reader/writer lock that never blocks readers.

Preserve, unpreserve and tree edits hold the read side; finalize takes the
write side and keeps it until unfreeze. A reader arriving while a writer
waits or holds the lock fails with ``EBUSY`` at once -- it never queues --
and the writer waits only for readers already inside, so none slips in
after the freeze and none is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from khod.errors import ebusy


class FreezeLock:
    def __init__(self) -> None:
        self._readers = 0
        self._writer = False  # waiting for or holding the write side
        self._drained = trio.Event()
        self._drained.set()

    @property
    def frozen(self) -> bool:
        return self._writer

    @property
    def readers(self) -> int:
        return self._readers

    @contextmanager
    def read(self, what: str = "preservation") -> Iterator[None]:
        """Hold the read side for a (possibly awaiting) block, or fail EBUSY at once."""
        if self._writer:
            raise ebusy(f"{what} is frozen for finalize; try again after unfreeze")
        self._readers += 1
        if self._readers == 1:
            self._drained = trio.Event()
        try:
            yield
        finally:
            self._readers -= 1
            if self._readers == 0:
                self._drained.set()

    async def freeze(self) -> None:
        """Take the write side: refuse new readers now, wait for those inside to leave."""
        if self._writer:
            raise ebusy("already frozen")
        self._writer = True
        try:
            await self._drained.wait()
        except BaseException:
            self._writer = False
            raise

    def thaw(self) -> None:
        self._writer = False
