"""Client and AsyncClient cannot drift: the same public methods, signatures and attributes.

The two are written by hand, one blocking and one trio. Everything public must
match, parameter by parameter (name, kind, default, annotation) and down to the
return annotation (an ``async def`` is annotated with what it returns once
awaited), except for the few differences listed below, each for a reason.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from khoclient import AsyncClient, Client

# Methods that are meant to differ in name: Client's name -> AsyncClient's name.
RENAMED = {
    "close": "aclose",  # trio's convention: an async close is called aclose
}

# Parameters whose annotations are meant to differ: (method, parameter) -> why.
DIFFERENT_ANNOTATIONS = {
    ("subscribe", "on_finalize"): "Client runs sync callables, AsyncClient awaits async ones",
    ("subscribe", "on_unfreeze"): "Client runs sync callables, AsyncClient awaits async ones",
}

# Parameters only the blocking client has: (method, parameter) -> why.
BLOCKING_ONLY = {
    ("__init__", "busy_poll_us"): "a blocking call may poll its socket before it sleeps "
    "(khoclient/spin.py); a trio task waits in trio's event loop, which it must not hold",
}

# Context manager protocols: a with-block on one, an async with-block on the other.
PROTOCOLS = {Client: ("__enter__", "__exit__"), AsyncClient: ("__aenter__", "__aexit__")}


def public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}


def public_names(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def shape(fn: Callable[..., Any], method: str) -> tuple[list[tuple[Any, ...]], str]:
    """Parameters as (name, kind, default, annotation) and the return annotation.

    Annotations are evaluated and compared by repr, so spelling (aliases, import
    style) does not matter but meaning does, and the two modules' TypeVars ``T``
    compare equal.
    """
    sig = inspect.signature(fn, eval_str=True)
    params = []
    for p in sig.parameters.values():
        ann = "(differs on purpose)" if (method, p.name) in DIFFERENT_ANNOTATIONS else p.annotation
        params.append((p.name, p.kind.description, p.default, _ann(ann)))
    return params, _ann(sig.return_annotation)


def _ann(a: Any) -> str:
    return a if isinstance(a, str) else "(none)" if a is inspect.Signature.empty else repr(a)


def drift(sync: type, asyn: type, method: str) -> list[str]:
    """How ``asyn``'s counterpart of ``sync.method`` differs from it (empty: it does not)."""
    other = RENAMED.get(method, method)
    fa, fb = getattr(sync, method), getattr(asyn, other, None)
    if fb is None:
        return [f"{asyn.__name__}.{other} is missing (it mirrors {sync.__name__}.{method})"]
    problems = []
    if inspect.iscoroutinefunction(fa) and method != "__init__":
        problems.append(f"{sync.__name__}.{method} is async; it should block")
    if not inspect.iscoroutinefunction(fb) and method != "__init__":
        problems.append(f"{asyn.__name__}.{other} is not async")
    (pa, ra), (pb, rb) = shape(fa, method), shape(fb, method)
    pa = [p for p in pa if (method, p[0]) not in BLOCKING_ONLY]
    names_a, names_b = [p[0] for p in pa], [p[0] for p in pb]
    if names_a != names_b:
        problems.append(f"parameters {names_a} != {names_b}")
    else:
        for a, b in zip(pa, pb, strict=True):
            for what, x, y in zip(("kind", "default", "annotation"), a[1:], b[1:], strict=True):
                if x != y:
                    problems.append(f"parameter {a[0]!r}: {what} {x!r} != {y!r}")
    if ra != rb:
        problems.append(f"return annotation {ra!r} != {rb!r}")
    if problems:
        head = f"{asyn.__name__}.{other} has drifted from {sync.__name__}.{method}:"
        return [head, *(f"  {p}" for p in problems)]
    return []


def assigned_attributes(cls: type) -> set[str]:
    """Public ``self.X`` assigned anywhere in the class body (``=``, ``: T =``, tuples)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        while targets:
            t = targets.pop()
            if isinstance(t, ast.Tuple | ast.List):
                targets.extend(t.elts)
            elif (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id == "self"
                and not t.attr.startswith("_")
            ):
                names.add(t.attr)
    return names


# ----------------------------------------------------------------------------- the clients


def test_the_same_public_methods() -> None:
    sync = {RENAMED.get(n, n) for n in public_methods(Client)}
    asyn = public_methods(AsyncClient)
    assert sync == asyn, (
        f"only on Client: {sorted(sync - asyn)}; only on AsyncClient: {sorted(asyn - sync)}"
    )
    # and nothing public that is not a method (properties, class attributes) either
    assert {RENAMED.get(n, n) for n in public_names(Client)} == public_names(AsyncClient)


@pytest.mark.parametrize("method", ["__init__", *sorted(public_methods(Client))])
def test_the_same_signature(method: str) -> None:
    problems = drift(Client, AsyncClient, method)
    assert not problems, "\n".join(problems)


def test_context_manager_protocols() -> None:
    for cls, names in PROTOCOLS.items():
        assert all(n in vars(cls) for n in names), cls.__name__
    assert "__aenter__" not in vars(Client) and "__enter__" not in vars(AsyncClient)


def test_the_same_attributes_assigned() -> None:
    sync, asyn = assigned_attributes(Client), assigned_attributes(AsyncClient)
    assert sync == asyn, (
        f"only on Client: {sorted(sync - asyn)}; only on AsyncClient: {sorted(asyn - sync)}"
    )
    assert {"session", "persistent", "timeout", "on_handover", "handed_over"} <= sync


def test_the_same_attributes_after_construction(silent: str) -> None:
    with Client(silent) as sync:
        sync_attrs = {n for n in vars(sync) if not n.startswith("_")}
    asyn_attrs = {n for n in vars(AsyncClient(silent)) if not n.startswith("_")}
    assert sync_attrs == asyn_attrs, (
        f"only on Client: {sorted(sync_attrs - asyn_attrs)}; "
        f"only on AsyncClient: {sorted(asyn_attrs - sync_attrs)}"
    )


# ----------------------------------------------------------------------------- the check itself


class _Blocking:
    def __init__(self, timeout: float | None = 60.0) -> None:
        self.timeout = timeout

    def close(self) -> None:
        pass

    def finalize(self, progress: Any = None, timeout: float | None = None) -> dict[str, Any]:
        return {}


class _Drifted:
    def __init__(self, timeout: float | None = 60.0) -> None:
        self.timeout_s = timeout

    async def finalize(self, progress: Any = None) -> dict[str, Any]:
        return {}


def test_the_check_names_the_drifted_method() -> None:
    problems = drift(_Blocking, _Drifted, "finalize")
    assert problems[0] == "_Drifted.finalize has drifted from _Blocking.finalize:"
    assert "parameters ['self', 'progress', 'timeout'] != ['self', 'progress']" in problems[1]
    assert drift(_Blocking, _Drifted, "__init__") == []
    assert drift(_Blocking, _Drifted, "close") == [
        "_Drifted.aclose is missing (it mirrors _Blocking.close)"
    ]
    assert assigned_attributes(_Blocking) == {"timeout"}
    assert assigned_attributes(_Drifted) == {"timeout_s"}
