"""mDNS advertisement and browsing of `_houndd._tcp.local.` (python-zeroconf).

Bound to the configured interface addresses only, never every interface: a Docker host has a
bridge per network and multicast on those would announce us to containers. What mDNS finds is a
hint, a candidate address; a peer becomes a member only by an authenticated push-pull.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from houndd.membership.member import Address

log = logging.getLogger("houndd.discovery")

SERVICE_TYPE = "_houndd._tcp.local."
# Resolving one announced service: mDNS answers on a LAN arrive in milliseconds.
RESOLVE_TIMEOUT_MS = 3000
# Announced services waiting to be resolved; a noisy LAN cannot make us queue more.
MAX_PENDING = 256
# TXT values are short hex ids and numbers; longer ones are not ours.
MAX_TXT_VALUE = 128
# A TXT string holds 255 bytes, key included: names are cut to this many characters.
MAX_TXT_NAME = 200


def default_route_address() -> str:
    """The local address of the default-route interface.

    Connecting a UDP socket sends nothing; it only makes the kernel pick the source address it
    would use for the default route (a TEST-NET-1 destination, never contacted).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"  # no default route: a lone host


def instance_name(node_id: str) -> str:
    """The mDNS service instance name of a node."""
    return f"houndd-{node_id}.{SERVICE_TYPE}"


class MdnsDiscovery:
    """Advertise this node and report other nodes' (address, port) to `on_candidate`."""

    def __init__(
        self,
        *,
        node_id: str,
        fingerprint: str,
        port: int,
        version: str,
        interfaces: list[str],
        advertise_host: str,
        on_candidate: Callable[[Address], object],
        node_name: str = "",
        cluster_name: str = "",
    ) -> None:
        self._node_id = node_id
        self._node_name = node_name[:MAX_TXT_NAME]
        self._cluster_name = cluster_name[:MAX_TXT_NAME]
        self._fingerprint = fingerprint
        self._port = port
        self._version = version
        self._interfaces = interfaces
        self._advertise_host = advertise_host
        self._on_candidate = on_candidate
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._pending: asyncio.Queue[str] = asyncio.Queue(MAX_PENDING)
        self.found: dict[str, Address] = {}
        """Currently announced peers: instance name -> (address, port)."""
        self.names: dict[str, str] = {}
        """Node names the announced peers gave (for logs and operators; never trusted)."""
        self.other_clusters: dict[str, str] = {}
        """Announced peers of another cluster name, not candidates: instance -> cluster."""
        self._closed = False

    async def start(self) -> None:
        """Register our service and start browsing."""
        v4 = all(ipaddress.ip_address(a).version == 4 for a in self._interfaces)
        self._azc = AsyncZeroconf(
            interfaces=list(self._interfaces),
            ip_version=IPVersion.V4Only if v4 else IPVersion.All,
        )
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            instance_name(self._node_id),
            port=self._port,
            properties={
                "id": self._node_id,
                "fp": self._fingerprint,
                "port": str(self._port),
                "version": self._version,
                # what `avahi-browse -r _houndd._tcp` shows an operator: which node, which
                # cluster (a peer of another cluster name is not a candidate)
                "name": self._node_name,
                "cluster": self._cluster_name,
            },
            server=f"houndd-{self._node_id}.local.",
            parsed_addresses=[self._advertise_host],
        )
        await self._azc.async_register_service(info)
        self._browser = AsyncServiceBrowser(
            self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )
        log.info(
            "mdns started interfaces=%s advertise=%s:%d",
            ",".join(self._interfaces), self._advertise_host, self._port,
        )  # fmt: skip

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if name == instance_name(self._node_id):
            return
        if state_change is ServiceStateChange.Removed:
            self.found.pop(name, None)
            self.names.pop(name, None)
            self.other_clusters.pop(name, None)
            return
        try:
            self._pending.put_nowait(name)
        except asyncio.QueueFull:
            log.debug("mdns resolve queue full; dropping name=%s", name)

    async def run(self) -> None:
        """Resolve announced services and hand their addresses to `on_candidate`."""
        while True:
            name = await self._pending.get()
            if self._azc is None:
                continue
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
                log.debug("mdns resolve timed out name=%s", name)
                continue
            cluster = str(info.decoded_properties.get("cluster") or "")[:MAX_TXT_NAME]
            if cluster and self._cluster_name and cluster != self._cluster_name:
                # another cluster on the same LAN: its envelopes would be refused anyway
                if len(self.other_clusters) < MAX_PENDING:
                    self.other_clusters[name] = cluster
                continue
            address = self._candidate(info)
            if address is not None:
                self.found[name] = address
                self.names[name] = str(info.decoded_properties.get("name") or "")[:MAX_TXT_NAME]
                self._on_candidate(address)

    def _candidate(self, info: AsyncServiceInfo) -> Address | None:
        txt = info.decoded_properties
        peer_id, port_text = txt.get("id"), txt.get("port")
        if not peer_id or peer_id == self._node_id or len(peer_id) > MAX_TXT_VALUE:
            return None
        port = info.port
        if port_text and port_text.isdigit():
            port = int(port_text)
        addresses = info.parsed_addresses(IPVersion.V4Only) or info.parsed_addresses()
        if not addresses or port is None or not 0 < port < 65536:
            return None
        log.debug(
            "mdns candidate id=%s name=%s fp=%s addr=%s:%d",
            peer_id, txt.get("name"), txt.get("fp"), addresses[0], port,
        )  # fmt: skip
        return (addresses[0], port)

    async def close(self) -> None:
        """Unregister (goodbye packets) and stop; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            await self._azc.async_close()
