"""SQLite store of the coordinator core's durable state.

One file (stdlib sqlite3, WAL, `PRAGMA synchronous=FULL`): election term/vote and fencing record,
plans, cancels, abort tombstones, results and the boot epoch. `NodeCore` emits `Persist(records)`
actions; the shell calls `Store.apply(action)` (one transaction, fsync'd on commit) before it
carries out any later action, and `Store.load()` rebuilds the core after a restart.

Registry credentials never reach the file in clear text: a plan document's `auth` mapping is
sealed with NaCl SecretBox under the key given to the constructor and kept in its own column;
without a key, storing a document that carries `auth` is refused.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.secret import SecretBox

from houndd.coordinator.election import ElectionRecord
from houndd.coordinator.messages import Persist
from houndd.coordinator.replica import (
    AbortRecord,
    CancelRecord,
    PlanItem,
    PlanRecord,
    Record,
    ResultRecord,
)
from houndd.coordinator.results import ItemResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS election (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    term INTEGER NOT NULL, voted_for TEXT, highest_term INTEGER NOT NULL, accepted TEXT
);
CREATE TABLE IF NOT EXISTS plans (
    plan_id TEXT PRIMARY KEY, document TEXT NOT NULL, auth_sealed BLOB, items TEXT NOT NULL,
    accepted_at REAL NOT NULL, committed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cancels (plan_id TEXT PRIMARY KEY, cancelled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aborted (plan_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS results (
    plan_id TEXT NOT NULL, node_id TEXT NOT NULL, image TEXT NOT NULL, result TEXT NOT NULL,
    PRIMARY KEY (plan_id, node_id, image)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass
class PersistedState:
    """Everything `Store.load` returns: feed it to `NodeCore(..., persisted=...)`."""

    election: ElectionRecord = field(default_factory=ElectionRecord)
    records: list[Record] = field(default_factory=list)


class Store:
    """The durable state of one node. Not thread-safe: one owner (the daemon's shell)."""

    def __init__(self, path: str | Path, *, secret_key: bytes | None = None) -> None:
        self.path = Path(path)
        self._box: Any = None
        if secret_key is not None:
            self._box = SecretBox(secret_key)
        self._db: sqlite3.Connection | None = None
        self._sync = "FULL"

    def open(self) -> None:
        """Open (creating) the database. Idempotent."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before apply() returns, which is what lets a replica
        # acknowledge a plan (G1) and a voter answer (one vote per term) right after.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        self._sync = "FULL"

    def close(self) -> None:
        """Close the database. Idempotent."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Store:
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

    def apply(self, action: Persist | Iterable[Any]) -> None:
        """Write the records of a `Persist` action in one durable transaction."""
        records = action.records if isinstance(action, Persist) else tuple(action)
        db = self.db
        # Progress (a pull's bytes, "pulling") is re-derived from the worker after a crash,
        # so it need not wait for an fsync; plans, votes, fencing and outcomes do (G1, G3).
        progress_only = all(
            isinstance(rec, ResultRecord) and not rec.result.is_final for rec in records
        )
        self._set_sync("NORMAL" if progress_only else "FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for rec in records:
                self._write(db, rec)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _set_sync(self, mode: str) -> None:
        if self._sync != mode:
            self.db.execute(f"PRAGMA synchronous={mode}")
            self._sync = mode

    def next_boot_epoch(self) -> int:
        """Increment and return the boot epoch (persisted, +1 per start)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT value FROM meta WHERE key = 'boot_epoch'").fetchone()
        epoch = (row[0] if row else 0) + 1
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot_epoch', ?)", (epoch,))
        db.execute("COMMIT")
        return epoch

    def _write(self, db: sqlite3.Connection, rec: Any) -> None:
        if isinstance(rec, ElectionRecord):
            db.execute(
                "INSERT OR REPLACE INTO election (id, term, voted_for, highest_term, accepted)"
                " VALUES (1, ?, ?, ?, ?)",
                (rec.term, rec.voted_for, rec.highest_term, rec.accepted),
            )
        elif isinstance(rec, PlanRecord):
            document = dict(rec.document)
            auth = document.pop("auth", None)
            sealed = None
            if auth is not None:
                if self._box is None:
                    raise ValueError(
                        "plan document carries registry credentials; give Store a secret_key"
                    )
                sealed = bytes(self._box.encrypt(json.dumps(auth).encode()))
            db.execute("DELETE FROM aborted WHERE plan_id = ?", (rec.plan_id,))
            db.execute(
                "INSERT INTO plans (plan_id, document, auth_sealed, items, accepted_at, committed)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (plan_id) DO UPDATE SET"
                " committed = max(committed, excluded.committed)",
                (
                    rec.plan_id,
                    json.dumps(document, sort_keys=True),
                    sealed,
                    json.dumps([list(i) for i in rec.items]),
                    rec.accepted_at,
                    int(rec.committed),
                ),
            )
        elif isinstance(rec, CancelRecord):
            db.execute(
                "INSERT OR REPLACE INTO cancels (plan_id, cancelled_at) VALUES (?, ?)",
                (rec.plan_id, rec.cancelled_at),
            )
        elif isinstance(rec, AbortRecord):
            for table in ("plans", "cancels", "results"):
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
        """Everything persisted, in an order `ReplicaState.restore` accepts."""
        db = self.db
        state = PersistedState()
        row = db.execute(
            "SELECT term, voted_for, highest_term, accepted FROM election WHERE id = 1"
        ).fetchone()
        if row is not None:
            state.election = ElectionRecord(row[0], row[1], row[2], row[3])
        for (pid,) in db.execute("SELECT plan_id FROM aborted ORDER BY rowid"):
            state.records.append(AbortRecord(pid))
        for pid, doc, sealed, items, accepted_at, committed in db.execute(
            "SELECT plan_id, document, auth_sealed, items, accepted_at, committed FROM plans"
            " ORDER BY accepted_at, plan_id"
        ):
            document = json.loads(doc)
            if sealed is not None:
                if self._box is None:
                    raise ValueError("stored plan has sealed credentials; give Store the key")
                document["auth"] = json.loads(self._box.decrypt(sealed))
            plan_items = tuple(PlanItem(*i) for i in json.loads(items))
            state.records.append(
                PlanRecord(pid, document, plan_items, accepted_at, bool(committed))
            )
        for pid, at in db.execute("SELECT plan_id, cancelled_at FROM cancels ORDER BY plan_id"):
            state.records.append(CancelRecord(pid, at))
        for pid, node, image, result in db.execute(
            "SELECT plan_id, node_id, image, result FROM results ORDER BY plan_id, node_id, image"
        ):
            state.records.append(
                ResultRecord(pid, node, image, ItemResult.from_dict(json.loads(result)))
            )
        return state
