"""khod: a userspace Kexec HandOver daemon.

Workloads allocate folios of a memory region from khod, preserve them, and
get them back, in place and without a copy, from khod's successor after a
live update. docs/design.md describes the daemon, docs/format.md the bytes it
writes, docs/protocol.md its wire protocol; README.md gives the tour.
"""

__version__ = "0.1.0"
