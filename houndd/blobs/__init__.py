"""Blob sharing: image bytes move between members instead of each one fetching them from
the registry (docs/blob-sharing.md).

- `cache.py`     content-addressed blob store with a size cap, LRU eviction, atomic writes
- `tree.py`      pure: per-blob distribution tree by rendezvous hashing, source order
- `protocol.py`  pure: the sealed peer request and the encrypted frame stream
- `source.py`    transfer context, `Transfers` protocol, the network implementation
- `memory.py`    `MemoryTransfers`, the in-memory fake with faults
- `fetcher.py`   one verified download per blob, streamed to readers while it arrives
- `peer.py`      peer blob endpoint (server) and client; upload limit and rate cap
- `loopback.py`  the read-only registry API on 127.0.0.1 that dockerd pulls through
- `route.py`     a pull through the loopback registry that ends as a direct pull would
- `sharing.py`   `BlobSharing`: all of it assembled for the daemon
"""

from houndd.blobs.cache import BlobCache
from houndd.blobs.fetcher import BlobStats, Fetcher
from houndd.blobs.sharing import BlobSharing
from houndd.blobs.source import BlobContext, BlobWant, SourceError, Transfers
from houndd.blobs.tree import Source, choose_sources

__all__ = [
    "BlobCache",
    "BlobContext",
    "BlobSharing",
    "BlobStats",
    "BlobWant",
    "Fetcher",
    "Source",
    "SourceError",
    "Transfers",
    "choose_sources",
]
