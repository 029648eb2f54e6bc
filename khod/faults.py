"""Named crash points for tests: ``KHOD_FAULT=<name>`` kills the daemon there.

A crash anywhere inside finalize, commit, handover or populate must leave
either a complete handover or none; tests prove it by dying at each point
with SIGKILL (no cleanup, no flush beyond what the code already did).
"""

from __future__ import annotations

import os
import signal
import sys

POINTS = (
    "finalize-notified",  # FINALIZE notifiers answered ok, before the freeze
    "serialize",  # the write lock is held, before any metadata is written
    "fdt",  # chunk lists and FDT written, not yet flushed
    "commit",  # everything flushed, before the record write (the commit point)
    "committed",  # right after the record write
    "handover",  # clients told, before the daemon exits
    "populate-validated",  # successor: handover validated, nothing reserved yet
    "populate-reserved",  # successor: incoming folios reserved
    "populate-record",  # successor: before the record is marked live
)


def point(name: str) -> None:
    """Die here if the environment asks for it."""
    if os.environ.get("KHOD_FAULT") == name:
        sys.stderr.write(f"khod: fault point {name!r} reached, killing myself\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
