"""The Store: one conformance suite run against SQLite and the in-memory fake, plus what only
SQLite has (WAL, fsync policy, rows another version wrote)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from houndd.config import local
from houndd.coordinator.election import ElectionRecord, Role
from houndd.coordinator.memory import MemoryStore
from houndd.coordinator.messages import Fenced, Heartbeat, Persist, Reply, Send, VoteRequest
from houndd.coordinator.node import NodeCore
from houndd.coordinator.plan import parse_plan
from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanDocument,
    PlanItem,
    PlanPart,
    PlanRecord,
    PlanWork,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.sealed import seal_credentials, unseal_credentials
from houndd.coordinator.store import SqliteStore, Store
from houndd.errors import HounddError
from houndd.wire import Keyring

Reopen = Callable[[], Store]
"""Close the store and open it again (the same data), like a restart."""


def _plan(pid: str, committed: bool = False) -> PlanRecord:
    doc = PlanDocument({"name": pid, "nodes": {"a": ["x:1"]}}, via="node-1")
    return PlanRecord.of(pid, doc, (PlanItem("a", "x:1", "sha256:1", 5),), 1.5, committed)


@pytest.fixture(params=["sqlite", "memory"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Reopen]]:
    """A store and a function that "restarts" it."""
    if request.param == "sqlite":
        current: list[Store] = [SqliteStore(tmp_path / "h.db")]

        def reopen_sqlite() -> Store:
            current[0].close()
            current[0] = SqliteStore(tmp_path / "h.db")
            return current[0]

        yield current[0], reopen_sqlite
        current[0].close()
    else:
        memory = MemoryStore()
        yield memory, lambda: memory


def test_every_record_round_trips(stores: tuple[Store, Reopen]) -> None:
    store, reopen = stores
    res = ItemResult(ItemState.FAILED, 2, "", 1, 5, "timeout", "d", 1.0, 2.0, False, True)
    store.apply(Persist((ElectionRecord(7, "b", 6, "c"), _plan("p"), _plan("q"))))
    store.apply(Persist((ResultRecord("p", "a", "x:1", res), CancelRecord("p", 3.0))))
    state = reopen().load()
    assert state.election == ElectionRecord(7, "b", 6, "c")
    assert _plan("p") in state.records and _plan("q") in state.records
    assert CancelRecord("p", 3.0) in state.records
    assert ResultRecord("p", "a", "x:1", res) in state.records


def test_commit_says_when_a_flush_is_due_and_keeps_the_records(
    stores: tuple[Store, Reopen],
) -> None:
    store, reopen = stores
    pulling = ResultRecord("p", "n", "x:1", ItemResult(ItemState.PULLING, 1))
    assert store.commit(Persist((pulling,))) is False  # progress: derived again
    assert store.commit(Persist((_plan("p"),))) is True  # a plan: flush before acting on it
    store.flush()
    records = reopen().load().records
    assert pulling in records and _plan("p") in records


def test_committed_wins_and_an_abort_removes_the_plan_with_its_records(
    stores: tuple[Store, Reopen],
) -> None:
    store, reopen = stores
    res = ItemResult(ItemState.DONE, 1)
    store.apply(Persist((_plan("p"), _plan("q"), ResultRecord("q", "a", "x:1", res))))
    store.apply(Persist((_plan("p", committed=True),)))
    store.apply(Persist((_plan("p"),)))  # a late tentative copy does not undo the commit
    store.apply(Persist((CancelRecord("q", 2.0), AbortRecord("q"))))
    records = reopen().load().records
    assert _plan("p", committed=True) in records and _plan("p") not in records
    assert AbortRecord("q") in records
    assert not [r for r in records if getattr(r, "plan_id", "") == "q" and r != AbortRecord("q")]
    # The tombstone goes when the plan comes back committed (acknowledged elsewhere).
    store = reopen()
    store.apply(Persist((_plan("q", committed=True),)))
    records = reopen().load().records
    assert _plan("q", committed=True) in records and AbortRecord("q") not in records


def test_the_last_cancel_and_result_applied_are_kept(stores: tuple[Store, Reopen]) -> None:
    store, reopen = stores
    first = ItemResult(ItemState.PULLING, 1, bytes_done=3)
    last = ItemResult(ItemState.DONE, 1, bytes_done=9)
    store.apply(Persist((_plan("p"), CancelRecord("p", 5.0), ResultRecord("p", "a", "x", first))))
    store.apply(Persist((CancelRecord("p", 4.0), ResultRecord("p", "a", "x", last))))
    records = reopen().load().records
    assert [r for r in records if isinstance(r, CancelRecord)] == [CancelRecord("p", 4.0)]
    assert [r for r in records if isinstance(r, ResultRecord)] == [
        ResultRecord("p", "a", "x", last)
    ]


def test_restarted_core_keeps_term_vote_and_fencing(stores: tuple[Store, Reopen]) -> None:
    store, reopen = stores
    cfg = local()
    core = NodeCore("b", cfg, random.Random(1), 0.0, store.load())
    for act in [
        *core.receive("c", Heartbeat(4, "c"), 0.1),
        *core.receive("a", VoteRequest(9, "a"), 5.0),
    ]:
        if isinstance(act, Persist):
            store.apply(act)
    again = NodeCore("b", cfg, random.Random(2), 10.0, reopen().load())
    e = again.election
    assert (e.term, e.voted_for, e.highest_term, e.accepted) == (9, "a", 4, "c")
    assert again.role is Role.FOLLOWER
    # The persisted vote holds: another candidate for term 9 is refused after the restart.
    acts = again.receive("d", VoteRequest(9, "d"), 20.0)
    assert [a.payload.granted for a in acts if isinstance(a, Reply)] == [False]
    # And the fencing record holds: a coordinator of an older term is refused.
    acts = again.receive("z", Heartbeat(3, "z"), 20.0)
    assert [a.payload for a in acts if isinstance(a, Send)] == [Fenced(4, "c")]


# --- SQLite only ---------------------------------------------------------------------------


class _Fsyncs:
    """Counts fsyncs of one store's WAL file (the real fsync still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, wal: Path) -> None:
        self.count = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            if os.path.samestat(os.fstat(fd), os.stat(wal)):
                self.count += 1
            real(fd)

        monkeypatch.setattr("houndd.coordinator.store.os.fsync", fsync)


def test_wal_mode_and_a_flush_is_an_fsync_of_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteStore(tmp_path / "h.db") as store:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # NORMAL: commits are not synced by SQLite; `flush` syncs the WAL itself.
        assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 1
        fsyncs = _Fsyncs(monkeypatch, tmp_path / "h.db-wal")
        store.flush()
        assert fsyncs.count == 1


def test_progress_commits_skip_the_fsync_outcomes_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqliteStore(tmp_path / "s.db") as store:
        fsyncs = _Fsyncs(monkeypatch, tmp_path / "s.db-wal")
        pulling = ResultRecord("p", "n", "x:1", ItemResult(ItemState.PULLING, 1, bytes_done=5))
        store.apply(Persist((pulling,)))
        assert fsyncs.count == 0
        done = ResultRecord("p", "n", "x:1", ItemResult(ItemState.DONE, 1, bytes_done=9))
        store.apply(Persist((done,)))
        assert fsyncs.count == 1
        # commit() leaves the flush to the caller and says whether one is due
        assert store.commit(Persist((pulling,))) is False
        assert store.commit(Persist((_plan("q"),))) is True
        assert fsyncs.count == 1


def test_a_dispatch_acceptance_skips_the_fsync_and_survives_a_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target's plan part and its "pulling" result are derived again after a crash (every
    DISPATCH carries the part): accepting a dispatch waits for no disk flush. The plan
    itself still does."""
    work = PlanWork("w", "pull", "IfNotPresent", 1, ("0123456789abcdef",))
    part = PlanPart("p", "n", work)
    pulling = ResultRecord("p", "n", "x:1", ItemResult(ItemState.PULLING, 1))
    with SqliteStore(tmp_path / "s.db") as store:
        fsyncs = _Fsyncs(monkeypatch, tmp_path / "s.db-wal")
        store.apply(Persist((part, pulling)))
        assert fsyncs.count == 0
        store.apply(Persist((_plan("q"),)))
        assert fsyncs.count == 1
    with SqliteStore(tmp_path / "s.db") as store:
        records = store.load().records
    assert part in records and pulling in records


def test_a_flush_on_another_thread_while_commits_go_on_loses_nothing(tmp_path: Path) -> None:
    """The daemon flushes on a thread of its own while its loop commits the next records."""
    with SqliteStore(tmp_path / "s.db") as store:
        with ThreadPoolExecutor(max_workers=1) as pool:
            flushes = []
            for i in range(200):
                store.commit(Persist((_plan(f"p{i}"),)))
                flushes.append(pool.submit(store.flush))
            for f in flushes:
                f.result()
        store.close()
        with pytest.raises(HounddError, match="closed"):
            store.flush()
    with SqliteStore(tmp_path / "s.db") as store:
        plans = {r.plan_id for r in store.load().records if isinstance(r, PlanRecord)}
    assert plans == {f"p{i}" for i in range(200)}


def test_rows_that_no_longer_decode_are_skipped_not_fatal(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "h.db") as store:
        store.apply(Persist((_plan("good"), _plan("bad"))))
        store.apply(Persist((ResultRecord("good", "a", "x:1", ItemResult(ItemState.DONE, 1)),)))
        broken = json.dumps({"spec": {"name": "bad", "policy": {"timeout": "forever"}}})
        store.db.execute("UPDATE plans SET document = ? WHERE plan_id = 'bad'", (broken,))
        store.db.execute('UPDATE results SET result = \'{"state": "sideways"}\'')
        records = store.load().records
    assert [r.plan_id for r in records if isinstance(r, PlanRecord)] == ["good"]
    assert not [r for r in records if isinstance(r, ResultRecord)]


def test_registry_credentials_are_stored_only_sealed(tmp_path: Path) -> None:
    spec = parse_plan(
        {
            "name": "p",
            "nodes": {"a": ["registry.local/x:1"]},
            "auth": {"registry.local": {"username": "u", "password": "hunter2-secret"}},
        }
    )
    keyring = Keyring.generate()
    doc = PlanDocument.of(spec, sealed_auth=seal_credentials(keyring, spec.credentials))
    rec = dataclasses.replace(_plan("p"), document=doc)
    with SqliteStore(tmp_path / "h.db") as store:
        store.apply(Persist((rec,)))
        (loaded,) = [r for r in store.load().records if isinstance(r, PlanRecord)]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("h.db*"))
    assert b"hunter2-secret" not in raw and b"hunter2-secret" not in repr(loaded).encode()
    assert unseal_credentials(keyring, loaded.document.sealed_auth) == spec.credentials
    assert unseal_credentials(Keyring.generate(), loaded.document.sealed_auth) == {}
