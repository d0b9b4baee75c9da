"""Static seeds: `host:port` strings resolved to addresses, for networks without multicast."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable

from houndd.errors import ConfigError
from houndd.membership.member import Address

log = logging.getLogger("houndd.discovery")


def parse_seed(seed: str) -> tuple[str, int]:
    """Split `host:port` (`[v6]:port` for IPv6 literals); `ConfigError` if malformed."""
    host, sep, port = seed.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("seeds", f"expected host:port entries, got {seed!r}")
    return host, int(port)


async def resolve_seeds(seeds: Iterable[str]) -> list[Address]:
    """Every address each seed resolves to, in seed order, without duplicates.

    A seed that does not resolve now is skipped with a warning; it is tried again on the next
    round (DNS may not be up yet at boot).
    """
    loop = asyncio.get_running_loop()
    out: list[Address] = []
    for seed in seeds:
        host, port = parse_seed(seed)
        with contextlib.suppress(ValueError):
            # An IP address needs no resolver (which would run in a thread every round).
            address = (str(ipaddress.ip_address(host)), port)
            if address not in out:
                out.append(address)
            continue
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as e:
            log.warning("seed does not resolve seed=%s err=%s", seed, e)
            continue
        for _family, _type, _proto, _name, sockaddr in infos:
            address = (str(sockaddr[0]), int(sockaddr[1]))
            if address not in out:
                out.append(address)
    return out
