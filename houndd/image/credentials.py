"""Registry credentials: the one place where an image's credentials are looked up.

Two sources: a plan's `auth` section (`RegistryCredential` per registry, found with
`plan_auth`) and the Docker client config file (`auths` entries, base64, found with
`credentials_for`). Credential helpers (`credsStore`, `credHelpers`) are not run: a daemon
should not execute whatever a config file names. Both give a `RegistryAuth`, what the registry
client and the engine take.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from houndd.image.reference import (
    DOCKER_HUB_REGISTRY,
    ImageRef,
    normalize_registry,
    parse_reference,
)

__all__ = [
    "RegistryAuth",
    "RegistryCredential",
    "auth_document",
    "credentials_for",
    "default_docker_config_path",
    "plan_auth",
]

log = logging.getLogger("houndd.puller")

# Docker Hub credentials are stored under the legacy index URL.
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", DOCKER_HUB_REGISTRY)
# A config file larger than this is not a Docker client config; don't read it into memory.
_MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one registry. The password never appears in repr or str."""

    username: str
    password: str = field(repr=False)
    server: str = ""

    def __repr__(self) -> str:
        return f"RegistryAuth(username={self.username!r}, password='***', server={self.server!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class RegistryCredential:
    """A plan's credentials for one registry: username + password, or a bearer token.

    Secrets never appear in `repr()` or `str()`, so a logged object leaks nothing.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        if self.token is not None:
            return "RegistryCredential(token=<hidden>)"
        return f"RegistryCredential(username={self.username!r}, password=<hidden>)"

    __str__ = __repr__

    def to_document(self) -> dict[str, str]:
        """The secret mapping (`{username, password}` or `{token}`); seal before storing."""
        if self.token is not None:
            return {"token": self.token}
        return {"username": self.username or "", "password": self.password or ""}

    def auth(self, server: str) -> RegistryAuth:
        """As the engine and the registry client take it."""
        if self.token is not None:
            # Docker's X-Registry-Auth takes a registry token as the identity token of a login.
            return RegistryAuth(username="<token>", password=self.token, server=server)
        return RegistryAuth(self.username or "", self.password or "", server)


def auth_document(credentials: Mapping[str, RegistryCredential]) -> dict[str, dict[str, str]]:
    """A plan's `auth` mapping (registry -> secrets) in clear: seal it before it leaves memory."""
    return {host: cred.to_document() for host, cred in credentials.items()}


def plan_auth(
    image: str | ImageRef, credentials: Mapping[str, RegistryCredential]
) -> RegistryAuth | None:
    """The plan's credentials (registry host -> credential) for the registry of `image`."""
    if not credentials:
        return None
    ref = parse_reference(image) if isinstance(image, str) else image
    cred = credentials.get(ref.registry)
    return None if cred is None else cred.auth(ref.registry)


def default_docker_config_path() -> Path:
    """`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json` (what the docker CLI reads)."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def _host_of(key: str) -> str:
    """`https://host:port/v1/` or `host:port` -> `host:port` (normalized for Docker Hub)."""
    host = key.split("://", 1)[-1].split("/", 1)[0]
    return normalize_registry(host)


def credentials_for(registry: str, path: str | Path | None = None) -> RegistryAuth | None:
    """Credentials for `registry` (a host[:port] as in `ImageRef.registry`) from the config
    file at `path` (None: `default_docker_config_path()`), or None if it names none."""
    config_path = Path(path) if path is not None else default_docker_config_path()
    try:
        if config_path.stat().st_size > _MAX_CONFIG_BYTES:
            log.warning("docker config too large, ignored path=%s", config_path)
            return None
        data = json.loads(config_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        # Say which file, never its content: it holds secrets.
        log.warning("docker config unreadable path=%s error=%s", config_path, type(e).__name__)
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = normalize_registry(registry)
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        if _host_of(key) != wanted and not (wanted == DOCKER_HUB_REGISTRY and key in _HUB_KEYS):
            continue
        username, password = entry.get("username"), entry.get("password")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                username, _, password = base64.b64decode(encoded).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                log.warning("docker config entry not base64 user:password path=%s", config_path)
                continue
        if isinstance(username, str) and isinstance(password, str) and username:
            return RegistryAuth(username=username, password=password, server=key)
    return None
