"""Seeds and mDNS discovery (real multicast on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from houndd.config import local
from houndd.discovery import Discovery, default_route_address
from houndd.discovery.seeds import parse_seed, resolve_seeds
from houndd.errors import ConfigError
from houndd.membership.member import Address


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        ("10.0.0.1:7480", ("10.0.0.1", 7480)),
        ("[::1]:7480", ("::1", 7480)),
        ("host.lan:1", ("host.lan", 1)),
    ],
)
def test_parse_seed(seed: str, expected: tuple[str, int]) -> None:
    assert parse_seed(seed) == expected


@pytest.mark.parametrize("seed", ["10.0.0.1", "10.0.0.1:0", ":7480", "h:99999", "h:x"])
def test_parse_seed_rejects(seed: str) -> None:
    with pytest.raises(ConfigError, match="seeds"):
        parse_seed(seed)


async def test_resolve_seeds_skips_unresolvable_and_dedupes() -> None:
    got = await resolve_seeds(
        ["127.0.0.1:7480", "127.0.0.1:7480", "no-such-host.invalid:1", "localhost:7481"]
    )
    assert got[0] == ("127.0.0.1", 7480)
    assert got.count(("127.0.0.1", 7480)) == 1
    assert ("127.0.0.1", 7481) in got or ("::1", 7481) in got
    assert all(port != 1 for _, port in got)


def test_default_route_address_is_a_local_address() -> None:
    addr = default_route_address()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((addr, 0))  # only works for an address of this host


async def test_seeds_are_offered_repeatedly() -> None:
    cfg = local(mdns=False, seeds=("127.0.0.1:7001",))
    seen: list[Address] = []
    d = Discovery(cfg, "id-a", "fp", 7000, seen.append)
    task = asyncio.create_task(d.run())
    await asyncio.sleep(cfg.join_retry_s * 2.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert seen.count(("127.0.0.1", 7001)) >= 2
    await d.close()  # idempotent after run() closed it


def _loopback_multicast_works() -> bool:
    group, port = "224.0.0.251", 0
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as w,
        ):
            r.bind(("", port))
            port = r.getsockname()[1]
            mreq = socket.inet_aton(group) + socket.inet_aton("127.0.0.1")
            r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            r.settimeout(1.0)
            w.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            w.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            w.sendto(b"probe", (group, port))
            return r.recv(16) == b"probe"
    except OSError:
        return False


async def test_two_nodes_find_each_other_over_mdns_on_loopback() -> None:
    if not _loopback_multicast_works():
        pytest.skip("multicast on the loopback interface is unavailable on this host")
    cfg = local(mdns=True, interfaces=("127.0.0.1",), cluster_name="blue")
    found_a: list[Address] = []
    found_b: list[Address] = []
    found_c: list[Address] = []
    a = Discovery(
        cfg.replace(node_name="node-a"), "aaaaaaaaaaaaaaaa", "fp-a", 17481, found_a.append,
        advertise_host="127.0.0.1",
    )  # fmt: skip
    b = Discovery(
        cfg.replace(node_name="node-b"), "bbbbbbbbbbbbbbbb", "fp-b", 17482, found_b.append,
        advertise_host="127.0.0.1",
    )  # fmt: skip
    other = Discovery(  # same LAN, another cluster name
        cfg.replace(node_name="node-c", cluster_name="green"), "cccccccccccccccc", "fp-c", 17483,
        found_c.append, advertise_host="127.0.0.1",
    )  # fmt: skip
    tasks = [asyncio.create_task(d.run()) for d in (a, b, other)]
    try:
        async with asyncio.timeout(15):
            # Polling: the callbacks fill plain lists.
            while (  # noqa: ASYNC110
                ("127.0.0.1", 17482) not in found_a
                or ("127.0.0.1", 17481) not in found_b
                or a.mdns is None
                or "green" not in a.mdns.other_clusters.values()
            ):
                await asyncio.sleep(0.05)
        assert ("127.0.0.1", 17481) not in found_a  # never ourselves
        assert a.mdns is not None and a.mdns.found
        # the TXT record names the node (what avahi-browse shows) and the cluster
        assert "node-b" in a.mdns.names.values()
        assert ("127.0.0.1", 17483) not in found_a + found_b
        assert ("127.0.0.1", 17481) not in found_c
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def test_unusable_mdns_interface_degrades_to_seeds_only() -> None:
    # 192.0.2.55 (TEST-NET-1) is not an address of this host: zeroconf cannot bind to it.
    cfg = local(mdns=True, interfaces=("192.0.2.55",), seeds=("127.0.0.1:7003",))
    seen: list[Address] = []
    d = Discovery(cfg, "id-c", "fp", 7002, seen.append, advertise_host="192.0.2.55")
    task = asyncio.create_task(d.run())
    try:
        async with asyncio.timeout(5):
            while ("127.0.0.1", 7003) not in seen:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert not task.done()  # still serving seeds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
