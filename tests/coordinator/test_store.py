"""SQLite store: round trip of every record; a restarted core keeps term, vote and fencing."""

from __future__ import annotations

import random
from pathlib import Path

import nacl.utils
import pytest

from houndd.config import local
from houndd.coordinator.election import ElectionRecord, Role
from houndd.coordinator.messages import Heartbeat, Persist, VoteRequest
from houndd.coordinator.node import NodeCore
from houndd.coordinator.replica import (
    AbortRecord,
    CancelRecord,
    PlanItem,
    PlanRecord,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.store import Store


def _plan(pid: str, **doc: object) -> PlanRecord:
    return PlanRecord(pid, {"name": pid, **doc}, (PlanItem("a", "x:1", "sha256:1", 5),), 1.5, False)


def test_round_trip(tmp_path: Path) -> None:
    res = ItemResult(ItemState.FAILED, 2, "sha256:1", 1, 5, "timeout", "d", 1.0, 2.0, False, True)
    with Store(tmp_path / "h.db") as store:
        store.apply(Persist((ElectionRecord(7, "b", 6, "c"), _plan("p"), _plan("q"))))
        store.apply(Persist((ResultRecord("p", "a", "x:1", res), CancelRecord("p", 3.0))))
        store.apply(Persist((dataclass_replace_committed(_plan("p")),)))
        store.apply(Persist((AbortRecord("q"),)))
        assert store.next_boot_epoch() == 1
    with Store(tmp_path / "h.db") as store:
        state = store.load()
        assert store.next_boot_epoch() == 2
    assert state.election == ElectionRecord(7, "b", 6, "c")
    assert AbortRecord("q") in state.records
    assert dataclass_replace_committed(_plan("p")) in state.records
    assert CancelRecord("p", 3.0) in state.records
    assert ResultRecord("p", "a", "x:1", res) in state.records
    assert not any(isinstance(r, PlanRecord) and r.plan_id == "q" for r in state.records)


def dataclass_replace_committed(rec: PlanRecord) -> PlanRecord:
    return PlanRecord(rec.plan_id, rec.document, rec.items, rec.accepted_at, True)


def test_wal_and_full_sync(tmp_path: Path) -> None:
    with Store(tmp_path / "h.db") as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_credentials_never_in_clear(tmp_path: Path) -> None:
    auth = {"registry.local": {"username": "u", "password": "hunter2-secret"}}
    with Store(tmp_path / "nokey.db") as store, pytest.raises(ValueError, match="secret_key"):
        store.apply(Persist((_plan("p", auth=auth),)))
    key = nacl.utils.random(32)
    with Store(tmp_path / "h.db", secret_key=key) as store:
        store.apply(Persist((_plan("p", auth=auth),)))
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.db*"))
    assert b"hunter2-secret" not in raw
    with Store(tmp_path / "h.db", secret_key=key) as store:
        (rec,) = [r for r in store.load().records if isinstance(r, PlanRecord)]
    assert rec.document["auth"] == auth


def test_restarted_core_keeps_term_vote_and_fencing(tmp_path: Path) -> None:
    cfg = local()
    path = tmp_path / "h.db"
    with Store(path) as store:
        core = NodeCore("b", cfg, random.Random(1), 0.0, store.load())
        for act in core.receive("c", "HEARTBEAT", Heartbeat(4, "c"), 0.1):
            if isinstance(act, Persist):
                store.apply(act)
        for act in core.receive("a", "VOTE_REQUEST", VoteRequest(9, "a"), 5.0):
            if isinstance(act, Persist):
                store.apply(act)
    with Store(path) as store:
        again = NodeCore("b", cfg, random.Random(2), 10.0, store.load())
    e = again.election
    assert (e.term, e.voted_for, e.highest_term, e.accepted) == (9, "a", 4, "c")
    assert again.role is Role.FOLLOWER
    # The persisted vote holds: another candidate for term 9 is refused after the restart.
    acts = again.receive("d", "VOTE_REQUEST", VoteRequest(9, "d"), 20.0)
    assert [a.payload.granted for a in acts if hasattr(a, "payload")] == [False]
    # And the fencing record holds: a coordinator of an older term is refused.
    again.receive("z", "HEARTBEAT", Heartbeat(3, "z"), 20.0)
    assert again.election.fenced_count == 1


def test_progress_commits_skip_the_fsync_outcomes_do_not(tmp_path: Path) -> None:
    from houndd.coordinator.replica import ResultRecord
    from houndd.coordinator.results import ItemResult, ItemState

    store = Store(tmp_path / "s.db")
    store.open()

    def mode() -> int:
        return int(store.db.execute("PRAGMA synchronous").fetchone()[0])

    pulling = ResultRecord("p", "n", "x:1", ItemResult(ItemState.PULLING, 1, bytes_done=5))
    store.apply([pulling])
    assert mode() == 1  # NORMAL
    done = ResultRecord("p", "n", "x:1", ItemResult(ItemState.DONE, 1, bytes_done=9))
    store.apply([done])
    assert mode() == 2  # FULL
    store.close()
    again = Store(tmp_path / "s.db")
    again.open()
    (loaded,) = [r for r in again.load().records if isinstance(r, ResultRecord)]
    assert loaded.result.state is ItemState.DONE
