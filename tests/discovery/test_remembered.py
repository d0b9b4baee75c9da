"""Remembered peers: the file, its upkeep, and discovery offering them after a start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import stat
from pathlib import Path

import pytest

from houndd.config import local
from houndd.discovery import REMEMBERED_ROUNDS, Discovery
from houndd.discovery.remembered import MAX_REMEMBERED, PeerMemory, load_peers, save_peers
from houndd.membership.member import Address


def test_saved_peers_load_back_from_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    save_peers(path, [("10.0.0.2", 7480), ("host-b.lan", 7481)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_peers(path) == [("10.0.0.2", 7480), ("host-b.lan", 7481)]


def test_a_missing_file_is_no_peers(tmp_path: Path) -> None:
    assert load_peers(tmp_path / "peers.json") == []


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', "[1, 2", "\udcff"])
def test_an_unreadable_file_is_ignored_with_a_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, "houndd.discovery"):
        assert load_peers(path) == []
    assert "remembered peers" in caplog.text


def test_invalid_entries_are_skipped_and_the_list_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    entries = [["10.0.0.1", 7480], ["bad\x00host", 1], ["10.0.0.3", 0], "x", ["10.0.0.1", 7480]]
    entries += [[f"10.1.{i // 256}.{i % 256}", 7480] for i in range(2 * MAX_REMEMBERED)]
    path.write_text(json.dumps(entries))
    got = load_peers(path)
    assert got[0] == ("10.0.0.1", 7480)
    assert ("bad\x00host", 1) not in got and ("10.0.0.3", 0) not in got
    assert len(got) == len(set(got)) <= MAX_REMEMBERED


async def test_peer_memory_writes_a_burst_of_changes_once_and_keeps_peers_when_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peers.json"
    alive: list[Address] = [("10.0.0.2", 7480)]
    memory = PeerMemory(path, lambda: list(alive), delay_s=0.05)
    assert memory.loaded == []
    memory.changed()
    alive.append(("10.0.0.3", 7480))
    memory.changed()  # the same pending write picks up both
    await asyncio.sleep(0.2)
    assert load_peers(path) == [("10.0.0.2", 7480), ("10.0.0.3", 7480)]
    alive.clear()  # everyone else died: the last peers known stay
    memory.changed()
    await asyncio.sleep(0.2)
    assert load_peers(path) == [("10.0.0.2", 7480), ("10.0.0.3", 7480)]
    await memory.close()
    assert PeerMemory(path, list).loaded == [("10.0.0.2", 7480), ("10.0.0.3", 7480)]


async def test_remembered_peers_are_offered_in_the_first_rounds_only() -> None:
    cfg = local(mdns=False, seeds=("127.0.0.1:7001",), join_retry_s=0.01)
    offered: list[Address] = []

    def on_candidate(address: Address) -> bool:
        offered.append(address)
        return True

    d = Discovery(cfg, "id-a", "fp", 7000, on_candidate, remembered=[("127.0.0.1", 7002)])
    task = asyncio.create_task(d.run())
    await asyncio.sleep(0.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert offered.count(("127.0.0.1", 7002)) == REMEMBERED_ROUNDS
    assert offered.count(("127.0.0.1", 7001)) > REMEMBERED_ROUNDS  # seeds in every round
    assert offered[:2] == [("127.0.0.1", 7001), ("127.0.0.1", 7002)]
