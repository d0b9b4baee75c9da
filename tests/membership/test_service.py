"""The async `Membership` shell, the bus, labels and cluster keyring operations over
`MemoryTransport` with a real `Wire`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from houndd.config import local
from houndd.coordinator.messages import Cancel, VoteReply, VoteRequest
from houndd.coordinator.records import CancelRecord
from houndd.errors import HounddError
from houndd.membership.bus import Bus, Message, UnknownMemberError
from houndd.membership.keyring_ops import ClusterKeyring, KeyringOpError
from houndd.membership.labels import Labels
from houndd.membership.member import Member, MemberState
from houndd.membership.memory import MemoryNetwork
from houndd.membership.messages import KeyringOp, KeyringReply, Ping, PushPull
from houndd.membership.service import Membership
from houndd.membership.transport import PeerError, RemoteError
from houndd.wire import Keyring, MsgType, NodeIdentity, Wire, generate_key
from houndd.wire.signing import PeerKeys


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
        self.bus = Bus(self.config, self.wire, self.transport)
        self.m = Membership(self.config, self.bus, me, rng=random.Random(i))
        self.labels = Labels(self.config, self.bus, self.m)
        self.keys = ClusterKeyring(self.config, self.bus, self.m, self.keyring)
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.labels.restore()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.bus.run())
            tg.create_task(self.m.run())

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
        node.task = asyncio.create_task(node.run())
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
        got: list[tuple[int, str, int]] = []
        done = asyncio.Event()

        def recorder(i: int) -> Callable[[Message], Any]:
            async def handler(msg: Message) -> VoteReply | None:
                assert isinstance(msg.payload, VoteRequest)  # decoded by the bus
                got.append((i, msg.sender, msg.payload.term))
                if len(got) >= 3:
                    done.set()
                if msg.payload.term == 666:
                    raise HounddError("refusing on purpose")
                return VoteReply(msg.payload.term + 1, nodes[i].id, True)

            return handler

        for i, node in enumerate(nodes):
            node.bus.register(MsgType.VOTE_REQUEST, recorder(i))
        me = nodes[0].id
        reply = await nodes[0].bus.request(nodes[1].id, VoteRequest(41, me))
        assert reply.type is MsgType.VOTE_REPLY and reply.payload == VoteReply(
            42, nodes[1].id, True
        )
        assert reply.sender == nodes[1].id
        with pytest.raises(RemoteError, match="refusing on purpose"):
            await nodes[0].bus.request(nodes[2].id, VoteRequest(666, me))
        with pytest.raises(RemoteError, match="no handler"):
            await nodes[0].bus.request(nodes[2].id, Cancel(CancelRecord("p1", 1.0)))
        with pytest.raises(UnknownMemberError):
            await nodes[0].bus.request("nobody", VoteRequest(1, me))
        # Requests to ourselves take the same path (the coordinator dispatches to itself too).
        self_reply = await nodes[0].bus.request(me, VoteRequest(1, me))
        assert self_reply.payload == VoteReply(2, me, True)
        got.clear()
        done.clear()
        await nodes[1].bus.send(nodes[2].id, VoteRequest(7, nodes[1].id))
        others = [n.address for n in nodes[1:]]
        assert await nodes[0].bus.broadcast(others, VoteRequest(9, me)) == 2
        await asyncio.wait_for(done.wait(), 3.0)
        assert sorted((i, term) for i, _, term in got) == [(1, 9), (2, 7), (2, 9)]


async def test_a_failing_handler_is_counted_and_the_bus_keeps_serving(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as nodes:
        calls: list[int] = []

        async def broken(msg: Message) -> None:
            calls.append(msg.payload.term)
            raise ZeroDivisionError("a bug in a handler")

        nodes[1].bus.register(MsgType.VOTE_REQUEST, broken)
        me = nodes[0].id
        for term in (1, 2):
            await nodes[0].bus.send(nodes[1].id, VoteRequest(term, me))
        with pytest.raises(RemoteError, match="internal error"):
            await nodes[0].bus.request(nodes[1].id, VoteRequest(3, me))
        await eventually(lambda: len(calls) == 3, what="all three handled")
        assert nodes[1].bus.handler_errors["VOTE_REQUEST"] == 3
        # Membership (which rides the same bus) still works.
        await eventually(lambda: nodes[1].alive_ids() == {nodes[0].id, nodes[1].id})
        assert (
            await nodes[0].bus.request_typed(nodes[1].id, KeyringOp("list", None), KeyringReply)
        ).error is None


async def test_labels_are_set_on_the_owner_persisted_and_spread(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        before = nodes[2].m.local.incarnation
        result = await nodes[0].labels.set("node-2", {"gpu": "true", "zone": "a"})
        assert result == {"gpu": "true", "zone": "a"}
        assert nodes[2].m.local.labels == {"gpu": "true", "zone": "a"}
        assert nodes[2].m.local.incarnation > before
        saved = json.loads((nodes[2].state_dir / "labels.json").read_text())
        assert saved == {"gpu": "true", "zone": "a"}

        def everyone_sees(labels: dict[str, str]) -> bool:
            return all(n.m.get(nodes[2].id).labels == labels for n in nodes)  # type: ignore[union-attr]

        await eventually(lambda: everyone_sees({"gpu": "true", "zone": "a"}), what="labels spread")
        await nodes[1].labels.set("node-2", {"zone": None})
        await eventually(lambda: everyone_sees({"gpu": "true"}), what="label removal spread")
        with pytest.raises(UnknownMemberError):
            await nodes[0].labels.set("node-9", {"a": "b"})


async def test_persisted_labels_are_restored_on_start(tmp_path: Path) -> None:
    net = MemoryNetwork(random.Random(0))
    node = Node(net, 0, generate_key(), tmp_path, labels={"from": "config"})
    node.state_dir.mkdir(parents=True)
    (node.state_dir / "labels.json").write_text(json.dumps({"from": "cli", "gpu": "true"}))
    task = asyncio.create_task(node.run())
    try:
        await eventually(lambda: node.m.local.labels == {"from": "cli", "gpu": "true"})
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_keyring_rotation_across_the_cluster(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as nodes:
        old, new = nodes[0].keyring.primary, generate_key()
        assert await nodes[0].keys.apply("install", new) == {f"node-{i}": None for i in range(3)}
        assert await nodes[1].keys.apply("use", new) == {f"node-{i}": None for i in range(3)}
        with pytest.raises(KeyringOpError):
            await nodes[0].keys.apply("remove", new)
        assert await nodes[2].keys.apply("remove", old) == {f"node-{i}": None for i in range(3)}
        for node in nodes:
            assert node.keyring.list() == [new]
            assert Keyring.load(node.config.cluster_key_path).list() == [new]
        fps = await nodes[0].keys.fingerprints()
        assert len({tuple(v) for v in fps.values()}) == 1 and len(fps) == 3
        assert all(new.hex() not in str(v) for v in fps.values())  # never the key itself
        # Still one cluster under the new key.
        reply = await nodes[0].bus.request_typed(nodes[2].id, KeyringOp("list", None), KeyringReply)
        assert reply.error is None
        # A node's own refusal is reported per node, not raised.
        result = await nodes[0].keys.apply("use", generate_key())
        assert all(err and "not installed" in err for err in result.values()), result


async def test_node_with_another_cluster_key_is_never_listed(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as nodes:
        net = nodes[0].transport._network
        intruder = Node(net, 9, generate_key(), tmp_path)
        task = asyncio.create_task(intruder.run())
        try:
            refused_before = sum(nodes[0].wire.refused.values())
            assert await intruder.m.join([nodes[0].address, nodes[1].address]) == 0
            await intruder.bus.send(nodes[0].address, Ping(1, nodes[0].id, ()))
            with pytest.raises(PeerError):
                await intruder.bus.request(nodes[0].address, PushPull(True, ()))
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


async def first_vote_request(sender: Node, receiver: Node, *, both_ways: bool = False) -> list[int]:
    """Record the terms of the VOTE_REQUESTs `receiver` (and, `both_ways`, `sender`) gets;
    send the first one (it carries the sender's certificate in full unless a SWIM datagram
    already did). Returns the terms."""
    got: list[int] = []

    async def handler(msg: Message) -> None:
        assert isinstance(msg.payload, VoteRequest)
        got.append(msg.payload.term)

    receiver.bus.register(MsgType.VOTE_REQUEST, handler)
    if both_ways:
        sender.bus.register(MsgType.VOTE_REQUEST, handler)
    await sender.bus.send(receiver.id, VoteRequest(1, sender.id))
    await eventually(lambda: got == [1], what="first datagram")
    return got


async def test_a_receiver_that_lost_our_certificate_gets_it_again(tmp_path: Path) -> None:
    """Datagrams name the sender's certificate once the receiver was sent it. A receiver
    that no longer holds it (it restarted) refuses one datagram, asks for the certificate
    (CERT_NEEDED), and the next datagram carries it."""
    async with cluster(tmp_path, 2) as nodes:
        sender, receiver = nodes
        got = await first_vote_request(sender, receiver)
        receiver.wire.peers = PeerKeys()  # as after a restart: no certificate held
        await sender.bus.send(receiver.id, VoteRequest(2, sender.id))  # a reference: refused
        await eventually(
            lambda: sender.bus.sent["VOTE_REQUEST"] == 2 and receiver.bus.sent["CERT_NEEDED"] >= 1,
            what="the receiver asked for the certificate",
        )
        # The 2nd only named the certificate (it was refused: `2 not in got` below). Its size
        # proves nothing: SWIM's first datagrams may have carried the certificate before the
        # first VOTE_REQUEST did, and then both were references.
        assert receiver.wire.refused["cert_unknown"] >= 1
        await eventually(
            lambda: receiver.address not in sender.wire._cert_sent,
            what="the sender heard CERT_NEEDED",
        )
        await sender.bus.send(receiver.id, VoteRequest(3, sender.id))
        await eventually(lambda: 3 in got, what="the next datagram carried the certificate")
        assert 2 not in got
        await eventually(
            lambda: all(n.alive_ids() == {sender.id, receiver.id} for n in nodes),
            what="both still alive",
        )


async def test_a_datagram_too_big_for_udp_carries_our_certificate(tmp_path: Path) -> None:
    """An oversize datagram travels as a request, which a receiver that lost our certificate
    cannot answer with CERT_NEEDED: it carries the certificate itself, not a reference."""
    async with cluster(tmp_path, 2) as nodes:
        sender, receiver = nodes
        got = await first_vote_request(sender, receiver)
        assert receiver.address in sender.wire._cert_sent  # datagrams now name it
        sender.bus._config = dataclasses.replace(sender.bus._config, max_udp_bytes=64)
        # SWIM datagrams sealed before that named the certificate; let those in flight land
        # while the receiver still holds it (one that landed after the reset was refused).
        await asyncio.sleep(0.05)
        receiver.wire.peers = PeerKeys()  # as after a restart: no certificate held
        await sender.bus.send(receiver.id, VoteRequest(2, sender.id))
        await eventually(lambda: 2 in got, what="the oversize datagram delivered as a request")
        assert receiver.wire.refused["cert_unknown"] == 0


async def test_a_member_that_restarted_is_sent_our_certificate_again(tmp_path: Path) -> None:
    """A message with a higher boot epoch says its sender restarted and holds none of the
    certificates it was sent: our next datagram to it carries ours, so it refuses nothing."""
    async with cluster(tmp_path, 2) as nodes:
        sender, receiver = nodes
        got = await first_vote_request(sender, receiver, both_ways=True)
        assert receiver.address in sender.wire._cert_sent
        # The receiver restarts: a new boot epoch, no certificates held.
        receiver.wire.peers = PeerKeys()
        receiver.wire.boot_epoch += 1
        await receiver.bus.send(sender.id, VoteRequest(2, receiver.id))
        await eventually(lambda: 2 in got, what="the restarted node heard")
        # Probes the sender sealed before it heard the new boot epoch may still be refused;
        # from now on nothing is.
        refused = receiver.wire.refused["cert_unknown"]
        await sender.bus.send(receiver.id, VoteRequest(3, sender.id))
        await eventually(lambda: 3 in got, what="the next datagram carried the certificate")
        assert receiver.wire.refused["cert_unknown"] == refused
