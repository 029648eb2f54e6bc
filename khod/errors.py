"""Error codes shared by the daemon, the wire protocol and the client library.

Every failure that crosses a boundary (a client request, a byte read back
from a region, a config value) becomes a :class:`KhoError` carrying one of
the errno-style codes of docs/protocol.md §4 and a message that names the fault.
Handover validation failures are a subclass that also names the fault class,
so metrics and operators can tell a CRC mismatch from a chunk-list loop.
"""

from __future__ import annotations

from enum import StrEnum


class Errno(StrEnum):
    """The closed set of error codes a reply may carry."""

    EBUSY = "EBUSY"
    EINVAL = "EINVAL"
    ENOENT = "ENOENT"
    EPERM = "EPERM"
    EEXIST = "EEXIST"
    ENOMEM = "ENOMEM"
    EOPNOTSUPP = "EOPNOTSUPP"
    ETIMEDOUT = "ETIMEDOUT"
    EPROTO = "EPROTO"


class KhoError(Exception):
    """A failure with an errno-style code and a message naming the fault."""

    def __init__(self, code: Errno | str, message: str) -> None:
        self.code = Errno(code)
        self.message = message
        super().__init__(f"{self.code}: {message}")

    def __reduce__(self) -> tuple[type[KhoError], tuple[str, str]]:
        return (type(self), (self.code.value, self.message))


class Fault(StrEnum):
    """Why a successor refuses a handover (one per check class of docs/format.md §8)."""

    BAD_RECORD = "bad_record"
    REGION_MISMATCH = "region_mismatch"
    POINTER_OUTSIDE_REGION = "pointer_outside_region"
    POINTER_IN_SCRATCH = "pointer_in_scratch"
    POINTER_MISALIGNED = "pointer_misaligned"
    BAD_ORDER = "bad_order"
    TOO_MANY_ENTRIES = "too_many_entries"
    MISALIGNED_PHYS_START = "misaligned_phys_start"
    MALFORMED_CHUNK = "malformed_chunk"
    FOLIO_OUT_OF_BOUNDS = "folio_out_of_bounds"
    OVERLAP = "overlap"
    CHUNK_LOOP = "chunk_loop"
    BAD_DTB = "bad_dtb"
    MISSING_PROPERTY = "missing_property"
    CRC_MISMATCH = "crc_mismatch"
    SESSION_MISMATCH = "session_mismatch"


class HandoverError(KhoError):
    """The incoming handover is refused as a whole; ``fault`` says why."""

    def __init__(self, fault: Fault | str, message: str) -> None:
        self.fault = Fault(fault)
        super().__init__(Errno.EPROTO, f"handover refused ({self.fault}): {message}")
        self.detail = message

    def __reduce__(self) -> tuple[type[KhoError], tuple[str, str]]:
        return (type(self), (self.fault.value, self.detail))


def ebusy(message: str) -> KhoError:
    return KhoError(Errno.EBUSY, message)


def einval(message: str) -> KhoError:
    return KhoError(Errno.EINVAL, message)


def enoent(message: str) -> KhoError:
    return KhoError(Errno.ENOENT, message)


def eexist(message: str) -> KhoError:
    return KhoError(Errno.EEXIST, message)


def enomem(message: str) -> KhoError:
    return KhoError(Errno.ENOMEM, message)


def eperm(message: str) -> KhoError:
    return KhoError(Errno.EPERM, message)
