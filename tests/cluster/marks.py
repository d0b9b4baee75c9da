"""Markers every multi-host test module carries: netns, and skips naming what is missing."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.cluster.harness import houndd_missing
from tests.fixtures.services import missing_binaries

_missing = missing_binaries() + [t for t in ("ip", "tc", "iptables") if shutil.which(t) is None]

NETNS_MARKS = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(_missing), reason=f"missing {', '.join(_missing)}"),
]
"""For tests of the harness itself."""

HOUNDD_NETNS_MARKS = [
    *NETNS_MARKS,
    pytest.mark.skipif(houndd_missing() is not None, reason=str(houndd_missing())),
]
"""For tests that run houndd on the hosts."""
