"""Node labels: the rules for keys and values, their persistence, and `houndd label`.

Labels are part of the member record and spread with it by gossip. Only the node that carries
them changes them: a change for another node travels there as LABELS_SET, and that node writes
`state_dir/labels.json` (the full set, atomically and durably) before it gossips the new record,
so a restart keeps them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path

from houndd.config import Config
from houndd.errors import HounddError
from houndd.keyfiles import atomic_write
from houndd.membership.bus import Bus, Message, UnknownMemberError
from houndd.membership.messages import LabelsReply, LabelsSet
from houndd.membership.service import Membership
from houndd.wire.fields import MAX_LABELS, label_key_problem, label_value_problem
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.membership")

LABELS_FILE = "labels.json"


class LabelError(HounddError, ValueError):
    """Invalid label key or value; keys are 1..63 letters, digits and - _ . /, values up to
    253 characters."""


def check_label_changes(labels: Mapping[str, object]) -> None:
    """Raise `LabelError` unless every key is valid and every value a valid string or None."""
    if len(labels) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels per change")
    for k, v in labels.items():
        problem = label_key_problem(k) if isinstance(k, str) else "a label key is a string"
        if problem is None and v is not None:
            problem = label_value_problem(v) if isinstance(v, str) else "a value is a string"
        if problem is not None:
            raise LabelError(f"label {str(k)[:64]!r}: {problem}")


def load_labels(state_dir: Path) -> dict[str, str] | None:
    """Labels persisted by `save_labels` (the full set), or None if never set or unreadable."""
    path = state_dir / LABELS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable labels file path=%s err=%s", path, e)
        return None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        log.warning("ignoring malformed labels file path=%s", path)
        return None
    try:
        check_label_changes(data)
    except LabelError as e:
        log.warning("ignoring labels file path=%s err=%s", path, e)
        return None
    return data


def save_labels(state_dir: Path, labels: Mapping[str, str]) -> None:
    """Write `state_dir/labels.json` atomically and durably (0644: labels are not secret)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(dict(labels), indent=2, sort_keys=True).encode()
    atomic_write(state_dir / LABELS_FILE, data, mode=0o644)


class Labels:
    """Label changes of this node and, through the bus, of any other member."""

    def __init__(self, config: Config, bus: Bus, membership: Membership) -> None:
        self._config = config
        self._bus = bus
        self._membership = membership
        bus.register(MsgType.LABELS_SET, self._on_labels_set)

    async def restore(self) -> None:
        """Apply the labels persisted by an earlier run (they outrank the config's)."""
        persisted = await asyncio.to_thread(load_labels, self._config.state_path)
        if persisted is not None and persisted != self._membership.local.labels:
            self._membership.update_local(labels=persisted)

    async def set(self, node_name: str, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Set (None: remove) labels of the node called `node_name`; that node persists and
        gossips them. Returns its resulting labels."""
        check_label_changes(changes)
        member = self._membership.by_name(node_name)
        if member is None:
            raise UnknownMemberError(f"no member named {node_name!r}; see `houndd status`")
        if member.node_id == self._bus.node_id:
            return await self._apply(changes)
        reply = await self._bus.request_typed(member.node_id, LabelsSet(dict(changes)), LabelsReply)
        return dict(reply.labels)

    async def _apply(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        labels = dict(self._membership.local.labels)
        for k, v in changes.items():
            if v is None:
                labels.pop(k, None)
            else:
                labels[k] = v
        if len(labels) > MAX_LABELS:
            raise LabelError(f"a node carries at most {MAX_LABELS} labels")
        await asyncio.to_thread(save_labels, self._config.state_path, labels)
        self._membership.update_local(labels=labels)
        log.info("labels changed labels=%s", ",".join(f"{k}={v}" for k, v in labels.items()))
        return labels

    async def _on_labels_set(self, msg: Message) -> LabelsReply:
        assert isinstance(msg.payload, LabelsSet)  # the bus decodes by type
        return LabelsReply(await self._apply(msg.payload.labels))
