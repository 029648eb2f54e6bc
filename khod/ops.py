"""The operations of DESIGN §5: argument checks, permissions, and the engine call.

Each handler takes the server, the calling connection, the request's
:class:`Args` and its id, and returns the reply's result (or an awaitable for
the operations that wait on notifiers). Handlers read every argument before
acting and call ``a.done()`` so unknown arguments are refused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from khod.args import Args
from khod.errors import Errno, KhoError, einval, eperm
from khod.session import Session

if TYPE_CHECKING:
    from khod.server import Connection, Server

__all__ = ["OPS", "Args", "OpSpec", "WithFds"]

Handler = Callable[["Server", "Connection", Args, int], Any]
EVENTS = frozenset({"finalize", "unfreeze"})
MAX_PATH = 1024
MAX_VALUE = 1 << 20


@dataclass(frozen=True)
class OpSpec:
    fn: Handler
    session: bool
    operator: bool


@dataclass
class WithFds:
    """A result whose reply carries file descriptors (SCM_RIGHTS)."""

    result: Any
    fds: list[int]


OPS: dict[str, OpSpec] = {}


def op(name: str, *, session: bool = True, operator: bool = False) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        OPS[name] = OpSpec(fn, session, operator)
        return fn

    return register


def _s(conn: Connection) -> Session:
    assert conn.session is not None  # dispatch checks OpSpec.session
    return conn.session


def _folios(folios: list[tuple[int, int]]) -> list[list[int]]:
    return [[phys, order] for phys, order in folios]


# --------------------------------------------------------------------------- sessions


@op("hello", session=False)
def _hello(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    name = a.string("name", 64)
    persistent = a.flag("persistent")
    a.done()
    if conn.session is not None and conn.session.name != name:
        raise einval(f"this connection already speaks for session {conn.session.name!r}")
    s, created = srv.engine.hello(conn.peer.uid, name, persistent)
    s.connections.add(conn.id)
    conn.session = s
    srv.log.info(
        "session.hello", session=name, uid=conn.peer.uid, created=created, persistent=persistent
    )
    return {
        "session": name,
        "created": created,
        "uid": s.uid,
        "persistent": s.persistent,
        "generation": srv.engine.generation,
        "incoming": s.incoming is not None,
        "incoming_bytes": s.incoming.unclaimed.total_bytes() if s.incoming else 0,
    }


@op("region")
def _region(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    a.done()
    r = srv.engine.region
    if r.backend == "devmem" and not conn.peer.is_root:
        raise eperm("the devmem backend's fd is /dev/mem itself; only root may receive it")
    info = {"base": r.base, "size": r.size, "map_offset": r.map_offset, "backend": r.backend}
    return WithFds(info, [r.fileno()])


@op("subscribe")
def _subscribe(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    events = a.strings("events", EVENTS)
    a.done()
    conn.subscriptions = set(events)
    return {"events": sorted(conn.subscriptions)}


@op("notify_reply")
def _notify_reply(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    token = a.u64("token")
    ok = a.flag("ok", default=True)
    reason = a.opt_string("reason", 512) or ""
    error = a.opt_string("error", 512)
    a.done()
    status = "error" if error is not None else ("ok" if ok else "veto")
    srv.answer(conn, token, status, error or reason)
    return {}


@op("ping", session=False)
def _ping(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    a.done()
    return {}


# --------------------------------------------------------------------------- memory


@op("alloc_folio")
def _alloc_folio(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    order = a.order()
    a.done()
    return {"phys": srv.engine.alloc_folio(_s(conn), order), "order": order}


@op("alloc_folios")
def _alloc_folios(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    order = a.order()
    count = a.count("count", srv.config.limits.max_batch)
    a.done()
    return {"phys": srv.engine.alloc_folios(_s(conn), order, count), "order": order}


@op("free_folio")
def _free_folio(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64("phys")
    a.done()
    srv.engine.free_folio(_s(conn), phys)
    return {}


@op("free_folios")
def _free_folios(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64s("phys", srv.config.limits.max_batch)
    a.done()
    return {"count": srv.engine.free_folios(_s(conn), phys)}


# --------------------------------------------------------------------------- preservation


@op("preserve_folio")
def _preserve_folio(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64("phys")
    order = a.opt_order()
    a.done()
    with srv.lock.read():
        return {"order": srv.engine.preserve_folio(_s(conn), phys, order)}


@op("unpreserve_folio")
def _unpreserve_folio(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64("phys")
    order = a.opt_order()
    a.done()
    with srv.lock.read():
        return {"order": srv.engine.unpreserve_folio(_s(conn), phys, order)}


@op("preserve_folios")
def _preserve_folios(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64s("phys", srv.config.limits.max_batch)
    orders = a.orders("orders", int(phys.size))
    a.done()
    with srv.lock.read():
        return {"count": srv.engine.preserve_folios(_s(conn), phys, orders)}


@op("unpreserve_folios")
def _unpreserve_folios(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64s("phys", srv.config.limits.max_batch)
    orders = a.orders("orders", int(phys.size))
    a.done()
    with srv.lock.read():
        return {"count": srv.engine.unpreserve_folios(_s(conn), phys, orders)}


@op("preserve_phys")
def _preserve_phys(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    with srv.lock.read():
        return {"folios": _folios(srv.engine.preserve_phys(_s(conn), phys, size))}


@op("unpreserve_phys")
def _unpreserve_phys(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    with srv.lock.read():
        return {"folios": _folios(srv.engine.unpreserve_phys(_s(conn), phys, size))}


def _ranges(srv: Server, a: Args) -> list[tuple[int, int]]:
    phys = a.u64s("phys", srv.config.limits.max_batch)
    sizes = a.u64s("sizes", srv.config.limits.max_batch)
    a.done()
    if phys.size != sizes.size:
        raise einval(f"{a.op}: {phys.size} addresses but {sizes.size} sizes")
    return list(zip(phys.tolist(), sizes.tolist(), strict=True))


@op("preserve_phys_ranges")
def _preserve_ranges(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    ranges = _ranges(srv, a)
    with srv.lock.read():
        return {"folios": len(srv.engine.preserve_ranges(_s(conn), ranges))}


@op("unpreserve_phys_ranges")
def _unpreserve_ranges(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    ranges = _ranges(srv, a)
    with srv.lock.read():
        return {"folios": len(srv.engine.unpreserve_ranges(_s(conn), ranges))}


# --------------------------------------------------------------------------- restore


@op("restore_folio")
def _restore_folio(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64("phys")
    a.done()
    order = srv.engine.restore_folio(_s(conn), phys)
    if srv.metrics is not None:
        srv.metrics.restored(4096 << order)
    return {"phys": phys, "order": order}


@op("restore_folios")
def _restore_folios(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys = a.u64s("phys", srv.config.limits.max_batch)
    a.done()
    orders = srv.engine.restore_folios(_s(conn), phys)
    if srv.metrics is not None:
        srv.metrics.restored(sum(4096 << o for o in orders))
    return {"orders": orders}


@op("restore_phys")
def _restore_phys(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    folios = srv.engine.restore_phys(_s(conn), phys, size)
    if srv.metrics is not None:
        srv.metrics.restored(size)
    return {"folios": _folios(folios)}


# --------------------------------------------------------------------------- tree


@op("add_node")
def _add_node(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path = a.string("path", MAX_PATH)
    a.done()
    with srv.lock.read("the KHO tree"):
        return {"created": _s(conn).tree.add_node(path)}


@op("add_prop")
def _add_prop(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", 64)
    value = a.blob("value", MAX_VALUE)
    a.done()
    with srv.lock.read("the KHO tree"):
        return {"added": _s(conn).tree.add_prop(path, name, value)}


@op("add_string_prop")
def _add_string_prop(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", 64)
    value = a.string("value", MAX_VALUE)
    a.done()
    with srv.lock.read("the KHO tree"):
        return {"added": _s(conn).tree.add_string_prop(path, name, value)}


@op("remove_node")
def _remove_node(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path = a.string("path", MAX_PATH)
    a.done()
    with srv.lock.read("the KHO tree"):
        _s(conn).tree.remove_node(path)
    return {}


@op("remove_prop")
def _remove_prop(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", 64)
    a.done()
    with srv.lock.read("the KHO tree"):
        return {"value": _s(conn).tree.remove_prop(path, name)}


@op("get_node")
def _get_node(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path = a.string("path", MAX_PATH)
    which = a.opt_string("tree", 3) or "in"
    a.done()
    return srv.engine.get_node(_s(conn), path, which)


@op("get_prop")
def _get_prop(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", 64)
    which = a.opt_string("tree", 3) or "in"
    a.done()
    return {"value": srv.engine.get_prop(_s(conn), path, name, which)}


# --------------------------------------------------------------------------- operator


@op("status", session=False)
def _status(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    a.done()
    out = srv.engine.status()
    out["connections"] = len(srv.conns)
    out["frozen"] = srv.lock.frozen
    return out


@op("fdt", session=False, operator=True)
def _fdt(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    which = a.string("which", 3)
    a.done()
    return {"fdt": srv.engine.fdt(which)}


@op("finalize", session=False, operator=True)
def _finalize(srv: Server, conn: Connection, a: Args, req_id: int) -> Awaitable[Any]:
    a.done()
    return srv.finalize(conn, req_id)


@op("unfreeze", session=False, operator=True)
def _unfreeze(srv: Server, conn: Connection, a: Args, req_id: int) -> Awaitable[Any]:
    a.done()
    return srv.unfreeze(conn, req_id)


@op("handover", session=False, operator=True)
def _handover(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    a.done()
    if srv.lifecycle.locked():
        raise KhoError(Errno.EBUSY, "a finalize or unfreeze is in progress")
    generation = srv.hand_over()
    conn.after_reply = lambda: srv.request_stop("handover")
    return {"generation": generation}


@op("release_unclaimed", session=False, operator=True)
def _release_unclaimed(srv: Server, conn: Connection, a: Args, _: int) -> Any:
    name = a.opt_string("session", 64)
    a.done()
    out = srv.engine.release_unclaimed(name)
    srv.log.info(
        "incoming.released",
        session=name or "*",
        bytes=out["released_bytes"],
        dropped=",".join(out["dropped_sessions"]) or None,
    )
    return out
