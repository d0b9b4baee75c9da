"""The peer blob stream: frames decrypt only in order, under the request's key, and a stream
counts as complete only with its end frame."""

from __future__ import annotations

import dataclasses
import os

import pytest

from houndd.blobs.protocol import (
    FRAME_PLAIN_BYTES,
    BlobRequest,
    FrameDecoder,
    FrameEncoder,
)
from houndd.errors import WireError
from houndd.wire import schema
from houndd.wire.payloads import decode_payload
from houndd.wire.types import MsgType

KEY = bytes(range(32))


def _request(**changes: object) -> BlobRequest:
    base = BlobRequest(
        digest="sha256:" + "1" * 64,
        size=100,
        offset=10,
        through=True,
        plan="p1",
        name="127.0.0.1:5000/app/x",
        image="sha256:" + "2" * 64,
        nodes=("aa" * 8, "bb" * 8),
        chain=("aa" * 8,),
        key=KEY,
        username="u",
        password="secret-pw",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_roundtrip_in_arbitrary_pieces() -> None:
    data = os.urandom(3 * FRAME_PLAIN_BYTES + 123)
    enc = FrameEncoder(KEY)
    wire = b"".join(enc.frames(data)) + enc.end()
    dec = FrameDecoder(KEY)
    out = b""
    for i in range(0, len(wire), 1000):
        out += b"".join(dec.feed(wire[i : i + 1000]))
    assert out == data and dec.ended


def test_truncated_stream_never_ends() -> None:
    enc = FrameEncoder(KEY)
    frames = list(enc.frames(os.urandom(FRAME_PLAIN_BYTES * 2)))
    dec = FrameDecoder(KEY)
    dec.feed(b"".join(frames))
    assert not dec.ended  # no end frame: the reader must treat the transfer as failed


@pytest.mark.parametrize("tamper", ["swap", "drop", "flip", "other-key", "replay-end"])
def test_tampering_is_detected(tamper: str) -> None:
    enc = FrameEncoder(KEY)
    frames = [enc.frame(b"a" * 100), enc.frame(b"b" * 100), enc.end()]
    if tamper == "swap":
        frames[0], frames[1] = frames[1], frames[0]
    elif tamper == "drop":
        del frames[0]
    elif tamper == "flip":
        frames[1] = frames[1][:-1] + bytes([frames[1][-1] ^ 1])
    elif tamper == "other-key":
        frames = [FrameEncoder(bytes(32)).frame(b"a" * 100)]
    elif tamper == "replay-end":
        frames = [frames[2]]  # an end frame from position 2 cannot pass as the first frame
    with pytest.raises(WireError):
        FrameDecoder(KEY).feed(b"".join(frames))


def test_oversize_frame_header_is_refused_before_buffering() -> None:
    with pytest.raises(WireError, match="frame of"):
        FrameDecoder(KEY).feed((10**9).to_bytes(4, "big"))


def test_bytes_after_the_end_are_refused() -> None:
    enc = FrameEncoder(KEY)
    dec = FrameDecoder(KEY)
    dec.feed(enc.end())
    with pytest.raises(WireError):
        dec.feed(b"x")


def test_request_encodes_and_decodes_strictly() -> None:
    req = _request()
    decoded = decode_payload(MsgType.BLOB_GET, schema.encode(req))
    assert decoded == req
    assert "secret-pw" not in repr(req) and str(KEY) not in repr(req)
    with pytest.raises(WireError):
        decode_payload(MsgType.BLOB_GET, {**schema.encode(req), "extra": 1})


@pytest.mark.parametrize(
    "changes",
    [
        {"digest": "sha256:xyz"},
        {"digest": "md5:" + "1" * 32},
        {"offset": 101},
        {"offset": -1},
        {"size": -5},
        {"key": b"short"},
        {"nodes": ("not hex!",)},
        {"chain": tuple("a" for _ in range(65))},
        {"name": "127.0.0.1:5000/app/x:tag"},
        {"name": "Not A Name"},
        {"image": "latest"},
    ],
)
def test_bad_requests_name_the_field(changes: dict[str, object]) -> None:
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
    with pytest.raises(WireError, match=next(iter(changes))):
        decode_payload(MsgType.BLOB_GET, {**schema.encode(_request()), **raw})
