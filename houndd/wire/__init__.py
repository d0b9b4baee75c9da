"""The secure wire protocol: every peer message crosses `Wire.seal` / `Wire.open`.

Sealing: the envelope is msgpack-encoded, signed with this node's current signing key (its
certificate, signed by the identity key, rides along as `{cert, sig, body}`), and the whole is
sealed with SecretBox under the keyring's primary key, prefixed with the key id. A datagram
to an address that was sent the current certificate before names it instead
(`{ref: [node id, generation], sig, body}`): the certificate is about half of a small
message. A receiver that does not hold the named certificate refuses the datagram with
`CertUnknown` and asks the sender for it (the bus's CERT_NEEDED), after which the sender
attaches it again (`resend_cert`).

Opening runs the cheap checks first: size cap, known key id, then decryption, the certificate
and signature, the envelope's strict decoding, and finally the replay window. Anything wrong is a
`WireError`; `Wire.refused` counts refusals by reason for the metrics.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

from houndd.errors import WireError
from houndd.wire import schema
from houndd.wire.codec import (
    WIRE_VERSION,
    Envelope,
    decode_envelope,
    encode_envelope,
    pack,
    unpack,
)
from houndd.wire.fields import NODE_ID_PATTERN
from houndd.wire.keyring import Keyring, KeyringError, derive_api_token, generate_key
from houndd.wire.replay import ReplayGuard
from houndd.wire.signing import Cert, NodeIdentity, PeerKeys, SigningKeys
from houndd.wire.types import CertUnknown, MsgType, WireRefused

__all__ = [
    "WIRE_VERSION",
    "CertUnknown",
    "Envelope",
    "Keyring",
    "KeyringError",
    "MsgType",
    "NodeIdentity",
    "Wire",
    "WireError",
    "WireRefused",
    "decode_envelope",
    "derive_api_token",
    "encode_envelope",
    "generate_key",
    "schema",
]

log = logging.getLogger("houndd.wire")

NODE_ID = re.compile(NODE_ID_PATTERN)

# The signed blob has exactly three keys and the cert seven fields (a reference two); parsing
# it happens before any signature check, so its item cap stays tiny (see codec.unpack).
_BLOB_MAX_ITEMS = 8
_BLOB_KEYS = frozenset({"cert", "sig", "body"})
_REF_KEYS = frozenset({"ref", "sig", "body"})
MAX_CERT_SENT = 65536
"""Addresses remembered as holding our certificate; the oldest is forgotten beyond this (it
then gets the certificate again)."""


class Wire:
    """Seals and opens this node's peer messages. Pure apart from randomness (keys, nonces):
    the caller passes `now`, and nothing here does IO."""

    def __init__(
        self,
        *,
        cluster_id: str,
        keyring: Keyring,
        identity: NodeIdentity,
        boot_epoch: int,
        rotation_s: float = 3600.0,
        grace_s: float = 60.0,
        replay_window_s: float = 30.0,
        max_senders: int = 4096,
        started_at: float | None = None,
    ) -> None:
        """`started_at` (wall clock): messages stamped earlier are refused, so a restart
        opens no replay window (see `houndd.wire.replay`); the daemon passes its start."""
        self.cluster_id = cluster_id
        self.keyring = keyring
        self.identity = identity
        self.node_id: str = identity.node_id
        self.boot_epoch = boot_epoch
        self.refused: Counter[str] = Counter()
        self.signing = SigningKeys(
            identity, boot_epoch=boot_epoch, rotation_s=rotation_s, grace_s=grace_s
        )
        # A peer's clock may be off by up to the replay window, so certificate times get the
        # same tolerance.
        self.peers = PeerKeys(grace_s=grace_s, skew_s=replay_window_s, max_nodes=max_senders * 16)
        self._replay = ReplayGuard(
            window_s=replay_window_s, max_senders=max_senders, started_at=started_at
        )
        self._seq = 0
        self._cert_sent: OrderedDict[Hashable, int] = OrderedDict()

    def resend_cert(self, to: Hashable) -> None:
        """The next datagram to `to` carries the full certificate again."""
        self._cert_sent.pop(to, None)

    def seal(
        self, msg_type: MsgType, payload: Mapping[str, Any], now: float, *, to: Hashable = None
    ) -> bytes:
        """Build, sign and encrypt one message. Each call uses a new sequence number. With
        `to` (a datagram's destination) the certificate goes in full only if `to` was not
        sent the current one yet; without it, always."""
        self._seq += 1
        body = encode_envelope(
            Envelope(
                version=WIRE_VERSION,
                cluster_id=self.cluster_id,
                type=MsgType(msg_type),
                sender=self.node_id,
                boot_epoch=self.boot_epoch,
                seq=self._seq,
                ts=float(now),
                payload=dict(payload),
            )
        )
        cert, sig = self.signing.sign(body, now)
        blob: dict[str, Any]
        if to is not None and self._cert_sent.get(to) == cert.generation:
            self._cert_sent.move_to_end(to)
            blob = {"ref": [self.node_id, cert.generation], "sig": sig, "body": body}
        else:
            if to is not None:
                self._cert_sent[to] = cert.generation
                if len(self._cert_sent) > MAX_CERT_SENT:
                    self._cert_sent.popitem(last=False)
            blob = {"cert": schema.encode(cert), "sig": sig, "body": body}
        return self.keyring.seal(pack(blob))

    def open(self, data: bytes, now: float, *, max_size: int) -> Envelope:
        """Authenticate, decode and replay-check one message; WireError on anything wrong."""
        try:
            return self._open(data, now, max_size)
        except WireRefused as e:
            self.refused[e.reason] += 1
            log.debug("refused message reason=%s detail=%s", e.reason, e.detail)
            raise
        except WireError as e:
            self.refused["malformed"] += 1
            log.debug("refused message reason=malformed detail=%s", e)
            raise

    def _open(self, data: bytes, now: float, max_size: int) -> Envelope:
        if len(data) > max_size:
            raise WireRefused("oversize", f"{len(data)} bytes exceeds the cap of {max_size}")
        if not data or not self.keyring.knows_key_id(data[0]):
            raise WireRefused("unknown_key", "sealed under a key not in the keyring")
        plain = self.keyring.open(data)

        blob = unpack(plain, max_size, max_items=_BLOB_MAX_ITEMS)
        if not isinstance(blob, dict) or blob.keys() not in (_BLOB_KEYS, _REF_KEYS):
            raise WireRefused("malformed", "expected a signed blob {cert|ref, sig, body}")
        body, sig = blob["body"], blob["sig"]
        if not isinstance(body, bytes) or not isinstance(sig, bytes):
            raise WireRefused("malformed", "body and sig must be binary")
        cert = self._cert_of(blob)
        self.peers.verify(cert, body, sig, now)

        env = decode_envelope(body, max_size)
        if env.sender != cert.node_id:
            raise WireRefused("sender", f"sender {env.sender} signed as {cert.node_id}")
        if env.cluster_id != self.cluster_id:
            raise WireRefused("cluster", f"message for cluster {env.cluster_id!r}")
        self._replay.accept(env.sender, env.boot_epoch, env.seq, env.ts, now)
        return env

    def _cert_of(self, blob: dict[str, Any]) -> Cert:
        if "cert" in blob:
            try:
                return schema.decode(Cert, blob["cert"])
            except schema.SchemaError as e:
                raise WireRefused("malformed", f"cert.{e}") from None
        ref = blob["ref"]
        if (
            not isinstance(ref, list)
            or len(ref) != 2
            or not isinstance(ref[0], str)
            or NODE_ID.fullmatch(ref[0]) is None
            or isinstance(ref[1], bool)
            or not isinstance(ref[1], int)
        ):
            raise WireRefused("malformed", "ref: expected [node id, generation]")
        cert = self.peers.cert(ref[0], ref[1])
        if cert is None:
            raise CertUnknown(ref[0], ref[1])
        return cert
