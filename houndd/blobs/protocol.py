"""The peer blob protocol: one sealed request, one encrypted stream back (pure, no IO).

Request: `POST /v1/peer/blob` whose body is a `Wire.seal(MsgType.BLOB_GET, BlobRequest)`
envelope: sealed with the cluster key, signed by the sender, replay-checked like every peer
message. It names the blob, the offset to start at, the image it belongs to and a fresh
32-byte `key` for the answer.

Answer: HTTP 200 and a stream of frames, each `u32 length | SecretBox(key, nonce=n)(chunk)`
with n = 0, 1, 2, ... (the nonce is implicit, so frames cannot be reordered, dropped or
replayed without failing to decrypt). The last frame is an empty chunk: the server sends it
only after the blob verified against its digest, so a stream that ends without it (the
server died, or found the bytes it was relaying wrong) is a failed transfer, never a complete
one. The key travels only inside the sealed request, so neither the request nor the bytes
mean anything to a host without the cluster key, on the wire or replayed.

Errors before the stream starts are HTTP statuses: 404 not held (complete-only request),
409 the request would loop, 503 the server is at its upload limit, 502 its own fetch failed,
400/401/403 the request itself was refused.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from houndd.errors import WireError
from houndd.image.reference import InvalidReference, parse_reference

__all__ = [
    "FRAME_PLAIN_BYTES",
    "BlobRequest",
    "FrameDecoder",
    "FrameEncoder",
    "check_request",
]

FRAME_PLAIN_BYTES = 1 << 16
"""Plaintext per frame: small enough to pipeline through hops, large enough to be cheap."""
_MAX_FRAME_BYTES = FRAME_PLAIN_BYTES + SecretBox.MACBYTES
_LENGTH = struct.Struct(">I")
MAX_NODES = 10_000
"""Caps a request's node list: a plan has at most this many target nodes per image."""
MAX_CHAIN = 64
"""Caps the relay chain; a tree of fanout >= 2 over MAX_NODES nodes is 14 deep."""
MAX_BLOB_BYTES = 1 << 42
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
_NODE_ID = re.compile(r"[0-9a-f]{1,64}", re.ASCII)


@dataclass(frozen=True)
class BlobRequest:
    """What a node asks a peer for. Credentials are those of the plan (or empty: the server
    uses its own), as readable to members as the plan's sealed credentials already are."""

    digest: str
    size: int
    offset: int
    through: bool  # may the server fetch it for us, or only serve a complete copy
    plan: str
    name: str  # the image's repository at its origin: `registry/repository` (BlobContext.name)
    image: str  # manifest digest the blob belongs to
    nodes: tuple[str, ...]  # the nodes that need the image (the tree's members)
    chain: tuple[str, ...]  # nodes already waiting on this request: never ask them back
    key: bytes
    username: str = ""
    password: str = ""

    def __repr__(self) -> str:  # never show the key or the password
        return (
            f"BlobRequest(digest={self.digest!r}, offset={self.offset}, size={self.size}, "
            f"through={self.through}, plan={self.plan!r}, name={self.name!r})"
        )


def check_request(req: BlobRequest) -> None:
    """Range and format checks a schema cannot express; WireError names the field."""
    if not _DIGEST.fullmatch(req.digest):
        raise WireError("digest: expected sha256:<64 hex>")
    if not _DIGEST.fullmatch(req.image):
        raise WireError("image: expected sha256:<64 hex>")
    if not 0 <= req.size <= MAX_BLOB_BYTES:
        raise WireError("size: out of range")
    if not 0 <= req.offset <= req.size:
        raise WireError("offset: out of range")
    if len(req.key) != SecretBox.KEY_SIZE:
        raise WireError("key: expected 32 bytes")
    if len(req.nodes) > MAX_NODES or not all(_NODE_ID.fullmatch(n) for n in req.nodes):
        raise WireError("nodes: expected at most 10000 node ids")
    if len(req.chain) > MAX_CHAIN or not all(_NODE_ID.fullmatch(n) for n in req.chain):
        raise WireError("chain: expected at most 64 node ids")
    if len(req.plan) > 64 or len(req.username) > 1024 or len(req.password) > 8192:
        raise WireError("plan, username or password too long")
    try:
        ref = parse_reference(req.name)
    except InvalidReference:
        raise WireError("name: not an image repository") from None
    if f"{ref.registry}/{ref.repository}" != req.name:
        raise WireError("name: expected registry/repository without tag or digest")


def _nonce(counter: int) -> bytes:
    return counter.to_bytes(SecretBox.NONCE_SIZE, "big")


class FrameEncoder:
    """Turns plaintext chunks into frames under one request's key."""

    def __init__(self, key: bytes) -> None:
        self._box = SecretBox(key)
        self._counter = 0

    def frame(self, chunk: bytes) -> bytes:
        """One frame; chunks larger than FRAME_PLAIN_BYTES are the caller's bug."""
        if len(chunk) > FRAME_PLAIN_BYTES:
            raise ValueError("chunk larger than FRAME_PLAIN_BYTES")
        sealed = self._box.encrypt(chunk, _nonce(self._counter)).ciphertext
        self._counter += 1
        return _LENGTH.pack(len(sealed)) + sealed

    def frames(self, data: bytes) -> Iterator[bytes]:
        """`data` split into as many frames as it takes (none for empty data)."""
        for start in range(0, len(data), FRAME_PLAIN_BYTES):
            yield self.frame(data[start : start + FRAME_PLAIN_BYTES])

    def end(self) -> bytes:
        """The end frame: the server vouches that the blob verified."""
        return self.frame(b"")


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get plaintext chunks back.

    WireError on a frame that is oversize or does not decrypt, and on bytes after the end.
    """

    def __init__(self, key: bytes) -> None:
        self._box = SecretBox(key)
        self._counter = 0
        self._buffer = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> list[bytes]:
        if self.ended and data:
            raise WireError("bytes after the end frame")
        self._buffer += data
        out: list[bytes] = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > _MAX_FRAME_BYTES or length < SecretBox.MACBYTES:
                raise WireError(f"frame of {length} bytes")
            if len(self._buffer) < _LENGTH.size + length:
                break
            sealed = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                plain = self._box.decrypt(sealed, _nonce(self._counter))
            except CryptoError:
                raise WireError("frame does not decrypt") from None
            self._counter += 1
            if not plain:
                self.ended = True
                if self._buffer:
                    raise WireError("bytes after the end frame")
                break
            out.append(plain)
        return out
