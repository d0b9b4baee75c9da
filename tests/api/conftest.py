"""Fixtures of the API tests: one in-process daemon per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.harness import RunningDaemon, running_daemon


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    """A single-node daemon with a fake engine, already coordinating."""
    with running_daemon(tmp_path_factory.mktemp("api-node")) as running:
        running.wait_coordinator()
        yield running
