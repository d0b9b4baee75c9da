from __future__ import annotations

import contextlib
import time
import tracemalloc
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from houndd.errors import HounddError, WireError
from houndd.wire import Envelope, Keyring, MsgType, NodeIdentity, Wire, schema
from houndd.wire.codec import WIRE_VERSION, encode_envelope, pack
from houndd.wire.types import CertUnknown, WireRefused
from tests.wire.conftest import MAX_UDP, T0, WireFactory
from tests.wire.keys import colliding_keys, distinct_keys


def refusal(wire: Wire, data: bytes, now: float = T0, max_size: int = MAX_UDP) -> str:
    with pytest.raises(WireRefused) as info:
        wire.open(data, now, max_size=max_size)
    return info.value.reason


def forge(
    signer: Wire,
    *,
    now: float = T0,
    sender: str | None = None,
    cert_node_id: str | None = None,
    body: bytes | None = None,
) -> bytes:
    """A message signed with `signer`'s real signing key but with chosen (lying) fields."""
    if body is None:
        body = encode_envelope(
            Envelope(
                version=WIRE_VERSION,
                cluster_id=signer.cluster_id,
                type=MsgType.PING,
                sender=sender or signer.node_id,
                boot_epoch=signer.boot_epoch,
                seq=10_000,
                ts=now,
                payload={},
            )
        )
    cert, sig = signer.signing.sign(body, now)
    if cert_node_id is not None:
        cert = replace(cert, node_id=cert_node_id)
    return signer.keyring.seal(pack({"cert": schema.encode(cert), "sig": sig, "body": body}))


# --- round trips ------------------------------------------------------------------------------


def test_every_message_type_round_trips(make_wire: WireFactory) -> None:
    a, b = make_wire(boot_epoch=7), make_wire()
    for i, msg_type in enumerate(MsgType):
        payload = {"type": msg_type.name, "n": i, "blob": bytes([i]), "nested": {"l": [1, "x"]}}
        env = b.open(a.seal(msg_type, payload, T0 + i * 0.01), T0 + i * 0.01, max_size=MAX_UDP)
        assert env.type is msg_type
        assert env.payload == payload
        assert env.sender == a.node_id
        assert env.cluster_id == "test-cluster"
        assert env.boot_epoch == 7
        assert env.seq == i + 1
        assert env.ts == T0 + i * 0.01
    assert not b.refused


@dataclass(frozen=True)
class Ping:
    target: str
    incarnation: int
    labels: dict[str, str]


def test_schema_payloads_round_trip(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    ping = Ping(target="node-2", incarnation=3, labels={"gpu": "true"})
    env = b.open(a.seal(MsgType.PING, schema.encode(ping), T0), T0, max_size=MAX_UDP)
    assert schema.decode(Ping, env.payload) == ping


def test_relayed_bytes_are_accepted_once_as_the_original_sender(make_wire: WireFactory) -> None:
    a, c = make_wire(), make_wire()
    data = a.seal(MsgType.GOSSIP, {"x": 1}, T0)
    relayed = bytes(data)  # B forwards the envelope unchanged
    assert c.open(relayed, T0 + 0.2, max_size=MAX_UDP).sender == a.node_id
    assert refusal(c, data, T0 + 0.3) == "replay_duplicate"


def test_sealed_bytes_hide_the_payload(make_wire: WireFactory) -> None:
    data = make_wire().seal(MsgType.PLAN_PUT, {"secret": "registry-password-123"}, T0)
    assert b"registry-password-123" not in data and b"secret" not in data


# --- cluster keys -----------------------------------------------------------------------------


def test_key_not_in_keyring_is_refused(make_wire: WireFactory) -> None:
    mine, theirs = distinct_keys(2)
    a = make_wire(keyring=Keyring(theirs))
    b = make_wire(keyring=Keyring(mine))
    assert refusal(b, a.seal(MsgType.PING, {}, T0)) == "unknown_key"
    assert b.refused["unknown_key"] == 1


def test_key_rotation_use_then_remove(make_wire: WireFactory) -> None:
    old, new = distinct_keys(2)
    a = make_wire(keyring=Keyring(old))
    b = make_wire(keyring=Keyring(old))
    under_old = a.seal(MsgType.PING, {"n": 1}, T0)

    for wire in (a, b):
        wire.keyring.install(new)
    for wire in (a, b):
        wire.keyring.use(new)
    under_new = a.seal(MsgType.PING, {"n": 2}, T0)
    b.open(under_new, T0, max_size=MAX_UDP)
    # Still installed: messages sealed under the old key (in flight, or from a lagging node).
    b.open(under_old, T0, max_size=MAX_UDP)
    late_under_old = make_wire(keyring=Keyring(old)).seal(MsgType.PING, {}, T0)

    with pytest.raises(HounddError, match="primary"):
        b.keyring.remove(new)
    b.keyring.remove(old)
    assert refusal(b, late_under_old) == "unknown_key"
    assert refusal(b, under_old) == "unknown_key"


def test_other_key_with_the_same_key_id_fails_decryption(make_wire: WireFactory) -> None:
    k1, k2 = colliding_keys()
    a, b = make_wire(keyring=Keyring(k1)), make_wire(keyring=Keyring(k2))
    assert refusal(b, a.seal(MsgType.PING, {}, T0)) == "decrypt"


# --- replay -----------------------------------------------------------------------------------


def test_same_message_twice_is_refused(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    data = a.seal(MsgType.HEARTBEAT, {"term": 1}, T0)
    b.open(data, T0, max_size=MAX_UDP)
    assert refusal(b, data) == "replay_duplicate"


def test_old_boot_epoch_is_refused(make_wire: WireFactory) -> None:
    identity = NodeIdentity.generate()
    before_restart = make_wire(identity=identity, boot_epoch=4)
    after_restart = make_wire(identity=identity, boot_epoch=5)
    b = make_wire()
    stale = before_restart.seal(MsgType.PING, {}, T0)
    b.open(after_restart.seal(MsgType.PING, {}, T0), T0, max_size=MAX_UDP)
    assert refusal(b, stale) == "replay_epoch"


@pytest.mark.parametrize("skew", [-30.5, 30.5, 1000.0])
def test_timestamp_outside_the_window_is_refused(make_wire: WireFactory, skew: float) -> None:
    a, b = make_wire(), make_wire(replay_window_s=30)
    a.seal(MsgType.PING, {}, T0 - 100)  # the certificate predates the message
    assert refusal(b, a.seal(MsgType.PING, {}, T0), T0 + skew) == "replay_time"


def test_sequence_below_the_window_refused_out_of_order_inside_accepted(
    make_wire: WireFactory,
) -> None:
    a, b = make_wire(), make_wire()
    sealed = [a.seal(MsgType.GOSSIP, {"i": i}, T0) for i in range(1100)]  # seq 1..1100
    b.open(sealed[-1], T0, max_size=MAX_UDP)  # seq 1100
    for i in (1000, 500, 900, 77):  # seq 1001, 501, 901, 78: inside the 1024-wide window
        assert b.open(sealed[i], T0, max_size=MAX_UDP).payload == {"i": i}
    assert refusal(b, sealed[0]) == "replay_old"  # seq 1: below the window
    assert refusal(b, sealed[500]) == "replay_duplicate"


def test_a_restart_opens_no_replay_window(make_wire: WireFactory) -> None:
    """Issue #9 item 3: the replay window lived in memory, so a restarted node accepted every
    message captured in the 30 s before its restart."""
    identity = NodeIdentity.generate()
    sender = make_wire()
    before = make_wire(identity=identity, boot_epoch=3, started_at=T0 - 100)
    captured = [sender.seal(MsgType.LABELS_SET, {"v": i}, T0 + i) for i in range(5)]
    for i, data in enumerate(captured):
        assert before.open(data, T0 + i, max_size=MAX_UDP).payload == {"v": i}
    # The receiver restarts 10 s later: new Wire, empty replay state, same identity.
    restarted = make_wire(identity=identity, boot_epoch=4, started_at=T0 + 10)
    for data in captured:  # all inside the +-30 s timestamp window, none seen by this life
        assert refusal(restarted, data, T0 + 12) == "replay_restart"
    assert restarted.refused["replay_restart"] == len(captured)
    fresh = sender.seal(MsgType.LABELS_SET, {"v": "new"}, T0 + 12)
    assert restarted.open(fresh, T0 + 12, max_size=MAX_UDP).payload == {"v": "new"}


def test_the_start_floor_costs_a_lagging_peer_only_its_lag(make_wire: WireFactory) -> None:
    sender, b = make_wire(), make_wire(replay_window_s=30, started_at=T0)
    lag = 2.0  # the sender's clock is 2 s behind ours
    assert refusal(b, sender.seal(MsgType.PING, {}, T0 + 1 - lag), T0 + 1) == "replay_restart"
    b.open(sender.seal(MsgType.PING, {}, T0 + 3 - lag), T0 + 3, max_size=MAX_UDP)
    # Past the window the floor is gone: a step of our clock backwards cannot make it bite.
    b.open(sender.seal(MsgType.PING, {}, T0 + 31), T0 + 31, max_size=MAX_UDP)
    b.open(sender.seal(MsgType.PING, {}, T0 - 5), T0 - 5, max_size=MAX_UDP)


# --- signing keys -----------------------------------------------------------------------------


def test_rotation_grace_then_refusal(make_wire: WireFactory) -> None:
    a = make_wire(rotation_s=10, grace_s=5)
    b = make_wire(rotation_s=10, grace_s=5)
    signed_by_old = a.seal(MsgType.PING, {"n": 1}, T0)
    signed_by_old_too = a.seal(MsgType.PING, {"n": 2}, T0 + 1)
    signed_by_new = a.seal(MsgType.PING, {"n": 3}, T0 + 10)  # rotates first
    b.open(signed_by_new, T0 + 10, max_size=MAX_UDP)  # the new key verifies
    b.open(signed_by_old, T0 + 12, max_size=MAX_UDP)  # retired key, within grace
    assert refusal(b, signed_by_old_too, T0 + 15.5) == "retired_key"
    assert b.open(a.seal(MsgType.PING, {}, T0 + 16), T0 + 16, max_size=MAX_UDP).seq == 4


def test_different_identity_claiming_a_pinned_node_id_is_refused(make_wire: WireFactory) -> None:
    victim, attacker, b = make_wire(), make_wire(), make_wire()
    b.open(victim.seal(MsgType.GOSSIP, {}, T0), T0, max_size=MAX_UDP)  # pins the victim's key
    fake = forge(attacker, sender=victim.node_id, cert_node_id=victim.node_id)
    assert refusal(b, fake) == "identity_changed"
    assert b.peers.pinned(victim.node_id) == victim.identity.public_key


def test_sender_must_match_the_certificate(make_wire: WireFactory) -> None:
    victim, attacker, b = make_wire(), make_wire(), make_wire()
    # A valid cert of the attacker, but the envelope claims to come from the victim.
    assert refusal(b, forge(attacker, sender=victim.node_id)) == "sender"


def test_node_id_must_be_the_hash_of_the_identity_key(make_wire: WireFactory) -> None:
    attacker, b = make_wire(), make_wire()
    fake = forge(attacker, sender="00000000000000aa", cert_node_id="00000000000000aa")
    assert refusal(b, fake) == "cert_invalid"


def test_other_cluster_id_is_refused(make_wire: WireFactory) -> None:
    a, b = make_wire(cluster_id="other"), make_wire()
    assert refusal(b, a.seal(MsgType.PING, {}, T0)) == "cluster"


def test_oversize_is_refused_first_and_refusals_are_counted(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    big = a.seal(MsgType.SYNC_ITEMS, {"pad": "x" * 2000}, T0)
    assert refusal(b, big, max_size=1000) == "oversize"
    assert refusal(b, b"") == "unknown_key"
    assert b.refused == {"oversize": 1, "unknown_key": 1}
    b.open(big, T0, max_size=MAX_UDP)


def test_signed_blob_with_extra_or_missing_fields_is_refused(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    for blob in ({"cert": {}, "sig": b"", "body": b"", "x": 1}, {"sig": b"", "body": b""}, [1]):
        assert refusal(b, a.keyring.seal(pack(blob))) == "malformed"
    cert, sig = a.signing.sign(b"body", T0)
    bad_cert = {**schema.encode(cert), "extra": 1}
    assert refusal(b, a.keyring.seal(pack({"cert": bad_cert, "sig": sig, "body": b"body"}))) == (
        "malformed"
    )


# --- hostile bytes ----------------------------------------------------------------------------


def assert_fast_and_small(fn: Any) -> None:
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 0.1, elapsed
    assert peak < 1 << 20, peak


HUGE_STR = b"\xdb\x80\x00\x00\x00"  # str32 claiming 2**31 bytes
NESTED = b"\xdc\xff\xff" * 1000  # 1000 nested arrays, each claiming 65535 items


@pytest.mark.parametrize("blob", [HUGE_STR, NESTED, b"\x83" + NESTED])
def test_hostile_plaintext_before_signature_check_is_cheap(
    make_wire: WireFactory, blob: bytes
) -> None:
    # A key holder without a valid certificate can reach the blob parser: it stays bounded.
    a, b = make_wire(), make_wire()
    data = a.keyring.seal(blob)

    def run() -> None:
        with pytest.raises(WireError):
            b.open(data, T0, max_size=MAX_UDP)

    assert_fast_and_small(run)


def test_hostile_signed_body_is_refused_cheaply(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    body = b"\x98\x01\xa1c\x01" + HUGE_STR
    data = forge(a, body=body)

    def run() -> None:
        with pytest.raises(WireError):
            b.open(data, T0, max_size=MAX_UDP)

    assert_fast_and_small(run)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_KEYRING = Keyring.generate()
_SENDER = Wire(cluster_id="fuzz", keyring=_KEYRING, identity=NodeIdentity.generate(), boot_epoch=1)
_SEALED = _SENDER.seal(MsgType.DISPATCH, {"items": [{"digest": "sha256:ab", "n": 1}]}, T0)


def receiver() -> Wire:
    return Wire(cluster_id="fuzz", keyring=_KEYRING, identity=NodeIdentity.generate(), boot_epoch=1)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        receiver().open(data, T0, max_size=MAX_UDP)


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_with_a_known_key_id_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        receiver().open(_SEALED[:1] + data, T0, max_size=MAX_UDP)


@FUZZ
@given(st.integers(min_value=0, max_value=len(_SEALED) - 1))
def test_truncated_sealed_messages_are_refused(cut: int) -> None:
    with pytest.raises(WireError):
        receiver().open(_SEALED[:cut], T0, max_size=MAX_UDP)


@FUZZ
@given(st.lists(st.integers(min_value=0, max_value=len(_SEALED) * 8 - 1), min_size=1, max_size=3))
def test_bit_flipped_sealed_messages_are_refused(bits: list[int]) -> None:
    data = bytearray(_SEALED)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    if bytes(data) == _SEALED:  # two flips of the same bit cancel out
        return
    with pytest.raises(WireError):
        receiver().open(bytes(data), T0, max_size=MAX_UDP)


@FUZZ
@given(st.binary(max_size=400))
def test_random_plaintext_under_a_valid_key_is_refused(plain: bytes) -> None:
    with pytest.raises(WireError):
        receiver().open(_KEYRING.seal(plain), T0, max_size=MAX_UDP)


@FUZZ
@given(st.binary(max_size=400))
def test_random_signed_bodies_only_ever_raise_wire_error(body: bytes) -> None:
    with contextlib.suppress(WireError):
        receiver().open(forge(_SENDER, body=body), T0, max_size=MAX_UDP)


# --- certificate references on datagrams -------------------------------------------------------


def test_a_datagram_names_a_certificate_its_receiver_was_sent(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    to = ("10.0.0.2", 7480)
    first = a.seal(MsgType.PING, {"n": 1}, T0, to=to)
    second = a.seal(MsgType.PING, {"n": 1}, T0 + 0.01, to=to)
    assert len(second) < len(first) - 200  # the certificate is most of a small message
    assert b.open(first, T0, max_size=MAX_UDP).payload == {"n": 1}
    assert b.open(second, T0 + 0.01, max_size=MAX_UDP).sender == a.node_id
    # Requests and replies (no destination given) always carry it.
    assert len(a.seal(MsgType.PING, {"n": 1}, T0 + 0.02)) == len(first)


def test_an_unknown_reference_is_refused_until_the_certificate_is_sent_again(
    make_wire: WireFactory,
) -> None:
    a, restarted = make_wire(), make_wire()
    to = ("10.0.0.2", 7480)
    a.seal(MsgType.PING, {}, T0, to=to)  # carried the certificate (to the old incarnation)
    ref = a.seal(MsgType.PING, {}, T0 + 0.01, to=to)
    with pytest.raises(CertUnknown) as info:
        restarted.open(ref, T0 + 0.01, max_size=MAX_UDP)
    assert (info.value.node_id, info.value.reason) == (a.node_id, "cert_unknown")
    assert restarted.refused["cert_unknown"] == 1
    a.resend_cert(to)
    full = a.seal(MsgType.PING, {}, T0 + 0.02, to=to)
    assert restarted.open(full, T0 + 0.02, max_size=MAX_UDP).sender == a.node_id
    # A new signing key is a new certificate: it goes in full again.
    a.signing.rotate(T0 + 0.03, force=True)
    rotated = a.seal(MsgType.PING, {}, T0 + 0.03, to=to)
    assert len(rotated) == len(full)
    assert restarted.open(rotated, T0 + 0.03, max_size=MAX_UDP).sender == a.node_id


def test_a_malformed_or_forged_reference_is_refused(make_wire: WireFactory) -> None:
    a, b = make_wire(), make_wire()
    body = b"x"
    _, sig = a.signing.sign(body, T0)
    for ref in ([a.node_id], ["NOT-AN-ID", 1], [a.node_id, True], "x", [a.node_id, 1, 2]):
        blob = pack({"ref": ref, "sig": sig, "body": body})
        assert refusal(b, a.keyring.seal(blob)) == "malformed"
    # A reference to a certificate b holds, over bytes its key did not sign.
    b.open(a.seal(MsgType.PING, {}, T0), T0, max_size=MAX_UDP)
    cert = a.signing.cert
    assert cert is not None
    forged = pack({"ref": [a.node_id, cert.generation], "sig": b"\0" * 64, "body": body})
    assert refusal(b, a.keyring.seal(forged)) == "signature"
