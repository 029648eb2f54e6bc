"""A map from pfn to order that never stalls the event loop growing.

A Python dict doubles its table when it fills: at a million entries one
insert rehashes everything, some 30-100 ms with the loop held, however
finely the request making it is sliced (docs/design.md §6). Sessions and
the allocator keep one entry per folio, so they shard by the high bits of
the pfn: each shard is a small dict (at most ``1 << SHARD_BITS`` pages'
worth of heads), and the largest rehash costs about a millisecond.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar, overload

SHARD_BITS = 14  # 16384 pages (64 MiB) per shard
D = TypeVar("D")
_MISSING = object()


class PfnMap:
    """``head pfn -> order``, sharded; the dict methods the daemon uses."""

    __slots__ = ("_len", "_shards")

    def __init__(self) -> None:
        self._shards: dict[int, dict[int, int]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __contains__(self, pfn: int) -> bool:
        shard = self._shards.get(pfn >> SHARD_BITS)
        return shard is not None and pfn in shard

    def get(self, pfn: int, default: int | None = None) -> int | None:
        shard = self._shards.get(pfn >> SHARD_BITS)
        return default if shard is None else shard.get(pfn, default)

    def __getitem__(self, pfn: int) -> int:
        shard = self._shards.get(pfn >> SHARD_BITS)
        if shard is None:
            raise KeyError(pfn)
        return shard[pfn]

    def __setitem__(self, pfn: int, order: int) -> None:
        key = pfn >> SHARD_BITS
        shard = self._shards.get(key)
        if shard is None:
            shard = self._shards[key] = {}
        n = len(shard)
        shard[pfn] = order
        self._len += len(shard) - n

    def update(self, pairs: Iterable[tuple[int, int]]) -> None:
        for pfn, order in pairs:
            self[pfn] = order

    @overload
    def pop(self, pfn: int) -> int: ...
    @overload
    def pop(self, pfn: int, default: D) -> int | D: ...
    def pop(self, pfn: int, default: object = _MISSING) -> object:
        key = pfn >> SHARD_BITS
        shard = self._shards.get(key)
        if shard is None or pfn not in shard:
            if default is not _MISSING:
                return default
            raise KeyError(pfn)
        order = shard.pop(pfn)
        self._len -= 1
        if not shard:
            del self._shards[key]
        return order

    def __iter__(self) -> Iterator[int]:
        for shard in list(self._shards.values()):
            yield from shard

    def keys(self) -> Iterator[int]:
        return iter(self)

    def values(self) -> Iterator[int]:
        for shard in list(self._shards.values()):
            yield from shard.values()

    def items(self) -> Iterator[tuple[int, int]]:
        for shard in list(self._shards.values()):
            yield from shard.items()
