"""Remembered peers: the members this node last saw alive, offered again after a restart.

A node that restarts without seeds and without mDNS (the first node of a static-seed cluster
is the usual one: everyone else seeds to it) knew its peers a moment ago but has no way to
find them; they find it only when their own seed retry comes round. If its join window ends
first, it elects itself alone, and the cluster's coordinator then has to move to a new term to
settle the contest. So every node keeps the addresses of the members it sees alive in
`state_dir/peers.json`, and discovery offers them in its first rounds after a start, like
seeds (Serf's snapshot and rejoin do the same).

The file holds addresses only (no keys, nothing secret), at most MAX_REMEMBERED of them, mode
0600, written atomically and at most once per SAVE_DELAY_S. A file that does not parse is
ignored with a warning: remembered peers are a hint, never a reason not to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from houndd.keyfiles import atomic_write
from houndd.membership.member import Address
from houndd.membership.transport import address_problem

__all__ = ["MAX_REMEMBERED", "PEERS_FILE", "PeerMemory", "load_peers", "save_peers"]

log = logging.getLogger("houndd.discovery")

PEERS_FILE = "peers.json"
MAX_REMEMBERED = 64
"""Enough to reach any cluster again: joining one member brings the whole view."""
SAVE_DELAY_S = 2.0
"""Changes within this long are written once (a cluster forming changes every second)."""


def load_peers(path: Path) -> list[Address]:
    """The remembered addresses, valid ones only, at most MAX_REMEMBERED; [] if none."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("remembered peers unreadable, ignored path=%s err=%s", path, e)
        return []
    if not isinstance(raw, list):
        log.warning("remembered peers ignored path=%s err=expected a list", path)
        return []
    out: list[Address] = []
    for entry in raw[:MAX_REMEMBERED]:
        address = tuple(entry) if isinstance(entry, list) else entry
        if address_problem(address) is None and address not in out:
            out.append((str(address[0]), int(address[1])))
    return out


def save_peers(path: Path, addresses: list[Address]) -> None:
    """Replace the file with `addresses` (the first MAX_REMEMBERED), atomically, mode 0600."""
    data = json.dumps([list(a) for a in addresses[:MAX_REMEMBERED]]).encode()
    atomic_write(path, data + b"\n", mode=0o600)


class PeerMemory:
    """Keeps `path` up to date with `alive()` (this node's alive peers' addresses): call
    `changed()` on every membership change; the file is written SAVE_DELAY_S later, in a
    thread, if the set differs from what the file holds."""

    def __init__(
        self, path: Path, alive: Callable[[], list[Address]], *, delay_s: float = SAVE_DELAY_S
    ) -> None:
        self.path = path
        self._alive = alive
        self._delay_s = delay_s
        self._saved = sorted(load_peers(path))
        self._pending: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> list[Address]:
        """What the file held when this node started."""
        return list(self._saved)

    def changed(self) -> None:
        """Membership changed: save soon (one write for a burst of changes)."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._save_later())

    async def close(self) -> None:
        """Cancel a pending write (the file keeps what it had)."""
        if self._pending is not None:
            self._pending.cancel()
            # asyncio.wait: a cancellation of close() itself still propagates
            await asyncio.wait([self._pending])

    async def _save_later(self) -> None:
        await asyncio.sleep(self._delay_s)
        addresses = sorted(set(self._alive()))
        if not addresses or addresses == self._saved:
            # Alone (everyone else left or died): keep the last peers known, the ones worth
            # trying after a restart.
            return
        try:
            await asyncio.to_thread(save_peers, self.path, addresses)
        except OSError as e:
            log.warning("cannot save remembered peers path=%s err=%s", self.path, e)
            return
        self._saved = addresses
