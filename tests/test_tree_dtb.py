"""The KHO tree's v5 semantics, and DTBs checked by the reference tools."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import fdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from khod.errors import Errno, KhoError
from khod.kho.dtb import DtbError, from_dtb, to_dtb, to_dts
from khod.kho.props import as_u32, as_u64, u32, u64
from khod.kho.tree import FDT_MAX_DEPTH, FDT_MAX_FANOUT, Node, Tree, TreeLimits

DTC = shutil.which("dtc")
FDTDUMP = shutil.which("fdtdump")
needs_dtc = pytest.mark.skipif(
    DTC is None or FDTDUMP is None,
    reason="device-tree-compiler is not installed (.ci/run installs it)",
)


def dtc_check(blob: bytes, tmp: Path) -> str:
    """Decompile with dtc and dump with fdtdump; fail on any error. Returns the dts."""
    path = tmp / "t.dtb"
    path.write_bytes(blob)
    dtc = subprocess.run(
        [DTC or "dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True, text=True
    )
    assert dtc.returncode == 0, dtc.stderr
    assert "ERROR" not in dtc.stderr and "Warning" not in dtc.stderr, dtc.stderr
    dump = subprocess.run([FDTDUMP or "fdtdump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    for bad in ("ERROR", "Unknown tag", "Bad", "FATAL"):
        assert bad not in dump.stdout + dump.stderr
    assert "// version:\t\t17" in dump.stdout
    return dtc.stdout


def kho_like_tree() -> Tree:
    t = Tree()
    t.add_string_prop("/", "compatible", "kho-v1")
    t.add_node("/preserved-memory")
    t.add_prop("/preserved-memory", "metadata", u64(0x1_0000_1000))
    t.add_node("/vmm")
    t.add_prop("/vmm", "owner-uid", u32(1000))
    t.add_node("/vmm/machine")
    t.add_prop("/vmm/machine", "vcpus", u32(4))
    t.add_prop("/vmm/machine", "flag", b"")
    t.add_string_prop("/vmm/machine", "model", "toy-vmm")
    return t


# --------------------------------------------------------------------------- tree semantics


def test_v5_prop_semantics() -> None:
    t = Tree()
    assert t.add_prop("/", "x", b"\x01") is True
    assert t.add_prop("/", "x", b"\x01") is False  # identical again: a no-op success
    with pytest.raises(KhoError, match="different value") as e:
        t.add_prop("/", "x", b"\x02")
    assert e.value.code is Errno.EEXIST
    assert t.add_node("/a") is True
    assert t.add_node("/a") is False
    with pytest.raises(KhoError, match="property named") as e:
        t.add_node("/x")  # a node may not share a name with a sibling property
    assert e.value.code is Errno.EEXIST
    with pytest.raises(KhoError, match="child node named"):
        t.add_prop("/", "a", b"")
    with pytest.raises(KhoError, match="no node /b") as e:
        t.add_node("/b/c")
    assert e.value.code is Errno.ENOENT
    assert t.remove_prop("/", "x") == b"\x01"
    with pytest.raises(KhoError) as e:
        t.remove_prop("/", "x")
    assert e.value.code is Errno.ENOENT
    t.remove_node("/a")
    with pytest.raises(KhoError) as e:
        t.get_node("/a")
    assert e.value.code is Errno.ENOENT
    assert t.nodes == 1 and t.size == 0


@pytest.mark.parametrize(
    ("path", "name"),
    [("a", "x"), ("/a//b", "x"), ("/a b", "x"), ("/", "bad name"), ("/", ""), ("/", "name"),
     ("/", "p" * 32), ("/" + "n" * 32, "x"), ("/x/", "y")],
)  # fmt: skip
def test_names_follow_the_devicetree_spec(path: str, name: str) -> None:
    t = Tree()
    t.add_node("/x")
    with pytest.raises(KhoError) as e:
        t.add_prop(path, name, b"")
    assert e.value.code in (Errno.EINVAL, Errno.ENOENT)


def test_limits_and_reserved_props() -> None:
    t = Tree(
        limits=TreeLimits(max_nodes=3, max_bytes=150, max_depth=3, max_prop_bytes=64),
        reserved_props=frozenset({"metadata"}),
    )
    with pytest.raises(KhoError, match="written by khod") as e:
        t.add_prop("/", "metadata", u64(0))
    assert e.value.code is Errno.EPERM
    t.add_prop("/", "ok", b"x" * 64)
    with pytest.raises(KhoError, match="65 bytes") as e:
        t.add_prop("/", "big", b"x" * 65)
    assert e.value.code is Errno.ENOMEM
    t.add_node("/a")
    t.add_node("/a/b")
    with pytest.raises(KhoError, match="3 nodes"):
        t.add_node("/c")
    with pytest.raises(KhoError, match="150 bytes"):
        t.add_prop("/a", "more", b"y" * 64)
    assert t.get_node("/a/b") == Node()


def test_u32_u64_helpers_are_little_endian() -> None:
    assert u32(1) == b"\x01\x00\x00\x00"
    assert u64(0x1_0000_1000) == bytes.fromhex("0010000001000000")
    assert as_u64(u64(7)) == 7 and as_u32(u32(9)) == 9
    with pytest.raises(KhoError):
        as_u64(b"123")


# --------------------------------------------------------------------------- DTB


@needs_dtc
def test_kho_tree_passes_dtc_and_fdtdump(tmp_path: Path) -> None:
    blob = to_dtb(kho_like_tree().root)
    dts = dtc_check(blob, tmp_path)
    assert 'compatible = "kho-v1";' in dts
    assert 'model = "toy-vmm";' in dts
    assert "flag;" in dts
    # u64 LE 0x1_0000_1000 seen by dtc as two big-endian cells
    assert "metadata = <0x100000 0x1000000>;" in dts


def test_output_is_deterministic() -> None:
    a = kho_like_tree()
    b = Tree()
    b.add_node("/vmm")
    b.add_node("/vmm/machine")
    b.add_string_prop("/vmm/machine", "model", "toy-vmm")
    b.add_prop("/vmm/machine", "flag", b"")
    b.add_prop("/vmm/machine", "vcpus", u32(4))
    b.add_prop("/vmm", "owner-uid", u32(1000))
    b.add_node("/preserved-memory")
    b.add_prop("/preserved-memory", "metadata", u64(0x1_0000_1000))
    b.add_string_prop("/", "compatible", "kho-v1")
    assert to_dtb(a.root) == to_dtb(b.root)
    assert from_dtb(to_dtb(a.root)) == a.root


names = st.from_regex(r"[a-z][a-z0-9,._+-]{0,11}", fullmatch=True).filter(lambda s: s != "name")
values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"A\0", b"A\0B\0", b"\0", b"\0\0", b"1234", b"abcdefgh", b"x\0y"]),
)


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> Node:
    node = Node()
    for name in draw(st.lists(names, max_size=4, unique=True)):
        node.props[name] = draw(values)
    if depth < 3:
        for name in draw(st.lists(names, max_size=3, unique=True)):
            if name not in node.props:  # Tree refuses a node named like a sibling property
                node.children[name] = draw(trees(depth + 1))
    return node


@given(trees())
def test_round_trip_exact_bytes(root: Node) -> None:
    # fdt guesses types on read (strings, u32 words); the wrapper restores exact bytes
    assert from_dtb(to_dtb(root)) == root


@needs_dtc
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees())
def test_every_written_dtb_passes_dtc(tmp_path: Path, root: Node) -> None:
    dtc_check(to_dtb(root), tmp_path)


HAND_WRITTEN_DTS = """/dts-v1/;
/memreserve/ 0x10000000 0x4000;
/memreserve/ 0x20000000 0x100000;
/ {
    compatible = "kho-v1";
    model = "board", "rev2";
    blob = [de ad be ef 01];
    empty;
    preserved-memory {
        metadata = /bits/ 64 <0x100001000>;
    };
    label: thing {
        cells = <1 2 3>;
        ref = <&label>;
    };
};
"""


@needs_dtc
def test_parses_what_dtc_compiled(tmp_path: Path) -> None:
    src = tmp_path / "in.dts"
    src.write_text(HAND_WRITTEN_DTS)
    out = tmp_path / "in.dtb"
    subprocess.run([DTC or "dtc", "-I", "dts", "-O", "dtb", "-b", "3", "-o", str(out), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    blob = out.read_bytes()
    root = from_dtb(blob)
    assert root.props["compatible"] == b"kho-v1\0"
    assert root.props["model"] == b"board\0rev2\0"
    assert root.props["blob"] == bytes.fromhex("deadbeef01")
    assert root.props["empty"] == b""
    # dtc stores /bits/ 64 big-endian, as DT cells: the raw bytes are exact
    assert root.children["preserved-memory"].props["metadata"] == struct.pack(">Q", 0x100001000)
    assert root.children["thing"].props["cells"] == struct.pack(">3I", 1, 2, 3)
    assert "phandle" in root.children["thing"].props
    assert reservations(blob) == [(0x10000000, 0x4000), (0x20000000, 0x100000)]
    # the package's shared default list must not leak those reservations
    assert fdt.FDT().entries == []
    again = to_dtb(root)
    assert reservations(again) == []
    assert from_dtb(again) == root


def reservations(blob: bytes) -> list[tuple[int, int]]:
    """The memory reservation map of a DTB, read straight from its header."""
    off = struct.unpack_from(">I", blob, 16)[0]  # off_mem_rsvmap
    out = []
    while True:
        addr, size = struct.unpack_from(">QQ", blob, off)
        off += 16
        if (addr, size) == (0, 0):
            return out
        out.append((addr, size))


def with_nops(blob: bytes) -> bytes:
    """Insert FDT_NOP tokens after the root node's name (as libfdt's in-place edits leave)."""
    (magic, total, off_struct, off_strings, off_rsv, ver, last, boot, size_strings, size_struct) = (
        struct.unpack_from(">10I", blob)
    )
    insert_at = off_struct + 8  # after FDT_BEGIN_NODE and the empty root name
    nops = struct.pack(">I", 4) * 3
    body = blob[:insert_at] + nops + blob[insert_at:]
    header = struct.pack(">10I", magic, total + 12, off_struct, off_strings + 12, off_rsv, ver,
                         last, boot, size_strings, size_struct + 12)  # fmt: skip
    return header + body[40:]


def test_nop_tokens_are_skipped() -> None:
    root = kho_like_tree().root
    blob = with_nops(to_dtb(root))
    with pytest.raises(Exception, match="Unknown Tag: 4"):
        fdt.parse_dtb(blob)  # the package's own bug (molejar/pyFDT#19)...
    assert from_dtb(blob) == root  # ...which the wrapper works around


def test_to_dts_is_readable() -> None:
    text = to_dts(kho_like_tree().root)
    assert 'compatible = "kho-v1";' in text
    assert "metadata = [00 10 00 00 01 00 00 00] /* u64 LE = 0x100001000 */;" in text
    assert "vcpus = [04 00 00 00] /* u32 LE = 0x4 */;" in text


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:30],
        lambda b: b"\x00" + b[1:],
        lambda b: b[:4] + struct.pack(">I", 1 << 30) + b[8:],  # totalsize past the end
        lambda b: b[:20] + struct.pack(">I", 15) + b[24:],  # version 15
        lambda b: b[:8] + struct.pack(">I", 1 << 20) + b[12:],  # struct offset outside
        lambda b: b[: len(b) - 200],  # truncated
    ],
)
def test_broken_blobs_are_refused(mutate: object) -> None:
    blob = to_dtb(kho_like_tree().root)
    with pytest.raises(DtbError) as e:
        from_dtb(mutate(blob))  # type: ignore[operator]
    assert e.value.code is Errno.EINVAL


@given(st.data())
def test_no_mutation_escapes_as_anything_but_dtb_error(data: st.DataObject) -> None:
    blob = bytearray(to_dtb(kho_like_tree().root))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DtbError):
        from_dtb(bytes(blob))


def test_limits_on_read_are_the_formats() -> None:
    deep = Node()
    n = deep
    for i in range(FDT_MAX_DEPTH):
        n.children[f"n{i}"] = Node()
        n = n.children[f"n{i}"]
    from_dtb(to_dtb(deep))  # 16 levels below the root: readable
    n.children["one-more"] = Node()
    with pytest.raises(DtbError, match="deeper"):
        from_dtb(to_dtb(deep))
    wide = Node(children={f"c{i}": Node() for i in range(FDT_MAX_FANOUT + 1)})
    with pytest.raises(DtbError, match=f"more than {FDT_MAX_FANOUT} children"):
        from_dtb(to_dtb(wide))
    many = Node(props={f"p{i}": b"" for i in range(FDT_MAX_FANOUT + 1)})
    with pytest.raises(DtbError, match=f"more than {FDT_MAX_FANOUT} properties"):
        from_dtb(to_dtb(many))
