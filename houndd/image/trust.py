"""Which registries the node's dockerd reaches without verified TLS, from its `GET /info`.

dockerd reports its registry settings in `RegistryConfig`: `IndexConfigs` (one entry per
registry named with `--insecure-registry HOST[:PORT]`, plus docker.io, each with `Secure`)
and `InsecureRegistryCIDRs` (`--insecure-registry` networks, and 127.0.0.0/8 by default).
houndd resolves tags itself, so it follows the same rule dockerd applies (its registry
package's `isSecureIndex`): a registry named in `IndexConfigs` is what its entry says;
otherwise it is insecure if one of its addresses lies in an insecure network. For an insecure
registry dockerd tries HTTPS without certificate checks first, then plain HTTP; so does houndd.

Pure: the addresses of a host name are the caller's to look up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What dockerd treats as insecure when it is given no --insecure-registry at all.
DEFAULT_INSECURE_CIDRS: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
# Bounds on what an engine's answer can make us hold.
MAX_ENTRIES = 1024


@dataclass(frozen=True)
class RegistryTrust:
    """dockerd's view of which registries are insecure (HTTP, or HTTPS without checks)."""

    insecure_networks: tuple[IPNetwork, ...] = DEFAULT_INSECURE_CIDRS
    secure_by_name: Mapping[str, bool] = field(default_factory=dict)

    @classmethod
    def from_docker_info(cls, info: Mapping[str, Any]) -> RegistryTrust:
        """From the `RegistryConfig` of dockerd's `GET /info`; anything malformed is skipped
        (an old or odd engine must not stop the node, it only teaches us less)."""
        config = info.get("RegistryConfig")
        if not isinstance(config, Mapping):
            return cls()
        networks: list[IPNetwork] = []
        cidrs = config.get("InsecureRegistryCIDRs")
        for cidr in cidrs[:MAX_ENTRIES] if isinstance(cidrs, list) else []:
            try:
                networks.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                continue
        secure: dict[str, bool] = {}
        indexes = config.get("IndexConfigs")
        entries = list(indexes.items())[:MAX_ENTRIES] if isinstance(indexes, Mapping) else []
        for name, entry in entries:
            flag = entry.get("Secure") if isinstance(entry, Mapping) else None
            if isinstance(name, str) and isinstance(flag, bool):
                secure[name] = flag
        return cls(insecure_networks=tuple(networks), secure_by_name=secure)

    def named(self, registry: str) -> bool | None:
        """dockerd's `Secure` for a registry it names (`host:port` as in the image reference),
        or None when it has no entry for it."""
        return self.secure_by_name.get(registry)

    def insecure(self, registry: str, addresses: Iterable[str] = ()) -> bool:
        """Whether dockerd reaches `registry` (`host[:port]`) without verified TLS.

        `addresses` are the host's IP addresses (looked up by the caller); an IP literal host
        needs none.
        """
        secure = self.named(registry)
        if secure is not None:
            return not secure
        host = _host(registry)
        candidates = [*addresses, host]  # the host itself counts when it is an IP literal
        for text in candidates:
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                continue
            if any(addr in net for net in self.insecure_networks if addr.version == net.version):
                return True
        return False


def _host(registry: str) -> str:
    """The host of `host`, `host:port`, `[v6]` or `[v6]:port`."""
    if registry.startswith("["):
        return registry[1:].split("]", 1)[0]
    if registry.count(":") == 1:
        return registry.split(":", 1)[0]
    return registry
