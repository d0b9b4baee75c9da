"""`NodeState`: what the roles of one node's core share (sans IO).

The coordinator role, the worker role and replication (`coordinator_role.py`,
`worker_role.py`, `replication.py`) each keep their own bookkeeping; this is what they all read:
the node's identity, configuration and randomness, the election, the replicated plan state, the
failure detector's view, and the table of requests in flight (whose replies come back through
`NodeCore.response` / `request_failed`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from houndd.config import Config
from houndd.coordinator.election import Election
from houndd.coordinator.messages import Request
from houndd.coordinator.replica import ReplicaState

MAX_REQUESTS = 10_000
"""Requests in flight tracked at once; the shell answers every one (reply or failure), so the
oldest is dropped only if it does not."""


@dataclass
class NodeState:
    """The state the roles of one node share."""

    node_id: str
    config: Config
    rng: random.Random
    election: Election
    replica: ReplicaState
    alive: set[str] = field(default_factory=set)
    """Other members the failure detector sees alive (or suspect)."""
    names: dict[str, str] = field(default_factory=dict)
    """Node id -> name of every member."""
    wall: Callable[[], float] | None = None
    """The wall clock that stamps records; None: stamp with `now` (one fake clock)."""
    _requests: dict[int, tuple[str, Any]] = field(default_factory=dict)
    _next_token: int = 1

    @property
    def is_coordinator(self) -> bool:
        """True while this node acts as coordinator."""
        return self.election.is_coordinator

    def coordinator(self, now: float) -> str | None:
        """The coordinator this node hears (itself included), or None during an election."""
        return self.election.coordinator(now)

    def stamp(self, now: float) -> float:
        """The time to write into a record created at `now` (acceptance, cancel, result)."""
        return now if self.wall is None else self.wall()

    def request(self, node: str, payload: Any) -> Request:
        """A `Request` action whose reply (or failure) will find its way back by token."""
        token = self._next_token
        self._next_token += 1
        if len(self._requests) >= MAX_REQUESTS:
            self._requests.pop(next(iter(self._requests)))
        self._requests[token] = (node, payload)
        return Request(node, payload, token)

    def answered(self, token: int) -> tuple[str, Any] | None:
        """Forget a request (its reply arrived or it failed); (node, payload) if it was ours."""
        return self._requests.pop(token, None)
