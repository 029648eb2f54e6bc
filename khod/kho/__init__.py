"""The KHO v5 format core: every byte khod puts in a region, written and read back.

Codecs (:mod:`abi`, :mod:`record`, :mod:`props`), the preservation set
(:mod:`tracker` over :mod:`bitmaps`), chunk lists (:mod:`chunklist`), the
KHO tree and its DTB (:mod:`tree`, :mod:`dtb`), whole handovers
(:mod:`handover`) and the offline verdict (:mod:`report`). Plain Python on
numpy and ``fdt``: no trio, no sockets, no files, and nothing of the daemon
(only :mod:`khod.errors` and :mod:`khod.pages`); the daemon's region and
allocator reach it through the protocols of :mod:`memory`.
docs/format.md describes the bytes.
"""
