"""Lifeguard suspicion timers: pure functions of (config numbers, N, confirmations, now).

A suspect is declared dead when its timer runs out. The timer starts at `max_s` and shrinks
logarithmically toward `min_s` as independent members confirm the suspicion (Lifeguard,
"dogpile"), so a suspicion nobody else shares takes longest and a widely shared one resolves fast.
"""

from __future__ import annotations

import math


def suspicion_timeout_s(mult: float, n: int, probe_interval_s: float) -> float:
    """The minimum suspicion timeout for a cluster of `n` members.

    `mult * max(1, log10(n + 1)) * probe_interval_s`: it grows with log(N) because gossip
    needs O(log N) rounds to reach the suspect, which needs that long to refute.
    """
    scale = max(1.0, math.log10(max(1, n) + 1))
    return mult * scale * probe_interval_s


def retransmit_limit(mult: int, n: int) -> int:
    """How many times one gossip update is piggybacked: `mult * ceil(log10(n + 1))`, min 1."""
    return max(1, mult * math.ceil(math.log10(max(1, n) + 1)))


def expected_confirmations(mult: float, n: int) -> int:
    """Independent confirmations after which the timer reaches its minimum (memberlist's k).

    `mult - 2`, but 0 when fewer than that many other members could confirm at all, because a
    small cluster would otherwise always wait the full maximum.
    """
    k = max(0, int(mult) - 2)
    return 0 if n - 2 < k else k


class Suspicion:
    """The timer for one suspect member.

    `confirm(origin)` records an independent accuser (the first accuser and repeats do not
    count); `deadline` is when the member is declared dead.
    """

    __slots__ = ("_confirmations", "first_accuser", "k", "max_s", "min_s", "start")

    def __init__(self, *, start: float, min_s: float, max_s: float, k: int, first_accuser: str):
        self.start = start
        self.min_s = min_s
        self.max_s = max(max_s, min_s)
        self.k = k
        self.first_accuser = first_accuser
        self._confirmations: set[str] = set()

    @property
    def confirmations(self) -> int:
        """Independent confirmations seen so far."""
        return len(self._confirmations)

    def confirm(self, origin: str) -> bool:
        """Count `origin` as a confirmation; True if it was new and may shorten the timer."""
        if origin == self.first_accuser or origin in self._confirmations:
            return False
        if len(self._confirmations) >= self.k:
            return False  # the timer is at its minimum already; also bounds the set
        self._confirmations.add(origin)
        return True

    def timeout_s(self) -> float:
        """Current timeout: from max_s down to min_s as confirmations approach k."""
        if self.k < 1:
            return self.min_s
        frac = math.log(self.confirmations + 1) / math.log(self.k + 1)
        return max(self.min_s, self.max_s - (self.max_s - self.min_s) * frac)

    @property
    def deadline(self) -> float:
        """Absolute time at which the suspect is declared dead."""
        return self.start + self.timeout_s()
