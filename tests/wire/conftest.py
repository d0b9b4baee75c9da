"""Fixtures for the wire tests: nodes sharing one cluster keyring, with a fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from houndd.wire import Keyring, NodeIdentity, Wire

MAX_UDP = 65536
T0 = 1_700_000_000.0

WireFactory = Callable[..., Wire]


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.generate()


@pytest.fixture
def make_wire(keyring: Keyring) -> WireFactory:
    """A node on the shared keyring; pass identity, boot_epoch, keyring or timing overrides."""

    def make(**overrides: Any) -> Wire:
        options: dict[str, Any] = {
            "cluster_id": "test-cluster",
            "keyring": keyring,
            "identity": NodeIdentity.generate(),
            "boot_epoch": 1,
        }
        options.update(overrides)
        return Wire(**options)

    return make
