"""Property value codecs of the KHO tree (docs/format.md §6).

KHO property values are little-endian integers or NUL-terminated strings;
the DTB container around them is big-endian, the values inside are not.
Decoders refuse values of the wrong size or shape with ``EINVAL``.
"""

from __future__ import annotations

import struct

from khod.errors import einval


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def as_u32(value: bytes) -> int:
    if len(value) != 4:
        raise einval(f"expected a 4-byte u32 property, got {len(value)} bytes")
    return int(struct.unpack("<I", value)[0])


def as_u64(value: bytes) -> int:
    if len(value) != 8:
        raise einval(f"expected an 8-byte u64 property, got {len(value)} bytes")
    return int(struct.unpack("<Q", value)[0])


def string_value(text: str) -> bytes:
    """A NUL-terminated string property value (``kho_add_string_prop``)."""
    data = text.encode()
    if b"\0" in data:
        raise einval("a string property cannot contain NUL")
    return data + b"\0"


def as_string(value: bytes) -> str:
    if not value.endswith(b"\0") or b"\0" in value[:-1]:
        raise einval("property is not a single NUL-terminated string")
    return value[:-1].decode(errors="replace")
