"""Write a complete handover into a region, and read one back (docs/format.md §4-§8).

A handover is: one chunk list for every preserved folio (the root list a
kernel would read), one list per session (so ownership survives), the KHO
FDT that points at them, and -- written last, after everything else is
flushed -- the handover record on the region's first page. That record
write is the commit point: a crash before it leaves no handover, a crash
after it leaves a complete one. :class:`CommitStep` names the moments in
between, where the daemon's tests inject crashes.

Reading validates everything before anything is trusted; the first fault
refuses the whole handover with a :class:`HandoverError` naming it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from khod.errors import Fault, HandoverError, KhoError, einval
from khod.kho.chunklist import (
    DeserializedList,
    PointerBounds,
    SerializedList,
    check_metadata_outside,
    deserialize,
    serialize,
)
from khod.kho.dtb import DtbError, from_dtb, to_dtb
from khod.kho.memory import Memory, Pages, ScratchRange
from khod.kho.props import as_string, as_u32, as_u64, string_value, u32, u64
from khod.kho.record import HandoverRecord, RecordState, write_record
from khod.kho.tracker import Tracker
from khod.kho.tree import SESSION_NODE, Node, node_cost
from khod.pages import PAGE_SHIFT, PAGE_SIZE

KHO_COMPATIBLE = "kho-v1"
KHOD_COMPATIBLE = "khod-v2"  # v2: sessions are (uid, name); v1 named nodes by name alone
SESSION_COMPATIBLE = "khod,session-v2"
ROOT_NODES = frozenset({"preserved-memory", "khod"})
ROOT_NAMES = ROOT_NODES | {"compatible"}  # names at the root: not available as session names
SESSION_PROPS = frozenset({"compatible", "owner-uid", "metadata"})  # written by khod
MAX_FDT_BYTES = 64 << 20
# At most what one session node adds besides its subtree: the node and khod's properties.
SESSION_NODE_BYTES = 96
# At most what a KHO FDT holds besides its session nodes: header, memory reservation
# map, root, /preserved-memory, /khod and FDT_END.
FDT_FIXED_BYTES = 512


SessionKey = tuple[int, str]  # (owner uid, name): sessions of different users never meet


def session_node(key: SessionKey) -> str:
    """A session's node name at the FDT root: ``u<uid>,<name>`` (docs/format.md §6.3)."""
    return f"u{key[0]},{key[1]}"


def parse_session_node(node: str) -> SessionKey | None:
    """The session a root node names, or None: what khod writes, and so all a reader accepts."""
    m = SESSION_NODE.fullmatch(node)
    if m is None or int(m.group(1)) >= 1 << 32 or m.group(2) in ROOT_NAMES:
        return None
    return int(m.group(1)), m.group(2)


def session_node_bytes(key: SessionKey) -> int:
    """At most the bytes of a session node with khod's properties and no subtree."""
    return node_cost(session_node(key)) + SESSION_NODE_BYTES


class CommitStep(StrEnum):
    """Moments inside :func:`commit`, reported to its hook (crash points for tests)."""

    SERIALIZE = "serialize"  # nothing written yet
    FDT_WRITTEN = "fdt"  # chunk lists and FDT written, not yet flushed
    FLUSHED = "commit"  # everything flushed, the record not yet written
    COMMITTED = "committed"  # right after the record write


Hook = Callable[[str], None]


def no_hook(point: str) -> None:
    return None


@dataclass
class SessionImage:
    """What one session hands over: its folios and its subtree."""

    name: str
    uid: int
    tracker: Tracker
    subtree: Node = field(default_factory=Node)

    @property
    def node(self) -> str:
        return session_node((self.uid, self.name))


@dataclass
class Committed:
    """A written handover: what it holds and which pages it occupies."""

    record: HandoverRecord
    root: SerializedList
    sessions: dict[str, SerializedList]
    fdt: bytes
    fdt_block: tuple[int, int]  # (pfn, order) of the FDT's pages
    metadata_crc32: int
    folios_by_order: dict[int, int]
    bytes_by_order: dict[int, int]
    tracker: Tracker  # every folio it holds: none of them may be freed while it stands

    @property
    def metadata_pages(self) -> int:
        return len(self.root.pages) + sum(len(s.pages) for s in self.sessions.values())

    @property
    def chunk_pages(self) -> int:
        return self.root.chunks + sum(s.chunks for s in self.sessions.values())

    @property
    def metadata_bytes(self) -> int:
        """Chunk, bitmap and FDT pages, in bytes."""
        return (self.metadata_pages + (1 << self.fdt_block[1])) * PAGE_SIZE

    def free(self, pages: Pages) -> None:
        """Give every metadata and FDT page back (unfreeze)."""
        pages.free_many(self.root.pages)
        for s in self.sessions.values():
            pages.free_many(s.pages)
        pages.free(self.fdt_block[0])


# --------------------------------------------------------------------------- writing


def build_fdt(
    generation: int,
    root_first_chunk: int,
    metadata_crc32: int,
    sessions: list[tuple[SessionImage, int]],
) -> Node:
    """The KHO tree of docs/format.md §6; ``sessions`` pairs each image with its list's first chunk."""
    root = Node(props={"compatible": string_value(KHO_COMPATIBLE)})
    root.children["preserved-memory"] = Node(props={"metadata": u64(root_first_chunk)})
    root.children["khod"] = Node(
        props={
            "compatible": string_value(KHOD_COMPATIBLE),
            "generation": u64(generation),
            "metadata-crc32": u32(metadata_crc32),
        }
    )
    for image, first in sessions:
        if image.name in ROOT_NAMES or parse_session_node(image.node) is None:
            raise einval(f"session name {image.name!r} is reserved or not allowed")
        node = image.subtree.copy()
        clash = SESSION_PROPS & node.props.keys()
        if clash:
            raise einval(f"session {image.name!r} subtree sets reserved properties {clash}")
        node.props.update(
            {
                "compatible": string_value(SESSION_COMPATIBLE),
                "owner-uid": u32(image.uid),
                "metadata": u64(first),
            }
        )
        root.children[image.node] = node
    return root


def commit(
    region: Memory,
    allocator: Pages,
    scratch: ScratchRange,
    generation: int,
    sessions: list[SessionImage],
    *,
    owner_pid: int,
    hook: Hook = no_hook,
) -> Committed:
    """Serialize everything, write the FDT, flush, read it all back, then commit the record.

    Before the record is written the whole validating reader runs over the
    bytes now in the region and must find exactly what was meant to be
    handed over, so nothing a successor would refuse is ever committed. On
    any failure before the commit point every page taken is given back and
    the region's record is untouched.
    """
    sessions = sorted(sessions, key=lambda s: s.node)
    if len({s.node for s in sessions}) != len(sessions):
        raise einval("two sessions share a name and an owner")
    root_tracker = Tracker.union([s.tracker for s in sessions])
    if root_tracker.count() != sum(s.tracker.count() for s in sessions):
        raise einval("sessions' preservation sets are not disjoint")
    written: list[SerializedList] = []
    fdt_pfn: int | None = None
    try:
        hook(CommitStep.SERIALIZE)
        root = serialize(root_tracker, allocator, region)
        written.append(root)
        lists: dict[str, SerializedList] = {}
        crc = root.crc32
        for s in sessions:
            lists[s.node] = serialize(s.tracker, allocator, region, crc_seed=crc)
            written.append(lists[s.node])
            crc = lists[s.node].crc32
        tree = build_fdt(
            generation, root.first_chunk, crc, [(s, lists[s.node].first_chunk) for s in sessions]
        )
        blob = to_dtb(tree)
        if len(blob) > MAX_FDT_BYTES:
            raise einval(f"the KHO FDT would be {len(blob)} bytes (limit {MAX_FDT_BYTES})")
        pages = -(-len(blob) // PAGE_SIZE)
        fdt_order = max(0, (pages - 1).bit_length())
        fdt_pfn = allocator.alloc(fdt_order)
        fdt_phys = fdt_pfn << PAGE_SHIFT
        region.write(fdt_phys, blob + bytes((pages << PAGE_SHIFT) - len(blob)))
        hook(CommitStep.FDT_WRITTEN)
        region.flush()
        record = HandoverRecord(
            state=RecordState.HANDOVER,
            owner_pid=owner_pid,
            region_base=region.base,
            region_size=region.size,
            fdt_phys=fdt_phys,
            fdt_size=len(blob),
            fdt_crc32=zlib.crc32(blob),
            scratch_phys=scratch.phys,
            scratch_size=scratch.size,
            generation=generation,
        )
        _verify(region, record, root_tracker, sessions)
        hook(CommitStep.FLUSHED)
        write_record(region, record)
    except BaseException:
        for w in written:
            allocator.free_many(w.pages)
        if fdt_pfn is not None:
            allocator.free(fdt_pfn)
        raise
    hook(CommitStep.COMMITTED)
    return Committed(
        record=record,
        root=root,
        sessions=lists,
        fdt=blob,
        fdt_block=(fdt_pfn, fdt_order),
        metadata_crc32=crc,
        folios_by_order={o: root_tracker.count(o) for o in root_tracker.orders},
        bytes_by_order={o: root_tracker.count(o) << (o + PAGE_SHIFT) for o in root_tracker.orders},
        tracker=root_tracker,
    )


def _verify(
    region: Memory, record: HandoverRecord, root: Tracker, sessions: list[SessionImage]
) -> None:
    """Read the handover as a successor would; it must be exactly what was written."""
    try:
        got = read_handover(region, record)
    except HandoverError as exc:
        raise HandoverError(
            exc.fault, f"the handover just written does not read back: {exc.detail}"
        ) from None
    if got.root.tracker != root:
        raise HandoverError(Fault.SESSION_MISMATCH, "the root list read back differs")
    if sorted(got.sessions) != sorted((s.uid, s.name) for s in sessions):
        raise HandoverError(Fault.SESSION_MISMATCH, "the session nodes read back differ")
    for s in sessions:
        back = got.sessions[(s.uid, s.name)]
        if back.uid != s.uid or back.memory.tracker != s.tracker or back.subtree != s.subtree:
            raise HandoverError(
                Fault.SESSION_MISMATCH, f"session {s.name!r} reads back differently"
            )


# --------------------------------------------------------------------------- reading


@dataclass
class IncomingSession:
    name: str
    uid: int
    memory: DeserializedList
    subtree: Node  # the session node without khod's own properties


@dataclass
class Incoming:
    """A validated handover, ready to be reserved and restored."""

    record: HandoverRecord
    generation: int
    fdt: bytes
    tree: Node
    root: DeserializedList
    sessions: dict[SessionKey, IncomingSession]
    metadata_crc32: int

    @property
    def scratch(self) -> ScratchRange:
        return ScratchRange(self.record.scratch_phys, self.record.scratch_size)

    def metadata_pfns(self) -> list[int]:
        """Every page the handover's own metadata occupies, ascending: chunk and bitmap
        pages of every list, and the FDT's pages."""
        pages = set(self.root.metadata_pfns)
        for s in self.sessions.values():
            pages.update(s.memory.metadata_pfns)
        first = self.record.fdt_phys >> PAGE_SHIFT
        pages.update(range(first, first + -(-self.record.fdt_size // PAGE_SIZE)))
        return sorted(pages)


def _prop(node: Node, path: str, name: str, size: int | None = None) -> bytes:
    value = node.props.get(name)
    if value is None:
        raise HandoverError(Fault.MISSING_PROPERTY, f"{path} has no {name!r} property")
    if size is not None and len(value) != size:
        raise HandoverError(
            Fault.MISSING_PROPERTY,
            f"{path} property {name!r} is {len(value)} bytes, expected {size}",
        )
    return value


def _compatible(node: Node, path: str, want: str) -> None:
    value = _prop(node, path, "compatible")
    try:
        got = as_string(value)
    except KhoError:
        got = repr(value)
    if got != want:
        raise HandoverError(
            Fault.MISSING_PROPERTY, f"{path} is compatible {got!r}, expected {want!r}"
        )


def _check_record(region: Memory, record: HandoverRecord) -> ScratchRange:
    if record.region_base != region.base or record.region_size != region.size:
        raise HandoverError(
            Fault.REGION_MISMATCH,
            f"the record describes region {record.region_base:#x}+{record.region_size:#x}, "
            f"this daemon maps {region.base:#x}+{region.size:#x}",
        )
    sp, ss = record.scratch_phys, record.scratch_size
    if ss and (
        sp % PAGE_SIZE or ss % PAGE_SIZE or sp < region.base + PAGE_SIZE or sp + ss > region.end
    ):
        raise HandoverError(
            Fault.BAD_RECORD, f"scratch {sp:#x}+{ss:#x} is not page-aligned inside the region"
        )
    return ScratchRange(sp, ss)


def read_handover(region: Memory, record: HandoverRecord) -> Incoming:
    """Validate and decode a committed handover; nothing is reserved here."""
    if record.state is not RecordState.HANDOVER:
        raise HandoverError(Fault.BAD_RECORD, f"the record says {record.state.name}, not HANDOVER")
    scratch = _check_record(region, record)
    bounds = PointerBounds(region, scratch)
    if not 0 < record.fdt_size <= MAX_FDT_BYTES:
        raise HandoverError(Fault.BAD_RECORD, f"FDT size {record.fdt_size} is out of range")
    bounds.check(record.fdt_phys, record.fdt_size, PAGE_SIZE, "FDT")
    blob = region.read(record.fdt_phys, record.fdt_size)
    crc = zlib.crc32(blob)
    if crc != record.fdt_crc32:
        raise HandoverError(
            Fault.CRC_MISMATCH,
            f"FDT CRC32 is {crc:#010x}, the record says {record.fdt_crc32:#010x}",
        )
    try:
        tree = from_dtb(blob)
    except DtbError as exc:
        raise HandoverError(Fault.BAD_DTB, exc.detail) from None

    _compatible(tree, "/", KHO_COMPATIBLE)
    pm = tree.children.get("preserved-memory")
    if pm is None:
        raise HandoverError(Fault.MISSING_PROPERTY, "no /preserved-memory node")
    root_first = as_u64(_prop(pm, "/preserved-memory", "metadata", 8))
    khod = tree.children.get("khod")
    if khod is None:
        raise HandoverError(Fault.MISSING_PROPERTY, "no /khod node")
    if khod.props.get("compatible") == string_value("khod-v1"):
        raise HandoverError(
            Fault.MISSING_PROPERTY,
            "/khod is compatible 'khod-v1': written by an older khod, whose sessions were named "
            "without their uid and whose clients' memory lay in the region file itself; this "
            "khod (khod-v2) cannot take it in",
        )
    _compatible(khod, "/khod", KHOD_COMPATIBLE)
    generation = as_u64(_prop(khod, "/khod", "generation", 8))
    want_crc = as_u32(_prop(khod, "/khod", "metadata-crc32", 4))
    if generation != record.generation:
        raise HandoverError(
            Fault.BAD_RECORD,
            f"record generation {record.generation} differs from the FDT's {generation}",
        )

    root = deserialize(region, root_first, scratch)
    crc = root.crc32
    sessions: dict[SessionKey, IncomingSession] = {}
    for node_name in sorted(tree.children):
        if node_name in ROOT_NODES:
            continue
        node = tree.children[node_name]
        path = f"/{node_name}"
        _compatible(node, path, SESSION_COMPATIBLE)
        key = parse_session_node(node_name)
        uid = as_u32(_prop(node, path, "owner-uid", 4))
        if key is None or key[0] != uid:
            raise HandoverError(
                Fault.MISSING_PROPERTY,
                f"{path} is not named u<owner-uid>,<session> for its owner-uid {uid}",
            )
        name = key[1]
        first = as_u64(_prop(node, path, "metadata", 8))
        memory = deserialize(region, first, scratch, crc_seed=crc)
        crc = memory.crc32
        subtree = node.copy()
        for p in SESSION_PROPS:
            subtree.props.pop(p, None)
        sessions[key] = IncomingSession(name, uid, memory, subtree)
    if crc != want_crc:
        raise HandoverError(
            Fault.CRC_MISMATCH,
            f"metadata CRC32 is {crc:#010x}, /khod says {want_crc:#010x}",
        )
    _check_sessions(root, sessions)
    got = Incoming(record, generation, blob, tree, root, sessions, crc)
    meta = got.metadata_pfns()
    check_metadata_outside(root.tracker, np.fromiter(meta, dtype=np.int64, count=len(meta)))
    return got


def _check_sessions(root: DeserializedList, sessions: dict[SessionKey, IncomingSession]) -> None:
    """Session lists must be disjoint and add up to the root list."""
    acc = Tracker()
    for key, s in sessions.items():
        merged = Tracker.union([acc, s.memory.tracker])
        if merged.count() != acc.count() + s.memory.tracker.count():
            raise HandoverError(
                Fault.SESSION_MISMATCH,
                f"session {session_node(key)} lists folios that another session lists too",
            )
        acc = merged
    if acc != root.tracker:
        raise HandoverError(
            Fault.SESSION_MISMATCH,
            f"session lists hold {acc.count()} folios in all, the root list "
            f"{root.tracker.count()}; they must be the same set",
        )
