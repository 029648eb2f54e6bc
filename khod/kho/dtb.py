"""Tree <-> flattened devicetree blob, through the ``fdt`` package.

This is the only module that imports ``fdt`` -- in the functions that need it,
so a daemon that parses or writes no DTB never loads it; it wraps the
package's known problems (fdt 0.3.x):

* ``FDT(entries=[])`` is a shared mutable default that ``parse_dtb`` appends
  to -- every FDT here gets a fresh list and the shared one is emptied;
* ``FDT_NOP`` tags are unknown to it -- blobs are pre-walked and NOPs dropped;
* it accepts only ``bytes`` and breaks on ``offset`` -- we slice and copy;
* it guesses property types on read -- :func:`_raw` turns every class back
  into the exact bytes;
* it validates with ``assert`` (gone under ``python -O``) and raises bare
  ``Exception`` -- untrusted blobs are fully checked by :func:`_clean`
  before it sees them, and anything it still raises becomes :class:`DtbError`;
* ``Node.append`` is linear per call -- fan-out is bounded on read and the
  writer fills node lists directly.

Output is deterministic: properties and children are emitted in name order.
"""

from __future__ import annotations

import struct
from typing import Any

from khod.errors import Errno, KhoError
from khod.kho.tree import (
    FDT_MAX_DEPTH,
    FDT_MAX_FANOUT,
    FDT_MAX_NODES,
    Node,
    check_tree,
)

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
_HEADER = struct.Struct(">10I")
_BEGIN_NODE, _END_NODE, _PROP, _NOP, _END = 1, 2, 3, 4, 9


class DtbError(KhoError):
    """A blob that is not a well-formed DTB (or breaks khod's limits)."""

    def __init__(self, message: str) -> None:
        super().__init__(Errno.EINVAL, f"bad DTB: {message}")
        self.detail = message


# --------------------------------------------------------------------------- writing


def _fdt_node(name: str, node: Node) -> Any:
    import fdt

    out = fdt.Node(name)
    props = []
    for pname in sorted(node.props):
        value = node.props[pname]
        prop = fdt.PropBytes(pname, data=value) if value else fdt.Property(pname)
        prop.set_parent(out)
        props.append(prop)
    children = []
    for cname in sorted(node.children):
        child = _fdt_node(cname, node.children[cname])
        child.set_parent(out)
        children.append(child)
    # Names are unique by construction (dict keys): skip append's O(n) duplicate scan.
    out.props.extend(props)
    out.nodes.extend(children)
    return out


def to_dtb(root: Node) -> bytes:
    """A version-17 DTB of the tree; the same tree always gives the same bytes."""
    import fdt

    tree = fdt.FDT(entries=[])
    tree.entries = []
    tree.header.version = FDT_VERSION
    tree.header.boot_cpuid_phys = 0
    tree.root = _fdt_node("/", root)
    blob: bytes = tree.to_dtb()
    return blob


# --------------------------------------------------------------------------- reading


def _cstring(buf: bytes, start: int, stop: int, what: str) -> str:
    end = buf.find(b"\0", start, stop)
    if end < 0:
        raise DtbError(f"{what} at offset {start} is not NUL-terminated inside its block")
    raw = buf[start:end]
    if not all(0x20 < c < 0x7F for c in raw):
        raise DtbError(f"{what} at offset {start} has non-printable characters")
    return raw.decode("ascii")


def _clean(blob: bytes) -> bytes:
    """Check every header field and token; return an equivalent blob without NOPs."""
    if len(blob) < _HEADER.size:
        raise DtbError(f"{len(blob)} bytes is shorter than a DTB header")
    (magic, total, off_struct, off_strings, off_rsv, version, last_comp, boot, size_strings,
     size_struct) = _HEADER.unpack_from(blob, 0)  # fmt: skip
    if magic != FDT_MAGIC:
        raise DtbError(f"magic {magic:#x} is not {FDT_MAGIC:#x}")
    if version < FDT_VERSION or last_comp > FDT_LAST_COMP_VERSION:
        raise DtbError(f"version {version} (last compatible {last_comp}) is not readable as 17")
    if not _HEADER.size <= total <= len(blob):
        raise DtbError(f"totalsize {total} does not fit the {len(blob)} bytes given")
    blocks = (("struct", off_struct, size_struct), ("strings", off_strings, size_strings))
    for block, off, size in blocks:
        if off < _HEADER.size or off + size > total:
            raise DtbError(f"{block} block {off}+{size} lies outside the blob")
    if off_struct % 4 or size_struct % 4:
        raise DtbError("structure block is not 4-byte aligned")
    if off_rsv % 8 or off_rsv < _HEADER.size:
        raise DtbError(f"memory reservation map offset {off_rsv} is misaligned")
    rsv = []
    pos = off_rsv
    while True:
        if pos + 16 > total:
            raise DtbError("memory reservation map runs off the blob")
        addr, size = struct.unpack_from(">QQ", blob, pos)
        pos += 16
        if addr == 0 and size == 0:
            break
        rsv.append(struct.pack(">QQ", addr, size))

    tokens = bytearray()
    pos, stop = off_struct, off_struct + size_struct
    depth = roots = 0
    fanout: list[list[int]] = []  # [children, props] per open node
    nodes = 0
    while True:
        if pos + 4 > stop:
            raise DtbError("structure block ends without FDT_END")
        (tag,) = struct.unpack_from(">I", blob, pos)
        if tag == _NOP:
            pos += 4
            continue
        start = pos
        pos += 4
        if tag == _BEGIN_NODE:
            end = blob.find(b"\0", pos, stop)
            if end < 0:
                raise DtbError(f"node name at offset {pos} is not NUL-terminated")
            name = blob[pos:end]
            if depth == 0:
                if roots or name:
                    raise DtbError("the tree must have exactly one root node, named ''")
                roots += 1
            else:
                if not name or b"/" in name or not all(0x20 < c < 0x7F for c in name):
                    raise DtbError(f"bad node name {name!r} at offset {pos}")
                fanout[-1][0] += 1
                if fanout[-1][0] > FDT_MAX_FANOUT:
                    raise DtbError(f"a node has more than {FDT_MAX_FANOUT} children")
            depth += 1
            nodes += 1
            if depth > FDT_MAX_DEPTH + 1:
                raise DtbError(f"nodes nest deeper than {FDT_MAX_DEPTH} levels")
            if nodes > FDT_MAX_NODES:
                raise DtbError(f"more than {FDT_MAX_NODES} nodes")
            fanout.append([0, 0])
            pos = (end + 1 + 3) & ~3
        elif tag == _END_NODE:
            if depth == 0:
                raise DtbError(f"FDT_END_NODE at offset {start} without an open node")
            depth -= 1
            fanout.pop()
        elif tag == _PROP:
            if depth == 0:
                raise DtbError(f"property at offset {start} outside any node")
            if pos + 8 > stop:
                raise DtbError("property header runs off the structure block")
            plen, nameoff = struct.unpack_from(">II", blob, pos)
            if pos + 8 + plen > stop:
                raise DtbError(f"property value at offset {pos + 8} runs off the structure block")
            if nameoff >= size_strings:
                raise DtbError(f"property name offset {nameoff} is outside the strings block")
            _cstring(blob, off_strings + nameoff, off_strings + size_strings, "property name")
            fanout[-1][1] += 1
            if fanout[-1][1] > FDT_MAX_FANOUT:
                raise DtbError(f"a node has more than {FDT_MAX_FANOUT} properties")
            pos = (pos + 8 + plen + 3) & ~3
        elif tag == _END:
            if depth != 0 or roots != 1:
                raise DtbError("FDT_END before every node was closed")
            tokens += blob[start:pos]
            break
        else:
            raise DtbError(f"unknown token {tag:#x} at offset {start}")
        if pos > stop:
            raise DtbError("a token runs off the structure block")
        tokens += blob[start:pos]

    rsv_block = b"".join(rsv) + bytes(16)
    strings = blob[off_strings : off_strings + size_strings]
    o_rsv = _HEADER.size
    o_struct = o_rsv + len(rsv_block)
    o_strings = o_struct + len(tokens)
    total = o_strings + len(strings)
    header = _HEADER.pack(FDT_MAGIC, total, o_struct, o_strings, o_rsv, FDT_VERSION,
                          FDT_LAST_COMP_VERSION, boot, len(strings), len(tokens))  # fmt: skip
    return header + rsv_block + bytes(tokens) + strings


def _raw(prop: Any) -> bytes:
    """Undo ``fdt``'s type guessing: the exact bytes of any property class."""
    import fdt

    if isinstance(prop, fdt.PropStrings):
        return b"".join(s.encode("ascii") + b"\0" for s in prop.data)
    if isinstance(prop, fdt.PropWords):
        return struct.pack(f">{len(prop.data)}I", *prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def _from_fdt(fnode: Any) -> Node:
    node = Node()
    for prop in fnode.props:
        node.props[prop.name] = _raw(prop)
    for child in fnode.nodes:
        node.children[child.name] = _from_fdt(child)
    return node


def from_dtb(blob: bytes | bytearray | memoryview) -> Node:
    """Parse an untrusted DTB into a tree; any defect, or any excess over the format's
    limits (docs/format.md §8), raises :class:`DtbError`."""
    import fdt

    data = _clean(bytes(blob))
    shared = fdt.FDT().entries  # the package's shared default list
    try:
        parsed = fdt.parse_dtb(data)
    except Exception as exc:  # the package raises bare Exception, AssertionError, ...
        raise DtbError(f"{type(exc).__name__}: {exc}") from None
    finally:
        shared.clear()
    root = _from_fdt(parsed.root)
    try:
        check_tree(root)
    except KhoError as exc:
        raise DtbError(exc.message) from None
    return root


def _dts_value(v: bytes) -> str:
    parts = v[:-1].split(b"\0") if v.endswith(b"\0") else []
    if parts and all(parts) and all(0x20 <= c < 0x7F and c not in b'"\\' for p in parts for c in p):
        return ", ".join(f'"{p.decode()}"' for p in parts)
    raw = "[" + " ".join(f"{c:02x}" for c in v) + "]"
    if len(v) in (4, 8):
        kind = "u32" if len(v) == 4 else "u64"
        return f"{raw} /* {kind} LE = {int.from_bytes(v, 'little'):#x} */"
    return raw


def to_dts(root: Node) -> str:
    """dts-like text for people: printable strings as such, other values as bytes."""
    lines = ["/dts-v1/;", ""]

    def emit(name: str, node: Node, depth: int) -> None:
        pad = "\t" * depth
        lines.append(f"{pad}{name} {{")
        for pname in sorted(node.props):
            v = node.props[pname]
            lines.append(f"{pad}\t{pname};" if not v else f"{pad}\t{pname} = {_dts_value(v)};")
        for cname in sorted(node.children):
            lines.append("")
            emit(cname, node.children[cname], depth + 1)
        lines.append(f"{pad}}};")

    emit("/", root, 0)
    return "\n".join(lines) + "\n"
