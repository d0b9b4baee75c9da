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

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from houndd.errors import WireError
from houndd.image.reference import InvalidReference, parse_reference
from houndd.wire.fields import MAX_IMAGE_CHARS, NodeId, PlanId
from houndd.wire.payloads import message
from houndd.wire.schema import Check, Match, Range, Size
from houndd.wire.types import MsgType

__all__ = [
    "FRAME_PLAIN_BYTES",
    "BlobRequest",
    "FrameDecoder",
    "FrameEncoder",
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


Key = Annotated[bytes, Size(SecretBox.KEY_SIZE, SecretBox.KEY_SIZE)]
NodeList = Annotated[tuple[NodeId, ...], Size(0, MAX_NODES)]
Chain = Annotated[tuple[NodeId, ...], Size(0, MAX_CHAIN)]
BlobDigest = Annotated[str, Match(r"sha256:[0-9a-f]{64}", "a digest (sha256: and 64 hex)")]
BlobSize = Annotated[int, Range(0, MAX_BLOB_BYTES)]


def repository_problem(value: str) -> str | None:
    """None if `value` is `registry/repository` (no tag, no digest), else what is wrong."""
    try:
        ref = parse_reference(value)
    except InvalidReference:
        return "expected an image repository"
    if f"{ref.registry}/{ref.repository}" != value:
        return "expected registry/repository without tag or digest"
    return None


Repository = Annotated[
    str, Size(1, MAX_IMAGE_CHARS), Check(repository_problem, "registry/repository")
]


@message(MsgType.BLOB_GET)
@dataclass(frozen=True)
class BlobRequest:
    """What a node asks a peer for. Credentials are those of the plan (or empty: the server
    uses its own), as readable to members as the plan's sealed credentials already are."""

    digest: BlobDigest
    size: BlobSize
    offset: BlobSize
    through: bool  # may the server fetch it for us, or only serve a complete copy
    plan: PlanId
    name: Repository  # the image's repository at its origin: `registry/repository`
    image: BlobDigest  # manifest digest the blob belongs to
    nodes: NodeList  # the nodes that need the image (the tree's members)
    chain: Chain  # nodes already waiting on this request: never ask them back
    key: Key
    username: Annotated[str, Size(0, 1024)] = ""
    password: Annotated[str, Size(0, 8192)] = ""

    def __post_init__(self) -> None:
        if self.offset > self.size:
            raise ValueError("offset: beyond the blob's size")

    def __repr__(self) -> str:  # never show the key or the password
        return (
            f"BlobRequest(digest={self.digest!r}, offset={self.offset}, size={self.size}, "
            f"through={self.through}, plan={self.plan!r}, name={self.name!r})"
        )


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
