"""The KHO state tree: nodes with byte-valued properties (docs/format.md §6, v5 semantics).

Each session owns one :class:`Tree` whose root becomes the session's node
in the FDT. Edits follow KHO v5: adding a property that is already there
with the same bytes is a successful no-op, with different bytes ``EEXIST``;
adding an existing node is a no-op. Property values are raw bytes (their
codecs are in :mod:`khod.kho.props`). Whether edits are allowed at all
(the freeze) is the engine's call, not the tree's.

Names are checked against the devicetree spec so that every tree can be
written as a DTB that dtc accepts, and sizes are bounded so that one
session cannot grow the handover without limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from khod.errors import eexist, einval, enoent, enomem, eperm
from khod.kho.props import string_value

NODE_NAME = re.compile(r"[A-Za-z0-9,._+-]{1,31}(@[A-Za-z0-9,._+-]{1,31})?")
# khod's session nodes at the root: ``u<owner uid>,<session name>`` (docs/format.md §6.3),
# longer than a devicetree node name may be, as dtc and libfdt allow.
SESSION_NODE = re.compile(r"u(0|[1-9][0-9]{0,9}),([A-Za-z0-9,._+-]{1,31})")
PROP_NAME = re.compile(r"[A-Za-z0-9,._+?#-]{1,31}")


def check_node_name(name: str) -> None:
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise einval(
            f"node name {name!r} is not a devicetree node name "
            "(1-31 of A-Z a-z 0-9 , . _ + -, optional @unit)"
        )


def check_prop_name(name: str) -> None:
    if not isinstance(name, str) or not PROP_NAME.fullmatch(name):
        raise einval(
            f"property name {name!r} is not a devicetree property name "
            "(1-31 of A-Z a-z 0-9 , . _ + ? # -)"
        )
    if name == "name":
        # dtc rejects a "name" property that differs from the node name (name_properties).
        raise einval("property name 'name' is reserved by the devicetree format")


def split_path(path: str) -> list[str]:
    """``/`` -> [], ``/a/b`` -> ['a', 'b'], each name checked."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise einval(f"path {path!r} must be absolute (start with '/')")
    if path == "/":
        return []
    parts = path[1:].split("/")
    for p in parts:
        check_node_name(p)
    return parts


def descend(root: Node, parts: list[str], where: str = "") -> Node:
    """The node at ``parts`` below ``root``; ENOENT names the first missing one."""
    node = root
    walked = ""
    for p in parts:
        walked += "/" + p
        nxt = node.children.get(p)
        if nxt is None:
            raise enoent(f"no node {walked}{where}")
        node = nxt
    return node


@dataclass
class Node:
    """One node: properties in name order on output, children likewise."""

    props: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, Node] = field(default_factory=dict)

    def copy(self) -> Node:
        return Node(dict(self.props), {k: v.copy() for k, v in self.children.items()})

    def walk(self, path: str = "/") -> Iterator[tuple[str, Node]]:
        yield path, self
        for name in sorted(self.children):
            sub = f"{path.rstrip('/')}/{name}"
            yield from self.children[name].walk(sub)

    def count_nodes(self) -> int:
        return 1 + sum(c.count_nodes() for c in self.children.values())

    def nbytes(self) -> int:
        """At most the bytes this node's properties and subtree add to a DTB.

        The node's own name is its parent's to count (:func:`node_cost`).
        """
        own = sum(prop_cost(k, v) for k, v in self.props.items())
        return own + sum(node_cost(k) + c.nbytes() for k, c in self.children.items())

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children.values()), default=0)


# What any reader accepts in a KHO FDT, whatever the writer's configuration
# (docs/format.md §8). A writer's limits are checked against these when its
# configuration is loaded, so whatever one khod writes, every khod reads.
FDT_MAX_NODES = 1 << 16  # nodes in the whole FDT, the root included
FDT_MAX_DEPTH = 16  # levels below the root
FDT_MAX_FANOUT = 1024  # child nodes, or properties, of one node
FDT_MAX_PROP_BYTES = 256 << 10


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def node_cost(name: str) -> int:
    """Most bytes a node's begin and end tokens and its name take in a DTB."""
    return 8 + _pad4(len(name) + 1)


def prop_cost(name: str, value: bytes) -> int:
    """Most bytes a property takes: token, length, name offset, padded value, its name string."""
    return 12 + _pad4(len(value)) + len(name) + 1


@dataclass(frozen=True)
class TreeLimits:
    """Bounds on one session's subtree; depth, fan-out and value size are the format's."""

    max_nodes: int = 4096
    max_bytes: int = 1 << 20
    max_depth: int = FDT_MAX_DEPTH
    max_prop_bytes: int = FDT_MAX_PROP_BYTES
    max_fanout: int = FDT_MAX_FANOUT


class TreeBudget:
    """What the trees of all sessions may hold together: one handover's FDT.

    Every tree that goes into the next handover charges its nodes and bytes
    here, so a request that would make the FDT exceed what a reader accepts
    is refused when it is made, not at finalize.
    """

    def __init__(
        self,
        max_nodes: int,
        max_bytes: int,
        *,
        parent: TreeBudget | None = None,
        whose: str = "all sessions",
        keys: tuple[str, str] = ("limits.tree_total_nodes", "limits.tree_total_bytes"),
    ) -> None:
        self.max_nodes = max_nodes
        self.max_bytes = max_bytes
        self.parent = parent  # a share of a larger budget (one user's, of the handover's)
        self.whose = whose
        self.keys = keys
        self.nodes = 0
        self.bytes = 0

    def charge(self, nodes: int, nbytes: int, *, force: bool = False) -> None:
        """Take ``nodes`` and ``nbytes`` here and in every parent, or refuse ``ENOMEM``;
        ``force`` takes them anyway (what a predecessor handed over must be carried,
        whatever this config says)."""
        if not force:
            self._check(nodes, nbytes)
        self.nodes += nodes
        self.bytes += nbytes
        if self.parent is not None:
            self.parent.charge(nodes, nbytes, force=True)  # checked below, before any change

    def _check(self, nodes: int, nbytes: int) -> None:
        if self.nodes + nodes > self.max_nodes:
            raise enomem(
                f"the KHO trees of {self.whose} would hold {self.nodes + nodes} nodes; "
                f"one handover carries at most {self.max_nodes} ({self.keys[0]})"
            )
        if self.bytes + nbytes > self.max_bytes:
            raise enomem(
                f"the KHO trees of {self.whose} would take {self.bytes + nbytes} bytes; "
                f"one handover carries at most {self.max_bytes} ({self.keys[1]})"
            )
        if self.parent is not None:
            self.parent._check(nodes, nbytes)

    def release(self, nodes: int, nbytes: int) -> None:
        self.nodes -= nodes
        self.bytes -= nbytes
        if self.parent is not None:
            self.parent.release(nodes, nbytes)


class Tree:
    """A mutable KHO subtree with the v5 edit rules and size limits."""

    def __init__(
        self,
        root: Node | None = None,
        *,
        limits: TreeLimits | None = None,
        reserved_props: frozenset[str] = frozenset(),
        budget: TreeBudget | None = None,
    ) -> None:
        self.root = root if root is not None else Node()
        self.limits = limits or TreeLimits()
        self.reserved_props = reserved_props  # the writer adds these to the root node
        self.budget = budget or TreeBudget(1 << 62, 1 << 62)
        self._nodes = self.root.count_nodes()
        self._bytes = self.root.nbytes()

    def _charge(self, nodes: int, nbytes: int) -> None:
        lim = self.limits
        if self._nodes + nodes > lim.max_nodes:
            raise enomem(f"the tree already holds {lim.max_nodes} nodes")
        if self._bytes + nbytes > lim.max_bytes:
            raise enomem(f"the tree would exceed {lim.max_bytes} bytes")
        self.budget.charge(nodes, nbytes)
        self._nodes += nodes
        self._bytes += nbytes

    def _release(self, nodes: int, nbytes: int) -> None:
        self.budget.release(nodes, nbytes)
        self._nodes -= nodes
        self._bytes -= nbytes

    # ----------------------------------------------------------------- lookup

    def _find(self, parts: list[str]) -> Node:
        return descend(self.root, parts)

    def get_node(self, path: str) -> Node:
        return self._find(split_path(path))

    def get_prop(self, path: str, name: str) -> bytes:
        check_prop_name(name)
        node = self.get_node(path)
        if name not in node.props:
            raise enoent(f"no property {name!r} in {path}")
        return node.props[name]

    # ----------------------------------------------------------------- edits

    def add_node(self, path: str) -> bool:
        """Create the node at ``path`` (its parent must exist); False if it already did."""
        parts = split_path(path)
        if not parts:
            return False
        parent = self._find(parts[:-1])
        name = parts[-1]
        if name in parent.children:
            return False
        if name in parent.props or (len(parts) == 1 and name in self.reserved_props):
            # dtc flags a node and a property of the same name (node_name_vs_property_name)
            raise eexist(f"{path}: its parent has a property named {name!r}")
        lim = self.limits
        if len(parts) >= lim.max_depth:
            raise einval(f"{path} is deeper than {lim.max_depth} levels")
        if len(parent.children) >= lim.max_fanout:
            raise enomem(f"{path.rsplit('/', 1)[0] or '/'} already has {lim.max_fanout} children")
        self._charge(1, node_cost(name))
        parent.children[name] = Node()
        return True

    def remove_node(self, path: str) -> None:
        parts = split_path(path)
        if not parts:
            raise einval("cannot remove the root node")
        parent = self._find(parts[:-1])
        node = parent.children.get(parts[-1])
        if node is None:
            raise enoent(f"no node {path}")
        del parent.children[parts[-1]]
        self._release(node.count_nodes(), node.nbytes() + node_cost(parts[-1]))

    def add_prop(self, path: str, name: str, value: bytes) -> bool:
        """Add a property; False (success) if the same bytes are already there."""
        check_prop_name(name)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise einval(f"property {name!r} value must be bytes")
        value = bytes(value)
        parts = split_path(path)
        if not parts and name in self.reserved_props:
            raise eperm(f"property {name!r} of the session node is written by khod")
        node = self._find(parts)
        if name in node.children:
            raise eexist(f"{path} has a child node named {name!r}")
        old = node.props.get(name)
        if old is not None:
            if old == value:
                return False
            raise eexist(f"property {name!r} of {path} exists with a different value")
        lim = self.limits
        if len(value) > lim.max_prop_bytes:
            raise enomem(f"property {name!r} is {len(value)} bytes (limit {lim.max_prop_bytes})")
        room = lim.max_fanout - (len(self.reserved_props) if node is self.root else 0)
        if len(node.props) >= room:
            raise enomem(f"{path} already has {room} properties")
        self._charge(0, prop_cost(name, value))
        node.props[name] = value
        return True

    def add_string_prop(self, path: str, name: str, text: str) -> bool:
        if not isinstance(text, str):
            raise einval(f"property {name!r} value must be a string")
        return self.add_prop(path, name, string_value(text))

    def remove_prop(self, path: str, name: str) -> bytes:
        check_prop_name(name)
        node = self.get_node(path)
        if name not in node.props:
            raise enoent(f"no property {name!r} in {path}")
        value = node.props.pop(name)
        self._release(0, prop_cost(name, value))
        return value

    # ----------------------------------------------------------------- size

    @property
    def nodes(self) -> int:
        return self._nodes

    @property
    def size(self) -> int:
        return self._bytes


def check_tree(root: Node) -> None:
    """Refuse a tree read back from elsewhere that breaks the format's limits or name rules."""
    for path, node in root.walk():
        depth = path.count("/") if path != "/" else 0
        if depth > FDT_MAX_DEPTH:
            raise einval(f"{path} is deeper than {FDT_MAX_DEPTH} levels")
        if len(node.children) > FDT_MAX_FANOUT or len(node.props) > FDT_MAX_FANOUT:
            raise einval(f"{path} has more than {FDT_MAX_FANOUT} children or properties")
        for name in node.children:
            if path == "/" and SESSION_NODE.fullmatch(name):
                continue
            check_node_name(name)
        for name, value in node.props.items():
            if not PROP_NAME.fullmatch(name):
                raise einval(f"property name {name!r} of {path} is not a devicetree name")
            if len(value) > FDT_MAX_PROP_BYTES:
                raise einval(f"property {name!r} of {path} is {len(value)} bytes")
