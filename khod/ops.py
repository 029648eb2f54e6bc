"""The operations of docs/protocol.md §6: argument checks, permissions, the engine call.

Each op is registered in :data:`OPS` with whether it needs the operator. A
handler reads every argument through :class:`Args` (``a.done()`` refuses
the ones nobody asked for), calls the engine or the lifecycle, and returns
the result (an engine result is serialized by :mod:`khod.dispatch`).
``session_op`` handlers get the caller's session and nothing else;
``op`` handlers get the :class:`Caller` itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import trio

from khod import status
from khod.args import Args
from khod.context import Caller, Context, Outcome
from khod.errors import KhoError, einval, enoent, eperm
from khod.kho.tracker import Tracker
from khod.pages import I64, PAGE_SHIFT, folio_bytes
from khod.protocol import DEFAULT_MAX_ARRAY as LIST_MAX
from khod.session import Session

U = TypeVar("U")
Handler = Callable[[Context, Caller, Args, int], Any]
SessionHandler = Callable[[Context, Session, Args], Any]
EVENTS = frozenset({"finalize", "unfreeze"})
MAX_PATH = 1024
MAX_NAME = 64
MAX_VALUE = 1 << 20


@dataclass(frozen=True)
class OpSpec:
    fn: Handler
    operator: bool


OPS: dict[str, OpSpec] = {}


def _needs_session(caller: Caller, a: Args) -> Session:
    if caller.session is None:
        raise einval(f"{a.op} needs a session: send hello first")
    return caller.session


def op(name: str, *, session: bool = False, operator: bool = False) -> Callable[[Handler], Handler]:
    """Register a handler that sees the caller (``session``: refuse callers without one)."""

    def register(fn: Handler) -> Handler:
        def checked(ctx: Context, caller: Caller, a: Args, req_id: int) -> Any:
            _needs_session(caller, a)
            return fn(ctx, caller, a, req_id)

        OPS[name] = OpSpec(checked if session else fn, operator)
        return fn

    return register


def session_op(name: str) -> Callable[[SessionHandler], SessionHandler]:
    """Register a handler that acts for the caller's session and needs nothing else.

    A session's requests run one at a time, whichever of its connections
    sent them, so a request cut into steps (:func:`_applied`) sees its
    session unchanged from its first slice to its last.
    """

    def register(fn: SessionHandler) -> SessionHandler:
        async def call(ctx: Context, caller: Caller, a: Args, req_id: int) -> Any:
            s = _needs_session(caller, a)
            async with ctx.serial(s.key):
                if caller.session is not s:  # dropped while this request waited its turn
                    raise enoent(f"session {s.name!r} of uid {s.uid} was dropped")
                result = fn(ctx, s, a)
                if isinstance(result, Awaitable):
                    result = await result
                return result

        OPS[name] = OpSpec(call, operator=False)
        return fn

    return register


BATCH = 1 << 16  # folios or ranges per step of a long preservation request


async def _checked(n: int, check: Callable[[slice], tuple[I64, I64]], op: str) -> tuple[I64, I64]:
    """Check a batch of ``n`` a step at a time; the (pfns, orders) ``check`` found.

    Each step's folios also go into a set of their own, which refuses a
    folio named twice across the whole batch (no sort, no array as large as
    the region). Nothing has changed yet, so a cancelled check just ends the
    request.
    """
    parts: list[tuple[I64, I64]] = []
    seen = Tracker()
    for at in range(0, n, BATCH):
        pfns, orders = check(slice(at, at + BATCH))
        try:
            seen.preserve_folios(pfns, orders)
        except KhoError:
            raise einval(f"{op}: the same folio appears twice") from None
        parts.append((pfns, orders))
        await trio.lowlevel.checkpoint()
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    return np.concatenate([p for p, _ in parts]), np.concatenate([o for _, o in parts])


async def _applied(n: int, apply: Callable[[slice], object]) -> None:
    """Apply a checked batch a step at a time; once begun it is finished, never abandoned."""
    for at in range(0, n, BATCH):
        apply(slice(at, at + BATCH))
        if at + BATCH < n:
            await trio.lowlevel.cancel_shielded_checkpoint()


async def _in_steps(
    ctx: Context, n: int, step: Callable[[slice], U], undo: Callable[[U], object]
) -> list[U]:
    """A preservation request over ``n`` items in steps of ``BATCH``, all or nothing.

    Between steps everyone else runs; the freeze waits for the last step
    (:meth:`Lifecycle.editing`). A failing step undoes the ones before it.
    """
    if n <= BATCH:
        return [step(slice(0, n))]
    done: list[U] = []
    async with ctx.lifecycle.editing():
        try:
            for at in range(0, n, BATCH):
                done.append(step(slice(at, min(n, at + BATCH))))
                await trio.lowlevel.cancel_shielded_checkpoint()
        except BaseException:
            for d in reversed(done):
                undo(d)
            raise
    return done


# --------------------------------------------------------------------------- sessions


@op("hello")
def _hello(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    name = a.string("name", MAX_NAME)
    persistent = a.flag("persistent")
    uid = a.opt_uid()
    a.done()
    peer = caller.peer
    owner = peer.uid if uid is None else uid
    if owner != peer.uid and not peer.is_root:
        raise eperm(f"only root may open a session of another user (uid {owner})")
    if caller.session is not None and caller.session.key != (owner, name):
        raise einval(f"this connection already speaks for session {caller.session.name!r}")
    s, created = ctx.engine.hello(owner, name, persistent, caller.key)
    caller.session = s
    ctx.log.info("session.hello", session=name, uid=owner, created=created, persistent=s.persistent)
    return {
        "session": name,
        "created": created,
        "uid": s.uid,
        "persistent": s.persistent,
        "generation": ctx.engine.generation,
        "incoming": s.incoming is not None,
        "incoming_bytes": s.incoming.unclaimed.total_bytes() if s.incoming else 0,
    }


@op("region", session=True)
def _region(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    """The descriptor of this session's memory (docs/protocol.md §8)."""
    a.done()
    s, r, memory = _needs_session(caller, a), ctx.engine.region, ctx.engine.memory
    if memory.shared and not caller.peer.maps_shared:
        raise eperm(
            f"the {r.backend} backend passes {r.path} itself, the whole of memory: only root "
            "and members of server.memory_group may map it"
        )
    info = {"base": r.base, "size": r.size, "map_offset": r.map_offset, "backend": r.backend}
    if not memory.shared:
        info["map_offset"] = 0  # the session's own file, laid out like the region
    return Outcome(info, fds=(memory.fd(s.key),))


@op("subscribe", session=True)
def _subscribe(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    events = a.strings("events", EVENTS)
    a.done()
    caller.events = frozenset(events)
    return {"events": sorted(caller.events)}


@op("notify_reply", session=True)
def _notify_reply(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    token = a.u64("token")
    ok = a.flag("ok", default=True)
    reason = a.opt_string("reason", 512) or ""
    error = a.opt_string("error", 512)
    a.done()
    status = "error" if error is not None else ("ok" if ok else "veto")
    ctx.lifecycle.answer(caller.key, token, status, error or reason)
    return {}


@op("ping")
def _ping(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    a.done()
    return {}


# --------------------------------------------------------------------------- memory


@session_op("alloc_folio")
def _alloc_folio(ctx: Context, s: Session, a: Args) -> Any:
    order = a.order()
    a.done()
    return {"phys": ctx.engine.alloc_folio(s, order), "order": order}


def _packed(a: Args, n: int) -> bool:
    """Whether a reply's long array travels packed (bin); unpacked ones stay short."""
    packed = a.flag("packed")
    if n > LIST_MAX and not packed:
        raise einval(
            f"{a.op}: a reply of {n} entries must be packed (packed: true): lists of more "
            f"than {LIST_MAX} take the daemon too long to encode"
        )
    return packed


@session_op("alloc_folios")
async def _alloc_folios(ctx: Context, s: Session, a: Args) -> Any:
    order = a.order()
    count = a.count("count", ctx.max_batch)
    packed = _packed(a, count)
    a.done()
    e = ctx.engine
    e.check_quota(s, count * folio_bytes(order))
    # The reply's array is filled step by step and packed as it is (a memoryview):
    # concatenating, converting and copying 8 MB at the end held the loop ~25 ms.
    phys = np.empty(count, dtype="<u8")
    done = 0
    try:
        while done < count:
            n = min(BATCH, count - done)
            phys[done : done + n] = e.alloc_folios(s, order, n)
            done += n
            await trio.lowlevel.cancel_shielded_checkpoint()
    except BaseException:
        if done:  # all or nothing
            pfns = phys[:done].astype(np.int64) >> PAGE_SHIFT
            e.free_blocks(s, pfns, np.full(done, order, dtype=np.int64))
        raise
    return {"phys": phys.data if packed else phys.tolist(), "order": order}


@session_op("free_folio")
def _free_folio(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64("phys")
    a.done()
    ctx.engine.free_folio(s, phys)
    return {}


@session_op("free_folios")
async def _free_folios(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64s("phys", ctx.max_batch)
    a.done()
    e = ctx.engine
    pfns, orders = await _checked(phys.size, lambda at: e.freeable(s, phys[at]), "free_folios")
    await _applied(pfns.size, lambda at: e.free_blocks(s, pfns[at], orders[at]))
    return {"count": int(pfns.size)}


# --------------------------------------------------------------------------- preservation


@session_op("preserve_folio")
def _preserve_folio(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64("phys")
    order = a.opt_order()
    a.done()
    return {"order": ctx.engine.preserve_folio(s, phys, order)}


@session_op("unpreserve_folio")
def _unpreserve_folio(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64("phys")
    order = a.opt_order()
    a.done()
    return {"order": ctx.engine.unpreserve_folio(s, phys, order)}


def _orders_of(orders: int | I64 | None, at: slice) -> int | I64 | None:
    return orders[at] if isinstance(orders, np.ndarray) else orders


@session_op("preserve_folios")
async def _preserve_folios(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64s("phys", ctx.max_batch)
    orders = a.orders("orders", int(phys.size))
    a.done()
    e = ctx.engine
    steps = await _in_steps(
        ctx,
        int(phys.size),
        lambda at: (at, e.preserve_folios(s, phys[at], _orders_of(orders, at))),
        lambda done: e.unpreserve_folios(s, phys[done[0]], _orders_of(orders, done[0])),
    )
    return {"count": sum(n for _, n in steps)}


@session_op("unpreserve_folios")
async def _unpreserve_folios(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64s("phys", ctx.max_batch)
    orders = a.orders("orders", int(phys.size))
    a.done()
    e = ctx.engine

    def step(at: slice) -> tuple[I64, I64]:
        ords = _orders_of(orders, at)
        if ords is None:  # look them up before they are gone, for the undo
            ords = np.array([s.tracker.find_order(int(p) >> PAGE_SHIFT) or 0 for p in phys[at]])
        e.unpreserve_folios(s, phys[at], ords)
        return phys[at], np.broadcast_to(np.asarray(ords, dtype=np.int64), phys[at].shape)

    steps = await _in_steps(ctx, int(phys.size), step, lambda d: e.preserve_folios(s, *d))
    return {"count": sum(int(p.size) for p, _ in steps)}


def _folio_pairs(pfns: I64, orders: I64) -> list[list[int]]:
    return [[p << PAGE_SHIFT, o] for p, o in zip(pfns.tolist(), orders.tolist(), strict=True)]


@session_op("preserve_phys")
def _preserve_phys(ctx: Context, s: Session, a: Args) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    return {"folios": _folio_pairs(*ctx.engine.preserve_ranges(s, *_one(phys, size)))}


@session_op("unpreserve_phys")
def _unpreserve_phys(ctx: Context, s: Session, a: Args) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    return {"folios": _folio_pairs(*ctx.engine.unpreserve_ranges(s, *_one(phys, size)))}


def _one(phys: int, size: int) -> tuple[I64, I64]:
    if size >= 1 << 63 or phys >= 1 << 63:
        raise einval(f"range {phys:#x}+{size:#x} is outside any region")
    return np.array([phys], dtype=np.int64), np.array([size], dtype=np.int64)


def _ranges(ctx: Context, a: Args) -> tuple[I64, I64]:
    phys = a.u64s("phys", ctx.max_batch)
    sizes = a.u64s("sizes", ctx.max_batch)
    a.done()
    if phys.size != sizes.size:
        raise einval(f"{a.op}: {phys.size} addresses but {sizes.size} sizes")
    return phys, sizes


async def _range_steps(
    ctx: Context,
    a: Args,
    do: Callable[[I64, I64, int], tuple[I64, I64]],
    undo: Callable[[I64, I64], object],
) -> int:
    """Ranges in steps; all of them split into at most ``max_batch`` folios."""
    phys, sizes = _ranges(ctx, a)
    made = 0

    def step(at: slice) -> tuple[I64, I64]:
        nonlocal made
        pfns, orders = do(phys[at], sizes[at], ctx.max_batch - made)
        made += int(pfns.size)
        return pfns, orders

    await _in_steps(ctx, int(phys.size), step, lambda d: undo(*d))
    return made


@session_op("preserve_phys_ranges")
async def _preserve_ranges(ctx: Context, s: Session, a: Args) -> Any:
    e = ctx.engine
    folios = await _range_steps(
        ctx,
        a,
        lambda p, z, lim: e.preserve_ranges(s, p, z, lim),
        lambda pfns, orders: s.tracker.unpreserve_folios(pfns, orders),
    )
    return {"folios": folios}


@session_op("unpreserve_phys_ranges")
async def _unpreserve_ranges(ctx: Context, s: Session, a: Args) -> Any:
    e = ctx.engine
    folios = await _range_steps(
        ctx,
        a,
        lambda p, z, lim: e.unpreserve_ranges(s, p, z, lim),
        lambda pfns, orders: s.tracker.preserve_folios(pfns, orders),
    )
    return {"folios": folios}


# --------------------------------------------------------------------------- restore


def _count_restored(ctx: Context, nbytes: int) -> None:
    if ctx.metrics is not None:
        ctx.metrics.restored(nbytes)


@session_op("restore_folio")
def _restore_folio(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64("phys")
    a.done()
    order = ctx.engine.restore_folio(s, phys)
    _count_restored(ctx, folio_bytes(order))
    return {"phys": phys, "order": order}


@session_op("restore_folios")
async def _restore_folios(ctx: Context, s: Session, a: Args) -> Any:
    phys = a.u64s("phys", ctx.max_batch)
    packed = _packed(a, int(phys.size))
    a.done()
    e = ctx.engine

    def check(at: slice) -> tuple[I64, I64]:
        pfns = e.restore_pfns(phys[at])
        return pfns, e.restorable(s, pfns)

    pfns, orders = await _checked(phys.size, check, "restore_folios")
    await _applied(pfns.size, lambda at: e.claim(s, pfns[at], orders[at]))
    _count_restored(ctx, int((np.int64(1) << orders).sum()) << PAGE_SHIFT)
    return {"orders": orders.astype(np.uint8).tobytes() if packed else orders.tolist()}


@session_op("restore_phys")
def _restore_phys(ctx: Context, s: Session, a: Args) -> Any:
    phys, size = a.u64("phys"), a.u64("size")
    a.done()
    folios = ctx.engine.restore_phys(s, phys, size)
    _count_restored(ctx, size)
    return {"folios": [[phys, order] for phys, order in folios]}


# --------------------------------------------------------------------------- tree


@session_op("add_node")
def _add_node(ctx: Context, s: Session, a: Args) -> Any:
    path = a.string("path", MAX_PATH)
    a.done()
    return {"created": ctx.engine.editable_tree(s).add_node(path)}


@session_op("add_prop")
def _add_prop(ctx: Context, s: Session, a: Args) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", MAX_NAME)
    value = a.blob("value", MAX_VALUE)
    a.done()
    return {"added": ctx.engine.editable_tree(s).add_prop(path, name, value)}


@session_op("add_string_prop")
def _add_string_prop(ctx: Context, s: Session, a: Args) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", MAX_NAME)
    value = a.string("value", MAX_VALUE)
    a.done()
    return {"added": ctx.engine.editable_tree(s).add_string_prop(path, name, value)}


@session_op("remove_node")
def _remove_node(ctx: Context, s: Session, a: Args) -> Any:
    path = a.string("path", MAX_PATH)
    a.done()
    ctx.engine.editable_tree(s).remove_node(path)
    return {}


@session_op("remove_prop")
def _remove_prop(ctx: Context, s: Session, a: Args) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", MAX_NAME)
    a.done()
    return {"value": ctx.engine.editable_tree(s).remove_prop(path, name)}


@session_op("get_node")
def _get_node(ctx: Context, s: Session, a: Args) -> Any:
    path = a.string("path", MAX_PATH)
    which = a.opt_string("tree", 3) or "in"
    a.done()
    return ctx.engine.get_node(s, path, which)


@session_op("get_prop")
def _get_prop(ctx: Context, s: Session, a: Args) -> Any:
    path, name = a.string("path", MAX_PATH), a.string("name", MAX_NAME)
    which = a.opt_string("tree", 3) or "in"
    a.done()
    return {"value": ctx.engine.get_prop(s, path, name, which)}


# --------------------------------------------------------------------------- operator


@op("status")
def _status(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    """Everything for operators; a user sees its own sessions only."""
    a.done()
    viewer = None if caller.peer.operator else caller.peer.uid
    return status.snapshot(ctx.engine, ctx.lifecycle, ctx.connection_count(), viewer)


@op("fdt", operator=True)
def _fdt(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    which = a.string("which", 3)
    a.done()
    return {"fdt": ctx.engine.fdt(which)}


@op("finalize", operator=True)
def _finalize(ctx: Context, caller: Caller, a: Args, req_id: int) -> Awaitable[Any]:
    a.done()
    return ctx.lifecycle.finalize(ctx.progress(caller, req_id))


@op("unfreeze", operator=True)
def _unfreeze(ctx: Context, caller: Caller, a: Args, req_id: int) -> Awaitable[Any]:
    a.done()
    return ctx.lifecycle.unfreeze(ctx.progress(caller, req_id))


@op("handover", operator=True)
def _handover(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    a.done()
    generation = ctx.lifecycle.hand_over()
    return Outcome({"generation": generation}, after=lambda: ctx.request_stop("handover"))


@op("drop_session", operator=True)
async def _drop_session(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    name = a.string("session", MAX_NAME)
    uid = a.opt_uid()
    a.done()
    uid = caller.peer.uid if uid is None else uid
    async with ctx.serial((uid, name)):  # between two of its requests, never inside one
        out = ctx.lifecycle.drop_session(uid, name)
        ctx.evict((uid, name), spare=caller.key)
    return out


@op("release_unclaimed", operator=True)
def _release_unclaimed(ctx: Context, caller: Caller, a: Args, _: int) -> Any:
    name = a.opt_string("session", MAX_NAME)
    uid = a.opt_uid()
    a.done()
    return ctx.lifecycle.release_unclaimed(name, uid)
