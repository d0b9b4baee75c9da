"""Node identity and rotating signing keys (sign side), and their verification (peer side).

Every node has a long-lived Ed25519 identity key; its node id is the hex of
blake2b(identity public key, 8 bytes), so an id cannot be claimed without the key. Messages are
signed with a short-lived Ed25519 signing key, announced in a `Cert` signed by the identity key
and attached to every message. The identity key therefore signs only certificates, and a leaked
signing key is useless once it is retired.

Generations order a node's signing keys across restarts: generation = boot_epoch << 32 | n,
where n counts rotations since the start. A restarted node (higher boot epoch) thus always
outranks its previous incarnation's keys, which peers then retire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.signing

from houndd.errors import KeyFileError
from houndd.keyfiles import read_secret, write_secret
from houndd.wire.codec import pack
from houndd.wire.types import WireRefused

log = logging.getLogger("houndd.wire")

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_SEED_BYTES = 32
_CERT_CONTEXT = "houndd-cert-v1"  # domain separation: cert bytes can never parse as a message
_GENERATION_SHIFT = 32


def node_id_of(identity_pub: bytes) -> str:
    """The node id belonging to an identity public key: 16 hex digits."""
    return hashlib.blake2b(identity_pub, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Cert:
    """A signing key announcement, signed by the node's identity key."""

    node_id: str
    identity_pub: bytes
    signing_pub: bytes
    generation: int
    issued_at: float
    expires_at: float
    sig: bytes


def _cert_bytes(
    *,
    node_id: str,
    identity_pub: bytes,
    signing_pub: bytes,
    generation: int,
    issued_at: float,
    expires_at: float,
) -> bytes:
    # float(): an int timestamp would pack differently from the float it decodes back to.
    return pack(
        [
            _CERT_CONTEXT,
            node_id,
            identity_pub,
            signing_pub,
            generation,
            float(issued_at),
            float(expires_at),
        ]
    )


class NodeIdentity:
    """A node's long-lived Ed25519 identity key. Its file (`state_dir/identity.key`) holds the
    base64 seed, mode 0600."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: str = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh random identity."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        """The identity for a 32-byte seed (deterministic; for tests and simulation)."""
        if len(seed) != _SEED_BYTES:
            raise ValueError(f"an identity seed is {_SEED_BYTES} bytes")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Read an identity file; KeyFileError if missing, malformed or not mode 0600."""
        target = Path(path)
        raw = read_secret(target)
        try:
            seed = base64.b64decode(raw.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != _SEED_BYTES:
            raise KeyFileError(
                f"{target}: expected a base64 Ed25519 seed of {_SEED_BYTES} bytes; "
                f"move the file away to generate a new identity (the node id will change)"
            )
        return cls.from_seed(seed)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeIdentity:
        """Load the identity file, or create one (mode 0600) if there is none."""
        target = Path(path)
        if not target.exists():
            identity = cls.generate()
            identity.save(target)
            log.info("created node identity node=%s path=%s", identity.node_id, target)
            return identity
        return cls.load(target)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the identity seed atomically with mode 0600."""
        write_secret(path, base64.b64encode(bytes(self._key)) + b"\n")

    @property
    def fingerprint(self) -> str:
        """A short public fingerprint of the identity key (for mDNS TXT and status output)."""
        return hashlib.blake2b(self.public_key, digest_size=16).hexdigest()

    def issue_cert(
        self, signing_pub: bytes, *, generation: int, issued_at: float, expires_at: float
    ) -> Cert:
        """Sign a certificate for a signing public key."""
        sig = self._key.sign(
            _cert_bytes(
                node_id=self.node_id,
                identity_pub=self.public_key,
                signing_pub=signing_pub,
                generation=generation,
                issued_at=issued_at,
                expires_at=expires_at,
            )
        ).signature
        return Cert(
            node_id=self.node_id,
            identity_pub=self.public_key,
            signing_pub=signing_pub,
            generation=generation,
            issued_at=float(issued_at),
            expires_at=float(expires_at),
            sig=bytes(sig),
        )


class SigningKeys:
    """This node's current signing key and certificate, rotated every `rotation_s`.

    Rotation is checked on every `sign`, so a node never signs with a key older than
    `rotation_s`. A cert expires `rotation_s + grace_s` after issue: the key's use plus the time
    peers still accept it once retired.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        *,
        boot_epoch: int,
        rotation_s: float = 3600.0,
        grace_s: float = 60.0,
    ) -> None:
        if rotation_s <= 0 or grace_s < 0:
            raise ValueError("rotation_s must be positive and grace_s non-negative")
        if not 0 <= boot_epoch < 1 << 31:
            raise ValueError("boot_epoch out of range")
        self._identity = identity
        self._boot_epoch = boot_epoch
        self._rotation_s = rotation_s
        self._grace_s = grace_s
        self._rotations = 0
        self._key: nacl.signing.SigningKey | None = None
        self._cert: Cert | None = None

    @property
    def cert(self) -> Cert | None:
        """The current certificate (None before the first `rotate` or `sign`)."""
        return self._cert

    def rotate(self, now: float, *, force: bool = False) -> bool:
        """Switch to a fresh signing key if the current one is due (or `force`); True if it did."""
        cert = self._cert
        # A clock stepped back (NTP) would leave the key issued in the future, which peers
        # refuse beyond their skew tolerance: rotate then too, so the certificate carries the
        # new time. One second of slack ignores jitter.
        age = now - cert.issued_at if cert is not None else 0.0
        if cert is not None and not force and -1.0 <= age < self._rotation_s:
            return False
        self._rotations += 1
        key = nacl.signing.SigningKey.generate()
        self._key = key
        self._cert = self._identity.issue_cert(
            bytes(key.verify_key),
            generation=(self._boot_epoch << _GENERATION_SHIFT) | self._rotations,
            issued_at=now,
            expires_at=now + self._rotation_s + self._grace_s,
        )
        log.debug(
            "rotated signing key node=%s generation=%d",
            self._identity.node_id,
            self._cert.generation,
        )
        return True

    def sign(self, data: bytes, now: float) -> tuple[Cert, bytes]:
        """Sign `data` with the current key (rotating first if due); returns (cert, signature)."""
        self.rotate(now)
        assert self._key is not None and self._cert is not None  # rotate() just set them
        return self._cert, bytes(self._key.sign(data).signature)


@dataclass
class _Peer:
    identity_pub: bytes
    # generation -> when it was first seen; pruned once a generation can no longer be accepted.
    generations: dict[int, float] = field(default_factory=dict)
    # Generations up to this one were pruned: their grace period is over.
    floor: int = -1
    warned: bool = False


class PeerKeys:
    """Verifies peers' certificates and signatures.

    Pins each node id to the identity key it was first admitted with; tracks each node's signing
    key generations so that a retired key is accepted for `grace_s` after its successor was
    first seen and refused afterwards. Verified certificates are cached, so steady-state
    verification costs one signature check.
    """

    _MAX_GENERATIONS = 8  # per node; more rotations within one grace period are not credible

    def __init__(
        self,
        *,
        grace_s: float = 60.0,
        skew_s: float = 30.0,
        max_certs: int = 4096,
        max_nodes: int = 65536,
    ) -> None:
        self._grace_s = grace_s
        self._skew_s = skew_s
        # Both bounds cap the memory a member can force by minting identities or certificates.
        # Evicting a pin forgets it (the node is re-pinned on its next message); the bound is
        # far above any real cluster, and only cluster key holders reach this code.
        self._max_certs = max_certs
        self._max_nodes = max_nodes
        self._certs: OrderedDict[Cert, nacl.signing.VerifyKey] = OrderedDict()
        self._by_ref: dict[tuple[str, int], Cert] = {}
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    def cert(self, node_id: str, generation: int) -> Cert | None:
        """A certificate verified before, by its node id and generation (a datagram may name
        its certificate this way once the receiver holds it)."""
        return self._by_ref.get((node_id, generation))

    def pinned(self, node_id: str) -> bytes | None:
        """The identity public key pinned for `node_id`, if any."""
        peer = self._peers.get(node_id)
        return peer.identity_pub if peer else None

    def verify(self, cert: Cert, message: bytes, sig: bytes, now: float) -> None:
        """Check `sig` over `message` under `cert`; raises WireRefused on anything wrong."""
        peer = self._peers.get(cert.node_id)
        if peer is not None and peer.identity_pub != cert.identity_pub:
            if not peer.warned:
                peer.warned = True
                log.warning(
                    "refusing a different identity key for a pinned node id node=%s "
                    "pinned=%s offered=%s",
                    cert.node_id,
                    peer.identity_pub.hex()[:16],
                    cert.identity_pub.hex()[:16],
                )
            raise WireRefused("identity_changed", f"node {cert.node_id} is pinned to another key")

        # Cheap checks before the certificate's signature check.
        if now > cert.expires_at + self._skew_s:
            raise WireRefused("cert_expired", f"certificate of {cert.node_id} expired")
        if cert.issued_at > now + self._skew_s:
            raise WireRefused("cert_future", f"certificate of {cert.node_id} issued in the future")
        if peer is not None:
            self._check_generation(peer, cert, now)

        verify_key = self._certs.get(cert)
        if verify_key is None:
            verify_key = self._check_cert(cert)
        else:
            self._certs.move_to_end(cert)

        if len(sig) != SIGNATURE_BYTES:
            raise WireRefused("signature", "signature has the wrong length")
        try:
            verify_key.verify(message, sig)
        except nacl.exceptions.BadSignatureError:
            raise WireRefused("signature", f"bad signature from {cert.node_id}") from None

        self._admit(peer, cert, now)

    def _check_cert(self, cert: Cert) -> nacl.signing.VerifyKey:
        if len(cert.identity_pub) != PUBLIC_KEY_BYTES or len(cert.signing_pub) != PUBLIC_KEY_BYTES:
            raise WireRefused("cert_invalid", "certificate keys have the wrong length")
        if len(cert.sig) != SIGNATURE_BYTES or cert.generation < 0:
            raise WireRefused("cert_invalid", "certificate signature or generation malformed")
        if node_id_of(cert.identity_pub) != cert.node_id:
            raise WireRefused("cert_invalid", f"node id {cert.node_id} is not its key's hash")
        signed = _cert_bytes(
            node_id=cert.node_id,
            identity_pub=cert.identity_pub,
            signing_pub=cert.signing_pub,
            generation=cert.generation,
            issued_at=cert.issued_at,
            expires_at=cert.expires_at,
        )
        try:
            nacl.signing.VerifyKey(cert.identity_pub).verify(signed, cert.sig)
        except nacl.exceptions.BadSignatureError:
            raise WireRefused("cert_invalid", f"certificate of {cert.node_id} is forged") from None
        verify_key = nacl.signing.VerifyKey(cert.signing_pub)
        self._certs[cert] = verify_key
        self._by_ref[(cert.node_id, cert.generation)] = cert
        if len(self._certs) > self._max_certs:
            old, _ = self._certs.popitem(last=False)
            if self._by_ref.get((old.node_id, old.generation)) == old:
                del self._by_ref[(old.node_id, old.generation)]
        return verify_key

    def _check_generation(self, peer: _Peer, cert: Cert, now: float) -> None:
        gens = peer.generations
        if not gens or cert.generation >= max(gens):
            return
        if cert.generation <= peer.floor:
            raise WireRefused("retired_key", f"signing key of {cert.node_id} is retired")
        superseded_at = min(t for g, t in gens.items() if g > cert.generation)
        if now - superseded_at > self._grace_s:
            raise WireRefused("retired_key", f"signing key of {cert.node_id} is retired")

    def _admit(self, peer: _Peer | None, cert: Cert, now: float) -> None:
        if peer is None:
            peer = _Peer(identity_pub=cert.identity_pub)
            self._peers[cert.node_id] = peer
            if len(self._peers) > self._max_nodes:
                self._peers.popitem(last=False)
            log.debug("pinned identity key node=%s", cert.node_id)
        else:
            self._peers.move_to_end(cert.node_id)
        gens = peer.generations
        if gens and cert.generation <= max(gens):
            return
        gens[cert.generation] = now
        self._prune(peer, now)

    def _prune(self, peer: _Peer, now: float) -> None:
        gens = peer.generations
        ordered = sorted(gens)
        # Walking from the newest down, a generation's retirement time is the earliest first
        # sighting of any newer one; once that is older than grace_s, it and all below are dead.
        superseded_at = gens[ordered[-1]]
        for g in reversed(ordered[:-1]):
            if now - superseded_at > self._grace_s:
                del gens[g]
                peer.floor = max(peer.floor, g)
            else:
                superseded_at = min(superseded_at, gens[g])
        while len(gens) > self._MAX_GENERATIONS:
            oldest = min(gens)
            del gens[oldest]
            peer.floor = max(peer.floor, oldest)
