"""khod: a userspace Kexec HandOver daemon.

Workloads allocate folios of a memory region from khod, preserve them, and
get them back, in place and without a copy, from khod's successor after a
live update. See DESIGN.md for the contracts and README.md for a tour.
"""

__version__ = "0.1.0"
