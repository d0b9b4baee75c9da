"""The durable state of a node's core: the `Store` protocol and its SQLite implementation.

`NodeCore` emits `Persist(records)` actions. The daemon's shell commits each at once
(`Store.commit`, one transaction) and, for a commit that `must_flush`, runs `Store.flush` (an
fsync) on a thread of its own; it carries out no later action of the batch, and sends
nothing, before that flush is done. `Store.apply` is both in one call (durable on return), for
the simulator and tests. `Store.load()` rebuilds the core after a restart. `SqliteStore`
keeps one file (stdlib sqlite3, WAL, `PRAGMA synchronous=NORMAL` plus an fsync of the WAL for
what must survive a crash of the machine): election term/vote and fencing record, plans, plan
parts (a target's work of a plan it does not hold), cancels, abort tombstones and results.
`MemoryStore` (`coordinator/memory.py`) is the in-memory fake the simulator uses; one
conformance suite runs against both.

Plan documents carry no registry credentials in clear: those are sealed with the cluster key by
the submission (`PlanDocument.sealed_auth`) before a record exists.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from houndd.coordinator.election import ElectionRecord
from houndd.coordinator.messages import Persist
from houndd.coordinator.records import (
    AbortRecord,
    CancelRecord,
    PlanDocument,
    PlanItem,
    PlanPart,
    PlanRecord,
    PlanWork,
    Record,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult
from houndd.errors import HounddError
from houndd.wire import schema

log = logging.getLogger("houndd.coordinator")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS election (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, voted_for TEXT, highest_term INTEGER NOT NULL, accepted TEXT
);
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY, document TEXT NOT NULL, items TEXT NOT NULL,
    accepted_at REAL NOT NULL, committed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    plan_id TEXT PRIMARY KEY, node_id TEXT NOT NULL, work TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cancels (plan_id TEXT PRIMARY KEY, cancelled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aborted (plan_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS results (
    plan_id TEXT NOT NULL, node_id TEXT NOT NULL, image TEXT NOT NULL, result TEXT NOT NULL,
    PRIMARY KEY (plan_id, node_id, image)
);
"""


@dataclass
class PersistedState:
    """Everything `Store.load` returns: feed it to `NodeCore(..., persisted=...)`."""

    election: ElectionRecord = field(default_factory=ElectionRecord)
    records: list[Record] = field(default_factory=list)


class Store(Protocol):
    """Where a node's core keeps what must survive a restart."""

    def apply(self, action: Persist) -> None:
        """Write the records of a `Persist` action atomically; durable when it returns
        (except progress and plan parts, which are derived again after a crash)."""
        ...

    def commit(self, action: Persist) -> bool:
        """`apply` without waiting for the disk: True when `flush` must run before anything
        that depends on the write (`must_flush`)."""
        ...

    def flush(self) -> None:
        """Make every commit so far durable. Safe to call from another thread while the
        owner commits (the daemon runs it off the event loop)."""
        ...

    def load(self) -> PersistedState:
        """Everything applied so far, as `NodeCore(..., persisted=...)` takes it: the latest
        election record; each plan once (committed wins) unless tombstoned afterwards; the
        last cancel and the last result applied per plan and per (plan, node, image)."""
        ...

    def close(self) -> None:
        """Release resources; idempotent."""
        ...


def must_flush(action: Persist) -> bool:
    """True when `action` holds a record that must be on disk before anything that follows
    it leaves the node (see `_rederived` for the records that need not)."""
    return not all(map(_rederived, action.records))


def _rederived(rec: object) -> bool:
    """True for a record that need not wait for an fsync, because it is derived again after
    a crash: progress (a pull's bytes, "pulling"), which the worker reports anew, and a
    target's `PlanPart`, which every DISPATCH carries (the coordinator and the replicas hold
    the plan). Plans, votes, fencing, cancels and outcomes wait for it (G1, G3).

    Such a write is committed without a flush, and nothing waits for one. A crash of the
    process loses none of it (the commit is in the WAL file); a crash of the machine may lose
    the last commits, which are derived again from the worker's next report or the next
    DISPATCH, and that crash is the node's death to SWIM, so the coordinator dispatches its
    items again. Accepting a dispatch thus waits for no disk flush: with ten daemons on one
    disk that write took 2-16 ms with an fsync, 0.2-0.3 ms without."""
    if isinstance(rec, ResultRecord):
        return not rec.result.is_final
    return isinstance(rec, PlanPart)


class SqliteStore:
    """The durable state of one node in SQLite. Not thread-safe, except `flush`, which may
    run on another thread while the owner commits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._wal: int | None = None  # the WAL file, for `flush`
        self._dir_synced = False

    def open(self) -> None:
        """Open (creating) the database. Idempotent."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit is in the WAL file, not yet on disk. `flush` makes it durable with
        # one fsync of the WAL, which is what synchronous=FULL does inside every commit; done
        # apart, the daemon runs it off the event loop, and what a replica acknowledges (G1)
        # and a voter answers (one vote per term) waits for it all the same.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        self._db = db
        self._wal = os.open(f"{self.path}-wal", os.O_RDONLY)
        self._dir_synced = False

    def close(self) -> None:
        """Close the database. Idempotent."""
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None

    def __enter__(self) -> SqliteStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection (opens on first use)."""
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    # --- writes --------------------------------------------------------------------------------

    def apply(self, action: Persist) -> None:
        """Write the records of a `Persist` action in one durable transaction."""
        if self.commit(action):
            self.flush()

    def commit(self, action: Persist) -> bool:
        """Write the records in one transaction, into the WAL; True if it must be flushed."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for rec in action.records:
                self._write(db, rec)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return must_flush(action)

    def flush(self) -> None:
        """fsync the WAL file (and, the first time, its directory): every commit so far is on
        disk. Touches no sqlite object, so it may run on another thread."""
        wal = self._wal
        if wal is None:
            raise HounddError(f"store {self.path} is closed")
        os.fsync(wal)
        if not self._dir_synced:
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._dir_synced = True

    def _write(self, db: sqlite3.Connection, rec: Any) -> None:
        if isinstance(rec, ElectionRecord):
            db.execute(
                "INSERT OR REPLACE INTO election (id, term, voted_for, highest_term, accepted)"
                " VALUES (1, ?, ?, ?, ?)",
                (rec.term, rec.voted_for, rec.highest_term, rec.accepted),
            )
        elif isinstance(rec, PlanRecord):
            items = [[i.node_id, i.image, i.digest, i.size_bytes] for i in rec.items]
            db.execute("DELETE FROM aborted WHERE plan_id = ?", (rec.plan_id,))
            db.execute(
                "INSERT INTO plans (plan_id, document, items, accepted_at, committed)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (plan_id) DO UPDATE SET"
                " committed = max(committed, excluded.committed)",
                (
                    rec.plan_id,
                    json.dumps(schema.encode(rec.document), sort_keys=True),
                    json.dumps(items),
                    rec.accepted_at,
                    int(rec.committed),
                ),
            )
        elif isinstance(rec, PlanPart):
            db.execute("DELETE FROM aborted WHERE plan_id = ?", (rec.plan_id,))
            db.execute(
                "INSERT OR IGNORE INTO parts (plan_id, node_id, work) VALUES (?, ?, ?)",
                (rec.plan_id, rec.node_id, json.dumps(schema.encode(rec.work), sort_keys=True)),
            )
        elif isinstance(rec, CancelRecord):
            db.execute(
                "INSERT OR REPLACE INTO cancels (plan_id, cancelled_at) VALUES (?, ?)",
                (rec.plan_id, rec.cancelled_at),
            )
        elif isinstance(rec, AbortRecord):
            for table in ("plans", "parts", "cancels", "results"):
                db.execute(f"DELETE FROM {table} WHERE plan_id = ?", (rec.plan_id,))
            db.execute("INSERT OR IGNORE INTO aborted (plan_id) VALUES (?)", (rec.plan_id,))
        elif isinstance(rec, ResultRecord):
            db.execute(
                "INSERT OR REPLACE INTO results (plan_id, node_id, image, result)"
                " VALUES (?, ?, ?, ?)",
                (rec.plan_id, rec.node_id, rec.image, json.dumps(rec.result.to_dict())),
            )
        else:
            raise TypeError(f"cannot persist {type(rec).__name__}")

    # --- reads ---------------------------------------------------------------------------------

    def load(self) -> PersistedState:
        """Everything persisted, in an order `ReplicaState.restore` accepts. A row that no
        longer decodes (written by another version, or damaged) is skipped with a warning:
        anti-entropy brings the plan back from the other replicas."""
        db = self.db
        state = PersistedState()
        row = db.execute(
            "SELECT term, voted_for, highest_term, accepted FROM election WHERE id = 1"
        ).fetchone()
        if row is not None:
            state.election = ElectionRecord(row[0], row[1], row[2], row[3])
        for (pid,) in db.execute("SELECT plan_id FROM aborted ORDER BY rowid"):
            state.records.append(AbortRecord(pid))
        for pid, doc, items, accepted_at, committed in db.execute(
            "SELECT plan_id, document, items, accepted_at, committed FROM plans"
            " ORDER BY accepted_at, plan_id"
        ):
            try:
                document = schema.decode(PlanDocument, json.loads(doc))
                plan_items = tuple(PlanItem(*i) for i in json.loads(items))
            except (HounddError, ValueError, TypeError) as e:
                log.warning("stored plan unreadable, skipped plan=%s error=%s", pid, e)
                continue
            state.records.append(
                PlanRecord.of(pid, document, plan_items, accepted_at, bool(committed))
            )
        for pid, node_id, work in db.execute(
            "SELECT plan_id, node_id, work FROM parts ORDER BY plan_id"
        ):
            try:
                part = PlanPart(pid, node_id, schema.decode(PlanWork, json.loads(work)))
            except (HounddError, ValueError, TypeError) as e:
                log.warning("stored plan part unreadable, skipped plan=%s error=%s", pid, e)
                continue
            state.records.append(part)
        for pid, at in db.execute("SELECT plan_id, cancelled_at FROM cancels ORDER BY plan_id"):
            state.records.append(CancelRecord(pid, at))
        for pid, node, image, result in db.execute(
            "SELECT plan_id, node_id, image, result FROM results ORDER BY plan_id, node_id, image"
        ):
            try:
                decoded = ItemResult.from_dict(json.loads(result))
            except (HounddError, ValueError) as e:
                log.warning("stored result unreadable, skipped plan=%s error=%s", pid, e)
                continue
            state.records.append(ResultRecord(pid, node, image, decoded))
        return state
