"""The shapes of names every part of houndd agrees on: hosts, node names, label keys and values.

The wire schema bounds peer messages with these rules (`houndd.wire.fields`), the config refuses
values that would break them (a node whose own record broke them would have its gossip refused
by every peer), and the API applies the same label rules. Standard library only: the CLI loads
the config on every call and must not pay for more.
"""

from __future__ import annotations

import functools
import ipaddress
import re

MAX_NAME_CHARS = 253
"""Node names default to hostnames: a DNS name's limit."""
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 253

_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def printable_problem(value: str) -> str | None:
    """None if `value` has no control characters (it ends up in logs and terminals)."""
    return None if value.isprintable() else "contains control characters"


@functools.lru_cache(maxsize=1024)
def is_ip_address(host: str) -> bool:
    """True if `host` is an IPv4 or IPv6 address. Cached: every datagram sent asks it of its
    destination, and parsing one costs more than sealing a small message."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_problem(host: str) -> str | None:
    """None if `host` is an IP address or an RFC 1123 hostname, else what is wrong."""
    if is_ip_address(host):
        return None
    if not 0 < len(host) <= MAX_NAME_CHARS:
        return f"expected 1..{MAX_NAME_CHARS} characters"
    if all(_HOST_LABEL.fullmatch(part) for part in host.split(".")):
        return None
    return "expected an IP address or an RFC 1123 hostname"


def label_key_problem(key: str) -> str | None:
    """None if `key` is a label key the API accepts: 1..63 of letters, digits, - _ . /"""
    if not 0 < len(key) <= MAX_LABEL_KEY_CHARS:
        return f"a label key has 1..{MAX_LABEL_KEY_CHARS} characters"
    if not all(c.isalnum() or c in "-_./" for c in key):
        return "a label key has only letters, digits and - _ . /"
    return None


def label_value_problem(value: str) -> str | None:
    """None if `value` is a label value the API accepts: at most 253 characters."""
    if len(value) > MAX_LABEL_VALUE_CHARS:
        return f"a label value has at most {MAX_LABEL_VALUE_CHARS} characters"
    return None
