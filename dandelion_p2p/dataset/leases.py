"""The lease book: which peer trains which chunk of which epoch, kept in SQLite.

Every grant and every receipt is committed (WAL, ``synchronous=FULL``) before the peer hears
of it, so a dataset server killed at any moment restarts with every lease it ever granted:
a lease whose answer was lost expires and the chunk is granted again; a receipt whose
acknowledgement was lost is accepted again (idempotently) when the peer retries.

Invariants, enforced by the schema as well as the code:

* at most one *active* lease per (epoch, chunk) (a partial unique index);
* at most one receipt per (epoch, chunk) (the primary key).

An epoch ends when every chunk has a receipt; the next grant opens the next epoch. Within an
epoch chunks go out least-trained first (fewest receipts over all epochs), ties broken by a
per-epoch shuffle, so every epoch visits the chunks in a different order.

Times are Unix seconds passed in by the caller, so tests need no real waiting.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import blake3

from dandelion_p2p.dataset.manifest import Manifest
from dandelion_p2p.errors import ConfigError, ProtocolViolation
from dandelion_p2p.networks import UNKNOWN_NETWORK
from dandelion_p2p.wire import RejectCode

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    idx INTEGER PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    samples INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    chunk TEXT NOT NULL REFERENCES chunks(hash),
    peer BLOB NOT NULL,
    granted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('active', 'done', 'expired', 'superseded')),
    ended_at REAL,
    network TEXT,
    nonce BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_lease ON leases(epoch, chunk)
    WHERE state = 'active';
CREATE INDEX IF NOT EXISTS leases_by_peer ON leases(peer, state);
CREATE TABLE IF NOT EXISTS receipts (
    epoch INTEGER NOT NULL,
    chunk TEXT NOT NULL REFERENCES chunks(hash),
    lease_id INTEGER NOT NULL UNIQUE REFERENCES leases(id),
    peer BLOB NOT NULL,
    samples INTEGER NOT NULL,
    signature BLOB NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (epoch, chunk)
);
-- Grants order chunks by their receipts over all epochs: without this index that count
-- scans every receipt once per chunk.
CREATE INDEX IF NOT EXISTS receipts_by_chunk ON receipts(chunk);
"""

NEXT_CHUNK_QUERY = (
    "SELECT c.hash, c.samples, c.size FROM chunks c "
    "WHERE NOT EXISTS (SELECT 1 FROM receipts r WHERE r.epoch=? AND r.chunk=c.hash) "
    "AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.epoch=? AND l.chunk=c.hash "
    "                AND l.state='active') "
    "ORDER BY (SELECT COUNT(*) FROM receipts r2 WHERE r2.chunk=c.hash), "
    "shuffle_key(?, c.hash) LIMIT 1"
)
"""The least-trained free chunk of an epoch (parameters: epoch three times)."""


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    epoch: int
    chunk: str
    peer: bytes
    granted_at: float
    expires_at: float
    samples: int
    size: int
    nonce: bytes | None
    """Key of the receipt's possession proof; None for a lease granted before leases had
    one (such a receipt is taken without a proof)."""


"""The network bucket of a peer whose address we cannot place (relayed: we see the relay's)."""

MAX_LEASES_PER_NETWORK = 8
"""Active leases the peers of one network (IPv4 /24, IPv6 /48) hold together: identities are
free, so a per-peer limit alone lets one network take every chunk of an epoch."""

NONCE_BYTES = 32
"""A fresh random nonce per lease keys its receipt's possession proof (a BLAKE3 key)."""

MIN_RETRY_AFTER = 0.5
MAX_RETRY_AFTER = 2.0


@dataclass(frozen=True, slots=True)
class NoChunkFree:
    """Every chunk of the epoch is done or leased; ask again after ``retry_after`` seconds."""

    epoch: int
    retry_after: float


@dataclass(frozen=True, slots=True)
class ReceiptOutcome:
    epoch: int
    completed: int
    """Chunks of this epoch with a receipt, after this one."""
    total: int
    duplicate: bool
    """The same receipt was already recorded (its acknowledgement was lost)."""


def _shuffle_key(epoch: int, chunk: str) -> str:
    return blake3.blake3(f"{epoch}:{chunk}".encode()).hexdigest()


class LeaseBook:
    """The lease and receipt tables of one dataset (one manifest) of one run."""

    def __init__(self, path: Path, manifest: Manifest, run: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.create_function("shuffle_key", 2, _shuffle_key, deterministic=True)
        self.db.executescript(SCHEMA)
        self._add_missing_columns()
        self.total = len(manifest.chunks)
        self._init_meta(manifest, run)
        # Status is read from other threads while a grant may be writing: a reader of its
        # own sees the last committed state (WAL lets it read during a write).
        self._reader = sqlite3.connect(path, check_same_thread=False)

    def close(self) -> None:
        self._reader.close()
        self.db.close()

    def _init_meta(self, manifest: Manifest, run: str) -> None:
        with self._transaction():
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                self.db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [("manifest", manifest.digest), ("run", run), ("epoch", "0")],
                )
                self.db.executemany(
                    "INSERT INTO chunks(idx, hash, samples, size) VALUES (?, ?, ?, ?)",
                    [(i, c.hash, c.samples, c.size) for i, c in enumerate(manifest.chunks)],
                )
            elif meta.get("manifest") != manifest.digest or meta.get("run") != run:
                raise ConfigError(
                    f"lease database {self.path} belongs to another dataset or run "
                    f"({meta.get('run')}); move it away to start over"
                )

    def _add_missing_columns(self) -> None:
        """Books written before leases recorded the requester's network or a nonce get the
        columns (NULL for their old rows, which then count toward no network and take a
        receipt without a possession proof)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(leases)")}
        if "network" not in columns:
            self.db.execute("ALTER TABLE leases ADD COLUMN network TEXT")
        if "nonce" not in columns:
            self.db.execute("ALTER TABLE leases ADD COLUMN nonce BLOB")
        self.db.execute(
            "CREATE INDEX IF NOT EXISTS leases_by_network ON leases(network, state)"
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # ---- queries -----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0])

    def completed(self, epoch: int) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM receipts WHERE epoch=?", (epoch,)).fetchone()
        return int(row[0])

    def active(self, now: float) -> int:
        row = self.db.execute(
            "SELECT COUNT(*) FROM leases WHERE state='active' AND expires_at > ?", (now,)
        ).fetchone()
        return int(row[0])

    def receipts_per_chunk(self, epoch: int) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT c.hash, COUNT(r.chunk) FROM chunks c "
            "LEFT JOIN receipts r ON r.chunk = c.hash AND r.epoch = ? GROUP BY c.hash",
            (epoch,),
        ).fetchall()
        return {h: int(n) for h, n in rows}

    def lease(self, lease_id: int) -> Lease | None:
        row = self.db.execute(
            "SELECT l.id, l.epoch, l.chunk, l.peer, l.granted_at, l.expires_at, c.samples, "
            "c.size, l.nonce FROM leases l JOIN chunks c ON c.hash = l.chunk WHERE l.id = ?",
            (lease_id,),
        ).fetchone()
        return Lease(*row) if row else None

    def receipt_signature(self, lease_id: int) -> bytes | None:
        """The signature of the receipt recorded for ``lease_id``, if any."""
        row = self.db.execute(
            "SELECT signature FROM receipts WHERE lease_id=?", (lease_id,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def status(self, now: float) -> dict[str, object]:
        def one(query: str, *args: object) -> int:
            return int(self._reader.execute(query, args).fetchone()[0])

        epoch = one("SELECT value FROM meta WHERE key='epoch'")
        return {
            "epoch": epoch,
            "chunks": self.total,
            "completed": one("SELECT COUNT(*) FROM receipts WHERE epoch=?", epoch),
            "active_leases": one(
                "SELECT COUNT(*) FROM leases WHERE state='active' AND expires_at > ?", now
            ),
            "receipts": one("SELECT COUNT(*) FROM receipts"),
            "leases_granted": one("SELECT COUNT(*) FROM leases"),
        }

    # ---- changes -----------------------------------------------------------------------

    def _expire(self, now: float) -> None:
        self.db.execute(
            "UPDATE leases SET state='expired', ended_at=? "
            "WHERE state='active' AND expires_at <= ?",
            (now, now),
        )

    def grant(
        self, peer: bytes, now: float, *, lease_seconds: float, max_per_peer: int,
        network: str = UNKNOWN_NETWORK, max_per_network: int = MAX_LEASES_PER_NETWORK,
    ) -> Lease | NoChunkFree:
        """Lease the least-trained free chunk of the current epoch to ``peer``, whose
        address lies in ``network`` (its prefix); while every chunk of the current epoch is
        done or leased out, one of the next epoch.

        Raises ``ProtocolViolation(RATE_LIMITED)`` when the peer holds ``max_per_peer``, or
        the peers of its network hold ``max_per_network`` together.
        """
        with self._transaction():
            self._expire(now)
            held = self.db.execute(
                "SELECT COUNT(*) FROM leases WHERE peer=? AND state='active'", (peer,)
            ).fetchone()[0]
            if held >= max_per_peer:
                raise ProtocolViolation(
                    RejectCode.RATE_LIMITED, f"already holding {held} leases; complete one first"
                )
            held_by_network = self.db.execute(
                "SELECT COUNT(*) FROM leases WHERE network=? AND state='active'", (network,)
            ).fetchone()[0]
            if held_by_network >= max_per_network:
                raise ProtocolViolation(
                    RejectCode.RATE_LIMITED,
                    f"peers of your network hold {held_by_network} leases; try again later",
                )
            current = epoch = self.epoch
            # The next epoch may be done already, its chunks leased ahead.
            while self.completed(epoch) >= self.total:
                epoch += 1
            if epoch != current:
                self.db.execute("UPDATE meta SET value=? WHERE key='epoch'", (str(epoch),))
            lease_epoch = epoch
            row = self.db.execute(NEXT_CHUNK_QUERY, (epoch, epoch, epoch)).fetchone()
            if row is None:
                # The epoch's last chunks are out. Their holders may be waiting for this peer
                # (in a blocking averaging round) before they train them: lease from the next
                # epoch meanwhile, never further ahead.
                lease_epoch = epoch + 1
                row = self.db.execute(
                    NEXT_CHUNK_QUERY, (lease_epoch, lease_epoch, lease_epoch)
                ).fetchone()
            if row is None:
                soonest = self.db.execute(
                    "SELECT MIN(expires_at) FROM leases WHERE state='active' AND epoch IN (?, ?)",
                    (epoch, epoch + 1),
                ).fetchone()[0]
                # A receipt can free the epoch at any moment, so peers ask again soon, not
                # only when the first lease expires.
                wait = max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, (soonest or now + 5.0) - now))
                return NoChunkFree(epoch, wait)
            chunk, samples, size = row
            expires = now + lease_seconds
            nonce = secrets.token_bytes(NONCE_BYTES)
            cursor = self.db.execute(
                "INSERT INTO leases(epoch, chunk, peer, granted_at, expires_at, state, network, "
                "nonce) VALUES (?, ?, ?, ?, ?, 'active', ?, ?)",
                (lease_epoch, chunk, peer, now, expires, network, nonce),
            )
            lease_id = cursor.lastrowid
            assert lease_id is not None
            return Lease(lease_id, lease_epoch, chunk, peer, now, expires, samples, size, nonce)

    def record_receipt(
        self, *, lease_id: int, epoch: int, chunk: str, peer: bytes, samples: int,
        signature: bytes, now: float,
    ) -> ReceiptOutcome:
        """Record a verified receipt for a lease.

        Raises ``ProtocolViolation``: ``NOT_FOUND`` for an unknown lease, ``FORBIDDEN`` when
        the lease is another peer's, ``INVALID_FIELD`` when chunk or epoch do not match it,
        ``STALE`` when the chunk was already completed under another lease, and
        ``INVALID_FIELD`` for more ``samples`` than the chunk has in the manifest.
        """
        with self._transaction():
            row = self.db.execute(
                "SELECT l.epoch, l.chunk, l.peer, l.state, c.samples FROM leases l "
                "JOIN chunks c ON c.hash = l.chunk WHERE l.id=?",
                (lease_id,),
            ).fetchone()
            if row is None:
                raise ProtocolViolation(RejectCode.NOT_FOUND, f"no lease {lease_id}")
            l_epoch, l_chunk, l_peer, state, chunk_samples = row
            if l_peer != peer:
                raise ProtocolViolation(RejectCode.FORBIDDEN, "the lease is another peer's")
            if (l_epoch, l_chunk) != (epoch, chunk):
                raise ProtocolViolation(RejectCode.INVALID_FIELD, "chunk or epoch differ")
            if samples > chunk_samples:
                raise ProtocolViolation(
                    RejectCode.INVALID_FIELD,
                    f"{samples} samples claimed for a chunk of {chunk_samples}",
                )
            done = self.db.execute(
                "SELECT lease_id FROM receipts WHERE epoch=? AND chunk=?", (epoch, chunk)
            ).fetchone()
            if done is not None:
                if done[0] != lease_id:
                    raise ProtocolViolation(
                        RejectCode.STALE, "chunk already completed under another lease"
                    )
                return ReceiptOutcome(epoch, self.completed(epoch), self.total, duplicate=True)
            if state == "superseded":
                raise ProtocolViolation(RejectCode.STALE, "lease was superseded")
            self.db.execute(
                "INSERT INTO receipts(epoch, chunk, lease_id, peer, samples, signature, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (epoch, chunk, lease_id, peer, samples, signature, now),
            )
            self.db.execute(
                "UPDATE leases SET state='done', ended_at=? WHERE id=?", (now, lease_id)
            )
            # A late receipt on an expired lease still counts; whoever got the chunk since
            # has nothing left to do for this epoch.
            self.db.execute(
                "UPDATE leases SET state='superseded', ended_at=? "
                "WHERE epoch=? AND chunk=? AND state='active'",
                (now, epoch, chunk),
            )
            return ReceiptOutcome(epoch, self.completed(epoch), self.total, duplicate=False)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
