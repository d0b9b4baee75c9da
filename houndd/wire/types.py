"""Message types and the refusal error of the wire protocol."""

from __future__ import annotations

from enum import IntEnum

from houndd.errors import WireError


class MsgType(IntEnum):
    """Peer message types.

    Only append: the values are on the wire, and nodes running different versions of houndd
    must agree on them during a rolling upgrade. Never renumber or reuse a value. Each live
    type has exactly one payload class (`houndd.wire.payloads`).
    """

    PING = 1
    PING_REQ = 2
    ACK = 3
    NACK = 4
    # 5, 6, 7 (ALIVE, SUSPECT, DEAD): retired, never reuse. Those updates ride in the "g"
    # list of the SWIM messages instead.
    PUSH_PULL = 8
    PUSH_PULL_REPLY = 9
    HEARTBEAT = 10
    VOTE_REQUEST = 11
    VOTE_REPLY = 12
    PLAN_PUT = 13
    PLAN_ACK = 14
    PLAN_FORWARD = 15
    PLAN_FORWARD_REPLY = 16
    DISPATCH = 17
    DISPATCH_REPLY = 18
    RESULTS = 19
    # 20 (RESULTS_ACK): retired, never reuse. A request with no answer gets RECEIPT.
    SYNC_DIGEST = 21
    SYNC_ITEMS = 22
    KEYRING_OP = 23
    KEYRING_REPLY = 24
    LABELS_SET = 25
    LABELS_REPLY = 26
    CANCEL = 27
    CANCEL_REPLY = 28
    GOSSIP = 29
    ERROR_REPLY = 30
    FENCED = 31
    PLAN_ABORT = 32
    ABORT = 33
    RECEIPT = 34  # the answer to a request that has nothing to say back
    BLOB_GET = 35  # a peer asks for a blob (POST /v1/peer/blob); the answer is a frame stream
    HOLDINGS = 36  # coordinator -> target: which of these images do you hold, how much disk?
    HOLDINGS_REPLY = 37
    PLAN_GET = 38  # a node that does not hold a plan asks a holder for it (to serve a reader)
    PLAN_GET_REPLY = 39
    PLAN_LIST = 40  # a node asks the coordinator for its plan list (to serve a reader)
    PLAN_LIST_REPLY = 41
    CERT_NEEDED = 42  # a datagram named a signing certificate the receiver does not hold


RETIRED_NUMBERS = frozenset({5, 6, 7, 20})
"""Message type numbers that were used once and must never be given to a new type."""


class WireRefused(WireError):
    """A peer message was refused. `reason` is a short stable name used as a metrics label
    (`oversize`, `unknown_key`, `decrypt`, `malformed`, `signature`, `replay_duplicate`, ...);
    the message text adds the detail for logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class CertUnknown(WireRefused):
    """A datagram named its signing certificate by reference, and this node does not hold
    that certificate (it restarted, or the datagram that carried it was lost). `node_id` is
    the claimed sender: not authenticated, only a hint of whom to ask for the certificate."""

    def __init__(self, node_id: str, generation: int) -> None:
        super().__init__("cert_unknown", f"certificate {generation} of {node_id} not held here")
        self.node_id = node_id
        self.generation = generation
