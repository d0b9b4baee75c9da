"""The one table from `MsgType` to payload class, and the one function that decodes a payload.

Every message type maps to exactly one frozen dataclass. The classes live with the subsystem
whose concepts they carry (`houndd.membership.messages`, `houndd.coordinator.messages`): the
coordinator's messages carry its replicated records themselves, so the wire layer, which every
package imports, imports none of them. Each class registers itself here with `@message(type)`;
the table belongs to the wire layer, so there is one schema for the whole protocol, and a test
checks that every live message type has its class once those modules are imported.

`decode_payload(msg_type, obj)` builds the registered class from a msgpack-decoded value with
`houndd.wire.schema.decode`: unknown, missing and out-of-bounds fields are a `SchemaError`
(a `WireError`). `encode_payload(payload)` is the inverse and also names the message type, so
a payload can never be sent under another type's number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from houndd.wire import schema
from houndd.wire.schema import SchemaError
from houndd.wire.types import MsgType

P = TypeVar("P")

_CLASSES: dict[MsgType, type[Any]] = {}
_TYPES: dict[type[Any], MsgType] = {}


def message(msg_type: MsgType) -> Callable[[type[P]], type[P]]:
    """Class decorator: `cls` is the payload of `msg_type` (one class per type, and back)."""

    def register(cls: type[P]) -> type[P]:
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"{cls.__name__}: a payload is a frozen dataclass")
        known = _CLASSES.get(msg_type)
        if (known is not None and known is not cls) or _TYPES.get(cls, msg_type) != msg_type:
            raise ValueError(f"{msg_type.name} and {cls.__name__}: one class per message type")
        _CLASSES[msg_type] = cls
        _TYPES[cls] = msg_type
        return cls

    return register


def registered() -> Mapping[MsgType, type[Any]]:
    """Message type -> payload class, for every class registered so far."""
    return dict(_CLASSES)


def msg_type_of(payload: object) -> MsgType:
    """The message type of a payload instance; TypeError for anything not registered."""
    msg_type = _TYPES.get(type(payload))
    if msg_type is None:
        raise TypeError(f"{type(payload).__name__} is not a registered payload class")
    return msg_type


def decode_payload(msg_type: MsgType, obj: object) -> Any:
    """The payload of a `msg_type` message, strictly decoded; `SchemaError` if it does not
    fit its class (or no class is registered for the type)."""
    cls = _CLASSES.get(msg_type)
    if cls is None:
        raise SchemaError("", f"no payload schema for message type {msg_type.name}")
    return schema.decode(cls, obj)


def encode_payload(payload: object) -> tuple[MsgType, dict[str, Any]]:
    """(message type, msgpack-ready map) of a registered payload instance."""
    if not dataclasses.is_dataclass(payload) or isinstance(payload, type):
        raise TypeError(f"expected a payload instance, got {type(payload).__name__}")
    return msg_type_of(payload), schema.encode(payload)
