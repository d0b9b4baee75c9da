"""Payloads the coordinator side exchanges with peers, and the actions its core returns.

Each payload class is the one payload of its `MsgType` (registered with `houndd.wire.payloads`)
and carries the replicated records themselves (`houndd.coordinator.records`): a plan, a cancel
or a result is the same object in the replica, on the wire and in the store. Every field is
bounded, so a decoded payload is safe to act on.

The forward protocol is typed too: a non-coordinator forwards a client's submission
(PLAN_FORWARD) and gets either the accepted plan (or, for a dry run, its `Preview`) or a
`Refusal` whose `kind` the API maps to HTTP (invalid plan: 400 naming the field; not the
coordinator: retry; replication failed: 503).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from houndd.coordinator.plan.model import MAX_DOCUMENT_BYTES
from houndd.coordinator.records import (
    CancelRecord,
    Group,
    PlanRecord,
    PlanWork,
    ResultRecord,
    Selector,
    Unresolved,
    Via,
)
from houndd.coordinator.replica import MAX_ABORTED, MAX_PLANS
from houndd.coordinator.scheduler import DispatchItem
from houndd.wire.fields import (
    MAX_ITEMS,
    NODE_ID_PATTERN,
    Counter,
    Digest,
    ImageName,
    Name,
    NodeId,
    NodeIdOrNone,
    PlanId,
    ShortText,
    Text,
    Timestamp,
)
from houndd.wire.payloads import message, msg_type_of
from houndd.wire.schema import Match, Size, wire_name
from houndd.wire.types import MsgType

MAX_DIGESTS = MAX_PLANS + MAX_ABORTED
"""Entries of an anti-entropy digest: every plan and tombstone a node may keep."""
MAX_HOLDINGS_QUERY = 1000
"""Images in one holdings query (about 150 bytes each: well inside a peer request's cap); a
node with more images in one plan is asked in several."""

Items = Annotated[tuple[DispatchItem, ...], Size(0, MAX_ITEMS)]
Images = Annotated[tuple[ImageName, ...], Size(0, MAX_ITEMS)]
ResultList = Annotated[tuple[ResultRecord, ...], Size(0, MAX_ITEMS)]
Digests = Annotated[dict[PlanId, ShortText], Size(0, MAX_DIGESTS)]
MAX_PEERS = 1000
"""Node ids one dispatch names as sharing a digest (a blob distribution tree's members)."""
NodeIdList = Annotated[
    str,
    Size(16, MAX_PEERS * 17),
    Match(f"{NODE_ID_PATTERN}(?:,{NODE_ID_PATTERN})*", "node ids separated by commas"),
]
"""Node ids joined by commas: one string to encode and check, not a thousand."""

# --- election ---------------------------------------------------------------------------------


@message(MsgType.HEARTBEAT)
@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Coordinator -> every alive member, every heartbeat_interval_s."""

    term: Counter
    coordinator: NodeId


@message(MsgType.FENCED)
@dataclass(frozen=True, slots=True)
class Fenced:
    """Reply to a coordinator message that was refused: the fencing record of the refuser
    (`coordinator` is empty when it accepted none yet)."""

    term: Counter
    coordinator: NodeIdOrNone


@message(MsgType.VOTE_REQUEST)
@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Candidate -> electorate."""

    term: Counter
    candidate: NodeId


@message(MsgType.VOTE_REPLY)
@dataclass(frozen=True, slots=True)
class VoteReply:
    """Voter -> candidate. `term` is the voter's current term after handling the request."""

    term: Counter
    voter: NodeId
    granted: bool


# --- replication --------------------------------------------------------------------------------


@message(MsgType.PLAN_PUT)
@dataclass(frozen=True, slots=True)
class PlanPut:
    """Coordinator -> replicas: store this plan durably, then answer PlanAck."""

    term: Counter
    coordinator: NodeId
    plan: PlanRecord


@message(MsgType.PLAN_ACK)
@dataclass(frozen=True, slots=True)
class PlanAck:
    """Replica -> coordinator, sent only after the plan is on disk."""

    plan_id: PlanId
    node: NodeId
    ok: bool


@message(MsgType.PLAN_ABORT)
@dataclass(frozen=True, slots=True)
class PlanAbort:
    """Coordinator -> everyone: drop this tentative plan (it was never acknowledged)."""

    term: Counter
    coordinator: NodeId
    plan_id: PlanId


@message(MsgType.RESULTS)
@dataclass(frozen=True, slots=True)
class Results:
    """Results travelling worker -> coordinator and coordinator -> everyone."""

    entries: ResultList


@message(MsgType.SYNC_DIGEST)
@dataclass(frozen=True, slots=True)
class SyncDigest:
    """Anti-entropy round start: plan_id -> hash of what the sender knows about that plan
    (`ReplicaState.digest`). `want_plans`: the sender coordinates and asks for the records
    of plans it lacks (a new coordinator's takeover round)."""

    digests: Digests
    want_plans: bool = False


@message(MsgType.SYNC_ITEMS)
@dataclass(frozen=True, slots=True)
class SyncItems:
    """What the other side lacks; `digests` (when set) asks the receiver to push back."""

    plans: Annotated[tuple[PlanRecord, ...], Size(0, MAX_PLANS)]
    cancels: Annotated[tuple[CancelRecord, ...], Size(0, MAX_PLANS)]
    aborted: Annotated[tuple[PlanId, ...], Size(0, MAX_ABORTED)]
    results: ResultList
    digests: Digests | None = None


@message(MsgType.CANCEL)
@dataclass(frozen=True, slots=True)
class Cancel:
    """Any node -> everyone: the plan is cancelled."""

    cancel: CancelRecord


@message(MsgType.CANCEL_REPLY)
@dataclass(frozen=True, slots=True)
class CancelReply:
    """Receipt for Cancel."""

    plan_id: PlanId
    ok: bool


@message(MsgType.PLAN_GET)
@dataclass(frozen=True, slots=True)
class PlanGet:
    """A node that does not hold a plan asks a holder for it (to serve a reader): the record
    (when `offset` is 0) and results from `offset` on. The asker holds the plan from then on,
    so the coordinator sends it the plan's outcomes."""

    plan_id: PlanId
    offset: Counter = 0


@message(MsgType.PLAN_GET_REPLY)
@dataclass(frozen=True, slots=True)
class PlanGetReply:
    """The plan (None: not held here), its cancel, and a page of its results; `more`: ask
    again from `offset + len(results)`."""

    plan: PlanRecord | None
    cancel: CancelRecord | None
    results: ResultList
    more: bool


@message(MsgType.PLAN_LIST)
@dataclass(frozen=True, slots=True)
class PlanList:
    """A node asks the coordinator for the plans it holds (to serve a reader)."""


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """One plan of a plan list, as the API shows it without items."""

    plan_id: PlanId = field(metadata=wire_name("id"))
    name: Name
    action: Literal["pull", "remove", "prune"]
    state: Literal["pending", "running", "done", "failed", "cancelled"]
    accepted_at: Timestamp
    committed: bool
    via: Via
    summary: Annotated[dict[ShortText, Counter], Size(0, 16)]


MAX_LISTED_PLANS = 1_000
"""A plan list from the coordinator holds its newest plans up to this many (at most about
650 bytes each, names and via at their longest: well inside a peer reply's body cap)."""


@message(MsgType.PLAN_LIST_REPLY)
@dataclass(frozen=True, slots=True)
class PlanListReply:
    """The coordinator's newest plans (at most MAX_LISTED_PLANS), newest first."""

    plans: Annotated[tuple[PlanSummary, ...], Size(0, MAX_LISTED_PLANS)]


# --- dispatch -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peers:
    """The nodes of a plan that need `digest` (blob sharing builds each blob's tree from
    them); at most MAX_PEERS, a cohort of a bigger group that every member of it is given."""

    digest: Digest
    nodes: NodeIdList


@message(MsgType.DISPATCH)
@dataclass(frozen=True, slots=True)
class Dispatch:
    """Coordinator -> worker: pull these items of this plan (fenced by term + coordinator),
    with what the worker needs to run them without holding the plan."""

    term: Counter
    coordinator: NodeId
    plan_id: PlanId
    items: Items
    work: PlanWork
    peers: Annotated[tuple[Peers, ...], Size(0, MAX_ITEMS)] = ()
    committed: bool = False
    """The plan was acknowledged: it outranks an abort tombstone the worker may hold."""


@message(MsgType.DISPATCH_REPLY)
@dataclass(frozen=True, slots=True)
class DispatchReply:
    """Worker -> coordinator: accepted, or refused with a reason (fenced, unknown plan).
    `results`: the worker's results of the dispatched items as it accepted them (pulling, or
    done/pulling already for a repeated dispatch), so no RESULTS message has to follow."""

    plan_id: PlanId
    node: NodeId
    accepted: bool
    reason: ShortText
    results: ResultList = ()


@message(MsgType.ABORT)
@dataclass(frozen=True, slots=True)
class AbortItems:
    """Coordinator -> worker: stop these images of a plan (fenced like a dispatch)."""

    term: Counter
    coordinator: NodeId
    plan_id: PlanId
    images: Images


# --- submission ---------------------------------------------------------------------------------


@message(MsgType.PLAN_FORWARD)
@dataclass(frozen=True, slots=True)
class PlanForward:
    """Any node -> coordinator: a client submitted this body to `via`. `dry_run`: answer
    what the plan would do (a `Preview`), store nothing."""

    body: Annotated[bytes, Size(1, MAX_DOCUMENT_BYTES)]
    content_type: ShortText
    via: Name
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    """An accepted submission, as the client sees it (the API's 201 body)."""

    plan_id: PlanId = field(metadata=wire_name("id"))
    name: Name
    action: Literal["pull", "remove", "prune"]
    groups: Annotated[tuple[Group, ...], Size(0, MAX_ITEMS)]
    unknown_nodes: Annotated[tuple[Name, ...], Size(0, MAX_ITEMS)]
    empty_selectors: Annotated[tuple[Selector, ...], Size(0, MAX_ITEMS)]
    unresolved: Annotated[dict[ImageName, Unresolved], Size(0, MAX_ITEMS)]
    coordinator: Name
    # node name -> images refused for lack of disk (they are failed items `no space`)
    no_space: Annotated[dict[Name, Images], Size(0, MAX_ITEMS)] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NodePreview:
    """What a plan would do on one target. `answered`: the node said which images it holds
    (else every image counts as lacking and nothing is checked); `no_space`: the images
    admission would fail for lack of disk."""

    node: Name
    answered: bool
    free_disk_bytes: Counter | None
    lacking: Images
    present: Images
    bytes_needed: Counter
    no_space: Images
    note: ShortText = ""  # why it did not answer


@dataclass(frozen=True, slots=True)
class Preview:
    """A dry run's answer (the API's 200 body for `POST /v1/plans?dry_run=true`): nothing
    was stored or pulled."""

    name: Name
    action: Literal["pull", "remove", "prune"]
    groups: Annotated[tuple[Group, ...], Size(0, MAX_ITEMS)]
    sizes: Annotated[dict[ImageName, Counter], Size(0, MAX_ITEMS)]
    nodes: Annotated[tuple[NodePreview, ...], Size(0, MAX_ITEMS)]
    unknown_nodes: Annotated[tuple[Name, ...], Size(0, MAX_ITEMS)]
    empty_selectors: Annotated[tuple[Selector, ...], Size(0, MAX_ITEMS)]
    unresolved: Annotated[dict[ImageName, Unresolved], Size(0, MAX_ITEMS)]
    coordinator: Name


RefusalKind = Literal["invalid-plan", "not-coordinator", "replication-failed"]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the coordinator did not accept a forwarded plan. `field` names the offending
    field of an invalid plan."""

    kind: RefusalKind
    reason: Text = ""
    field: ShortText = ""


@message(MsgType.PLAN_FORWARD_REPLY)
@dataclass(frozen=True, slots=True)
class PlanForwardReply:
    """Coordinator -> forwarding node: exactly one of `accepted`, `preview` (a dry run) and
    `refusal`."""

    accepted: Accepted | None = None
    refusal: Refusal | None = None
    preview: Preview | None = None

    def __post_init__(self) -> None:
        if [self.accepted, self.refusal, self.preview].count(None) != 2:
            raise ValueError("a forward reply carries one of accepted, preview or refusal")


# --- holdings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageAt:
    """An image at a digest."""

    image: ImageName
    digest: Digest


@message(MsgType.HOLDINGS)
@dataclass(frozen=True, slots=True)
class HoldingsQuery:
    """Coordinator -> target: which of these images do you hold at these digests, and how
    much disk is free? (dry runs and disk-aware admission)"""

    images: Annotated[tuple[ImageAt, ...], Size(0, MAX_HOLDINGS_QUERY)]


@message(MsgType.HOLDINGS_REPLY)
@dataclass(frozen=True, slots=True)
class HoldingsReply:
    """Target -> coordinator: the queried images it holds; its free disk (None: unknown)."""

    held: Annotated[tuple[ImageName, ...], Size(0, MAX_HOLDINGS_QUERY)]
    free_disk_bytes: Counter | None


# --- actions (core -> shell) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a datagram (best effort)."""

    node_id: str
    payload: Any

    @property
    def msg_type(self) -> MsgType:
        """The message type of the payload."""
        return msg_type_of(self.payload)


@dataclass(frozen=True, slots=True)
class Request:
    """Send a request; the shell calls `NodeCore.response(token, ...)` or `request_failed`."""

    node_id: str
    payload: Any
    token: int

    @property
    def msg_type(self) -> MsgType:
        """The message type of the payload."""
        return msg_type_of(self.payload)


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the message being handled (request response, or a datagram back)."""

    payload: Any

    @property
    def msg_type(self) -> MsgType:
        """The message type of the payload."""
        return msg_type_of(self.payload)


@dataclass(frozen=True, slots=True)
class Persist:
    """Durable writes. The shell applies them (fsync) before carrying out any later action."""

    records: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    """Local executor: pull these items of a plan (`work` says how; `peers` who else needs
    each digest)."""

    plan_id: str
    items: tuple[DispatchItem, ...]
    work: PlanWork
    peers: tuple[Peers, ...] = ()


@dataclass(frozen=True, slots=True)
class AbortLocal:
    """Local executor: stop these images of a plan (cancel or abort)."""

    plan_id: str
    images: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AckClient:
    """Answer the client whose submission carried `client_ref`."""

    client_ref: Any
    ok: bool
    reason: str = ""


Action = Send | Request | Reply | Persist | Execute | AbortLocal | AckClient
