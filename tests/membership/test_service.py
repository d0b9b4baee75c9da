"""The async `Membership` shell over `MemoryTransport` with a real `Wire`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from houndd.config import local
from houndd.errors import HounddError
from houndd.membership.member import Member, MemberState
from houndd.membership.memory import MemoryNetwork
from houndd.membership.service import KeyringOpError, Membership, UnknownMemberError
from houndd.membership.transport import PeerError, RemoteError
from houndd.wire import Envelope, Keyring, MsgType, NodeIdentity, Wire, generate_key


class Node:
    def __init__(
        self,
        net: MemoryNetwork,
        i: int,
        key: bytes,
        tmp: Path,
        *,
        labels: dict[str, str] | None = None,
    ):
        self.state_dir = tmp / f"node-{i}"
        self.config = local(state_dir=str(self.state_dir), node_name=f"node-{i}")
        self.keyring = Keyring(key)
        self.wire = Wire(
            cluster_id="test", keyring=self.keyring, identity=NodeIdentity.generate(), boot_epoch=1
        )
        self.address = (f"10.0.0.{i}", 7480)
        self.transport = net.transport(self.address)
        me = Member(
            node_id=self.wire.node_id,
            name=f"node-{i}",
            host=self.address[0],
            port=self.address[1],
            labels=labels or {},
        )
        self.m = Membership(
            self.config, self.wire, self.transport, me, rng=random.Random(i), keyring=self.keyring
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.wire.node_id

    def alive_ids(self) -> set[str]:
        return {m.node_id for m in self.m.alive()}


async def eventually(cond: Callable[[], bool], within_s: float = 5.0, what: str = "") -> None:
    """Poll `cond` (state of several nodes; no single event to wait on)."""
    async with asyncio.timeout(within_s):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert cond(), what


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, n: int, *, join: bool = True) -> AsyncIterator[list[Node]]:
    net = MemoryNetwork(random.Random(0), delay=(0.0005, 0.002))
    key = generate_key()
    nodes = [Node(net, i, key, tmp_path) for i in range(n)]
    for node in nodes:
        node.task = asyncio.create_task(node.m.run())
    try:
        await asyncio.sleep(0)
        if join:
            for node in nodes[1:]:
                assert await node.m.join([nodes[0].address]) == 1
            ids = {node.id for node in nodes}
            await eventually(
                lambda: all(node.alive_ids() == ids for node in nodes), what="converged"
            )
        yield nodes
    finally:
        for node in nodes:
            if node.task is not None:
                node.task.cancel()
        for node in nodes:
            if node.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await node.task


async def test_join_lists_every_member_with_metadata(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        for node in nodes:
            names = sorted(m.name for m in node.m.members())
            assert names == ["node-0", "node-1", "node-2"]
            other = node.m.by_name("node-2")
            assert other is not None and other.node_id == nodes[2].id
            assert other.address == nodes[2].address
            heard = node.m.get(nodes[1].id)
            assert heard is not None
            if node is not nodes[1]:
                # last_heard is reported in wall-clock seconds (the table runs on monotonic).
                assert abs(time.time() - heard.last_heard) < 2.0


async def test_request_reply_send_and_broadcast_on_the_bus(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        got: list[tuple[int, str, Any]] = []
        done = asyncio.Event()

        def recorder(i: int) -> Callable[[Envelope], Any]:
            async def handler(env: Envelope) -> tuple[MsgType, dict[str, Any]] | None:
                got.append((i, env.sender, env.payload))
                if len(got) >= 3:
                    done.set()
                if env.payload.get("fail"):
                    raise HounddError("refusing on purpose")
                return MsgType.VOTE_REPLY, {"echo": env.payload.get("x"), "by": i}

            return handler

        for i, node in enumerate(nodes):
            node.m.register(MsgType.VOTE_REQUEST, recorder(i))
        reply = await nodes[0].m.request(nodes[1].id, MsgType.VOTE_REQUEST, {"x": 41})
        assert reply.type is MsgType.VOTE_REPLY and reply.payload == {"echo": 41, "by": 1}
        assert reply.sender == nodes[1].id
        with pytest.raises(RemoteError, match="refusing on purpose"):
            await nodes[0].m.request(nodes[2].id, MsgType.VOTE_REQUEST, {"fail": True})
        with pytest.raises(RemoteError, match="no handler"):
            await nodes[0].m.request(nodes[2].id, MsgType.CANCEL, {})
        with pytest.raises(UnknownMemberError):
            await nodes[0].m.request("nobody", MsgType.VOTE_REQUEST, {})
        # Requests to ourselves take the same path (the coordinator dispatches to itself too).
        self_reply = await nodes[0].m.request(nodes[0].id, MsgType.VOTE_REQUEST, {"x": 1})
        assert self_reply.payload == {"echo": 1, "by": 0}
        got.clear()
        done.clear()
        await nodes[1].m.send(nodes[2].id, MsgType.VOTE_REQUEST, {"x": "dgram"})
        assert await nodes[0].m.broadcast(MsgType.VOTE_REQUEST, {"x": "all"}) == 2
        await asyncio.wait_for(done.wait(), 3.0)
        assert sorted((i, p["x"]) for i, _, p in got) == [(1, "all"), (2, "all"), (2, "dgram")]


async def test_labels_are_set_on_the_owner_persisted_and_spread(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        before = nodes[2].m.local.incarnation
        result = await nodes[0].m.set_labels("node-2", {"gpu": "true", "zone": "a"})
        assert result == {"gpu": "true", "zone": "a"}
        assert nodes[2].m.local.labels == {"gpu": "true", "zone": "a"}
        assert nodes[2].m.local.incarnation > before
        saved = json.loads((nodes[2].state_dir / "labels.json").read_text())
        assert saved == {"gpu": "true", "zone": "a"}

        def everyone_sees(labels: dict[str, str]) -> bool:
            return all(n.m.get(nodes[2].id).labels == labels for n in nodes)  # type: ignore[union-attr]

        await eventually(lambda: everyone_sees({"gpu": "true", "zone": "a"}), what="labels spread")
        await nodes[1].m.set_labels("node-2", {"zone": None})
        await eventually(lambda: everyone_sees({"gpu": "true"}), what="label removal spread")
        with pytest.raises(UnknownMemberError):
            await nodes[0].m.set_labels("node-9", {"a": "b"})


async def test_persisted_labels_are_restored_on_start(tmp_path: Path) -> None:
    net = MemoryNetwork(random.Random(0))
    node = Node(net, 0, generate_key(), tmp_path, labels={"from": "config"})
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "labels.json").write_text(json.dumps({"from": "cli", "gpu": "true"}))
    task = asyncio.create_task(node.m.run())
    try:
        await eventually(lambda: node.m.local.labels == {"from": "cli", "gpu": "true"})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_keyring_rotation_across_the_cluster(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        old, new = nodes[0].keyring.primary, generate_key()
        assert await nodes[0].m.keyring_op("install", new) == {f"node-{i}": None for i in range(3)}
        assert await nodes[1].m.keyring_op("use", new) == {f"node-{i}": None for i in range(3)}
        with pytest.raises(KeyringOpError):
            await nodes[0].m.keyring_op("remove", new)
        assert await nodes[2].m.keyring_op("remove", old) == {f"node-{i}": None for i in range(3)}
        for node in nodes:
            assert node.keyring.list() == [new]
            assert Keyring.load(node.config.cluster_key_path).list() == [new]
        fps = await nodes[0].m.keyring_fingerprints()
        assert len({tuple(v) for v in fps.values()}) == 1 and len(fps) == 3
        assert all(new.hex() not in str(v) for v in fps.values())  # never the key itself
        # Still one cluster under the new key.
        reply = await nodes[0].m.request(
            nodes[2].id, MsgType.KEYRING_OP, {"op": "list", "key": None}
        )
        assert reply.payload["error"] is None
        # A node's own refusal is reported per node, not raised.
        result = await nodes[0].m.keyring_op("use", generate_key())
        assert all(err and "not installed" in err for err in result.values()), result


async def test_node_with_another_cluster_key_is_never_listed(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as nodes:
        net = nodes[0].transport._network
        intruder = Node(net, 9, generate_key(), tmp_path)
        task = asyncio.create_task(intruder.m.run())
        try:
            refused_before = sum(nodes[0].wire.refused.values())
            assert await intruder.m.join([nodes[0].address, nodes[1].address]) == 0
            await intruder.m.send(
                nodes[0].address, MsgType.PING, {"seq": 1, "target": nodes[0].id, "g": []}
            )
            with pytest.raises(PeerError):
                await intruder.m.request(
                    nodes[0].address, MsgType.PUSH_PULL, {"join": True, "members": []}
                )
            await eventually(lambda: sum(nodes[0].wire.refused.values()) >= refused_before + 3)
            assert nodes[0].wire.refused["unknown_key"] >= 3
            await asyncio.sleep(0.3)
            for node in nodes:
                assert intruder.id not in {m.node_id for m in node.m.members()}
            assert {m.node_id for m in intruder.m.members()} == {intruder.id}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_crashed_node_is_marked_dead_and_subscribers_hear_it(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        seen: list[tuple[str, MemberState | None, MemberState]] = []
        nodes[0].m.subscribe(lambda m, old, new: seen.append((m.node_id, old, new)))
        assert nodes[2].task is not None
        nodes[2].task.cancel()
        await nodes[2].transport.close()
        victim = nodes[2].id
        await eventually(
            lambda: all(n.m.get(victim).state is MemberState.DEAD for n in nodes[:2]),  # type: ignore[union-attr]
            what="crash detected",
        )
        assert (victim, MemberState.SUSPECT, MemberState.DEAD) in seen


async def test_graceful_leave_is_seen_as_left(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        await nodes[2].m.leave()
        victim = nodes[2].id
        await eventually(
            lambda: all(n.m.get(victim).state is MemberState.LEFT for n in nodes[:2]),  # type: ignore[union-attr]
            what="leave seen",
        )
