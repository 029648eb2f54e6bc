"""One :class:`Call` per daemon operation: the op, its arguments, how to read the result.

Sans-I/O and shared by the blocking and the trio client, so both speak the
protocol the same way and differ only in how they wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

PAGE_SIZE = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class Folio:
    """``2**order`` pages at ``phys``."""

    phys: int
    order: int

    @property
    def size(self) -> int:
        return PAGE_SIZE << self.order


@dataclass(frozen=True)
class RegionInfo:
    base: int
    size: int
    map_offset: int
    backend: str


@dataclass(frozen=True)
class NodeInfo:
    props: list[str]
    children: list[str]


def _same(r: Any) -> Any:
    return r


class Call(NamedTuple, Generic[T]):
    """One request: its op, its arguments (None ones are left out), how to read its result.

    A tuple, not a frozen dataclass: one is built per call, and a tuple is
    built in half the time. ``args`` is never changed once the call is made.
    """

    op: str
    args: Mapping[str, Any] = MappingProxyType({})
    decode: Callable[[Any], T] = _same


PACK_OVER = 1024  # longer lists go packed: khod refuses lists over 65536 entries


def _as_u64s(values: Iterable[int] | np.ndarray[Any, Any]) -> bytes | list[int]:
    """Large integer lists travel as packed little-endian u64 bytes (no per-int decoding)."""
    if not isinstance(values, np.ndarray):
        values = list(values)
        if len(values) <= PACK_OVER:
            return values
    return np.ascontiguousarray(values, dtype="<u8").tobytes()


def _folio_list(r: Any) -> list[Folio]:
    return [Folio(int(p), int(o)) for p, o in r["folios"]]


def _none(_: Any) -> None:
    return None


def hello(name: str, persistent: bool, uid: int | None = None) -> Call[dict[str, Any]]:
    return Call("hello", {"name": name, "persistent": persistent, "uid": uid})


def region() -> Call[RegionInfo]:
    return Call(
        "region",
        {},
        lambda r: RegionInfo(
            int(r["base"]), int(r["size"]), int(r["map_offset"]), str(r["backend"])
        ),
    )


def ping() -> Call[None]:
    return Call("ping", {}, _none)


def subscribe(events: Sequence[str]) -> Call[list[str]]:
    return Call("subscribe", {"events": list(events)}, lambda r: list(r["events"]))


def notify_reply(token: int, ok: bool, reason: str = "", error: str | None = None) -> Call[None]:
    args: dict[str, Any] = {"token": token, "ok": ok, "reason": reason}
    if error is not None:
        args["error"] = error
    return Call("notify_reply", args, _none)


def alloc_folio(order: int) -> Call[Folio]:
    return Call("alloc_folio", {"order": order}, lambda r: Folio(int(r["phys"]), int(r["order"])))


def _u64_list(value: Any) -> list[int]:
    """A reply's integer array: packed little-endian u64 bytes, or a list."""
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype="<u8").tolist()  # type: ignore[no-any-return]
    return [int(v) for v in value]


def alloc_folios(order: int, count: int) -> Call[list[Folio]]:
    return Call(
        "alloc_folios",
        {"order": order, "count": count, "packed": True},
        lambda r: [Folio(p, int(r["order"])) for p in _u64_list(r["phys"])],
    )


def alloc_folio_array(order: int, count: int) -> Call[np.ndarray[Any, np.dtype[np.uint64]]]:
    """``alloc_folios`` for large counts: the phys of each folio as one numpy array."""
    return Call(
        "alloc_folios",
        {"order": order, "count": count, "packed": True},
        lambda r: np.frombuffer(r["phys"], dtype="<u8").astype(np.uint64),
    )


def free_folio(phys: int) -> Call[None]:
    return Call("free_folio", {"phys": phys}, _none)


def free_folios(phys: Iterable[int] | np.ndarray[Any, Any]) -> Call[int]:
    return Call("free_folios", {"phys": _as_u64s(phys)}, lambda r: int(r["count"]))


def preserve_folio(phys: int, order: int | None = None) -> Call[int]:
    return Call("preserve_folio", {"phys": phys, "order": order}, lambda r: int(r["order"]))


def unpreserve_folio(phys: int, order: int | None = None) -> Call[int]:
    return Call("unpreserve_folio", {"phys": phys, "order": order}, lambda r: int(r["order"]))


def _orders(orders: int | Iterable[int] | np.ndarray[Any, Any] | None) -> Any:
    if orders is None or isinstance(orders, int):
        return orders
    return _as_u64s(orders)


def preserve_folios(
    phys: Iterable[int] | np.ndarray[Any, Any],
    orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
) -> Call[int]:
    return Call(
        "preserve_folios",
        {"phys": _as_u64s(phys), "orders": _orders(orders)},
        lambda r: int(r["count"]),
    )


def unpreserve_folios(
    phys: Iterable[int] | np.ndarray[Any, Any],
    orders: int | Iterable[int] | np.ndarray[Any, Any] | None = None,
) -> Call[int]:
    return Call(
        "unpreserve_folios",
        {"phys": _as_u64s(phys), "orders": _orders(orders)},
        lambda r: int(r["count"]),
    )


def preserve_phys(phys: int, size: int) -> Call[list[Folio]]:
    return Call("preserve_phys", {"phys": phys, "size": size}, _folio_list)


def unpreserve_phys(phys: int, size: int) -> Call[list[Folio]]:
    return Call("unpreserve_phys", {"phys": phys, "size": size}, _folio_list)


def preserve_phys_ranges(ranges: Sequence[tuple[int, int]]) -> Call[int]:
    return Call(
        "preserve_phys_ranges",
        {"phys": _as_u64s(p for p, _ in ranges), "sizes": _as_u64s(s for _, s in ranges)},
        lambda r: int(r["folios"]),
    )


def unpreserve_phys_ranges(ranges: Sequence[tuple[int, int]]) -> Call[int]:
    return Call(
        "unpreserve_phys_ranges",
        {"phys": _as_u64s(p for p, _ in ranges), "sizes": _as_u64s(s for _, s in ranges)},
        lambda r: int(r["folios"]),
    )


def restore_folio(phys: int) -> Call[Folio]:
    return Call("restore_folio", {"phys": phys}, lambda r: Folio(int(r["phys"]), int(r["order"])))


def restore_folios(phys: Iterable[int] | np.ndarray[Any, Any]) -> Call[list[int]]:
    return Call(
        "restore_folios",
        {"phys": _as_u64s(phys), "packed": True},
        lambda r: (
            list(r["orders"]) if isinstance(r["orders"], bytes) else [int(o) for o in r["orders"]]
        ),
    )


def restore_folio_orders(
    phys: np.ndarray[Any, Any],
) -> Call[np.ndarray[Any, np.dtype[np.uint8]]]:
    """``restore_folios`` for large batches: the order of each folio as one numpy array."""
    return Call(
        "restore_folios",
        {"phys": np.ascontiguousarray(phys, dtype="<u8").tobytes(), "packed": True},
        lambda r: np.frombuffer(r["orders"], dtype=np.uint8),
    )


def restore_phys(phys: int, size: int) -> Call[list[Folio]]:
    return Call("restore_phys", {"phys": phys, "size": size}, _folio_list)


def add_node(path: str) -> Call[bool]:
    return Call("add_node", {"path": path}, lambda r: bool(r["created"]))


def add_prop(path: str, name: str, value: bytes) -> Call[bool]:
    return Call(
        "add_prop", {"path": path, "name": name, "value": bytes(value)}, lambda r: bool(r["added"])
    )


def add_string_prop(path: str, name: str, value: str) -> Call[bool]:
    return Call(
        "add_string_prop", {"path": path, "name": name, "value": value}, lambda r: bool(r["added"])
    )


def remove_node(path: str) -> Call[None]:
    return Call("remove_node", {"path": path}, _none)


def remove_prop(path: str, name: str) -> Call[bytes]:
    return Call("remove_prop", {"path": path, "name": name}, lambda r: bytes(r["value"]))


def get_node(path: str, tree: str = "in") -> Call[NodeInfo]:
    return Call(
        "get_node",
        {"path": path, "tree": tree},
        lambda r: NodeInfo(list(r["props"]), list(r["children"])),
    )


def get_prop(path: str, name: str, tree: str = "in") -> Call[bytes]:
    return Call("get_prop", {"path": path, "name": name, "tree": tree}, lambda r: bytes(r["value"]))


def status() -> Call[dict[str, Any]]:
    return Call("status")


def fdt(which: str) -> Call[bytes]:
    return Call("fdt", {"which": which}, lambda r: bytes(r["fdt"]))


def finalize() -> Call[dict[str, Any]]:
    return Call("finalize")


def unfreeze() -> Call[dict[str, Any]]:
    return Call("unfreeze")


def handover() -> Call[dict[str, Any]]:
    return Call("handover")


def release_unclaimed(session: str | None = None, uid: int | None = None) -> Call[dict[str, Any]]:
    return Call("release_unclaimed", {"session": session, "uid": uid})


def drop_session(session: str, uid: int | None = None) -> Call[dict[str, Any]]:
    return Call("drop_session", {"session": session, "uid": uid})
