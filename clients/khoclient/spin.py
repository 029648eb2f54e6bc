"""How long a blocking call busy-polls for its reply before it sleeps (sans-I/O).

Why spin at all: a reply that finds its caller asleep must wake it, and a
request that finds the daemon asleep must wake the daemon. On a virtual
machine each wake-up is an inter-processor interrupt through the hypervisor,
tens of microseconds on both sides, more than the daemon's work for a small
request. A caller that polls the socket for a short while after sending is
awake when the reply comes, and sends its next request before the daemon has
gone to sleep: measured on this project's 2-core VM, unbatched preserve round
trips went from 11.5k/s to 29k/s, with less CPU per round trip on both sides
(bench/rpc.py; README, Performance).

Why adaptive: spinning only pays when the reply comes within the budget. A
slow request (a finalize), an overloaded machine or a busy daemon makes it pure
waste, and on a machine with fewer free cores than spinners it takes the CPU
the daemon needs. So each miss doubles the number of calls that sleep at once
without spinning (up to 1024), and a hit ends the backoff.
"""

from __future__ import annotations

import os

from khod.errors import Errno, KhoError

DEFAULT_US = 100  # above a small request's round trip on an awake daemon (30-40 µs here)
ENV = "KHOCLIENT_BUSY_POLL_US"  # overrides the default: 0 never spins
MAX_US = 1_000_000  # a longer spin is a sleep that burns a core
MAX_BACKOFF = 10  # misses in a row that count: at most 2**10 calls sleep without spinning


def default_us() -> int:
    """The busy-poll budget a client takes when none is given: $KHOCLIENT_BUSY_POLL_US or 100."""
    raw = os.environ.get(ENV)
    if raw is None or not raw.strip():
        return DEFAULT_US
    try:
        us = int(raw)
    except ValueError:
        raise KhoError(Errno.EINVAL, f"{ENV}={raw!r}: not a whole number of microseconds") from None
    check(us, ENV)
    return us


def check(us: object, what: str = "busy_poll_us") -> None:
    """A budget must be a whole number of microseconds from 0 (never spin) to one second."""
    if not isinstance(us, int) or isinstance(us, bool) or not 0 <= us <= MAX_US:
        raise KhoError(Errno.EINVAL, f"{what}={us!r}: must be 0 (never spin) to {MAX_US} µs")


class BusyPoll:
    """The budget of each call: ``budget()`` before it reads, ``hit()``/``miss()`` after."""

    __slots__ = ("_misses", "_skip", "limit")

    def __init__(self, limit_us: int) -> None:
        check(limit_us)
        self.limit = limit_us / 1e6  # seconds; 0: never spin
        self._misses = 0  # misses in a row
        self._skip = 0  # calls left that sleep at once

    def budget(self) -> float:
        """Seconds this call may spin (0: go to sleep at once)."""
        if self._skip:
            self._skip -= 1
            return 0.0
        return self.limit

    def hit(self) -> None:
        """The reply came while spinning."""
        self._misses = 0

    def miss(self) -> None:
        """The budget ran out with no reply: back off."""
        self._misses = min(self._misses + 1, MAX_BACKOFF)
        self._skip = 1 << self._misses
