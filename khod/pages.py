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
