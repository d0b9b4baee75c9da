"""`RegistryClient`: the registry HTTP API v2 as houndd needs it.

Resolving a tag to one digest and its download size (manifest GET with every manifest media
type in Accept, the linux/amd64 entry of an index), fetching a manifest by digest, and
streaming a blob from an offset (for blob sharing). Anonymous access, HTTP basic auth and the
bearer-token flow (RFC 6750 challenge -> token endpoint, with basic credentials if any).

Transport follows the node's dockerd, so that houndd reaches every registry dockerd does:
loopback and `insecure_registries` (the override) over plain HTTP; registries dockerd treats
as insecure (`--insecure-registry`, learned from its `GET /info`) over HTTPS without
certificate checks, then plain HTTP; all others over verified HTTPS, trusting the CA files
dockerd would (`/etc/docker/certs.d/<registry>/*.crt`). A TLS-versus-plain-HTTP mismatch is
reported as such, with the setting that fixes it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp

from houndd.errors import (
    MANIFEST_UNKNOWN,
    PULL_FAILED,
    REGISTRY_UNREACHABLE,
    UNAUTHORIZED,
    PullError,
    pull_error,
)
from houndd.image.credentials import RegistryAuth, credentials_for
from houndd.image.reference import ImageRef, InvalidReference, parse_reference
from houndd.image.trust import RegistryTrust

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "RegistryClient",
    "Resolved",
]

log = logging.getLogger("houndd.puller")

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST))
# Real manifests are a few KiB; the cap bounds what a hostile registry can make us buffer.
_MAX_MANIFEST_BYTES = 4 << 20
_MAX_TOKEN_BYTES = 1 << 20
_PLATFORM = ("linux", "amd64")
_BLOB_CHUNK_BYTES = 1 << 16
T = TypeVar("T")
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]*))')
# Where dockerd looks for a registry's CA certificates (docker docs: "Verify repository client
# with certificates").
DOCKER_CERTS_DIR = Path("/etc/docker/certs.d")
# What OpenSSL says when a TLS client gets a plain HTTP answer.
_PLAIN_HTTP_SIGNS = ("WRONG_VERSION_NUMBER", "wrong version number", "packet length too long")


class _Endpoint(NamedTuple):
    """How to reach a registry: the URL scheme and the TLS setting for aiohttp's `ssl=`."""

    scheme: str
    tls: bool | ssl.SSLContext  # True: verify with system CAs; False: no checks (insecure)


class _WrongProtocol(Exception):
    """The endpoint speaks the other protocol (TLS vs plain HTTP); the next one may work."""

    def __init__(self, error: PullError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Resolved:
    """A tag resolved to what every node will pull."""

    digest: str  # of the manifest (or index) the tag names
    size_bytes: int  # config + layers of the linux/amd64 image: what a pull downloads
    media_type: str


def _is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _basic(auth: RegistryAuth) -> str:
    return "Basic " + base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()


class RegistryClient:
    """Resolves references against their registries.

    `session_factory` makes the aiohttp session on first use (so the constructor does no IO
    and tests can inject connectors); `close()` closes it. `insecure_registries` (`host:port`)
    are spoken to over plain http, as are loopback hosts. `trust` returns what the node's
    dockerd reported about insecure registries (see module docstring); without it, dockerd's
    defaults. `docker_config_path`: where to find credentials when a call passes none (None:
    the docker CLI's default location). `certs_dir`: dockerd's per-registry CA directory.
    `lookup`: a registry's IP addresses (default: the resolver), for dockerd's networks.
    """

    def __init__(
        self,
        session_factory: Callable[[], aiohttp.ClientSession],
        *,
        insecure_registries: Sequence[str] = (),
        trust: Callable[[], RegistryTrust] | None = None,
        docker_config_path: str | Path | None = None,
        certs_dir: Path = DOCKER_CERTS_DIR,
        lookup: Callable[[str], Awaitable[list[str]]] | None = None,
        request_timeout_s: float = 30.0,
    ) -> None:
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._insecure = frozenset(insecure_registries)
        self._trust = trust or RegistryTrust
        self._docker_config_path = docker_config_path
        self._certs_dir = certs_dir
        self._lookup = lookup or _addresses
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        # the endpoint that answered last, per registry: tried first next time
        self._working: dict[str, _Endpoint] = {}

    async def close(self) -> None:
        """Close the session if one was made. Idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _endpoints(self, registry: str) -> list[_Endpoint]:
        if registry in self._insecure or _is_loopback(registry):
            return [_Endpoint("http", True)]
        trust = self._trust()
        addresses: list[str] = []
        if trust.named(registry) is None:
            addresses = await self._lookup(registry)
        if trust.insecure(registry, addresses):
            endpoints = [_Endpoint("https", False), _Endpoint("http", True)]
        else:
            endpoints = [_Endpoint("https", self._tls_context(registry))]
        working = self._working.get(registry)
        if working in endpoints:
            endpoints.remove(working)
            endpoints.insert(0, working)
        return endpoints

    def _tls_context(self, registry: str) -> bool | ssl.SSLContext:
        """System CAs, plus the CA files dockerd would trust for this registry."""
        directory = self._certs_dir / registry
        try:
            cas = sorted(directory.glob("*.crt"))
        except OSError:
            return True
        if not cas:
            return True
        context = ssl.create_default_context()
        for ca in cas:
            try:
                context.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as e:
                log.warning("ignoring unreadable CA file path=%s error=%s", ca, e)
        return context

    async def resolve(self, ref: str, auth: RegistryAuth | None = None) -> Resolved:
        """Resolve `ref` (tag or digest reference) to its digest, size and media type.

        Raises `PullError`: "manifest unknown", "unauthorized", "registry unreachable"
        (transient), or "pull failed" for anything malformed.
        """

        async def at(
            session: aiohttp.ClientSession,
            endpoint: _Endpoint,
            parsed: ImageRef,
            auth: RegistryAuth | None,
        ) -> Resolved:
            return await self._resolve_at(session, endpoint, parsed, ref, auth)

        return await self._on_endpoints(ref, auth, at)

    def _parse(self, name: str, auth: RegistryAuth | None) -> tuple[ImageRef, RegistryAuth | None]:
        """The parsed reference, and the credentials to use (the node's if none given)."""
        try:
            parsed = parse_reference(name)
        except InvalidReference as e:
            raise PullError(PULL_FAILED, str(e)) from None
        if auth is None:
            auth = credentials_for(parsed.registry, self._docker_config_path)
        return parsed, auth

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._session_factory()
        return self._session

    async def _on_endpoints(
        self,
        name: str,
        auth: RegistryAuth | None,
        attempt: Callable[
            [aiohttp.ClientSession, _Endpoint, ImageRef, RegistryAuth | None], Awaitable[T]
        ],
    ) -> T:
        """Run `attempt` against the registry's endpoints in order until one speaks the
        right protocol; remember that one."""
        parsed, auth = self._parse(name, auth)
        session = self._client()
        endpoints = await self._endpoints(parsed.registry)
        for i, endpoint in enumerate(endpoints):
            try:
                result = await attempt(session, endpoint, parsed, auth)
            except _WrongProtocol as e:
                if i + 1 < len(endpoints):
                    log.debug(
                        "registry endpoint failed, trying the next registry=%s scheme=%s",
                        parsed.registry, endpoint.scheme,
                    )  # fmt: skip
                    continue
                raise e.error from None
            self._working[parsed.registry] = endpoint
            return result
        raise AssertionError("no endpoint")  # pragma: no cover  (endpoints is never empty)

    async def manifest(
        self, name: str, digest: str, auth: RegistryAuth | None = None
    ) -> tuple[bytes, str]:
        """The manifest (or index) `digest` of repository `name`, verified against the
        digest, and its media type. Raises PullError like `resolve`."""

        async def at(
            session: aiohttp.ClientSession,
            endpoint: _Endpoint,
            parsed: ImageRef,
            auth: RegistryAuth | None,
        ) -> tuple[bytes, str]:
            authorizer = _Authorizer(session, parsed, auth, self._timeout, endpoint.tls)
            base = f"{endpoint.scheme}://{parsed.registry}"
            body, media_type, _ = await self._manifest(session, authorizer, base, parsed, digest)
            return body, media_type

        body, media_type = await self._on_endpoints(name, auth, at)
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            raise pull_error(PULL_FAILED, f"registry sent manifest {actual} for {digest}")
        return body, media_type

    async def stream_blob(
        self,
        name: str,
        digest: str,
        *,
        auth: RegistryAuth | None = None,
        offset: int = 0,
        connect_timeout_s: float = 30.0,
    ) -> AsyncGenerator[bytes, None]:
        """The bytes of blob `digest` of repository `name` from `offset` on, as they arrive.

        Not verified here: the caller hashes the whole blob. Raises PullError:
        "unauthorized", "manifest unknown" (no such blob), "registry unreachable" (also when
        the connection breaks mid-blob), "pull failed".
        """
        parsed, auth = self._parse(name, auth)
        try:
            async with self._blob_response(parsed, auth, digest, offset, connect_timeout_s) as resp:
                where = f"{parsed.registry}/{parsed.repository}"
                if resp.status in (401, 403):
                    raise pull_error(UNAUTHORIZED, f"{where}: blob HTTP {resp.status}")
                if resp.status == 404:
                    raise pull_error(MANIFEST_UNKNOWN, f"{where}: blob {digest} unknown")
                if resp.status == 429 or resp.status >= 500:
                    raise pull_error(REGISTRY_UNREACHABLE, f"{parsed.registry}: HTTP {resp.status}")
                if resp.status not in (200, 206):
                    raise pull_error(PULL_FAILED, f"{parsed.registry}: HTTP {resp.status} for blob")
                skip = offset if resp.status == 200 else 0  # the registry ignored our Range
                async for data in resp.content.iter_chunked(_BLOB_CHUNK_BYTES):
                    cut = min(skip, len(data))
                    skip -= cut
                    if cut < len(data):
                        yield data[cut:] if cut else data
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise pull_error(
                REGISTRY_UNREACHABLE, f"{parsed.registry}: {type(e).__name__}: {e}"
            ) from None

    @contextlib.asynccontextmanager
    async def _blob_response(
        self,
        parsed: ImageRef,
        auth: RegistryAuth | None,
        digest: str,
        offset: int,
        connect_timeout_s: float,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The blob GET's response from the first endpoint that speaks the right protocol."""
        session = self._client()
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        # No total timeout: a large blob on a slow link takes as long as it takes; the
        # caller detects a stall between chunks.
        limits = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        endpoints = await self._endpoints(parsed.registry)
        for i, endpoint in enumerate(endpoints):
            authorizer = _Authorizer(session, parsed, auth, self._timeout, endpoint.tls)
            url = f"{endpoint.scheme}://{parsed.registry}/v2/{parsed.repository}/blobs/{digest}"
            try:
                resp = await authorizer.request(url, headers, limits)
            except aiohttp.ClientSSLError as e:
                if i + 1 < len(endpoints):
                    continue
                raise _tls_error(parsed.registry, e) from None
            self._working[parsed.registry] = endpoint
            try:
                yield resp
            finally:
                resp.release()
            return

    async def _resolve_at(
        self,
        session: aiohttp.ClientSession,
        endpoint: _Endpoint,
        parsed: ImageRef,
        ref: str,
        auth: RegistryAuth | None,
    ) -> Resolved:
        base = f"{endpoint.scheme}://{parsed.registry}"
        reference = parsed.digest or parsed.tag or "latest"
        authorizer = _Authorizer(session, parsed, auth, self._timeout, endpoint.tls)
        body, media_type, digest = await self._manifest(
            session, authorizer, base, parsed, reference
        )
        if parsed.digest is not None and digest != parsed.digest:
            raise pull_error(PULL_FAILED, f"registry returned {digest} for {parsed.digest}")
        manifest = _decode(body)
        size_media = media_type
        if media_type in _INDEX_TYPES:
            child = _platform_entry(manifest, ref)
            child_body, size_media, _ = await self._manifest(
                session, authorizer, base, parsed, child
            )
            manifest = _decode(child_body)
        size = _image_size(manifest, ref)
        log.debug("resolved ref=%s digest=%s size=%d media_type=%s", ref, digest, size, size_media)
        return Resolved(digest=digest, size_bytes=size, media_type=media_type)

    async def _manifest(
        self,
        session: aiohttp.ClientSession,
        authorizer: _Authorizer,
        base: str,
        ref: ImageRef,
        reference: str,
    ) -> tuple[bytes, str, str]:
        url = f"{base}/v2/{ref.repository}/manifests/{reference}"
        headers = {"Accept": _ACCEPT}
        try:
            status, resp_headers, body = await authorizer.get(url, headers, _MAX_MANIFEST_BYTES)
        except aiohttp.ClientSSLError as e:
            raise _WrongProtocol(_tls_error(ref.registry, e)) from None
        except aiohttp.ClientConnectorError as e:
            reason = (e.os_error.strerror or str(e.os_error)) if e.os_error else str(e)
            raise pull_error(REGISTRY_UNREACHABLE, f"{ref.registry}: {reason.lower()}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            detail = str(e) or type(e).__name__
            if isinstance(e, TimeoutError):
                detail = "timed out"
            raise pull_error(REGISTRY_UNREACHABLE, f"{ref.registry}: {detail}") from None
        if status == 400 and base.startswith("http:") and b"HTTPS server" in body:
            raise _WrongProtocol(
                pull_error(
                    PULL_FAILED,
                    f"{ref.registry} speaks HTTPS, but houndd used plain HTTP (it is listed in "
                    f"insecure_registries or is a loopback address): remove it from "
                    f"insecure_registries in houndd.toml",
                )
            )
        if status in (401, 403):
            raise pull_error(UNAUTHORIZED, f"{ref.registry}/{ref.repository}: HTTP {status}")
        if status == 404:
            raise pull_error(MANIFEST_UNKNOWN, f"{ref.registry}/{ref.repository}:{reference}")
        if status == 429 or status >= 500:
            raise pull_error(REGISTRY_UNREACHABLE, f"{ref.registry}: HTTP {status}")
        if status != 200:
            raise pull_error(PULL_FAILED, f"{ref.registry}: HTTP {status} for {url}")
        media_type = resp_headers.get("Content-Type", "").split(";", 1)[0].strip()
        if media_type not in _INDEX_TYPES and media_type not in (DOCKER_MANIFEST, OCI_MANIFEST):
            media_type = str(_decode(body).get("mediaType") or media_type)
        digest = resp_headers.get("Docker-Content-Digest") or (
            "sha256:" + hashlib.sha256(body).hexdigest()
        )
        return body, media_type, digest


class _Authorizer:
    """Adds credentials to registry requests, answering 401 challenges once per scheme."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ref: ImageRef,
        auth: RegistryAuth | None,
        timeout: aiohttp.ClientTimeout,
        tls: bool | ssl.SSLContext = True,
    ) -> None:
        self._session = session
        self._ref = ref
        self._auth = auth
        self._timeout = timeout
        self._tls = tls
        self._authorization: str | None = None

    async def get(
        self, url: str, headers: Mapping[str, str], limit: int
    ) -> tuple[int, Mapping[str, str], bytes]:
        status, resp_headers, body = await self._get(url, headers, limit)
        if status != 401 or not await self._answer(resp_headers.get("WWW-Authenticate", "")):
            return status, resp_headers, body
        return await self._get(url, headers, limit)

    async def request(
        self, url: str, headers: Mapping[str, str], limits: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        """A streaming GET (blobs), after answering one 401 challenge. The caller releases
        the response."""
        resp = await self._send(url, headers, limits)
        if resp.status == 401 and await self._answer(resp.headers.get("WWW-Authenticate", "")):
            resp.release()
            resp = await self._send(url, headers, limits)
        return resp

    async def _send(
        self, url: str, headers: Mapping[str, str], limits: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        all_headers = dict(headers)
        if self._authorization is not None:
            all_headers["Authorization"] = self._authorization
        # aiohttp drops Authorization when a redirect leaves the origin (blob storage URLs)
        return await self._session.get(
            url, headers=all_headers, timeout=limits, allow_redirects=True, ssl=self._tls
        )

    async def _answer(self, challenge: str) -> bool:
        """Set credentials for a 401 challenge; False if there is nothing to answer with."""
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if self._auth is None:
                return False
            self._authorization = _basic(self._auth)
            return True
        if scheme == "bearer":
            token = await self._token(params)
            if token is None:
                return False
            self._authorization = f"Bearer {token}"
            return True
        return False

    async def _get(
        self, url: str, headers: Mapping[str, str], limit: int
    ) -> tuple[int, Mapping[str, str], bytes]:
        all_headers = dict(headers)
        if self._authorization is not None:
            all_headers["Authorization"] = self._authorization
        async with self._session.get(
            url, headers=all_headers, timeout=self._timeout, allow_redirects=True, ssl=self._tls
        ) as resp:
            body = await resp.content.read(limit + 1)
            if len(body) > limit:
                raise pull_error(
                    PULL_FAILED, f"response from {self._ref.registry} over {limit} bytes"
                )
            return resp.status, dict(resp.headers), body

    async def _token(self, params: Mapping[str, str]) -> str | None:
        realm = params.get("realm")
        if not realm:
            return None
        query = {"scope": params.get("scope") or f"repository:{self._ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        headers = {} if self._auth is None else {"Authorization": _basic(self._auth)}
        try:
            async with self._session.get(
                realm, params=query, headers=headers, timeout=self._timeout, ssl=self._tls
            ) as resp:
                if resp.status in (401, 403):
                    return None
                if resp.status != 200:
                    raise pull_error(REGISTRY_UNREACHABLE, f"token endpoint: HTTP {resp.status}")
                raw = await resp.content.read(_MAX_TOKEN_BYTES + 1)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise pull_error(REGISTRY_UNREACHABLE, f"token endpoint: {type(e).__name__}") from None
        if len(raw) > _MAX_TOKEN_BYTES:
            raise pull_error(PULL_FAILED, "token response too large")
        data = _decode(raw)
        token = data.get("token") or data.get("access_token")
        return token if isinstance(token, str) and token else None


async def _addresses(registry: str) -> list[str]:
    """The IP addresses of the registry's host (for dockerd's insecure networks); none if it
    cannot be resolved, as dockerd does."""
    host = registry[1:].split("]", 1)[0] if registry.startswith("[") else registry
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return []  # a literal: RegistryTrust reads it itself
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def _tls_error(registry: str, e: aiohttp.ClientSSLError) -> PullError:
    text = str(e)
    if any(sign in text for sign in _PLAIN_HTTP_SIGNS):
        return pull_error(
            PULL_FAILED,
            f"{registry} answers in plain HTTP, not TLS: if it is meant to be plain HTTP, start "
            f"dockerd with --insecure-registry {registry} (houndd follows dockerd's /info) or "
            f"add it to insecure_registries in houndd.toml",
        )
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return pull_error(
            PULL_FAILED,
            f"{registry}: TLS certificate not trusted ({e.certificate_error}): put its CA in "
            f"{DOCKER_CERTS_DIR}/{registry}/ca.crt (dockerd and houndd read it) or mark it "
            f"insecure in dockerd (--insecure-registry {registry})",
        )
    return pull_error(PULL_FAILED, f"{registry}: TLS failed: {text[:200]}")


def _decode(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise pull_error(PULL_FAILED, "registry sent a manifest that is not JSON") from None
    if not isinstance(data, dict):
        raise pull_error(PULL_FAILED, "registry sent a manifest that is not a JSON object")
    return data


def _platform_entry(index: Mapping[str, Any], ref: str) -> str:
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict):
            continue
        platform = entry.get("platform") or {}
        if (platform.get("os"), platform.get("architecture")) == _PLATFORM:
            digest = entry.get("digest")
            if isinstance(digest, str) and digest:
                return digest
    raise pull_error(MANIFEST_UNKNOWN, f"{ref}: no linux/amd64 image in the index")


def _image_size(manifest: Mapping[str, Any], ref: str) -> int:
    try:
        config = manifest["config"]
        layers = manifest.get("layers") or []
        return int(config["size"]) + sum(int(layer["size"]) for layer in layers)
    except (KeyError, TypeError, ValueError):
        raise pull_error(PULL_FAILED, f"{ref}: manifest without config/layer sizes") from None
