"""Payloads the coordinator core exchanges with peers, and the actions it asks its shell to do.

Payloads are frozen dataclasses made only of str, int, float, bool, None, tuples, dicts with
str keys, and other payload dataclasses, so they are msgpack/JSON-able as they are.
`to_wire(payload)` / `from_wire(msg_type, obj)` convert to and from plain maps with strict
decoding (unknown or missing fields raise `WireError`). Message type names are the names of
`houndd.wire.MsgType` members; the shell maps them with `MsgType[name]`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from houndd.errors import WireError

# --- payloads -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Coordinator -> every alive member, every heartbeat_interval_s."""

    term: int
    coordinator: str


@dataclass(frozen=True, slots=True)
class Fenced:
    """Reply to a coordinator message that was refused: the fencing record of the refuser."""

    term: int
    coordinator: str


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Candidate -> electorate."""

    term: int
    candidate: str


@dataclass(frozen=True, slots=True)
class VoteReply:
    """Voter -> candidate. `term` is the voter's current term after handling the request."""

    term: int
    voter: str
    granted: bool


@dataclass(frozen=True, slots=True)
class PlanItemWire:
    """One (node, image) of a plan, with its resolved digest and size."""

    node_id: str
    image: str
    digest: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class PlanWire:
    """A plan record as it travels: immutable document, items, acceptance time, commit flag."""

    plan_id: str
    document: Mapping[str, Any]
    items: tuple[PlanItemWire, ...]
    accepted_at: float
    committed: bool


@dataclass(frozen=True, slots=True)
class PlanPut:
    """Coordinator -> replicas: store this plan durably, then answer PlanAck."""

    term: int
    coordinator: str
    plan: PlanWire


@dataclass(frozen=True, slots=True)
class PlanAck:
    """Replica -> coordinator, sent only after the plan is on disk."""

    plan_id: str
    node: str
    ok: bool


@dataclass(frozen=True, slots=True)
class PlanAbort:
    """Coordinator -> everyone: drop this tentative plan (it was never acknowledged)."""

    term: int
    coordinator: str
    plan_id: str


@dataclass(frozen=True, slots=True)
class PlanForward:
    """Any node -> coordinator: a client submitted this plan to me (the shell handles it)."""

    plan_id: str
    document: Mapping[str, Any]
    items: tuple[PlanItemWire, ...]


@dataclass(frozen=True, slots=True)
class PlanReply:
    """Coordinator -> forwarding node: the outcome of a forwarded submission."""

    plan_id: str
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class DispatchItemWire:
    """One image a worker should pull now."""

    image: str
    digest: str
    attempt: int
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Coordinator -> worker: pull these items of this plan (fenced by term + coordinator)."""

    term: int
    coordinator: str
    plan_id: str
    items: tuple[DispatchItemWire, ...]


@dataclass(frozen=True, slots=True)
class AbortItems:
    """Coordinator -> worker: stop these images of a plan (fenced like a dispatch)."""

    term: int
    coordinator: str
    plan_id: str
    images: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DispatchReply:
    """Worker -> coordinator: accepted, or refused with a reason (fenced, unknown plan)."""

    plan_id: str
    node: str
    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """One result of the lattice, keyed by (plan, node, image); `result` is ItemResult.to_dict()."""

    plan_id: str
    node_id: str
    image: str
    result: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Results:
    """Results travelling worker -> coordinator and coordinator -> everyone."""

    entries: tuple[ResultEntry, ...]


@dataclass(frozen=True, slots=True)
class ResultsAck:
    """Receipt for Results (how many entries were merged)."""

    count: int


@dataclass(frozen=True, slots=True)
class CancelWire:
    """A cancel record: immutable plan documents are cancelled by a separate record."""

    plan_id: str
    cancelled_at: float


@dataclass(frozen=True, slots=True)
class SyncDigest:
    """Anti-entropy round start: plan_id -> hash of everything known about that plan."""

    digests: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SyncItems:
    """What the other side lacks; `digests` (when set) asks the receiver to push back."""

    plans: tuple[PlanWire, ...]
    cancels: tuple[CancelWire, ...]
    aborted: tuple[str, ...]
    results: tuple[ResultEntry, ...]
    digests: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    """Any node -> everyone: the plan is cancelled."""

    cancel: CancelWire


@dataclass(frozen=True, slots=True)
class CancelReply:
    """Receipt for Cancel."""

    plan_id: str
    ok: bool


Payload = (
    Heartbeat
    | Fenced
    | VoteRequest
    | VoteReply
    | PlanPut
    | PlanAck
    | PlanAbort
    | PlanForward
    | PlanReply
    | Dispatch
    | DispatchReply
    | AbortItems
    | Results
    | ResultsAck
    | SyncDigest
    | SyncItems
    | Cancel
    | CancelReply
)

#: Message type name (a `houndd.wire.MsgType` member name) -> payload class.
PAYLOADS: dict[str, type[Any]] = {
    "HEARTBEAT": Heartbeat,
    "FENCED": Fenced,
    "VOTE_REQUEST": VoteRequest,
    "VOTE_REPLY": VoteReply,
    "PLAN_PUT": PlanPut,
    "PLAN_ACK": PlanAck,
    "PLAN_ABORT": PlanAbort,
    "PLAN_FORWARD": PlanForward,
    "PLAN_REPLY": PlanReply,
    "DISPATCH": Dispatch,
    "DISPATCH_REPLY": DispatchReply,
    "ABORT": AbortItems,
    "RESULTS": Results,
    "RESULTS_ACK": ResultsAck,
    "SYNC_DIGEST": SyncDigest,
    "SYNC_ITEMS": SyncItems,
    "CANCEL": Cancel,
    "CANCEL_REPLY": CancelReply,
}
MSG_TYPE: dict[type[Any], str] = {cls: name for name, cls in PAYLOADS.items()}

# --- actions (core -> shell) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a datagram (best effort)."""

    node_id: str
    msg_type: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Request:
    """Send a request; the shell calls `NodeCore.response(token, ...)` or `request_failed`."""

    node_id: str
    msg_type: str
    payload: Any
    token: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the message being handled (request response, or a datagram back)."""

    msg_type: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Persist:
    """Durable writes. The shell applies them (fsync) before carrying out any later action."""

    records: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    """Local executor: pull these items of a plan."""

    plan_id: str
    items: tuple[DispatchItemWire, ...]


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

# --- codec --------------------------------------------------------------------------------


def to_wire(value: Any) -> Any:
    """Payload dataclass -> plain msgpack/JSON-able value (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


def from_wire(msg_type: str, obj: Any) -> Any:
    """Decode a plain value into the payload class of `msg_type`; WireError if it does not fit."""
    cls = PAYLOADS.get(msg_type)
    if cls is None:
        raise WireError(f"unknown coordinator message type {msg_type!r}")
    return _decode(cls, obj, msg_type)


_MAX_DEPTH = 32


def _decode(tp: Any, obj: Any, where: str, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"{where}: nested too deeply")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(obj, Mapping):
            raise WireError(f"{where}: expected a map")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(obj) - set(fields)
        if unknown:
            raise WireError(f"{where}: unknown fields {sorted(map(str, unknown))}")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in obj:
                if f.default is not dataclasses.MISSING:
                    continue
                raise WireError(f"{where}: missing field {name!r}")
            kwargs[name] = _decode(hints[name], obj[name], f"{where}.{name}", depth + 1)
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if obj is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], obj, where, depth + 1)
    if origin is tuple:
        if not isinstance(obj, list | tuple):
            raise WireError(f"{where}: expected a list")
        return tuple(_decode(args[0], v, f"{where}[]", depth + 1) for v in obj)
    if origin is Mapping or tp is Mapping:
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
            raise WireError(f"{where}: expected a map with string keys")
        value_type = args[1] if args else Any
        return {k: _decode(value_type, v, f"{where}.{k}", depth + 1) for k, v in obj.items()}
    if tp is Any:
        return obj
    if tp is bool:
        if not isinstance(obj, bool):
            raise WireError(f"{where}: expected a boolean")
        return obj
    if tp is int:
        if not isinstance(obj, int) or isinstance(obj, bool):
            raise WireError(f"{where}: expected an integer")
        return obj
    if tp is float:
        if not isinstance(obj, int | float) or isinstance(obj, bool):
            raise WireError(f"{where}: expected a number")
        return float(obj)
    if tp is str:
        if not isinstance(obj, str):
            raise WireError(f"{where}: expected a string")
        return obj
    raise WireError(f"{where}: unsupported type {tp!r}")  # a bug in a payload class
