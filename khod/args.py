"""Typed access to a request's untrusted arguments.

Every getter names the op and the argument in its error, and :meth:`done`
refuses arguments nobody asked for, so a typo in a client is an ``EINVAL``
that says which key was wrong rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from khod.errors import KhoError, einval
from khod.pages import MAX_ORDER

U64_LIMIT = 1 << 64


class Args:
    def __init__(self, op: str, raw: dict[str, Any]) -> None:
        self.op = op
        self._raw = raw
        self._used: set[str] = set()

    def _get(self, name: str, required: bool) -> Any:
        self._used.add(name)
        if name not in self._raw or self._raw[name] is None:
            if required:
                raise einval(f"{self.op}: missing argument {name!r}")
            return None
        return self._raw[name]

    def _bad(self, name: str, want: str, value: Any) -> KhoError:
        shown = repr(value) if not isinstance(value, bytes | list) else type(value).__name__
        return einval(f"{self.op}: argument {name!r} must be {want}, got {shown[:60]}")

    def u64(self, name: str) -> int:
        v = self._get(name, True)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < U64_LIMIT:
            raise self._bad(name, "an integer in 0..2**64-1", v)
        return v

    def opt_uid(self, name: str = "uid") -> int | None:
        if self._get(name, False) is None:
            return None
        v = self.u64(name)
        if v >= 1 << 32:
            raise self._bad(name, "a uid in 0..2**32-1", v)
        return v

    def order(self, name: str = "order") -> int:
        v = self._get(name, True)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ORDER:
            raise self._bad(name, f"an order in 0..{MAX_ORDER}", v)
        return v

    def opt_order(self, name: str = "order") -> int | None:
        return None if self._get(name, False) is None else self.order(name)

    def count(self, name: str, limit: int) -> int:
        v = self.u64(name)
        if not 1 <= v <= limit:
            raise self._bad(name, f"a count in 1..{limit}", v)
        return v

    def string(self, name: str, max_len: int = 4096) -> str:
        v = self._get(name, True)
        if not isinstance(v, str) or len(v) > max_len:
            raise self._bad(name, f"a string of at most {max_len} characters", v)
        return v

    def opt_string(self, name: str, max_len: int = 4096) -> str | None:
        return None if self._get(name, False) is None else self.string(name, max_len)

    def flag(self, name: str, default: bool = False) -> bool:
        v = self._get(name, False)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self._bad(name, "true or false", v)
        return v

    def blob(self, name: str, max_len: int) -> bytes:
        v = self._get(name, True)
        if not isinstance(v, bytes) or len(v) > max_len:
            raise self._bad(name, f"bytes (at most {max_len})", v)
        return v

    def strings(self, name: str, allowed: frozenset[str]) -> list[str]:
        v = self._get(name, True)
        if not isinstance(v, list) or not all(isinstance(x, str) and x in allowed for x in v):
            raise self._bad(name, f"a list drawn from {sorted(allowed)}", v)
        return list(dict.fromkeys(v))

    def u64s(self, name: str, limit: int) -> npt.NDArray[np.int64]:
        """A list of integers, or bytes packing little-endian u64s (the fast form)."""
        v = self._get(name, True)
        if isinstance(v, bytes):
            if len(v) % 8:
                raise self._bad(name, "packed little-endian u64s (a multiple of 8 bytes)", v)
            arr = np.frombuffer(v, dtype="<u8")
            if arr.size and int(arr.max()) >= 1 << 63:
                raise einval(f"{self.op}: a value in {name!r} is beyond 2**63")
            out = arr.astype(np.int64)
        elif isinstance(v, list):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise self._bad(name, "a list of integers", v)
            if v and (min(v) < 0 or max(v) >= 1 << 63):
                raise einval(f"{self.op}: a value in {name!r} is negative or beyond 2**63")
            out = np.asarray(v, dtype=np.int64)
        else:
            raise self._bad(name, "a list of integers or packed u64 bytes", v)
        if out.size > limit:
            raise einval(f"{self.op}: {out.size} entries in {name!r}, at most {limit} per batch")
        return out

    def orders(self, name: str, n: int) -> int | npt.NDArray[np.int64] | None:
        """One order for the whole batch, one per entry, or None (look them up)."""
        v = self._get(name, False)
        if v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            return self.order(name)
        arr = self.u64s(name, n)
        if arr.size != n:
            raise einval(f"{self.op}: {arr.size} orders for {n} entries")
        if arr.size and int(arr.max()) > MAX_ORDER:
            raise einval(f"{self.op}: order {int(arr.max())} in {name!r} is above {MAX_ORDER}")
        return arr

    def done(self) -> None:
        extra = sorted(set(self._raw) - self._used)
        if extra:
            raise einval(f"{self.op}: unknown argument {extra[0]!r}")
