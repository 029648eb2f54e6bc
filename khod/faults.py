"""Named crash points for tests: ``KHOD_FAULT=<name>`` kills the daemon there.

A crash anywhere inside finalize, commit, handover or populate must leave
either a complete handover or none; tests prove it by dying at each point
with SIGKILL (no cleanup, no flush beyond what the code already did). The
commit's own moments are :class:`khod.kho.handover.CommitStep`; every one of
them is a member here too, under the same name.
"""

from __future__ import annotations

import os
import signal
import sys
from enum import StrEnum


class FaultPoint(StrEnum):
    FINALIZE_NOTIFIED = "finalize-notified"  # FINALIZE notifiers answered ok, before the freeze
    SERIALIZE = "serialize"  # frozen, before any metadata is written
    FDT_WRITTEN = "fdt"  # chunk lists and FDT written, not yet flushed
    FLUSHED = "commit"  # everything flushed, before the record write (the commit point)
    COMMITTED = "committed"  # right after the record write
    HANDOVER = "handover"  # clients told, before the daemon exits
    POPULATE_VALIDATED = "populate-validated"  # successor: validated, nothing reserved yet
    POPULATE_RESERVED = "populate-reserved"  # successor: incoming folios reserved
    READY = "ready"  # successor: serving, the incoming handover not taken over yet
    TAKE_OVER = "take-over"  # successor: handed-over memory freed, before the record says live


def point(name: str) -> None:
    """Die here if the environment asks for it."""
    if os.environ.get("KHOD_FAULT") == name:
        sys.stderr.write(f"khod: fault point {str(name)!r} reached, killing myself\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
