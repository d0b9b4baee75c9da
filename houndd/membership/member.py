"""The member record (the paper's NIDB entry), which is also its wire form.

`Member` is what `houndd status` shows for one node. On the wire it is a map with short keys
(`id`, `name`, `host`, `port`, `labels`, `kernel`, `os`, `docker`, `disk`, `state`, `inc`,
`ver`; records of nodes older than `ver` lack it),
decoded strictly by `houndd.wire.schema` like every payload: each field is bounded, so a peer
(even an authenticated one) can neither make us hold unbounded data nor hand us a host that
would make `sendto` fail. `last_heard` is local and never travels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from houndd.wire.fields import Counter, Host, Labels, Name, NodeId, Port, ShortText
from houndd.wire.schema import LOCAL, wire_name

Address = tuple[str, int]


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

    node_id: NodeId = field(metadata=wire_name("id"))
    name: Name
    host: Host
    port: Port
    labels: Labels = field(default_factory=dict)
    kernel: ShortText = ""
    os: ShortText = ""
    docker_version: ShortText = field(default="", metadata=wire_name("docker"))
    free_disk_bytes: Counter = field(default=0, metadata=wire_name("disk"))
    state: MemberState = MemberState.ALIVE
    incarnation: Counter = field(default=0, metadata=wire_name("inc"))
    last_heard: float = field(default=0.0, metadata=LOCAL)
    version: ShortText = field(default="", metadata=wire_name("ver"))
    """Of houndd on that node, for `houndd status` during rolling upgrades."""

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
