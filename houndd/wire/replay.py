"""Replay defence: timestamp window, boot epochs and a sliding sequence window per sender.

A message is accepted once. Per sender we keep the boot epoch and an RFC 6479 style window: the
highest sequence number seen and a bitmap of which of the `seq_window` numbers below it were
seen. Numbers below the window are refused (they could be replays we can no longer tell apart),
numbers inside it are accepted once, in any order. A newer boot epoch (the sender restarted and
counts from 1 again) resets the window; an older one is refused. The timestamp check bounds how
long a captured message stays usable at all, which is what makes forgetting senders safe.

This state lives in memory, so a restart would forget it and reopen the window for every
message sent in the `window_s` before. `started_at` closes that: a message whose timestamp is
older than this node's own start is refused (`replay_restart`), whatever its sequence number.
Nothing sent to us before our start can be an answer we wait for, so a legitimate peer loses
at most what was in flight at that instant. The cost is clock skew: a peer whose clock lags
ours by d seconds is refused for the first d seconds after our start (and a peer that lags by
more than `window_s` is refused always, as before). Once `window_s` has passed since the start,
the timestamp check alone refuses everything older, and the floor is dropped, so a later
step of our own clock backwards cannot turn it into a lasting refusal.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from houndd.wire.types import WireRefused


@dataclass
class _Window:
    epoch: int
    highest: int
    bitmap: int  # bit i set: sequence number `highest - i` was seen


class ReplayGuard:
    """Per-sender replay state. Pure: the caller passes `now`."""

    def __init__(
        self,
        *,
        window_s: float = 30.0,
        seq_window: int = 1024,
        max_senders: int = 4096,
        started_at: float | None = None,
    ) -> None:
        """`started_at`: this node's start (wall clock, like message timestamps); messages
        stamped before it are refused. None keeps no floor (tests of the window alone)."""
        if window_s <= 0 or seq_window < 1 or max_senders < 1:
            raise ValueError("window_s, seq_window and max_senders must be positive")
        self._window_s = window_s
        self._started_at = started_at
        self._seq_window = seq_window
        self._mask = (1 << seq_window) - 1
        # Bounded: a forgotten sender's old messages are refused by the timestamp check once
        # window_s has passed; the bound caps memory, senders are authenticated members.
        self._max_senders = max_senders
        self._senders: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._senders)

    def accept(self, sender: str, boot_epoch: int, seq: int, ts: float, now: float) -> None:
        """Record the message or raise WireRefused (`replay_time`, `replay_restart`,
        `replay_epoch`, `replay_old`, `replay_duplicate`). Only accepted messages change the
        state."""
        if self._started_at is not None and now > self._started_at + self._window_s:
            self._started_at = None  # the timestamp check now refuses anything older
        if not math.isfinite(ts) or abs(ts - now) > self._window_s:
            raise WireRefused(
                "replay_time", f"timestamp of {sender} is {ts - now:+.1f} s away from ours"
            )
        if self._started_at is not None and ts < self._started_at:
            raise WireRefused(
                "replay_restart",
                f"message of {sender} stamped {self._started_at - ts:.1f} s before our start",
            )
        window = self._senders.get(sender)
        if window is None or boot_epoch > window.epoch:
            self._remember(sender, _Window(epoch=boot_epoch, highest=seq, bitmap=1))
            return
        if boot_epoch < window.epoch:
            raise WireRefused(
                "replay_epoch", f"boot epoch {boot_epoch} of {sender} is older than {window.epoch}"
            )
        if seq > window.highest:
            shift = seq - window.highest
            # A jump past the whole window forgets it; masking keeps the bitmap at seq_window bits.
            if shift >= self._seq_window:
                window.bitmap = 1
            else:
                window.bitmap = ((window.bitmap << shift) | 1) & self._mask
            window.highest = seq
        else:
            behind = window.highest - seq
            if behind >= self._seq_window:
                raise WireRefused(
                    "replay_old", f"sequence {seq} of {sender} is below the replay window"
                )
            bit = 1 << behind
            if window.bitmap & bit:
                raise WireRefused("replay_duplicate", f"sequence {seq} of {sender} seen before")
            window.bitmap |= bit
        self._senders.move_to_end(sender)

    def _remember(self, sender: str, window: _Window) -> None:
        self._senders[sender] = window
        self._senders.move_to_end(sender)
        if len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
