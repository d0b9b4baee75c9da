"""Docker image references, parsed exactly per the distribution/reference grammar.

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain '/'] remote-name
    domain           := host [':' port-number]
    host             := domain-name | '[' IPv6address ']'
    domain-name      := domain-component ['.' domain-component]*
    domain-component := /([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])/
    remote-name      := path-component ['/' path-component]*
    path-component   := alpha-numeric [separator alpha-numeric]*
    alpha-numeric    := /[a-z0-9]+/
    separator        := /[_.]|__|[-]+/
    tag              := /[\\w][\\w.-]{0,127}/
    digest           := algorithm ":" hex

Familiar names are normalized the way `docker pull` does (docker/normalize.go): the first
path component is a domain only if it contains "." or ":" or is "localhost" (or has upper case
letters, which a path component cannot); otherwise the domain is docker.io, and a single
component gets the `library/` prefix. Docker Hub is served from `registry-1.docker.io`.
A reference with neither tag nor digest means the tag `latest`.

Digests: sha256 (64 hex), sha384 (96) and sha512 (128), lower case: the algorithms go-digest
registers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from houndd.errors import PlanError

__all__ = [
    "DEFAULT_TAG",
    "DOCKER_HUB_DOMAIN",
    "DOCKER_HUB_REGISTRY",
    "ImageRef",
    "InvalidReference",
    "normalize_registry",
    "parse_digest",
    "parse_reference",
]

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_LEGACY_HUB_DOMAINS = frozenset({"index.docker.io", DOCKER_HUB_REGISTRY})
_OFFICIAL_PREFIX = "library/"

# distribution/reference: NameTotalLengthMax; bounds the work of a hostile reference, too.
NAME_TOTAL_LENGTH_MAX = 255
# Longer input cannot be a valid reference (name 255 + tag 129 + sha512 digest 136).
_MAX_REFERENCE_CHARS = 600

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
_REMOTE_NAME_RE = re.compile(_REMOTE_NAME, re.ASCII)
_TAG_RE = re.compile(_TAG, re.ASCII)
_DIGEST_RE = re.compile(_DIGEST, re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX = re.compile(r"[a-f0-9]+", re.ASCII)


class InvalidReference(PlanError):
    """Not a valid image reference. Also a `PlanError` (and so a `ValueError`)."""


def _excerpt(s: str) -> str:
    return repr(s if len(s) <= 80 else s[:77] + "...")


def normalize_registry(domain: str) -> str:
    """The host to talk to for `domain`: Docker Hub's aliases become registry-1.docker.io."""
    low = domain.lower()
    if low == DOCKER_HUB_DOMAIN or low in _LEGACY_HUB_DOMAINS:
        return DOCKER_HUB_REGISTRY
    return domain


def parse_digest(digest: str, *, field: str = "digest") -> str:
    """Check a content digest (`sha256:<64 hex>`, sha384, sha512) and return it."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(field, f"invalid digest {_excerpt(str(digest))}")
    algorithm, _, hex_ = digest.partition(":")
    expected = _DIGEST_HEX_LEN.get(algorithm)
    if expected is None:
        raise InvalidReference(field, f"unsupported digest algorithm {algorithm!r}")
    if len(hex_) != expected or not _LOWER_HEX.fullmatch(hex_):
        raise InvalidReference(
            field, f"invalid {algorithm} digest: expected {expected} lower-case hex digits"
        )
    return digest


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A parsed, normalized image reference.

    `registry` is the host to contact (`registry-1.docker.io` for Docker Hub), `repository`
    the full path (`library/busybox`), `tag` is None only when a digest is given without one.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def domain(self) -> str:
        """The domain as Docker names it (`docker.io` for the Hub)."""
        return DOCKER_HUB_DOMAIN if self.registry == DOCKER_HUB_REGISTRY else self.registry

    @property
    def familiar_repository(self) -> str:
        """The shortest name Docker accepts for the repository (`busybox`, `me/app`,
        `registry.local:5000/app`)."""
        if self.registry == DOCKER_HUB_REGISTRY:
            if self.repository.startswith(_OFFICIAL_PREFIX) and self.repository.count("/") == 1:
                return self.repository[len(_OFFICIAL_PREFIX) :]
            return self.repository
        return f"{self.registry}/{self.repository}"

    @property
    def name(self) -> str:
        """The familiar form with tag and digest: `busybox:1.36`, `me/app@sha256:...`."""
        return self.familiar_repository + self._suffix()

    @property
    def canonical(self) -> str:
        """The fully qualified form: `docker.io/library/busybox:1.36`."""
        return f"{self.domain}/{self.repository}{self._suffix()}"

    @property
    def pull_ref(self) -> str:
        """What to pull: the repository at the digest if known, else at the tag."""
        repo = f"{self.domain}/{self.repository}"
        if self.digest:
            return f"{repo}@{self.digest}"
        return f"{repo}:{self.tag or DEFAULT_TAG}"

    def with_digest(self, digest: str) -> ImageRef:
        """The same reference pinned to `digest` (the tag is kept for tagging locally)."""
        return ImageRef(self.registry, self.repository, self.tag, parse_digest(digest))

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag is not None else ""
        return out + (f"@{self.digest}" if self.digest is not None else "")

    def __str__(self) -> str:
        return self.name


def _check_reference_text(s: object, field: str) -> None:
    if not isinstance(s, str):
        raise InvalidReference(field, f"expected an image reference string, got {type(s).__name__}")
    if not s:
        raise InvalidReference(field, "empty image reference")
    if len(s) > _MAX_REFERENCE_CHARS:
        raise InvalidReference(field, f"image reference longer than {_MAX_REFERENCE_CHARS} chars")
    if _IDENTIFIER_RE.fullmatch(s):
        raise InvalidReference(
            field, "a 64-hex-digit image ID is not a reference; use name@sha256:<id>"
        )


def parse_reference(s: str, *, field: str = "image") -> ImageRef:
    """Parse an image reference the way `docker pull` does.

    Raises `InvalidReference(field, reason)` (a `PlanError`), so a plan validator passes the
    field path (`targets[0].images[1]`) and the error names it.
    """
    _check_reference_text(s, field)
    rest, at, digest = s.partition("@")
    if at:
        parse_digest(digest, field=field)
    # A ':' after the last '/' starts the tag; one before it belongs to the domain's port.
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag: str | None = None
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(field, f"invalid tag {_excerpt(tag)} in {_excerpt(s)}")

    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain = first
        if not _DOMAIN_RE.fullmatch(domain):
            raise InvalidReference(field, f"invalid registry host {_excerpt(domain)}")
    else:
        domain, remainder = DOCKER_HUB_DOMAIN, rest

    if not remainder:
        raise InvalidReference(field, f"missing repository name in {_excerpt(s)}")
    if remainder.lower() != remainder:
        raise InvalidReference(field, f"repository name must be lowercase: {_excerpt(s)}")
    if not _REMOTE_NAME_RE.fullmatch(remainder):
        raise InvalidReference(field, f"invalid reference format: {_excerpt(s)}")

    registry = normalize_registry(domain)
    repository = remainder
    if registry == DOCKER_HUB_REGISTRY and "/" not in repository:
        repository = _OFFICIAL_PREFIX + repository
    full_name = f"{DOCKER_HUB_DOMAIN if registry == DOCKER_HUB_REGISTRY else domain}/{repository}"
    if len(full_name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(
            field, f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters"
        )
    if tag is None and not at:
        tag = DEFAULT_TAG
    return ImageRef(registry, repository, tag, digest if at else None)
