"""Discovery: candidate peer addresses from static seeds and mDNS.

Candidates are hints: seeds, mDNS and, in the first rounds after a start, the peers this node
last saw alive (`remembered.py`). `Discovery` hands them to `on_candidate` (the daemon wires it to
`Membership.add_candidate`), again every `join_retry_s` with jitter so a seed that was down at
boot is joined once it comes up; membership ignores candidates it already knows as alive. A
round in which `on_candidate` said of every candidate that there was nothing to do (it
returned False: all are alive members) doubles the pause before the next, up to
OFFER_IDLE_MAX_S, so a formed cluster at rest does not re-offer its seeds every two seconds;
any candidate worth a try brings the pause back to `join_retry_s`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import zeroconf

from houndd import __version__
from houndd.config import Config
from houndd.discovery.mdns import MdnsDiscovery, default_route_address
from houndd.discovery.seeds import resolve_seeds
from houndd.membership.member import Address

__all__ = ["REMEMBERED_ROUNDS", "Discovery", "default_route_address"]

log = logging.getLogger("houndd.discovery")

OFFER_IDLE_MAX_S = 30.0
"""The longest pause between offer rounds once every candidate is an alive member."""
REMEMBERED_ROUNDS = 5
"""Remembered peers (`remembered.py`) are offered in this many rounds after a start, seeds and
mDNS in every round: a member that left for good should not be tried for ever."""


class Discovery:
    """Seeds plus (if `config.mdns`) mDNS on `config.interfaces` (default: the default-route
    interface). Constructor does no IO; `run()` until cancelled; `close()` is idempotent."""

    def __init__(
        self,
        config: Config,
        node_id: str,
        fingerprint: str,
        port: int,
        on_candidate: Callable[[Address], object],
        *,
        advertise_host: str | None = None,
        rng: random.Random | None = None,
        remembered: Sequence[Address] = (),
    ) -> None:
        self._config = config
        self._remembered = list(remembered)
        self._node_id = node_id
        self._fingerprint = fingerprint
        self._port = port
        self._on_candidate = on_candidate
        self._advertise_host = advertise_host
        self._rng = rng or random.Random()
        self._mdns: MdnsDiscovery | None = None
        self._closed = False
        self.first_round = asyncio.Event()
        """Set once mDNS is up (registered and browsing, or given up) and the seeds were
        offered once: the election waits for this before its join window starts."""

    @property
    def mdns(self) -> MdnsDiscovery | None:
        """The mDNS part, once running (None when disabled)."""
        return self._mdns

    async def run(self) -> None:
        """Offer seed and mDNS candidates every `join_retry_s` (jittered) until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                if self._config.mdns:
                    interfaces = list(self._config.interfaces) or [default_route_address()]
                    advertise = self._advertise_host or self._config.advertise or interfaces[0]
                    mdns = MdnsDiscovery(
                        node_id=self._node_id,
                        fingerprint=self._fingerprint,
                        port=self._port,
                        version=__version__,
                        interfaces=interfaces,
                        advertise_host=advertise,
                        on_candidate=self._on_candidate,
                        node_name=self._config.effective_node_name,
                        cluster_name=self._config.cluster_name,
                    )
                    self._mdns = mdns
                    try:
                        await mdns.start()
                    except (OSError, zeroconf.Error) as e:
                        # mDNS is only a hint: without it seeds still work, so keep running.
                        log.warning(
                            "mdns unavailable; continuing with seeds only interfaces=%s err=%s",
                            ",".join(interfaces), e,
                        )  # fmt: skip
                        await mdns.close()
                        self._mdns = None
                    else:
                        tg.create_task(mdns.run())
                tg.create_task(self._offer_loop())
        finally:
            await self.close()

    async def _offer_loop(self) -> None:
        pause = self._config.join_retry_s
        rounds = 0
        while True:
            candidates = await resolve_seeds(self._config.seeds) if self._config.seeds else []
            if rounds < REMEMBERED_ROUNDS:
                candidates.extend(a for a in self._remembered if a not in candidates)
            rounds += 1
            if self._mdns is not None:
                candidates.extend(self._mdns.found.values())
            useful = [self._on_candidate(address) is not False for address in candidates]
            if any(useful) or not candidates:
                pause = self._config.join_retry_s
            else:
                pause = min(OFFER_IDLE_MAX_S, pause * 2)
            self.first_round.set()
            # Jitter: identical hosts booted together must not retry in lockstep.
            await asyncio.sleep(pause * self._rng.uniform(0.8, 1.2))

    async def close(self) -> None:
        """Stop mDNS (sending goodbyes); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._mdns is not None:
            await self._mdns.close()
