"""Whether a process named by a handover record still runs.

Shared by start-up (a live record whose owner still runs must not be taken
over) and by ``khoctl inspect`` (which says whether the owner is gone); kept
apart from the daemon so the operator's tool does not import it.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
