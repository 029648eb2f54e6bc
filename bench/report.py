"""How every benchmark prints: a table for people, then one JSON object as the last line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

Targets = Mapping[str, tuple[str, float]]


def print_figures(title: str, figures: dict[str, Any], targets: Targets, as_json: bool) -> None:
    """Print ``figures`` against their ``targets`` (">=" or "<=" a number)."""
    print(title)
    width = max(len(k) for k in figures) + 2
    print(f"{'figure':{width}} {'value':>16}  target")
    for key, value in figures.items():
        mark = ""
        if key in targets:
            op, bound = targets[key]
            ok = value >= bound if op == ">=" else value <= bound
            mark = f"{op} {bound:,}  {'ok' if ok else 'MISSED'}"
        shown = f"{value:,}" if isinstance(value, int) else str(value)
        print(f"{key:{width}} {shown:>16}  {mark}")
    if as_json:
        print(json.dumps(figures))
