"""The wire protocol: msgpack maps over a Unix stream socket (docs/protocol.md).

Sans-I/O, shared by the daemon and the client library. One message is one
msgpack map:

* request   ``{"id": 7, "op": "alloc_folio", "order": 9}`` -- every key but
  ``id`` and ``op`` is an argument;
* reply     ``{"id": 7, "result": {...}}`` or
            ``{"id": 7, "error": {"code": "EINVAL", "message": "..."}}``;
* event     ``{"event": "finalize", "token": 3, ...}`` pushed by the daemon;
  notifier events are answered with a ``notify_reply`` request.

A reply that carries file descriptors (SCM_RIGHTS) says how many in
``"nfds"``; fds are not tied to frame boundaries, so receivers keep a FIFO.

The decoder enforces hard limits (frame bytes, array and map lengths); a
stream that breaks them, or that is not msgpack at all, is unrecoverable
(:class:`FrameError`) and the connection is closed. A well-formed message
that is not a valid request gets an error reply instead (:class:`BadRequest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from khod.errors import Errno, KhoError

MAX_ID = (1 << 63) - 1
DEFAULT_MAX_FRAME = 16 << 20
DEFAULT_MAX_ARRAY = 1 << 16  # longer lists of integers travel as packed u64 bytes (bin)
DEFAULT_MAX_MAP = 64


class FrameError(Exception):
    """The byte stream cannot be decoded further: close the connection."""


class BadRequest(KhoError):
    """A decodable message that is not a valid request; ``id`` is kept when known."""

    def __init__(self, req_id: int | None, code: Errno, message: str) -> None:
        super().__init__(code, message)
        self.req_id = req_id


@dataclass(frozen=True)
class Limits:
    max_frame: int = DEFAULT_MAX_FRAME
    max_array: int = DEFAULT_MAX_ARRAY
    max_map: int = DEFAULT_MAX_MAP


class Decoder:
    """Incremental decoder: ``feed(bytes) -> [message, ...]``."""

    def __init__(self, limits: Limits | None = None) -> None:
        lim = limits or Limits()
        options: dict[str, Any] = {
            "raw": False,
            "strict_map_key": False,  # a non-string key is a bad request, not a broken frame
            "use_list": True,
            "max_array_len": lim.max_array,
            "max_map_len": lim.max_map,
            "max_ext_len": 0,
        }
        self._unpacker = msgpack.Unpacker(max_buffer_size=lim.max_frame, **options)
        self._whole = options
        self.max_frame = lim.max_frame
        self._fed = 0  # bytes fed so far
        self._end = 0  # stream offset just after the last complete message
        self._whole_bytes = 0  # bytes decoded whole, never fed to the streaming parser

    @property
    def pending(self) -> int:
        """Bytes fed that belong to no complete message yet."""
        return self._fed - self._end

    def feed(self, data: bytes) -> list[Any]:
        if self._fed == self._end and len(data) <= self.max_frame:
            # The usual read is exactly one message: decode it in one call, with the
            # same limits, at a fraction of the streaming parser's cost per message.
            try:
                message = msgpack.unpackb(data, **self._whole)
            except Exception:  # several messages, part of one, or a broken one: see below
                pass
            else:
                self._fed += len(data)
                self._end = self._fed
                self._whole_bytes += len(data)
                return [message]
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise self._too_big() from None
        self._fed += len(data)
        out: list[Any] = []
        try:
            for message in self._unpacker:
                end = self._whole_bytes + self._unpacker.tell()
                if end - self._end > self.max_frame:
                    raise self._too_big()
                out.append(message)
                self._end = end
        except msgpack.BufferFull:
            raise self._too_big() from None
        except (ValueError, msgpack.StackError, msgpack.ExtraData) as exc:
            raise FrameError(f"undecodable frame: {exc}") from None
        # The streaming parser consumes containers as they arrive, so its buffer
        # limit alone does not bound a message: count the bytes since the last one.
        if self._fed - self._end > self.max_frame:
            raise self._too_big()
        return out

    def _too_big(self) -> FrameError:
        return FrameError(f"a frame exceeds the {self.max_frame}-byte limit")


def encode(message: Mapping[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


def parse_request(obj: object) -> Request:
    """Check the envelope of a decoded message; arguments are checked per op."""
    if not isinstance(obj, dict):
        raise BadRequest(None, Errno.EPROTO, f"a message must be a map, got {type(obj).__name__}")
    req_id = obj.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool) or not 0 <= req_id <= MAX_ID:
        req_id = None
    for k in obj:  # a loop, not a generator: cheaper for a request's few keys
        if not isinstance(k, str):  # (nil too)
            raise BadRequest(
                req_id, Errno.EPROTO, f"map keys must be strings, got {type(k).__name__} {k!r:.40}"
            )
    if req_id is None:
        raise BadRequest(None, Errno.EPROTO, "a request needs an integer 'id' in 0..2**63-1")
    op = obj.get("op")
    if not isinstance(op, str):
        raise BadRequest(req_id, Errno.EPROTO, "a request needs a string 'op'")
    args = obj.copy()
    del args["id"], args["op"]
    return Request(req_id, op, args)


def reply(req_id: int | None, result: Any = None, *, nfds: int = 0) -> dict[str, Any]:
    msg: dict[str, Any] = {"id": req_id, "result": result}
    if nfds:
        msg["nfds"] = nfds
    return msg


def error_reply(req_id: int | None, error: KhoError) -> dict[str, Any]:
    return {"id": req_id, "error": {"code": str(error.code), "message": error.message}}


def event(name: str, **fields: Any) -> dict[str, Any]:
    return {"event": name, **fields}


def error_from_reply(err: object) -> KhoError:
    """The KhoError a reply's ``error`` map describes (untrusted: the peer wrote it)."""
    if isinstance(err, dict):
        code, message = err.get("code"), err.get("message")
        if isinstance(code, str) and code in Errno.__members__ and isinstance(message, str):
            return KhoError(Errno(code), message)
    return KhoError(Errno.EPROTO, f"malformed error reply: {err!r}")
