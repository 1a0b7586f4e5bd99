"""Reads the three sources ``controller.reconcile`` compares: unit journals, the catalogue
and storage.

A journal is opened read-only (its unit may still be running), and each object in storage
is hashed from its content, streamed, never taken from a checksum the store kept.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from controller.catalogue import MANIFEST_FILENAME
from controller.db import Database, in_chunks
from controller.models import Alert, Recording, Segment
from controller.reconcile import (
    CatalogueRecording,
    CatalogueSegment,
    CatalogueState,
    JournalRecording,
    JournalSegment,
    Listing,
    ObjectFacts,
    OpenAlert,
    Span,
    SpoolFile,
    UnitJournal,
    Window,
)
from controller.storage.base import Storage, StorageError, StoredObject
from device.journal import SCHEMA_VERSION, SegmentState
from device.segmentlist import MANIFEST_NAME, SEGMENT_LIST_NAME
from shared.codec import DecodeError, decode
from shared.messages import DesiredState, Gap

log = logging.getLogger(__name__)

# Where device.desired keeps the unit's last desired state (its capture windows).
_DESIRED_KEY = "desired_state"
# What a spool folder keeps beside the video (device.spool's bookkeeping files).
_BOOKKEEPING = frozenset({MANIFEST_NAME, SEGMENT_LIST_NAME, MANIFEST_NAME + ".tmp"})
HASH_WORKERS = 4


class SourceError(Exception):
    """A source cannot be read as asked: a journal, the catalogue database or storage."""


@dataclass(frozen=True)
class JournalSource:
    path: Path
    device_id: str | None = None  # None: found from the catalogue


@dataclass(frozen=True)
class Sources:
    units: tuple[UnitJournal, ...]
    catalogue: CatalogueState
    listings: dict[str, Listing]


def journal_source(value: str) -> JournalSource:
    """``PATH`` or ``UNIT=PATH``, as given on the command line."""
    unit, sep, path = value.partition("=")
    if sep and unit and "/" not in unit:
        return JournalSource(Path(path), unit)
    return JournalSource(Path(value))


def gather(
    sources: Sequence[JournalSource],
    db: Database,
    storage: Storage,
    *,
    hash_workers: int = HASH_WORKERS,
) -> Sources:
    """Everything the reconciler needs; raises SourceError naming what could not be read.

    The recordings compared are those in the journals and every other one the catalogue
    has of the same units; a journal's unit, when not given, is the one the catalogue
    files its recordings under.
    """
    # A journal named twice would report its spool twice.
    unique = {source.path.resolve(): source for source in sources}.values()
    units = [load_journal(source.path, source.device_id) for source in unique]
    journalled = {r.recording_id for u in units for r in u.recordings}
    owners = recording_owners(db, journalled)
    units = [_with_device(unit, owners) for unit in units]
    catalogue = load_catalogue(
        db, journalled, {u.device_id for u in units if u.device_id is not None}
    )
    devices = {c.recording_id: c.device_id for c in catalogue.recordings}
    for unit in units:
        if unit.device_id is not None:
            devices.update((r.recording_id, unit.device_id) for r in unit.recordings)
    return Sources(tuple(units), catalogue, list_recordings(storage, devices, hash_workers))


def _with_device(unit: UnitJournal, owners: Mapping[str, str]) -> UnitJournal:
    found = {owners[r.recording_id] for r in unit.recordings if r.recording_id in owners}
    if unit.device_id is not None:
        others = found - {unit.device_id}
        if others:
            raise SourceError(
                f"journal {unit.source} was given as unit {unit.device_id}, but the catalogue "
                f"files its recordings under {', '.join(sorted(others))}"
            )
        return unit
    if len(found) > 1:
        raise SourceError(
            f"journal {unit.source}: the catalogue files its recordings under several units "
            f"({', '.join(sorted(found))}); give it as UNIT=PATH"
        )
    if not found:
        log.warning(
            "journal unit unknown journal=%s: none of its recordings is catalogued", unit.source
        )
        return unit
    return replace(unit, device_id=found.pop())


# --- journals -------------------------------------------------------------------------------


def load_journal(path: Path, device_id: str | None = None) -> UnitJournal:
    """A unit's journal, opened read-only, and the files left in its spool."""
    if not path.is_file():
        raise SourceError(f"journal {path}: no such file")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise SourceError(f"journal {path}: cannot open: {exc}") from exc
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise SourceError(
                f"journal {path}: schema version {version}, this reconciler reads {SCHEMA_VERSION}"
            )
        recordings = _journal_recordings(conn)
        windows = _journal_windows(conn, path)
    except (sqlite3.Error, ValueError) as exc:
        raise SourceError(f"journal {path}: {exc}") from exc
    finally:
        conn.close()
    spooled = tuple(_spool_files(path, recordings))
    log.info(
        "journal read path=%s recordings=%d segments=%d spool_files=%d",
        path,
        len(recordings),
        sum(len(r.segments) for r in recordings),
        len(spooled),
    )
    return UnitJournal(str(path), device_id, recordings, windows, spooled)


def _journal_recordings(conn: sqlite3.Connection) -> tuple[JournalRecording, ...]:
    gaps: dict[str, list[Span]] = defaultdict(list)
    for recording_id, start, end, reason in conn.execute(
        'SELECT recording_id, start, "end", reason FROM gaps ORDER BY start, id'
    ):
        gaps[recording_id].append(Span(_dt(start), _dt(end), reason))
    segments: dict[str, list[JournalSegment]] = defaultdict(list)
    for row in conn.execute(
        "SELECT recording_id, sequence, state, size, sha256, started_at, ended_at, recovered,"
        " path FROM segments ORDER BY recording_id, sequence"
    ):
        recording_id, sequence, state, size, sha256, started_at, ended_at, recovered, path = row
        segments[recording_id].append(
            JournalSegment(
                sequence=sequence,
                state=SegmentState(state),
                size=size,
                sha256=sha256,
                started_at=_dt(started_at),
                ended_at=None if ended_at is None else _dt(ended_at),
                recovered=bool(recovered),
                path=path,
                file_present=Path(path).is_file(),
            )
        )
    return tuple(
        JournalRecording(
            recording_id=recording_id,
            trigger=trigger,
            window_id=window_id,
            started_at=_dt(started_at),
            ended_at=None if ended_at is None else _dt(ended_at),
            status=status,
            end_reason=end_reason,
            gaps=tuple(gaps[recording_id]),
            segments=tuple(segments[recording_id]),
        )
        for recording_id, trigger, window_id, started_at, ended_at, status, end_reason in (
            conn.execute(
                "SELECT recording_id, trigger, window_id, started_at, ended_at, status,"
                " end_reason FROM recordings ORDER BY started_at, id"
            )
        )
    )


def _journal_windows(conn: sqlite3.Connection, path: Path) -> tuple[Window, ...]:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (_DESIRED_KEY,)).fetchone()
    if row is None:
        return ()
    try:
        desired = decode(DesiredState, str(row[0]).encode())
    except DecodeError as exc:
        log.warning("journal desired state unreadable path=%s reason=%s", path, exc.reason)
        return ()
    return tuple(Window(w.window_id, w.start, w.end) for w in desired.schedule)


def _dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _spool_files(journal: Path, recordings: Sequence[JournalRecording]) -> Iterator[SpoolFile]:
    """Files other than bookkeeping in the unit's spool: beside the journal (the agent's
    layout) and wherever its segments were written."""
    roots = {journal.parent / "spool"}
    for recording in recordings:
        for segment in recording.segments:
            folder = Path(segment.path).parent
            if folder.name == recording.recording_id:
                roots.add(folder.parent)
    seen: set[Path] = set()
    for root in sorted(roots):
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for file in sorted(folder.iterdir()):
                if file in seen or file.name in _BOOKKEEPING or not file.is_file():
                    continue
                seen.add(file)
                yield SpoolFile(folder.name, str(file), file.stat().st_size)


# --- catalogue ------------------------------------------------------------------------------


def recording_owners(db: Database, recording_ids: Collection[str]) -> dict[str, str]:
    """The unit the catalogue files each of these recordings under."""
    try:
        with db.session(readonly=True) as session:
            return {
                recording_id: device_id
                for chunk in in_chunks(sorted(recording_ids))
                for recording_id, device_id in session.execute(
                    select(Recording.id, Recording.device_id).where(Recording.id.in_(chunk))
                )
            }
    except SQLAlchemyError as exc:
        raise SourceError(f"catalogue database: {exc}") from exc


def load_catalogue(
    db: Database, recording_ids: Collection[str], device_ids: Collection[str]
) -> CatalogueState:
    """These recordings and every other one of these units, with segments; open alerts."""
    try:
        with db.session(readonly=True) as session:
            found: dict[str, Recording] = {}
            for chunk in in_chunks(sorted(recording_ids)):
                found.update(
                    (r.id, r)
                    for r in session.scalars(select(Recording).where(Recording.id.in_(chunk)))
                )
            for chunk in in_chunks(sorted(device_ids)):
                found.update(
                    (r.id, r)
                    for r in session.scalars(
                        select(Recording).where(Recording.device_id.in_(chunk))
                    )
                )
            segments = _catalogue_segments(session, found)
            recordings = tuple(
                _catalogue_recording(r, segments[r.id])
                for r in sorted(found.values(), key=lambda r: (r.started_at, r.id))
            )
            alerts = tuple(
                OpenAlert(a.device_id, a.kind, a.severity, a.message, a.raised_at)
                for a in session.scalars(
                    select(Alert).where(Alert.cleared_at.is_(None)).order_by(Alert.raised_at)
                )
            )
    except SQLAlchemyError as exc:
        raise SourceError(f"catalogue database: {exc}") from exc
    log.info(
        "catalogue read recordings=%d segments=%d open_alerts=%d",
        len(recordings),
        sum(len(r.segments) for r in recordings),
        len(alerts),
    )
    return CatalogueState(recordings, alerts)


def _catalogue_segments(
    session: Session, recordings: Mapping[str, Recording]
) -> dict[str, list[CatalogueSegment]]:
    segments: dict[str, list[CatalogueSegment]] = defaultdict(list)
    for chunk in in_chunks(sorted(recordings)):
        for s in session.scalars(
            select(Segment)
            .where(Segment.recording_id.in_(chunk))
            .order_by(Segment.recording_id, Segment.sequence, Segment.id)
        ):
            segments[s.recording_id].append(
                CatalogueSegment(
                    s.sequence,
                    s.key,
                    s.size,
                    s.sha256,
                    s.state,
                    s.started_at,
                    s.ended_at,
                    s.recovered,
                )
            )
    return segments


def _catalogue_recording(
    recording: Recording, segments: list[CatalogueSegment]
) -> CatalogueRecording:
    return CatalogueRecording(
        recording_id=recording.id,
        device_id=recording.device_id,
        status=recording.status,
        end_reason=recording.end_reason,
        gaps=tuple(_span(recording.id, item) for item in recording.gaps),
        segments=tuple(segments),
    )


def _span(recording_id: str, item: Any) -> Span:
    try:
        gap = Gap.model_validate(item)
    except ValidationError as exc:
        raise SourceError(
            f"catalogue recording {recording_id} has an unreadable gap: {exc}"
        ) from exc
    return Span(gap.start, gap.end, gap.reason)


# --- storage --------------------------------------------------------------------------------


def list_recordings(
    storage: Storage, devices: Mapping[str, str], workers: int = HASH_WORKERS
) -> dict[str, Listing]:
    """What storage holds under each recording's prefix (recording id -> its unit), every
    object hashed from its content."""
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            listed = dict(
                zip(
                    devices,
                    pool.map(lambda rid: _list_prefix(storage, devices[rid], rid), devices),
                    strict=True,
                )
            )
            everything = [obj for _prefix, _manifest, objects in listed.values() for obj in objects]
            digests = dict(
                zip(
                    (obj.key for obj in everything),
                    pool.map(lambda obj: storage.sha256_of(obj.key), everything),
                    strict=True,
                )
            )
    except StorageError as exc:
        raise SourceError(f"storage: {exc}") from exc
    log.info(
        "storage read recordings=%d objects=%d bytes=%d",
        len(listed),
        len(everything),
        sum(obj.size for obj in everything),
    )
    return {
        recording_id: Listing(
            prefix,
            manifest_key,
            tuple(ObjectFacts(obj.key, obj.size, digests[obj.key]) for obj in objects),
        )
        for recording_id, (prefix, manifest_key, objects) in listed.items()
    }


def _list_prefix(
    storage: Storage, device_id: str, recording_id: str
) -> tuple[str, str, list[StoredObject]]:
    try:
        manifest_key = storage.key_for(device_id, recording_id, MANIFEST_FILENAME)
    except ValueError as exc:
        raise SourceError(f"recording {recording_id} of unit {device_id}: {exc}") from exc
    prefix = manifest_key.removesuffix(MANIFEST_FILENAME)
    return prefix, manifest_key, list(storage.list_objects(prefix))
