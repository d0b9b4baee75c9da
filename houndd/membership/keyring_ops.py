"""Cluster-wide keyring operations (Serf's `keys install | use | remove | list`).

An operation is applied on every alive member over the bus (KEYRING_OP), this node last, and
each node answers with its outcome and the fingerprints of its keys; keys themselves never leave
a node in a reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from houndd.config import Config
from houndd.errors import HounddError
from houndd.membership.bus import Bus, Message
from houndd.membership.messages import KeyringOp, KeyringOpName, KeyringReply
from houndd.membership.service import Membership
from houndd.membership.transport import PeerError
from houndd.wire.keyring import Keyring
from houndd.wire.types import MsgType

log = logging.getLogger("houndd.membership")

KEYRING_OPS: tuple[KeyringOpName, ...] = ("install", "use", "remove", "list")


class KeyringOpError(HounddError, ValueError):
    """A cluster keyring operation was refused before it was sent."""


def key_fingerprint(key: bytes) -> str:
    """A public, non-reversible name for a cluster key (for `houndd keys list`)."""
    return hashlib.blake2b(key, digest_size=8, person=b"houndd-keyfp").hexdigest()


class ClusterKeyring:
    """This node's keyring, and the operations that change every member's."""

    def __init__(self, config: Config, bus: Bus, membership: Membership, keyring: Keyring) -> None:
        self._config = config
        self._bus = bus
        self._membership = membership
        self._keyring = keyring
        bus.register(MsgType.KEYRING_OP, self._on_keyring_op)

    async def apply(self, op: KeyringOpName, key: bytes | None) -> dict[str, str | None]:
        """Apply a keyring operation on every alive member, this node last.

        Returns node name -> None (done) or the error. Removing the primary key is refused
        before anything is sent.
        """
        if op not in KEYRING_OPS:
            raise KeyringOpError(f"unknown keyring op {op!r}")
        if op != "list" and key is None:
            raise KeyringOpError(f"keyring op {op} needs a key")
        if op == "remove" and key == self._keyring.primary:
            raise KeyringOpError("refusing to remove the primary key; `use` another key first")
        replies = await self._everywhere(KeyringOp(op, key))
        return {name: reply.error for name, reply in replies.items()}

    async def fingerprints(self) -> dict[str, str | list[str]]:
        """Per node name: fingerprints of its installed keys (primary first), or the error."""
        replies = await self._everywhere(KeyringOp("list", None))
        return {
            name: (reply.error if reply.error is not None else list(reply.keys))
            for name, reply in replies.items()
        }

    async def _everywhere(self, op: KeyringOp) -> dict[str, KeyringReply]:
        results: dict[str, KeyringReply] = {}
        me = self._membership.local

        async def remote(node_id: str, name: str) -> None:
            try:
                results[name] = await self._bus.request_typed(node_id, op, KeyringReply)
            except PeerError as e:
                results[name] = KeyringReply(str(e), ())

        # Peers first, this node last: for `use`, peers switch while we can still read their
        # replies under either key; for `remove`, we keep the key until they dropped it.
        async with asyncio.TaskGroup() as tg:
            for m in self._membership.alive():
                if m.node_id != me.node_id:
                    tg.create_task(remote(m.node_id, m.name))
        results[me.name] = await self._local(op)
        return results

    async def _local(self, op: KeyringOp) -> KeyringReply:
        try:
            if op.op != "list":
                if op.key is None:
                    return KeyringReply(f"keyring op {op.op} needs a key", ())
                {"install": self._keyring.install, "use": self._keyring.use}.get(
                    op.op, self._keyring.remove
                )(op.key)
                await asyncio.to_thread(self._keyring.save, self._config.cluster_key_path)
        except (HounddError, OSError) as e:
            return KeyringReply(str(e), ())
        log.info("keyring op=%s applied", op.op)
        return KeyringReply(None, tuple(key_fingerprint(k) for k in self._keyring.list()))

    async def _on_keyring_op(self, msg: Message) -> KeyringReply:
        assert isinstance(msg.payload, KeyringOp)  # the bus decodes by type
        return await self._local(msg.payload)
