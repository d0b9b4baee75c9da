"""The envelope every peer message travels in, and bounded msgpack decoding.

An envelope is a msgpack array `[version, cluster_id, type, sender, boot_epoch, seq, ts,
payload]`; the version comes first so that a later layout can be told apart. Decoding is strict
(exact arity and types, string map keys, no ext types) and bounded: every declared str, bin,
array and map length is checked against a cap before msgpack allocates anything for it.
Never pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import msgpack

from houndd.wire.types import MsgType, WireRefused

WIRE_VERSION = 1
"""Envelope layout version; a node refuses envelopes of any other version."""

_ENVELOPE_ARITY = 8


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded peer message. `sender` is the node id of the signer; `payload` is the
    msgpack-decoded map, to be checked with `houndd.wire.schema.decode`."""

    version: int
    cluster_id: str
    type: MsgType
    sender: str
    boot_epoch: int
    seq: int
    ts: float
    payload: Any


def encode_envelope(env: Envelope) -> bytes:
    """Serialise an envelope. A payload value msgpack cannot carry raises TypeError."""
    return pack(
        [
            env.version,
            env.cluster_id,
            int(env.type),
            env.sender,
            env.boot_epoch,
            env.seq,
            env.ts,
            env.payload,
        ]
    )


def decode_envelope(data: bytes, max_size: int) -> Envelope:
    """Parse and check an envelope; any problem raises `WireError` (a `WireRefused`)."""
    obj = unpack(data, max_size)
    if not isinstance(obj, list) or not obj:
        _malformed(f"expected an envelope array, got {type(obj).__name__}")
    version = obj[0]
    if version != WIRE_VERSION or isinstance(version, bool):
        raise WireRefused(
            "version", f"unsupported wire version {version!r}; this node speaks {WIRE_VERSION}"
        )
    if len(obj) != _ENVELOPE_ARITY:
        _malformed(f"expected {_ENVELOPE_ARITY} envelope fields, got {len(obj)}")
    _, cluster_id, raw_type, sender, boot_epoch, seq, ts, payload = obj
    if not isinstance(cluster_id, str):
        _malformed("cluster_id: expected a string")
    if not _is_uint(raw_type):
        _malformed("type: expected an integer")
    try:
        msg_type = MsgType(raw_type)
    except ValueError:
        raise WireRefused("unknown_type", f"unknown message type {raw_type}") from None
    if not isinstance(sender, str) or not sender:
        _malformed("sender: expected a node id")
    if not _is_uint(boot_epoch):
        _malformed("boot_epoch: expected a non-negative integer")
    if not _is_uint(seq):
        _malformed("seq: expected a non-negative integer")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        _malformed("ts: expected a finite number")
    if not isinstance(payload, dict):
        _malformed("payload: expected a map")
    return Envelope(
        version=WIRE_VERSION,
        cluster_id=cluster_id,
        type=msg_type,
        sender=sender,
        boot_epoch=boot_epoch,
        seq=seq,
        ts=float(ts),
        payload=payload,
    )


def pack(obj: object) -> bytes:
    """msgpack-encode with bin type for bytes (so they come back as bytes, not str)."""
    return cast(bytes, msgpack.packb(obj, use_bin_type=True))


def unpack(data: bytes, max_size: int, *, max_items: int | None = None) -> object:
    """Decode exactly one msgpack object from `data`, bounded by `max_size` bytes.

    `max_items` caps any one array or map length (default: the data length, since every item
    takes at least one byte). The C unpacker allocates an array's slots as soon as it reads the
    header, so callers that parse bytes not yet authenticated should pass a small `max_items`.
    Ext types (including msgpack timestamps) are refused: nothing of ours uses them.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        _malformed(f"expected bytes, got {type(data).__name__}")
    size = len(data)
    if size > max_size:
        raise WireRefused("oversize", f"{size} bytes exceeds the cap of {max_size}")
    items = min(size, max_size) if max_items is None else min(max_items, size)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_buffer_size=max(max_size, 1),
        # The initial buffer is sized from read_size (by default up to 1 MiB): size it to the
        # message so decoding a 100-byte datagram does not allocate the whole cap.
        read_size=max(1, min(size, max_size)),
        max_str_len=max_size,
        max_bin_len=max_size,
        max_array_len=items,
        max_map_len=items,
        max_ext_len=0,
        ext_hook=_refuse_ext,
    )
    try:
        unpacker.feed(data)
        obj = unpacker.unpack()
        consumed = unpacker.tell()
    except WireRefused:
        raise
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as e:
        # UnpackException covers OutOfData (truncated input, or a declared length beyond the
        # data), ValueError the caps, invalid UTF-8 and non-str map keys.
        _malformed(f"invalid msgpack: {type(e).__name__}: {str(e)[:120]}")
    if consumed != size:
        _malformed(f"{size - consumed} trailing bytes after the message")
    return cast(object, obj)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse_ext(code: int, data: bytes) -> NoReturn:
    raise WireRefused("malformed", f"msgpack ext type {code} is not allowed")


def _malformed(detail: str) -> NoReturn:
    raise WireRefused("malformed", detail)
