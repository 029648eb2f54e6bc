"""khoclient: the Python client library for khod (docs/protocol.md is what it speaks).

``Client`` is blocking (a context manager, thread-safe); ``AsyncClient`` is
its trio twin. Both have one method per daemon operation, raise
:class:`KhoError` with ``.code`` on failure, and ``map(folio)`` a folio's
bytes through the region fd khod passes, without a copy.
"""

from khod.errors import Errno, KhoError

from .aclient import AsyncClient
from .calls import Folio, NodeInfo, RegionInfo
from .client import Client
from .core import DEFAULT_SOCKET, NotifierEvent, Veto, default_socket

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncClient",
    "Client",
    "Errno",
    "Folio",
    "KhoError",
    "NodeInfo",
    "NotifierEvent",
    "RegionInfo",
    "Veto",
    "default_socket",
]
