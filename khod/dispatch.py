"""One decoded message in, one reply out (docs/protocol.md §3-§4).

The protocol half of a connection, apart from its transport: check the
envelope, find the op, check the caller may use it, run the handler, and
turn its result or its :class:`KhoError` into a reply. Anything else a
handler raises is a bug: it is logged with its traceback and answered
``EPROTO``, and the daemon carries on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from khod.args import Args
from khod.context import Caller, Context, Outcome
from khod.errors import Errno, KhoError
from khod.ops import OPS
from khod.protocol import BadRequest, error_reply, parse_request, reply
from khod.results import wire


@dataclass(slots=True)  # not frozen: building a frozen one costs 4x as much, once per reply
class Response:
    message: dict[str, Any]
    fds: tuple[int, ...] = ()
    after: Callable[[], None] | None = None  # run once the reply is queued


def label(caller: Caller) -> str:
    who = caller.session.name if caller.session else "-"
    return f"conn{caller.key}(uid={caller.peer.uid},pid={caller.peer.pid},session={who})"


async def dispatch(ctx: Context, caller: Caller, msg: object) -> Response:
    t0 = time.perf_counter()
    op_name, code = "invalid", "OK"
    req_id: int | None = None
    try:
        req = parse_request(msg)
        req_id = req.id
        spec = OPS.get(req.op)
        if spec is None:
            op_name = "unknown"
            raise KhoError(Errno.EOPNOTSUPP, f"unknown op {req.op[:64]!r}")
        op_name = req.op
        if spec.operator and not caller.peer.operator:
            raise KhoError(Errno.EPERM, f"{req.op} needs root or the operator group")
        result = spec.fn(ctx, caller, Args(req.op, req.args), req.id)
        if isinstance(result, Awaitable):
            result = await result
        if isinstance(result, Outcome):
            message = reply(req.id, wire(result.result), nfds=len(result.fds))
            return Response(message, result.fds, result.after)
        return Response(reply(req.id, wire(result)))
    except KhoError as exc:
        code = str(exc.code)
        if isinstance(exc, BadRequest):
            req_id = exc.req_id
        ctx.log.debug(
            "request.failed", conn=label(caller), op=op_name, code=code, reason=exc.message
        )
        return Response(error_reply(req_id, exc))
    except Exception as exc:
        code = "EPROTO"
        ctx.log.error(
            "request.crashed",
            conn=label(caller),
            op=op_name,
            reason=repr(exc),
            trace=traceback.format_exc(),
        )
        err = KhoError(Errno.EPROTO, f"internal error in {op_name}: {exc!r}")
        return Response(error_reply(req_id, err))
    finally:
        if ctx.metrics is not None:
            ctx.metrics.request(op_name, code, time.perf_counter() - t0)
