"""The cluster keyring: symmetric keys that make a node a member (the Serf model).

One primary key seals every outgoing message; every installed key opens incoming ones. A sealed
message is `key id (1 byte) || SecretBox nonce (24) || ciphertext`; the key id is the first byte
of blake2b(key), so a receiver picks the key without trial decryption. Rotating the cluster key is
`install` new everywhere, `use` new everywhere, `remove` old everywhere.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import nacl.exceptions
import nacl.secret
import nacl.utils

from houndd.errors import HounddError, KeyFileError
from houndd.keyfiles import CLUSTER_KEY_BYTES, parse_key, read_cluster_keys, write_secret
from houndd.keyfiles import derive_api_token as _derive_api_token
from houndd.wire.types import WireRefused

KEY_BYTES = CLUSTER_KEY_BYTES
"""Length of a cluster key (XSalsa20-Poly1305)."""

_NONCE_BYTES = 24
_MAC_BYTES = 16
_MIN_SEALED = 1 + _NONCE_BYTES + _MAC_BYTES


class KeyringError(HounddError, ValueError):
    """A keyring operation was refused (bad key, key id collision, removing the primary...)."""


def generate_key() -> bytes:
    """A fresh random cluster key."""
    return bytes(nacl.utils.random(KEY_BYTES))


def key_id(key: bytes) -> int:
    """The 1-byte id of a key that prefixes every message sealed with it."""
    return hashlib.blake2b(key).digest()[0]


def encode_key(key: bytes) -> str:
    """The text form of a key (standard base64), as in key files and `houndd keys` output."""
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Parse the text form of a key; raises KeyringError if it is not 32 base64 bytes."""
    try:
        return parse_key(text)
    except ValueError as e:
        raise KeyringError(str(e)) from None


def derive_api_token(key: bytes) -> str:
    """The HTTP API bearer token derived from a cluster key (see `houndd.keyfiles`)."""
    _check_key(key)
    return _derive_api_token(key)


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise KeyringError(f"a cluster key must be {KEY_BYTES} bytes")


class Keyring:
    """One primary key plus accepted keys. Not thread-safe; owned by the event loop."""

    def __init__(self, primary: bytes, accepted: Iterable[bytes] = ()) -> None:
        _check_key(primary)
        self._boxes: dict[int, tuple[bytes, nacl.secret.SecretBox]] = {}
        self._primary = primary
        self.install(primary)
        for key in accepted:
            self.install(key)

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring holding one fresh random primary key."""
        return cls(generate_key())

    @property
    def primary(self) -> bytes:
        """The key that seals outgoing messages."""
        return self._primary

    def list(self) -> builtins.list[bytes]:
        """Installed keys, primary first."""
        return [self._primary] + [k for k, _ in self._boxes.values() if k != self._primary]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            return False
        entry = self._boxes.get(key_id(key))
        return entry is not None and entry[0] == key

    def knows_key_id(self, kid: int) -> bool:
        """True if a message prefixed with `kid` could be opened (the cheap check)."""
        return kid in self._boxes

    def install(self, key: bytes) -> None:
        """Accept messages sealed with `key`. Idempotent.

        Refused if another installed key has the same 1-byte id (generate a new key then).
        """
        _check_key(key)
        kid = key_id(key)
        existing = self._boxes.get(kid)
        if existing is not None:
            if existing[0] == key:
                return
            raise KeyringError(f"key id {kid} collides with an installed key; generate another key")
        self._boxes[kid] = (key, nacl.secret.SecretBox(key))

    def use(self, key: bytes) -> None:
        """Make an installed key the primary one."""
        _check_key(key)
        if key not in self:
            raise KeyringError("the key is not installed; install it on every node first")
        self._primary = key

    def remove(self, key: bytes) -> None:
        """Stop accepting `key`. Idempotent for keys not installed (cluster-wide ops are retried).

        Refuses the primary key: `use` another key first.
        """
        _check_key(key)
        if key == self._primary:
            raise KeyringError("refusing to remove the primary key; `use` another key first")
        if key in self:
            del self._boxes[key_id(key)]

    def api_tokens(self) -> builtins.list[str]:
        """Bearer tokens derived from every installed key, primary first, so that API clients
        keep working while a key rotation is in progress."""
        return [derive_api_token(k) for k in self.list()]

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate under the primary key, prefixed with its key id."""
        kid = key_id(self._primary)
        return bytes([kid]) + bytes(self._boxes[kid][1].encrypt(plaintext))

    def open(self, data: bytes) -> bytes:
        """Authenticate and decrypt a sealed message; raises WireError (`WireRefused` with
        reason `malformed`, `unknown_key` or `decrypt`)."""
        if len(data) < _MIN_SEALED:
            raise WireRefused("malformed", f"{len(data)} bytes is too short for a sealed message")
        entry = self._boxes.get(data[0])
        if entry is None:
            raise WireRefused("unknown_key", f"no installed key has id {data[0]}")
        try:
            return bytes(entry[1].decrypt(bytes(data[1:])))
        except nacl.exceptions.CryptoError:
            raise WireRefused("decrypt", f"decryption failed under key id {data[0]}") from None

    # --- persistence -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring file: one base64 key per line, the primary first.

        A file holding a single key (what `houndd init` writes as the cluster key) is a keyring
        with that key as primary. Raises KeyFileError naming the file and line.
        """
        target = Path(path)
        keys = read_cluster_keys(target)
        try:
            return cls(keys[0], keys[1:])
        except KeyringError as e:
            raise KeyFileError(f"{target}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring (primary first) atomically with mode 0600."""
        text = "".join(encode_key(k) + "\n" for k in self.list())
        write_secret(path, text.encode("ascii"))
