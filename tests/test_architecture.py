"""The import structure docs/design.md §2 describes, checked by reading the imports.

Every import counts, including those under ``if TYPE_CHECKING``: a cycle
that only the type checker sees is still a cycle for a reader.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DAEMON = ROOT / "khod"
CLIENT = ROOT / "clients" / "khoclient"


def module_name(path: Path, package_root: Path, package: str) -> str:
    rel = path.relative_to(package_root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            # "from khod import faults" imports the module khod.faults
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def daemon_modules() -> dict[str, Path]:
    return {
        module_name(p, DAEMON, "khod"): p
        for p in DAEMON.rglob("*.py")
        if "__pycache__" not in p.parts
    }


def daemon_imports(path: Path, name: str) -> set[str]:
    """The daemon modules (not names inside them) that ``path`` imports."""
    modules = daemon_modules()
    return {m for m in imports_of(path, name) if m in modules}


def daemon_graph() -> dict[str, set[str]]:
    modules = daemon_modules()
    return {
        name: {m for m in imports_of(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_daemon_has_no_import_cycle() -> None:
    graph = daemon_graph()
    assert len(graph) > 30  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_format_core_imports_nothing_of_the_daemon() -> None:
    allowed = {"khod", "khod.errors", "khod.pages"}
    forbidden_stdlib = {"trio", "socket", "threading", "subprocess", "mmap", "os", "asyncio"}
    for path in (DAEMON / "kho").rglob("*.py"):
        name = module_name(path, DAEMON, "khod")
        for mod in daemon_imports(path, name):
            assert mod.startswith("khod.kho") or mod in allowed, f"{name} imports {mod}"
        for mod in imports_of(path, name):
            top = mod.split(".")[0]
            assert top not in forbidden_stdlib, f"{name} imports {mod}: the core does no I/O"


def test_the_client_library_needs_only_the_wire_contract() -> None:
    allowed = {"khod.errors", "khod.protocol"}
    for path in CLIENT.glob("*.py"):
        if path.name == "ctl.py":  # khoctl also runs the offline inspector
            continue
        name = module_name(path, CLIENT, "khoclient")
        for mod in daemon_imports(path, name):
            assert mod in allowed, f"{name} imports {mod}"


def test_batches_do_not_import_numpy_submodules_lazily() -> None:
    """numpy 2 imports some submodules on first use (``np.unique`` pulls in ``numpy.ma``,
    20 ms): a daemon that did so in a request would make its first client after a
    start wait for it. The batch paths of a session and the allocator must not."""
    script = """
import sys
import numpy as np
from khod.allocator import Allocator
from khod.kho.tree import TreeLimits
from khod.session import Session
a = Allocator(0, 1 << 16)
s = Session("db", 0, True, TreeLimits())
before = set(sys.modules)
held = []
for order in (0, 9):
    pfns = a.alloc_many(order, 16)
    s.add_allocs(pfns, order)
    npages = np.full(pfns.shape, 1 << order, dtype=np.int64)
    assert s.owned_mask(pfns, npages).all()
    assert not s.owned_mask(pfns[-1:], np.array([1 << (order + 4)], dtype=np.int64)).any()
    s.tracker.preserve_folios(pfns, order)
    s.tracker.unpreserve_folios(pfns, order)
    held.append((pfns, order))
for pfns, order in held:
    a.free_blocks(pfns, order)
late = sorted(set(sys.modules) - before)
assert not late, late
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
