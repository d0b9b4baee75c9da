from __future__ import annotations

import dataclasses
import hashlib
import logging
import stat
from pathlib import Path

import pytest

from houndd.errors import KeyFileError
from houndd.wire import NodeIdentity
from houndd.wire import signing as signing_mod
from houndd.wire.signing import Cert, PeerKeys, SigningKeys, node_id_of
from houndd.wire.types import WireRefused

T0 = 1_000_000.0
ROTATION_S = 10.0
GRACE_S = 5.0


def refused(peers: PeerKeys, cert: Cert, msg: bytes, sig: bytes, now: float) -> str:
    with pytest.raises(WireRefused) as info:
        peers.verify(cert, msg, sig, now)
    return info.value.reason


def keys(identity: NodeIdentity | None = None, epoch: int = 1) -> SigningKeys:
    return SigningKeys(
        identity or NodeIdentity.generate(),
        boot_epoch=epoch,
        rotation_s=ROTATION_S,
        grace_s=GRACE_S,
    )


# --- identity ---------------------------------------------------------------------------------


def test_node_id_is_the_hash_of_the_identity_key() -> None:
    identity = NodeIdentity.from_seed(bytes(32))
    assert identity.node_id == hashlib.blake2b(identity.public_key, digest_size=8).hexdigest()
    assert len(identity.node_id) == 16
    assert NodeIdentity.from_seed(bytes(32)).node_id == identity.node_id
    assert NodeIdentity.generate().node_id != identity.node_id


def test_identity_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    first = NodeIdentity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert NodeIdentity.load_or_create(path).node_id == first.node_id
    assert NodeIdentity.load(path).public_key == first.public_key


def test_identity_file_with_loose_mode_or_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    NodeIdentity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        NodeIdentity.load(path)
    path.write_bytes(b"short\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=str(path)):
        NodeIdentity.load(path)


# --- signing keys -----------------------------------------------------------------------------


def test_rotation_happens_when_due_and_raises_the_generation() -> None:
    sk = keys()
    cert1, _ = sk.sign(b"m", T0)
    assert cert1.expires_at == T0 + ROTATION_S + GRACE_S
    assert not sk.rotate(T0 + ROTATION_S - 0.1)
    cert_same, _ = sk.sign(b"m", T0 + ROTATION_S - 0.1)
    assert cert_same == cert1
    cert2, _ = sk.sign(b"m", T0 + ROTATION_S)
    assert cert2.generation > cert1.generation
    assert cert2.signing_pub != cert1.signing_pub
    assert cert2.identity_pub == cert1.identity_pub
    assert sk.rotate(T0 + ROTATION_S, force=True)


def test_a_restarted_node_outranks_its_previous_generations() -> None:
    identity = NodeIdentity.generate()
    old = keys(identity, epoch=1)
    for i in range(5):
        old.rotate(T0 + i * ROTATION_S)
    new = keys(identity, epoch=2)
    new.rotate(T0)
    assert old.cert is not None and new.cert is not None
    assert new.cert.generation > old.cert.generation


# --- verification -----------------------------------------------------------------------------


def test_valid_signature_verifies_and_tampering_is_refused() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    cert, sig = sk.sign(b"message", T0)
    peers.verify(cert, b"message", sig, T0)
    assert refused(peers, cert, b"messagE", sig, T0) == "signature"
    assert refused(peers, cert, b"message", sig[:-1], T0) == "signature"


@pytest.mark.parametrize(
    "change",
    [
        {"generation": 999},
        {"expires_at": T0 + 1e9},
        {"signing_pub": bytes(32)},
        {"sig": bytes(64)},
        {"node_id": "0" * 16},
        {"identity_pub": bytes(31)},
    ],
)
def test_forged_certificates_are_refused(change: dict[str, object]) -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    cert, sig = sk.sign(b"m", T0)
    forged = dataclasses.replace(cert, **change)  # type: ignore[arg-type]
    assert refused(peers, forged, b"m", sig, T0) == "cert_invalid"


def test_expired_and_future_certificates_are_refused() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S, skew_s=30)
    cert, sig = sk.sign(b"m", T0)
    assert refused(peers, cert, b"m", sig, cert.expires_at + 30.1) == "cert_expired"
    assert refused(peers, cert, b"m", sig, T0 - 30.1) == "cert_future"
    peers.verify(cert, b"m", sig, cert.expires_at + 29)  # within the clock-skew tolerance


def test_different_identity_for_a_pinned_node_id_is_refused_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim, attacker = NodeIdentity.generate(), NodeIdentity.generate()
    peers = PeerKeys(grace_s=GRACE_S)
    cert, sig = keys(victim).sign(b"m", T0)
    peers.verify(cert, b"m", sig, T0)
    assert peers.pinned(victim.node_id) == victim.public_key

    # The attacker signs a certificate claiming the victim's node id with its own identity key.
    signing = SigningKeys(attacker, boot_epoch=9)
    signing.rotate(T0)
    assert signing.cert is not None
    claim = dataclasses.replace(signing.cert, node_id=victim.node_id)
    _, fake_sig = signing.sign(b"evil", T0)
    with caplog.at_level(logging.WARNING, logger="houndd.wire"):
        for _ in range(3):
            assert refused(peers, claim, b"evil", fake_sig, T0) == "identity_changed"
    warnings = [r for r in caplog.records if r.name == "houndd.wire"]
    assert len(warnings) == 1
    assert victim.node_id in warnings[0].getMessage()
    assert peers.pinned(victim.node_id) == victim.public_key


def test_retired_key_is_accepted_during_grace_then_refused() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    old_cert, old_sig = sk.sign(b"old", T0)
    peers.verify(old_cert, b"old", old_sig, T0)
    t_new = T0 + ROTATION_S
    new_cert, new_sig = sk.sign(b"new", t_new)
    assert new_cert.generation > old_cert.generation
    peers.verify(new_cert, b"new", new_sig, t_new)  # the new key verifies
    peers.verify(old_cert, b"old", old_sig, t_new + GRACE_S)  # retired, within grace
    assert refused(peers, old_cert, b"old", old_sig, t_new + GRACE_S + 0.1) == "retired_key"
    peers.verify(new_cert, b"new", new_sig, t_new + GRACE_S + 0.1)


def test_grace_starts_when_the_newer_key_is_first_seen_not_issued() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    old_cert, old_sig = sk.sign(b"old", T0)
    new_cert, new_sig = sk.sign(b"new", T0 + ROTATION_S)
    peers.verify(old_cert, b"old", old_sig, T0 + 20)
    peers.verify(new_cert, b"new", new_sig, T0 + 30)  # first seen late
    peers.verify(old_cert, b"old", old_sig, T0 + 30 + GRACE_S)
    assert refused(peers, old_cert, b"old", old_sig, T0 + 31 + GRACE_S) == "retired_key"


def test_older_generation_never_seen_before_gets_the_same_grace() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    old_cert, old_sig = sk.sign(b"old", T0)
    new_cert, new_sig = sk.sign(b"new", T0 + ROTATION_S)
    peers.verify(new_cert, b"new", new_sig, T0 + ROTATION_S)  # first contact: newer key
    peers.verify(old_cert, b"old", old_sig, T0 + ROTATION_S + 1)  # delayed older message
    assert refused(peers, old_cert, b"old", old_sig, T0 + ROTATION_S + GRACE_S + 1) == "retired_key"


def test_pruned_generations_stay_refused() -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    certs = []
    for i in range(4):
        now = T0 + i * ROTATION_S
        cert, sig = sk.sign(b"m", now)
        peers.verify(cert, b"m", sig, now)
        certs.append((cert, sig))
    first_cert, first_sig = certs[0]
    # Generation 1 was retired 30 s ago (far beyond grace) and pruned from the table.
    assert refused(peers, first_cert, b"m", first_sig, T0 + 30) == "retired_key"


def test_verified_certificates_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    sk, peers = keys(), PeerKeys(grace_s=GRACE_S)
    cert, _ = sk.sign(b"", T0)
    calls = 0
    real = signing_mod._cert_bytes

    def counting(**kw: object) -> bytes:
        nonlocal calls
        calls += 1
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(signing_mod, "_cert_bytes", counting)
    for i in range(20):
        msg = f"m{i}".encode()
        _, sig = sk.sign(msg, T0)
        peers.verify(cert, msg, sig, T0)
    assert calls == 1


def test_certificate_cache_is_bounded() -> None:
    peers = PeerKeys(grace_s=GRACE_S, max_certs=3)
    for _ in range(10):
        cert, sig = keys().sign(b"m", T0)
        peers.verify(cert, b"m", sig, T0)
    assert len(peers._certs) == 3


def test_node_id_of_matches_identity() -> None:
    identity = NodeIdentity.generate()
    assert node_id_of(identity.public_key) == identity.node_id
