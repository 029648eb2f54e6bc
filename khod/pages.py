"""Page geometry shared by every layer: pages, orders, folios, range splitting.

A folio is ``2**order`` pages at a pfn aligned to its own size, with orders
0..18 (4 KiB .. 1 GiB); see docs/format.md §1 and §5.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from khod.errors import einval

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_ORDER = 18
NR_ORDERS = MAX_ORDER + 1

I64 = npt.NDArray[np.int64]


def folio_bytes(order: int) -> int:
    """Bytes in one folio of ``order``."""
    return PAGE_SIZE << order


def check_order(order: int) -> None:
    if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
        raise einval(f"order {order!r} is outside 0..{MAX_ORDER}")


def split_range(pfn: int, npages: int) -> list[tuple[int, int]]:
    """Split ``npages`` pages at ``pfn`` into naturally aligned folios.

    Greedy (docs/format.md §5): each folio takes the largest order allowed
    by both the alignment of its pfn and the pages still left, capped at
    MAX_ORDER. (KHO v5 ignored the alignment and recorded misaligned blocks
    at the rounded-down address; this does not.)
    """
    if pfn < 0 or npages < 0:
        raise einval(f"negative range: pfn {pfn}, {npages} pages")
    out: list[tuple[int, int]] = []
    while npages:
        align = (pfn & -pfn).bit_length() - 1 if pfn else MAX_ORDER
        order = min(align, npages.bit_length() - 1, MAX_ORDER)
        out.append((pfn, order))
        pfn += 1 << order
        npages -= 1 << order
    return out


def split_ranges(
    pfns: I64, npages: I64, limit: int, *, ordered: bool = False
) -> tuple[I64, I64, I64]:
    """:func:`split_range` over many ranges at once: (pfns, orders, range of each folio).

    With ``ordered`` the folios come range by range, each range's ascending.
    At most ``limit`` folios are made: more is ``EINVAL`` before they exist,
    so a request cannot make the daemon build an unbounded list.
    """
    at, left = pfns.astype(np.int64), npages.astype(np.int64)
    rng = np.arange(at.size, dtype=np.int64)
    parts: list[tuple[I64, I64, I64]] = []
    made = 0
    while rng.size:
        low = at & -at  # the lowest set bit: alignment (pfn 0 is aligned to anything)
        align = np.where(at == 0, MAX_ORDER, np.frexp(low.astype(np.float64))[1] - 1)
        fits = np.frexp(left.astype(np.float64))[1] - 1  # floor(log2(pages left))
        order = np.minimum(np.minimum(align, fits), MAX_ORDER).astype(np.int64)
        made += rng.size
        if made > limit:
            raise einval(f"the ranges split into more than {limit} folios (one batch)")
        parts.append((at, order, rng))
        step = np.int64(1) << order
        at, left = at + step, left - step
        more = left > 0
        at, left, rng = at[more], left[more], rng[more]
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    p = np.concatenate([x[0] for x in parts])
    o = np.concatenate([x[1] for x in parts])
    r = np.concatenate([x[2] for x in parts])
    if not ordered:
        return p, o, r
    keep = np.lexsort((p, r))
    return p[keep], o[keep], r[keep]
