"""Payloads of membership's messages (SWIM, cluster keyring, labels) and of the bus itself.

Each class is the one payload of its `MsgType` (`houndd.wire.payloads`). The field names are
the keys on the wire; the gossip update keeps its short keys (`s`, `id`, `inc`, `by`, `m`),
since dozens of them ride on every datagram.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from houndd.membership.member import Member
from houndd.wire.fields import (
    MAX_LABELS,
    Counter,
    Host,
    LabelKey,
    Labels,
    LabelValue,
    NodeId,
    Port,
    ShortText,
    Text,
)
from houndd.wire.payloads import message
from houndd.wire.schema import Size, wire_name
from houndd.wire.types import MsgType

MAX_UPDATES_PER_MESSAGE = 256
"""Gossip updates one message may carry (caps the work one datagram can cause)."""
MAX_PUSH_PULL_MEMBERS = 4096
"""Members in one push-pull state; keeps a full state of a big cluster under the body cap."""
MAX_KEYS = 256
"""Keys one keyring listing may name."""

UpdateKind = Literal["alive", "suspect", "dead"]


@dataclass(frozen=True)
class Update:
    """The gossip unit: `by` says `node_id` is alive (with its record), suspect or dead at
    `incarnation`. A dead update with `by == node_id` announces a graceful leave."""

    kind: UpdateKind = field(metadata=wire_name("s"))
    node_id: NodeId = field(metadata=wire_name("id"))
    incarnation: Counter = field(metadata=wire_name("inc"))
    by: NodeId
    member: Member | None = field(metadata=wire_name("m"))

    def __post_init__(self) -> None:
        if self.kind == "alive":
            if self.member is None:
                raise ValueError("an alive update carries the member record")
            if self.member.node_id != self.node_id or self.member.incarnation != self.incarnation:
                raise ValueError("the member record does not match id and inc")
        elif self.member is not None:
            raise ValueError("only alive updates carry a member record")


Updates = Annotated[tuple[Update, ...], Size(0, MAX_UPDATES_PER_MESSAGE)]
MemberList = Annotated[tuple[Member, ...], Size(0, MAX_PUSH_PULL_MEMBERS)]


@message(MsgType.PING)
@dataclass(frozen=True)
class Ping:
    """Are you alive? `target` is the node id meant (the address may have changed hands)."""

    seq: Counter
    target: NodeId
    g: Updates


@message(MsgType.PING_REQ)
@dataclass(frozen=True)
class PingReq:
    """Please ping `target` at host:port for me and relay its ACK."""

    seq: Counter
    target: NodeId
    host: Host
    port: Port
    g: Updates


@message(MsgType.ACK)
@dataclass(frozen=True)
class Ack:
    """The answer to PING `seq`."""

    seq: Counter
    g: Updates


@message(MsgType.NACK)
@dataclass(frozen=True)
class Nack:
    """Lifeguard: a relay heard nothing from the target of PING_REQ `seq` (but is alive)."""

    seq: Counter
    g: Updates


@message(MsgType.GOSSIP)
@dataclass(frozen=True)
class Gossip:
    """Updates only (a gossip round, or a leave announcement)."""

    g: Updates


@message(MsgType.PUSH_PULL)
@dataclass(frozen=True)
class PushPull:
    """A full state exchange (`join`: the sender is joining through us)."""

    join: bool
    members: MemberList


@message(MsgType.PUSH_PULL_REPLY)
@dataclass(frozen=True)
class PushPullReply:
    """Our full state, in answer to PUSH_PULL."""

    members: MemberList


SwimPayload = Ping | PingReq | Ack | Nack | Gossip | PushPull | PushPullReply

KeyringOpName = Literal["install", "use", "remove", "list"]
Key = Annotated[bytes, Size(32, 32)]


@message(MsgType.KEYRING_OP)
@dataclass(frozen=True)
class KeyringOp:
    """Apply a cluster keyring operation on the receiving node (Serf's `keys` commands)."""

    op: KeyringOpName
    key: Key | None


@message(MsgType.KEYRING_REPLY)
@dataclass(frozen=True)
class KeyringReply:
    """The outcome: `error` (None: applied) and the fingerprints of the node's keys."""

    error: Text | None
    keys: Annotated[tuple[ShortText, ...], Size(0, MAX_KEYS)]


@message(MsgType.LABELS_SET)
@dataclass(frozen=True)
class LabelsSet:
    """Set (None: remove) labels of the receiving node."""

    labels: Annotated[dict[LabelKey, LabelValue | None], Size(0, MAX_LABELS)]


@message(MsgType.LABELS_REPLY)
@dataclass(frozen=True)
class LabelsReply:
    """The labels the node carries after LABELS_SET."""

    labels: Labels


@message(MsgType.ERROR_REPLY)
@dataclass(frozen=True)
class ErrorReply:
    """A request was refused or failed on the peer; `error` says why."""

    error: Text


@message(MsgType.CERT_NEEDED)
@dataclass(frozen=True)
class CertNeeded:
    """The sender could not check a datagram of ours: it does not hold the signing
    certificate the datagram named (it restarted, or the datagram that carried the
    certificate was lost). Our next datagram to it carries the certificate again."""

    generation: Counter


@message(MsgType.RECEIPT)
@dataclass(frozen=True)
class Receipt:
    """A request was handled and has nothing to answer."""
