from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from houndd.errors import HounddError, KeyFileError, WireError
from houndd.wire import Keyring, KeyringError, derive_api_token, generate_key
from houndd.wire.keyring import decode_key, encode_key, key_id
from houndd.wire.types import WireRefused
from tests.wire.keys import colliding_keys, distinct_keys


def reason(exc: pytest.ExceptionInfo[WireError]) -> str:
    assert isinstance(exc.value, WireRefused)
    return exc.value.reason


def test_seal_open_round_trip_with_key_id_prefix() -> None:
    ring = Keyring.generate()
    sealed = ring.seal(b"hello")
    assert sealed[0] == key_id(ring.primary)
    assert ring.open(sealed) == b"hello"
    assert ring.seal(b"hello") != sealed  # fresh random nonce every time
    assert b"hello" not in sealed


def test_unknown_key_tampering_and_short_input_are_refused() -> None:
    ring = Keyring.generate()
    other = next(k for k in iter(generate_key, None) if key_id(k) != key_id(ring.primary))
    with pytest.raises(WireError) as info:
        ring.open(Keyring(other).seal(b"x"))
    assert reason(info) == "unknown_key"
    tampered = bytearray(ring.seal(b"payload"))
    tampered[-1] ^= 1
    with pytest.raises(WireError) as info:
        ring.open(bytes(tampered))
    assert reason(info) == "decrypt"
    with pytest.raises(WireError) as info:
        ring.open(b"\x00" * 10)
    assert reason(info) == "malformed"


def test_same_key_id_different_key_fails_decryption_not_trial() -> None:
    a, b = colliding_keys()
    with pytest.raises(WireError) as info:
        Keyring(a).open(Keyring(b).seal(b"x"))
    assert reason(info) == "decrypt"


def test_install_is_idempotent_and_refuses_key_id_collisions() -> None:
    a, b = colliding_keys()
    ring = Keyring(a)
    ring.install(a)
    assert ring.list() == [a]
    with pytest.raises(KeyringError, match="collides"):
        ring.install(b)
    assert b not in ring


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_keys_must_be_32_bytes(bad: object) -> None:
    with pytest.raises(KeyringError):
        Keyring.generate().install(bad)  # type: ignore[arg-type]


def test_use_remove_and_list() -> None:
    old, new, spare = distinct_keys(3)
    ring = Keyring(old)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(new)
    ring.install(new)
    ring.install(spare)
    assert ring.list()[0] == old and set(ring.list()) == {old, new, spare}
    ring.use(new)
    assert ring.primary == new and ring.list()[0] == new
    with pytest.raises(HounddError, match="primary"):
        ring.remove(new)
    ring.remove(old)
    ring.remove(old)  # idempotent: cluster-wide operations get retried
    assert old not in ring and ring.list() == [new, spare]


def test_messages_follow_key_rotation() -> None:
    old, new = distinct_keys(2)
    sender, receiver = Keyring(old), Keyring(old)
    before = sender.seal(b"before")
    for ring in (sender, receiver):
        ring.install(new)
    for ring in (sender, receiver):
        ring.use(new)
    after = sender.seal(b"after")
    assert after[0] == key_id(new)
    assert receiver.open(before) == b"before"  # old key still installed
    receiver.remove(old)
    assert receiver.open(after) == b"after"
    with pytest.raises(WireError):
        receiver.open(before)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    a, b, c = distinct_keys(3)
    ring = Keyring(a, [b, c])
    path = tmp_path / "state" / "cluster.key"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0] == encode_key(ring.primary) and len(lines) == 3
    loaded = Keyring.load(path)
    assert loaded.list() == ring.list()
    assert loaded.open(ring.seal(b"m")) == b"m"


def test_single_key_file_with_comments_is_a_keyring(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "cluster.key"
    path.write_text(f"# houndd cluster key\n\n{encode_key(key)}\n")
    path.chmod(0o600)
    assert Keyring.load(path).primary == key


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(encode_key(generate_key()) + "\nnot-base64!\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=rf"{path}:2"):
        Keyring.load(path)
    path.write_text("\n")
    with pytest.raises(KeyFileError, match="no key"):
        Keyring.load(path)
    path.write_text(encode_key(generate_key()) + "\n")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Keyring.load(path)


def test_decode_key_refuses_wrong_lengths() -> None:
    with pytest.raises(KeyringError):
        decode_key(encode_key(b"x" * 16))
    key = generate_key()
    assert decode_key(" " + encode_key(key) + "\n") == key


def test_api_token_is_derived_deterministically_and_per_key() -> None:
    a, b = distinct_keys(2)
    token = derive_api_token(a)
    assert token == derive_api_token(a) and token != derive_api_token(b)
    assert len(token) == 64 and int(token, 16) >= 0
    assert a.hex() not in token
    # keyed with a personalisation: not the plain hash of the key
    assert token != hashlib.blake2b(a, digest_size=32).hexdigest()
    ring = Keyring(a, [b])
    assert ring.api_tokens() == [derive_api_token(a), derive_api_token(b)]
