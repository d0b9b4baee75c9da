"""The member record (the paper's NIDB entry) and its strict wire form.

`Member` is what `houndd status` shows for one node. Its wire form is a msgpack-able dict with
short keys; `Member.from_wire` rejects anything unexpected with `WireError`, and bounds every
string so a peer (even an authenticated one) cannot make us hold unbounded data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from houndd.errors import WireError

Address = tuple[str, int]

# Bounds on what one member record may carry. They cap the memory a peer can force per member
# and keep one full push-pull state of a few hundred nodes well under the HTTP body cap.
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 256
MAX_TEXT_CHARS = 256


class MemberState(StrEnum):
    """SWIM state of a member, as this node believes it."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"  # announced its own departure; never suspected, reaped like dead


@dataclass(frozen=True)
class Member:
    """One node as this node sees it (the NIDB record).

    `incarnation` only ever grows and is bumped by the node itself (refutation, metadata
    change). `last_heard` is local: when this node last got an authenticated message from it.
    """

    node_id: str
    name: str
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    kernel: str = ""
    os: str = ""
    docker_version: str = ""
    free_disk_bytes: int = 0
    state: MemberState = MemberState.ALIVE
    incarnation: int = 0
    last_heard: float = 0.0
    version: str = ""  # of houndd on that node, for `houndd status` during rolling upgrades

    @property
    def address(self) -> Address:
        """Where its UDP gossip and HTTP peer endpoint listen."""
        return (self.host, self.port)

    def replace(self, **changes: Any) -> Member:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def same_metadata(self, other: Member) -> bool:
        """True if everything a peer gossips (besides state/incarnation) is equal."""
        return (
            self.name == other.name
            and self.host == other.host
            and self.port == other.port
            and self.labels == other.labels
            and self.kernel == other.kernel
            and self.os == other.os
            and self.docker_version == other.docker_version
            and self.free_disk_bytes == other.free_disk_bytes
            and self.version == other.version
        )

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-able form gossiped to peers (without the local `last_heard`)."""
        return {
            "id": self.node_id,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "labels": dict(self.labels),
            "kernel": self.kernel,
            "os": self.os,
            "docker": self.docker_version,
            "disk": self.free_disk_bytes,
            "state": self.state.value,
            "inc": self.incarnation,
            "ver": self.version,
        }

    @classmethod
    def from_wire(cls, obj: object) -> Member:
        """Strictly decode `to_wire()` output; `WireError` names the offending field."""
        d = _exact_keys(obj, _MEMBER_KEYS, "member", optional=_OPTIONAL_MEMBER_KEYS)
        port = _int(d, "port", "member")
        if not 0 < port < 65536:
            raise WireError(f"member.port: expected 1..65535, got {port}")
        labels_obj = d["labels"]
        if not isinstance(labels_obj, dict) or len(labels_obj) > MAX_LABELS:
            raise WireError(f"member.labels: expected a map of at most {MAX_LABELS} entries")
        labels: dict[str, str] = {}
        for k, v in labels_obj.items():
            if (
                not isinstance(k, str)
                or not isinstance(v, str)
                or not 0 < len(k) <= MAX_LABEL_KEY_CHARS
                or len(v) > MAX_LABEL_VALUE_CHARS
            ):
                raise WireError("member.labels: expected short string keys and values")
            labels[k] = v
        try:
            state = MemberState(_str(d, "state", "member"))
        except ValueError:
            raise WireError(f"member.state: unknown state {d['state']!r}") from None
        disk = _int(d, "disk", "member")
        inc = _int(d, "inc", "member")
        if disk < 0 or inc < 0:
            raise WireError("member: disk and inc must not be negative")
        node_id = _str(d, "id", "member")
        if not node_id:
            raise WireError("member.id: must not be empty")
        return cls(
            node_id=node_id,
            name=_str(d, "name", "member"),
            host=_str(d, "host", "member"),
            port=port,
            labels=labels,
            kernel=_str(d, "kernel", "member"),
            os=_str(d, "os", "member"),
            docker_version=_str(d, "docker", "member"),
            free_disk_bytes=disk,
            state=state,
            incarnation=inc,
            version=_str(d, "ver", "member") if "ver" in d else "",
        )


_MEMBER_KEYS = frozenset(
    {"id", "name", "host", "port", "labels", "kernel", "os", "docker", "disk", "state", "inc"}
)
# Keys added after the first release: records gossiped by older nodes lack them.
_OPTIONAL_MEMBER_KEYS = frozenset({"ver"})


def _exact_keys(
    obj: object, keys: frozenset[str], what: str, *, optional: frozenset[str] = frozenset()
) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a map, got {type(obj).__name__}")
    got = set(obj) - optional
    if got != keys:
        missing = sorted(keys - got)
        unknown = sorted(str(k) for k in got - keys)
        raise WireError(f"{what}: missing fields {missing}, unknown fields {unknown}")
    return obj


def _str(d: Mapping[str, Any], key: str, what: str) -> str:
    v = d[key]
    if not isinstance(v, str) or len(v) > MAX_TEXT_CHARS:
        raise WireError(f"{what}.{key}: expected a string of at most {MAX_TEXT_CHARS} chars")
    return v


def _int(d: Mapping[str, Any], key: str, what: str) -> int:
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError(f"{what}.{key}: expected an integer")
    return v
