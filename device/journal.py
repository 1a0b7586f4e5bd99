"""The unit's journal: recordings, segments and commands in one SQLite file.

Power may fail at any moment, so the database runs in WAL mode with
``synchronous=FULL`` and every public call is one transaction: after a call
returns, its change survives a power cut. One connection serves every thread
behind a lock. The schema version lives in ``PRAGMA user_version`` and the
``_MIGRATIONS`` list upgrades older files step by step.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.messages import (
    Bookmark,
    CommandResult,
    EndReason,
    Gap,
    RecordingManifest,
    RecordingStatus,
    Trigger,
)

log = logging.getLogger(__name__)

# Seconds to wait for a lock held by another process (a CLI reading the journal).
_BUSY_TIMEOUT_MS = 5000

# _MIGRATIONS[n] upgrades a journal from user_version n to n + 1.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE recordings (
        id INTEGER PRIMARY KEY,
        recording_id TEXT NOT NULL UNIQUE,
        trigger TEXT NOT NULL,
        window_id TEXT,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        status TEXT NOT NULL,
        end_reason TEXT,
        video TEXT NOT NULL,
        audio TEXT
    );
    CREATE INDEX recordings_status ON recordings (status);
    CREATE TABLE bookmarks (
        id INTEGER PRIMARY KEY,
        recording_id TEXT NOT NULL REFERENCES recordings (recording_id),
        at TEXT NOT NULL,
        source TEXT NOT NULL,
        note TEXT
    );
    CREATE INDEX bookmarks_recording ON bookmarks (recording_id);
    CREATE TABLE gaps (
        id INTEGER PRIMARY KEY,
        recording_id TEXT NOT NULL REFERENCES recordings (recording_id),
        start TEXT NOT NULL,
        "end" TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX gaps_recording ON gaps (recording_id);
    CREATE TABLE segments (
        recording_id TEXT NOT NULL REFERENCES recordings (recording_id),
        sequence INTEGER NOT NULL CHECK (sequence >= 0),
        path TEXT NOT NULL,
        state TEXT NOT NULL,
        size INTEGER,
        sha256 TEXT,
        started_at TEXT NOT NULL,
        ended_at TEXT,
        recovered INTEGER NOT NULL DEFAULT 0,
        key TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (recording_id, sequence)
    );
    CREATE INDEX segments_state ON segments (state);
    CREATE TABLE commands (
        command_id TEXT PRIMARY KEY,
        expires_at TEXT NOT NULL,
        result TEXT
    );
    CREATE INDEX commands_expires ON commands (expires_at);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class JournalError(Exception):
    """The journal cannot be used as asked: corrupt, unreadable, or a call it must refuse."""


class UnknownRecordingError(JournalError):
    pass


class SegmentStateError(JournalError):
    """A segment transition the journal refuses (unknown segment or a step backwards)."""


class SegmentState(StrEnum):
    RECORDING = "recording"
    CLOSED = "closed"
    GRANTED = "granted"
    UPLOADED = "uploaded"
    STORED = "stored"


# Closed but not yet confirmed stored: the upload backlog.
_PENDING = (SegmentState.CLOSED, SegmentState.GRANTED, SegmentState.UPLOADED)

_SELECT_SEGMENTS = (
    "SELECT s.recording_id, s.sequence, s.path, s.state, s.size, s.sha256, s.started_at,"
    " s.ended_at, s.recovered, s.key, s.attempts FROM segments s"
    " JOIN recordings r ON r.recording_id = s.recording_id"
)


@dataclass(frozen=True)
class SegmentRow:
    recording_id: str
    sequence: int
    path: Path
    state: SegmentState
    size: int | None
    sha256: str | None
    started_at: datetime
    ended_at: datetime | None
    recovered: bool
    key: str | None
    attempts: int


def _ts(value: datetime) -> str:
    """Fixed-width UTC text, so SQL string comparison orders timestamps correctly."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"timestamp {value!r} has no timezone")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _opt_dt(value: str | None) -> datetime | None:
    return None if value is None else _dt(value)


def _segment_row(row: tuple[Any, ...]) -> SegmentRow:
    rid, seq, path, state, size, sha256, started_at, ended_at, recovered, key, attempts = row
    return SegmentRow(
        recording_id=rid,
        sequence=seq,
        path=Path(path),
        state=SegmentState(state),
        size=size,
        sha256=sha256,
        started_at=_dt(started_at),
        ended_at=_opt_dt(ended_at),
        recovered=bool(recovered),
        key=key,
        attempts=attempts,
    )


class Journal:
    def __init__(self, path: Path, device_id: str) -> None:
        self._path = path
        self._device_id = device_id
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: transactions are begun and committed explicitly below.
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_MS / 1000
            )
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self._conn.close()
            raise
        log.info("journal opened path=%s schema=%d", path, SCHEMA_VERSION)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # --- set-up ---------------------------------------------------------------------

    def _configure(self) -> None:
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            raise self._wrap(exc) from exc
        if problems != ["ok"]:
            raise self._corrupt("; ".join(problems[:5]))
        if str(mode).lower() != "wal":
            raise JournalError(f"journal {self._path}: cannot enable WAL mode (got {mode!r})")

    def _corrupt(self, detail: str) -> JournalError:
        return JournalError(
            f"journal {self._path} is corrupt or not a SQLite database ({detail}); "
            "move it aside to let the agent start a fresh journal"
        )

    def _migrate(self) -> None:
        try:
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._wrap(exc) from exc
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {self._path} has schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this agent understands; upgrade the agent"
            )
        for step in range(version, SCHEMA_VERSION):
            try:
                self._conn.executescript(
                    f"BEGIN IMMEDIATE;\n{_MIGRATIONS[step]}\n"
                    f"PRAGMA user_version={step + 1};\nCOMMIT;"
                )
            except sqlite3.Error as exc:
                self._rollback()
                raise JournalError(
                    f"journal {self._path}: migrating schema {step} -> {step + 1} failed: {exc}"
                ) from exc
            log.info("journal migrated path=%s schema=%d", self._path, step + 1)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; sqlite errors become JournalError.

        Writers take SQLite's write lock at BEGIN: a deferred transaction that
        upgrades later can get SQLITE_BUSY without waiting for the busy timeout.
        """
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._wrap(exc) from exc
            try:
                yield self._conn
            except BaseException as exc:
                self._rollback()
                if isinstance(exc, sqlite3.Error):
                    raise self._wrap(exc) from exc
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise self._wrap(exc) from exc

    def _rollback(self) -> None:
        if not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("journal rollback failed path=%s", self._path)

    def _wrap(self, exc: sqlite3.Error) -> JournalError:
        code = getattr(exc, "sqlite_errorcode", None)
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return self._corrupt(str(exc))
        return JournalError(f"journal {self._path}: {exc}")

    # --- recordings -----------------------------------------------------------------

    def begin_recording(  # noqa: PLR0917 - the agent's interface passes these positionally
        self,
        recording_id: str,
        trigger: Trigger,
        started_at: datetime,
        video: str,
        audio: str | None,
        window_id: str | None = None,
    ) -> RecordingManifest:
        # Validating the manifest first rejects a bad id before anything is written.
        manifest = RecordingManifest(
            recording_id=recording_id,
            device_id=self._device_id,
            trigger=trigger,
            window_id=window_id,
            started_at=started_at,
            status=RecordingStatus.RECORDING,
            segments=0,
            video=video,
            audio=audio,
        )
        with self._tx() as db:
            if self._recording_exists(db, recording_id):
                raise JournalError(f"recording {recording_id} already exists in the journal")
            db.execute(
                "INSERT INTO recordings (recording_id, trigger, window_id, started_at, status,"
                " video, audio) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    recording_id,
                    trigger.value,
                    window_id,
                    _ts(started_at),
                    RecordingStatus.RECORDING.value,
                    video,
                    audio,
                ),
            )
        log.debug("recording begun recording=%s trigger=%s", recording_id, trigger.value)
        return manifest

    def end_recording(
        self,
        recording_id: str,
        ended_at: datetime,
        status: RecordingStatus,
        end_reason: EndReason,
    ) -> RecordingManifest:
        if status is RecordingStatus.RECORDING:
            raise ValueError("an ended recording needs a final status, not 'recording'")
        with self._tx() as db:
            self._require_recording(db, recording_id)
            db.execute(
                "UPDATE recordings SET ended_at = ?, status = ?, end_reason = ?"
                " WHERE recording_id = ?",
                (_ts(ended_at), status.value, end_reason.value, recording_id),
            )
            manifest = self._manifest(db, recording_id)
        log.debug(
            "recording ended recording=%s status=%s reason=%s",
            recording_id,
            status.value,
            end_reason.value,
        )
        assert manifest is not None
        return manifest

    def add_bookmark(self, recording_id: str, bookmark: Bookmark) -> RecordingManifest:
        with self._tx() as db:
            self._require_recording(db, recording_id)
            db.execute(
                "INSERT INTO bookmarks (recording_id, at, source, note) VALUES (?, ?, ?, ?)",
                (recording_id, _ts(bookmark.at), bookmark.source, bookmark.note),
            )
            manifest = self._manifest(db, recording_id)
        assert manifest is not None
        return manifest

    def add_gap(self, recording_id: str, gap: Gap) -> RecordingManifest:
        with self._tx() as db:
            self._require_recording(db, recording_id)
            db.execute(
                'INSERT INTO gaps (recording_id, start, "end", reason) VALUES (?, ?, ?, ?)',
                (recording_id, _ts(gap.start), _ts(gap.end), gap.reason),
            )
            manifest = self._manifest(db, recording_id)
        log.info(
            "gap recorded recording=%s start=%s end=%s reason=%s",
            recording_id,
            gap.start.isoformat(),
            gap.end.isoformat(),
            gap.reason,
        )
        assert manifest is not None
        return manifest

    def manifest(self, recording_id: str) -> RecordingManifest | None:
        """The manifest as the journal knows it; ``segments`` counts closed-or-later segments."""
        with self._tx(write=False) as db:
            return self._manifest(db, recording_id)

    def open_recordings(self) -> list[str]:
        """Recordings still marked as recording (at start-up: left open by a crash)."""
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT recording_id FROM recordings WHERE status = ? ORDER BY started_at, id",
                (RecordingStatus.RECORDING.value,),
            ).fetchall()
        return [row[0] for row in rows]

    def recordings_with_pending_segments(self) -> list[str]:
        with self._tx(write=False) as db:
            rows = db.execute(
                "SELECT r.recording_id FROM recordings r WHERE EXISTS (SELECT 1 FROM segments s"
                " WHERE s.recording_id = r.recording_id"
                " AND s.state IN ('closed', 'granted', 'uploaded'))"
                " ORDER BY r.started_at, r.id"
            ).fetchall()
        return [row[0] for row in rows]

    @staticmethod
    def _recording_exists(db: sqlite3.Connection, recording_id: str) -> bool:
        row = db.execute(
            "SELECT 1 FROM recordings WHERE recording_id = ?", (recording_id,)
        ).fetchone()
        return row is not None

    def _require_recording(self, db: sqlite3.Connection, recording_id: str) -> None:
        if not self._recording_exists(db, recording_id):
            raise UnknownRecordingError(f"recording {recording_id} is not in the journal")

    def _manifest(self, db: sqlite3.Connection, recording_id: str) -> RecordingManifest | None:
        row = db.execute(
            "SELECT trigger, window_id, started_at, ended_at, status, end_reason, video, audio"
            " FROM recordings WHERE recording_id = ?",
            (recording_id,),
        ).fetchone()
        if row is None:
            return None
        trigger, window_id, started_at, ended_at, status, end_reason, video, audio = row
        (segments,) = db.execute(
            "SELECT COUNT(*) FROM segments WHERE recording_id = ? AND state != ?",
            (recording_id, SegmentState.RECORDING.value),
        ).fetchone()
        bookmarks = [
            Bookmark(at=_dt(at), source=source, note=note)
            for at, source, note in db.execute(
                "SELECT at, source, note FROM bookmarks WHERE recording_id = ? ORDER BY at, id",
                (recording_id,),
            )
        ]
        gaps = [
            Gap(start=_dt(start), end=_dt(end), reason=reason)
            for start, end, reason in db.execute(
                'SELECT start, "end", reason FROM gaps WHERE recording_id = ? ORDER BY start, id',
                (recording_id,),
            )
        ]
        try:
            return RecordingManifest(
                recording_id=recording_id,
                device_id=self._device_id,
                trigger=Trigger(trigger),
                window_id=window_id,
                started_at=_dt(started_at),
                ended_at=_opt_dt(ended_at),
                status=RecordingStatus(status),
                end_reason=None if end_reason is None else EndReason(end_reason),
                segments=segments,
                bookmarks=bookmarks,
                gaps=gaps,
                video=video,
                audio=audio,
            )
        except (ValueError, ValidationError) as exc:
            raise JournalError(
                f"journal {self._path}: recording {recording_id} has invalid stored values: {exc}"
            ) from exc

    # --- segments -------------------------------------------------------------------

    def segment_opened(
        self, recording_id: str, sequence: int, path: Path, started_at: datetime
    ) -> bool:
        """Notes a segment being written; False (and no change) if the journal already has it."""
        with self._tx() as db:
            self._require_recording(db, recording_id)
            cursor = db.execute(
                "INSERT INTO segments (recording_id, sequence, path, state, started_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (recording_id, sequence) DO NOTHING",
                (recording_id, sequence, str(path), SegmentState.RECORDING.value, _ts(started_at)),
            )
            return cursor.rowcount == 1

    def segment_closed(  # noqa: PLR0917 - the agent's interface passes these positionally
        self,
        recording_id: str,
        sequence: int,
        path: Path,
        size: int,
        sha256: str,
        started_at: datetime,
        ended_at: datetime,
        recovered: bool = False,
    ) -> bool:
        """Records a complete segment as CLOSED.

        Returns False and changes nothing if the segment is already closed or
        later: re-reading a segment list must never reset an upload in flight.
        """
        values = (str(path), size, sha256, _ts(started_at), _ts(ended_at), int(recovered))
        with self._tx() as db:
            self._require_recording(db, recording_id)
            state = self._state(db, recording_id, sequence)
            if state is None:
                db.execute(
                    "INSERT INTO segments (path, size, sha256, started_at, ended_at, recovered,"
                    " recording_id, sequence, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*values, recording_id, sequence, SegmentState.CLOSED.value),
                )
            elif state is SegmentState.RECORDING:
                db.execute(
                    "UPDATE segments SET path = ?, size = ?, sha256 = ?, started_at = ?,"
                    " ended_at = ?, recovered = ?, state = ?"
                    " WHERE recording_id = ? AND sequence = ?",
                    (*values, SegmentState.CLOSED.value, recording_id, sequence),
                )
            else:
                return False
        log.debug(
            "journal segment closed recording=%s seq=%d size=%d recovered=%s",
            recording_id,
            sequence,
            size,
            recovered,
        )
        return True

    def mark_granted(self, recording_id: str, sequence: int, key: str) -> None:
        """CLOSED -> GRANTED; a repeated grant for a GRANTED segment replaces its key."""
        with self._tx() as db:
            self._require_state(
                db, recording_id, sequence, (SegmentState.CLOSED, SegmentState.GRANTED), "grant"
            )
            db.execute(
                "UPDATE segments SET state = ?, key = ? WHERE recording_id = ? AND sequence = ?",
                (SegmentState.GRANTED.value, key, recording_id, sequence),
            )

    def mark_uploaded(self, recording_id: str, sequence: int) -> None:
        """GRANTED -> UPLOADED; a no-op once uploaded or stored."""
        with self._tx() as db:
            state = self._require_state(
                db,
                recording_id,
                sequence,
                (SegmentState.GRANTED, SegmentState.UPLOADED, SegmentState.STORED),
                "mark uploaded",
            )
            if state is SegmentState.GRANTED:
                db.execute(
                    "UPDATE segments SET state = ? WHERE recording_id = ? AND sequence = ?",
                    (SegmentState.UPLOADED.value, recording_id, sequence),
                )

    def mark_stored(self, recording_id: str, sequence: int) -> None:
        """Any closed state -> STORED: the controller verified the object's checksum.

        A segment still GRANTED or CLOSED may be confirmed too, when the unit
        crashed between its PUT and noting it.
        """
        with self._tx() as db:
            state = self._require_state(
                db, recording_id, sequence, (*_PENDING, SegmentState.STORED), "mark stored"
            )
            if state is not SegmentState.STORED:
                db.execute(
                    "UPDATE segments SET state = ? WHERE recording_id = ? AND sequence = ?",
                    (SegmentState.STORED.value, recording_id, sequence),
                )
        log.debug("journal segment stored recording=%s seq=%d", recording_id, sequence)

    def reset_to_closed(self, recording_id: str, sequence: int) -> None:
        """Back to CLOSED after an expired grant or a failed upload or verification.

        Counts the attempt, so the uploader can back off and report repeated failures.
        """
        with self._tx() as db:
            state = self._require_state(
                db, recording_id, sequence, (*_PENDING, SegmentState.STORED), "reset"
            )
            if state is SegmentState.STORED:
                log.warning(
                    "segment reset ignored, already stored recording=%s seq=%d",
                    recording_id,
                    sequence,
                )
                return
            db.execute(
                "UPDATE segments SET state = ?, key = NULL, attempts = attempts + 1"
                " WHERE recording_id = ? AND sequence = ?",
                (SegmentState.CLOSED.value, recording_id, sequence),
            )

    def segment(self, recording_id: str, sequence: int) -> SegmentRow | None:
        with self._tx(write=False) as db:
            rows = self._segments(
                db, "s.recording_id = ? AND s.sequence = ?", (recording_id, sequence)
            )
        return rows[0] if rows else None

    def pending_segments(self) -> list[SegmentRow]:
        """CLOSED, GRANTED and UPLOADED segments, oldest recording first, then by sequence."""
        with self._tx(write=False) as db:
            return self._segments(db, "s.state IN ('closed', 'granted', 'uploaded')", ())

    def backlog(self) -> tuple[int, int]:
        """(segments, bytes) closed but not yet confirmed stored."""
        with self._tx(write=False) as db:
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM segments"
                " WHERE state IN ('closed', 'granted', 'uploaded')"
            ).fetchone()
        return int(count), int(size)

    def all_segments(self, recording_id: str) -> list[SegmentRow]:
        with self._tx(write=False) as db:
            return self._segments(db, "s.recording_id = ?", (recording_id,))

    @staticmethod
    def _state(db: sqlite3.Connection, recording_id: str, sequence: int) -> SegmentState | None:
        row = db.execute(
            "SELECT state FROM segments WHERE recording_id = ? AND sequence = ?",
            (recording_id, sequence),
        ).fetchone()
        return None if row is None else SegmentState(row[0])

    def _require_state(
        self,
        db: sqlite3.Connection,
        recording_id: str,
        sequence: int,
        allowed: tuple[SegmentState, ...],
        action: str,
    ) -> SegmentState:
        state = self._state(db, recording_id, sequence)
        if state is None:
            raise SegmentStateError(
                f"cannot {action} segment recording={recording_id} seq={sequence}: "
                "not in the journal"
            )
        if state not in allowed:
            raise SegmentStateError(
                f"cannot {action} segment recording={recording_id} seq={sequence} in state {state}"
            )
        return state

    def _segments(
        self, db: sqlite3.Connection, where: str, params: tuple[str | int, ...]
    ) -> list[SegmentRow]:
        # ``where`` is always one of this module's literal clauses, never outside input.
        query = f"{_SELECT_SEGMENTS} WHERE {where} ORDER BY r.started_at, r.id, s.sequence"
        return [_segment_row(row) for row in db.execute(query, params)]

    # --- commands -------------------------------------------------------------------

    def remember_command(self, command_id: str, expires_at: datetime) -> bool:
        """True the first time a command id is seen: only then may the command run."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO commands (command_id, expires_at) VALUES (?, ?)"
                " ON CONFLICT (command_id) DO NOTHING",
                (command_id, _ts(expires_at)),
            )
            return cursor.rowcount == 1

    def store_command_result(self, result: CommandResult) -> None:
        """Keeps the latest result so a repeated command gets the same answer.

        A result for a command never remembered (refused before that step) is
        kept until its own timestamp passes ``prune_commands``.
        """
        with self._tx() as db:
            db.execute(
                "INSERT INTO commands (command_id, expires_at, result) VALUES (?, ?, ?)"
                " ON CONFLICT (command_id) DO UPDATE SET result = excluded.result",
                (result.command_id, _ts(result.ts), result.to_json().decode()),
            )

    def last_command_result(self, command_id: str) -> CommandResult | None:
        with self._tx(write=False) as db:
            row = db.execute(
                "SELECT result FROM commands WHERE command_id = ?", (command_id,)
            ).fetchone()
        if row is None or row[0] is None:
            return None
        try:
            return CommandResult.model_validate_json(row[0])
        except ValidationError as exc:
            raise JournalError(
                f"journal {self._path}: stored result of command {command_id} is invalid: {exc}"
            ) from exc

    def prune_commands(self, older_than: datetime) -> int:
        """Forgets commands that expired before ``older_than``; returns how many.

        Safe because a redelivered command past its expiry is refused as stale
        before its id is looked up.
        """
        with self._tx() as db:
            cursor = db.execute("DELETE FROM commands WHERE expires_at < ?", (_ts(older_than),))
            return cursor.rowcount

    # --- small persistent values ------------------------------------------------------

    def next_epoch(self) -> int:
        """The next presence epoch, committed before it is returned."""
        with self._tx() as db:
            rows = db.execute(
                "INSERT INTO counters (name, value) VALUES ('epoch', 1)"
                " ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
            ).fetchall()
            return int(rows[0][0])

    def get_value(self, key: str) -> str | None:
        with self._tx(write=False) as db:
            row = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_value(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
