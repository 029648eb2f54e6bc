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
        """Bytes the subtree adds to a DTB, roughly: names plus values."""
        own = sum(len(k) + len(v) + 12 for k, v in self.props.items())
        return own + sum(len(k) + 8 + c.nbytes() for k, c in self.children.items())

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children.values()), default=0)


@dataclass(frozen=True)
class TreeLimits:
    """Bounds on one session's subtree (and on any tree read back)."""

    max_nodes: int = 4096
    max_bytes: int = 1 << 20
    max_depth: int = 16
    max_prop_bytes: int = 256 << 10
    max_fanout: int = 1024  # children or properties of one node


class Tree:
    """A mutable KHO subtree with the v5 edit rules and size limits."""

    def __init__(
        self,
        root: Node | None = None,
        *,
        limits: TreeLimits | None = None,
        reserved_props: frozenset[str] = frozenset(),
    ) -> None:
        self.root = root if root is not None else Node()
        self.limits = limits or TreeLimits()
        self.reserved_props = reserved_props
        self._nodes = self.root.count_nodes()
        self._bytes = self.root.nbytes()

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
        if self._nodes + 1 > lim.max_nodes:
            raise enomem(f"the tree already holds {lim.max_nodes} nodes")
        if len(parent.children) >= lim.max_fanout:
            raise enomem(f"{path.rsplit('/', 1)[0] or '/'} already has {lim.max_fanout} children")
        cost = len(name) + 8
        if self._bytes + cost > lim.max_bytes:
            raise enomem(f"the tree would exceed {lim.max_bytes} bytes")
        parent.children[name] = Node()
        self._nodes += 1
        self._bytes += cost
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
        self._nodes -= node.count_nodes()
        self._bytes -= node.nbytes() + len(parts[-1]) + 8

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
        if len(node.props) >= lim.max_fanout:
            raise enomem(f"{path} already has {lim.max_fanout} properties")
        cost = len(name) + len(value) + 12
        if self._bytes + cost > lim.max_bytes:
            raise enomem(f"the tree would exceed {lim.max_bytes} bytes")
        node.props[name] = value
        self._bytes += cost
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
        self._bytes -= len(name) + len(value) + 12
        return value

    # ----------------------------------------------------------------- size

    @property
    def nodes(self) -> int:
        return self._nodes

    @property
    def size(self) -> int:
        return self._bytes


def check_tree(root: Node, limits: TreeLimits) -> None:
    """Refuse a tree read back from elsewhere that breaks the limits or name rules."""
    for path, node in root.walk():
        depth = path.count("/") if path != "/" else 0
        if depth > limits.max_depth:
            raise einval(f"{path} is deeper than {limits.max_depth} levels")
        if len(node.children) > limits.max_fanout or len(node.props) > limits.max_fanout:
            raise einval(f"{path} has more than {limits.max_fanout} children or properties")
        for name in node.children:
            check_node_name(name)
        for name, value in node.props.items():
            if not PROP_NAME.fullmatch(name):
                raise einval(f"property name {name!r} of {path} is not a devicetree name")
            if len(value) > limits.max_prop_bytes:
                raise einval(f"property {name!r} of {path} is {len(value)} bytes")
