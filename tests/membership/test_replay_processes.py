"""A restart opens no replay window (issue #9 item 3), with real daemons and real traffic.

The test process sniffs the loopback interface (AF_PACKET, root) while one daemon sets a label
on another, so it holds the genuine sealed LABELS_SET request as an attacker on the network
would. The label is then changed again, the receiver restarts, and the captured request is
replayed well inside the +-30 s timestamp window: the receiver must refuse it, and the label
must not roll back on any node.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from houndd.errors import WireError
from houndd.wire import Keyring, MsgType
from houndd.wire.codec import decode_envelope, unpack
from tests.procs import LocalCluster, http

pytestmark = [
    pytest.mark.processes,
    pytest.mark.skipif(os.geteuid() != 0, reason="sniffing the loopback interface needs root"),
]

_ETH_P_ALL = 0x0003
_PACKET_HOST = 0  # on lo every packet is seen twice: as sent (outgoing) and as received (host)
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LoopbackCapture:
    """Every TCP payload sent to `port` on 127.0.0.1, per connection, by sequence number."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(_ETH_P_ALL))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._segments: dict[int, dict[int, bytes]] = {}  # source port -> seq -> payload
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == _PACKET_HOST:
                self._take(frame)

    def _take(self, frame: bytes) -> None:
        ip = frame[14:]  # lo carries a zeroed Ethernet header
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            return
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[(ip[0] & 0x0F) * 4 : total]
        src_port, dst_port, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if dst_port == self.port and payload:
            with self._lock:
                self._segments.setdefault(src_port, {})[seq] = payload

    def requests(self) -> list[bytes]:
        """The bodies of the HTTP requests captured so far, in each connection's order."""
        bodies: list[bytes] = []
        with self._lock:
            streams = [b"".join(seg[s] for s in sorted(seg)) for seg in self._segments.values()]
        for connection in streams:
            stream = connection
            while stream:
                head, sep, rest = stream.partition(b"\r\n\r\n")
                if not sep:
                    break
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                bodies.append(rest[:length])
                stream = rest[length:]
        return bodies

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()


def _message_type(keyring: Keyring, sealed: bytes) -> MsgType | None:
    """Peek at a captured message's type (the test holds the cluster key)."""
    with contextlib.suppress(WireError):
        blob = unpack(keyring.open(sealed), len(sealed))
        if isinstance(blob, dict) and isinstance(blob.get("body"), bytes):
            return decode_envelope(blob["body"], len(sealed)).type
    return None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path)
    a = cluster.add("a")
    cluster.add("b", seeds=[f"127.0.0.1:{a.port}"])
    try:
        for name in ("a", "b"):
            cluster.start(name)
            cluster.wait_ready(name)
        cluster.wait_for(
            lambda: all(cluster.members(n) == {"a": "alive", "b": "alive"} for n in "ab"),
            15,
            "a and b to see each other",
        )
        yield cluster
    finally:
        cluster.close()


def _post_raw(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with _OPENER.open(req, timeout=5.0) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def _labels(cluster: LocalCluster, seen_by: str, of: str) -> dict[str, str]:
    status, body = cluster.nodes[seen_by].get(f"/v1/nodes/{of}")
    assert status == 200, body
    return dict(body["labels"])


def _set_label(cluster: LocalCluster, via: str, on: str, value: str) -> None:
    node = cluster.nodes[via]
    status, body = http(
        "PUT", f"{node.api}/v1/nodes/{on}/labels", node.token, {"labels": {"zone": value}}
    )
    assert status == 200, body


def test_a_labels_set_captured_before_a_restart_is_refused_after_it(pair: LocalCluster) -> None:
    cluster = pair
    b = cluster.nodes["b"]
    keyring = Keyring.load(cluster.key_path)
    capture = LoopbackCapture(b.port)
    try:
        _set_label(cluster, "a", "b", "old")  # a -> b LABELS_SET, captured on the way
        cluster.wait_for(
            lambda: [
                r for r in capture.requests() if _message_type(keyring, r) is MsgType.LABELS_SET
            ],
            10,
            "the LABELS_SET request on the wire",
        )
    finally:
        capture.close()
    (captured,) = [r for r in capture.requests() if _message_type(keyring, r) is MsgType.LABELS_SET]
    _set_label(cluster, "a", "b", "new")

    cluster.stop("b")
    cluster.start("b")
    cluster.wait_ready("b")
    assert _labels(cluster, "b", "b")["zone"] == "new"  # persisted across the restart

    # Seconds after the capture: inside the timestamp window, and the restarted b has no
    # memory of the sequence numbers it saw before.
    status, reply = _post_raw(f"{b.api}/v1/peer", captured)
    labels_after = _labels(cluster, "b", "b")
    assert status == 400, f"the replay was answered HTTP {status}; b now has {labels_after}"
    assert b"replay_restart" in reply
    assert labels_after["zone"] == "new"
    cluster.wait_for(
        lambda: _labels(cluster, "a", "b").get("zone") == "new", 10, "a to see zone=new on b"
    )
    metrics = _OPENER.open(b.api + "/metrics", timeout=3).read().decode()
    assert 'reason="replay_restart"' in metrics
