"""Recordings and their segments: upload grants, verification, and manifests in storage.

A segment is announced → granted → stored. It becomes stored only after the
store itself showed the object's size and SHA-256 (``Storage.verify``), and a
stored segment is never granted again: announcing it once more gets its
confirmation. Storage is never asked inside a database transaction, so a slow
store cannot hold SQLite's write lock.

Beside each recording's segments the catalogue keeps ``manifest.json``: the
recording's metadata and every known segment with its size, SHA-256 and
whether it is stored. Each change bumps the recording's ``revision``; the
manifest is written after the change and records the revision it shows, so
``write_pending_manifests`` can catch up on any write that failed.
"""

from __future__ import annotations

import builtins
import json
import logging
import threading
import zlib
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from controller.db import Database, affected, paginate
from controller.models import CaptureWindowRow, Device, Recording, Segment
from controller.registry import UnknownDevice
from controller.storage.base import Storage, StorageError
from controller.views import Completeness, Page, RecordingView, SegmentView
from shared.clock import utcnow
from shared.messages import (
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)

__all__ = ["Catalogue", "Page", "RecordingView", "SegmentView", "segment_filename"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ANNOUNCED = "announced"
GRANTED = "granted"
STORED = "stored"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_SCHEMA = 1
_LOCK_STRIPES = 64


def segment_filename(sequence: int) -> str:
    """The object name of a segment: the same name the unit gives the file."""
    return f"seg-{sequence:05d}.mp4"


def completeness(status: str, segments_reported: int, segments_stored: int) -> Completeness:
    """How a recording stands in storage: complete only when the unit ended it normally and
    every segment it reported is stored."""
    if status == RecordingStatus.RECORDING.value:
        return "recording"
    if status == RecordingStatus.INTERRUPTED.value:
        return "interrupted"
    if status == RecordingStatus.COMPLETE.value and segments_stored >= segments_reported:
        return "complete"
    return "partial"


class Catalogue:
    def __init__(
        self,
        db: Database,
        storage: Storage,
        *,
        grant_expires_s: int = 900,
        download_expires_s: int = 3600,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._storage = storage
        self._grant_expires_s = grant_expires_s
        self._download_expires_s = download_expires_s
        self._clock = clock
        # Manifest writes of one recording are serialised so an older one never lands last.
        self._manifest_locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    # --- manifests from units ----------------------------------------------------------------

    def on_manifest(self, device_id: str, manifest: RecordingManifest) -> None:
        """Creates or updates the recording; an ended one never goes back to "recording"."""
        if manifest.device_id != device_id:
            raise ValueError(
                f"manifest of {manifest.recording_id} names device {manifest.device_id!r}, "
                f"but came from {device_id!r}"
            )
        changed = _once_more_on_conflict(lambda: self._apply_manifest(device_id, manifest))
        if changed:
            self._write_manifest(manifest.recording_id)

    def _apply_manifest(self, device_id: str, manifest: RecordingManifest) -> bool:
        with self._db.session() as session:
            recording = self._recording_for(session, device_id, manifest.recording_id)
            if recording is None:
                recording = self._new_recording(
                    session, device_id, manifest.recording_id, manifest.started_at
                )
            elif (
                recording.status != RecordingStatus.RECORDING.value
                and manifest.status is RecordingStatus.RECORDING
            ):
                log.info(
                    "older manifest ignored recording=%s status=%s kept=%s",
                    manifest.recording_id,
                    manifest.status.value,
                    recording.status,
                )
                return False
            recording.trigger = manifest.trigger.value
            recording.window_id = manifest.window_id
            recording.started_at = manifest.started_at
            recording.ended_at = manifest.ended_at
            recording.status = manifest.status.value
            recording.end_reason = manifest.end_reason.value if manifest.end_reason else None
            recording.bookmarks = [b.model_dump(mode="json") for b in manifest.bookmarks]
            recording.gaps = [g.model_dump(mode="json") for g in manifest.gaps]
            recording.video = manifest.video
            recording.audio = manifest.audio
            recording.segments_reported = manifest.segments
            recording.revision += 1
        log.info(
            "recording updated device=%s recording=%s status=%s segments=%d",
            device_id,
            manifest.recording_id,
            manifest.status.value,
            manifest.segments,
        )
        return True

    def _recording_for(
        self, session: Session, device_id: str, recording_id: str
    ) -> Recording | None:
        recording = session.get(Recording, recording_id, with_for_update=True)
        if recording is not None and recording.device_id != device_id:
            raise ValueError(f"recording {recording_id} belongs to {recording.device_id}")
        return recording

    def _new_recording(
        self, session: Session, device_id: str, recording_id: str, started_at: datetime
    ) -> Recording:
        device = session.get(Device, device_id)
        if device is None:
            raise UnknownDevice(device_id)
        recording = Recording(
            id=recording_id,
            device_id=device_id,
            school=device.school,
            room=device.room,
            started_at=started_at,
            status=RecordingStatus.RECORDING.value,
            bookmarks=[],
            gaps=[],
            segments_reported=0,
            revision=0,
            manifest_revision=0,
        )
        session.add(recording)
        return recording

    # --- segments ----------------------------------------------------------------------------

    def on_announcement(
        self, device_id: str, announcement: SegmentAnnouncement
    ) -> UploadGrant | StoredConfirmation:
        """A fresh grant per announcement, or the confirmation of a segment already stored.

        Raises StorageError when no grant can be made (the unit asks again later).
        """
        key = self._storage.key_for(
            device_id, announcement.recording_id, segment_filename(announcement.sequence)
        )
        answer, look_first = _once_more_on_conflict(
            lambda: self._register(device_id, announcement, key)
        )
        if answer is not None:
            return answer
        if look_first:
            # Granted before: the unit may have PUT it and crashed before saying so.
            try:
                verification = self._storage.verify(key, announcement.size, announcement.sha256)
            except StorageError as exc:
                log.info("stored object not checked key=%s error=%s", key, exc)
            else:
                if verification.ok:
                    self._mark_stored(
                        announcement.recording_id, announcement.sequence, announcement.sha256
                    )
                    return _confirmed(
                        announcement.recording_id,
                        announcement.sequence,
                        key,
                        announcement.size,
                        announcement.sha256,
                    )
        presigned = self._storage.presign_put(
            key, announcement.size, announcement.sha256, self._grant_expires_s
        )
        with self._db.session() as session:
            session.execute(
                update(Segment)
                .where(
                    Segment.key == key,
                    Segment.sha256 == announcement.sha256,
                    Segment.state != STORED,
                )
                .values(state=GRANTED, grants=Segment.grants + 1)
            )
        log.info(
            "grant issued device=%s recording=%s seq=%d key=%s",
            device_id,
            announcement.recording_id,
            announcement.sequence,
            key,
        )
        return UploadGrant(
            recording_id=announcement.recording_id,
            sequence=announcement.sequence,
            key=key,
            url=presigned.url,
            headers=presigned.headers,
            expires_at=presigned.expires_at,
        )

    def _register(
        self, device_id: str, announcement: SegmentAnnouncement, key: str
    ) -> tuple[StoredConfirmation | None, bool]:
        """Records the announcement; returns an immediate answer, or whether to look in
        storage before granting."""
        now = self._clock()
        with self._db.session() as session:
            recording = self._recording_for(session, device_id, announcement.recording_id)
            if recording is None:
                recording = self._new_recording(
                    session, device_id, announcement.recording_id, announcement.started_at
                )
            segment = session.scalar(
                select(Segment)
                .where(
                    Segment.recording_id == announcement.recording_id,
                    Segment.sequence == announcement.sequence,
                )
                .with_for_update()
            )
            same = segment is not None and (segment.size, segment.sha256) == (
                announcement.size,
                announcement.sha256,
            )
            if segment is not None and segment.state == STORED:
                if same:
                    return _confirmed(
                        announcement.recording_id,
                        announcement.sequence,
                        key,
                        segment.size,
                        segment.sha256,
                    ), False
                log.error(
                    "segment announced with other content after it was stored "
                    "recording=%s seq=%d sha256=%s stored_sha256=%s",
                    announcement.recording_id,
                    announcement.sequence,
                    announcement.sha256,
                    segment.sha256,
                )
                return _refused(
                    announcement.recording_id,
                    announcement.sequence,
                    key,
                    f"segment already stored with sha256 {segment.sha256} and size "
                    f"{segment.size}; it is not replaced",
                ), False
            if segment is None:
                segment = Segment(
                    recording_id=announcement.recording_id,
                    sequence=announcement.sequence,
                    key=key,
                    grants=0,
                    state=ANNOUNCED,
                    announced_at=now,
                )
                session.add(segment)
                recording.revision += 1
            elif not same:
                log.warning(
                    "segment announced with new content recording=%s seq=%d sha256=%s old=%s",
                    announcement.recording_id,
                    announcement.sequence,
                    announcement.sha256,
                    segment.sha256,
                )
                segment.state = ANNOUNCED
                recording.revision += 1
            look_first = same and segment.grants > 0
            segment.size = announcement.size
            segment.sha256 = announcement.sha256
            segment.started_at = announcement.started_at
            segment.ended_at = announcement.ended_at
            segment.recovered = announcement.recovered
            segment.announced_at = now
            recording.started_at = min(recording.started_at, announcement.started_at)
        return None, look_first

    def on_upload_result(self, device_id: str, result: UploadResult) -> StoredConfirmation:
        """Verifies the object in storage whatever the unit says (a failed PUT may have landed)."""
        with self._db.session(readonly=True) as session:
            row = session.execute(
                select(Segment.key, Segment.size, Segment.sha256, Segment.state)
                .join(Recording, Recording.id == Segment.recording_id)
                .where(
                    Segment.recording_id == result.recording_id,
                    Segment.sequence == result.sequence,
                    Recording.device_id == device_id,
                )
            ).first()
        if row is None:
            return _refused(
                result.recording_id, result.sequence, result.key, "segment not announced"
            )
        key, size, sha256, state = row
        if result.key != key:
            return _refused(
                result.recording_id, result.sequence, result.key, f"key is not the granted {key}"
            )
        if state == STORED:
            return _confirmed(result.recording_id, result.sequence, key, size, sha256)
        try:
            verification = self._storage.verify(key, size, sha256)
        except StorageError as exc:
            log.warning("segment not verified, storage unavailable key=%s error=%s", key, exc)
            return _refused(
                result.recording_id, result.sequence, key, f"storage unavailable: {exc}"
            )
        if not verification.ok:
            reason = verification.reason or "stored object does not match"
            if not result.ok:
                reason = f"upload failed ({result.error or result.http_status}); {reason}"
            with self._db.session() as session:
                session.execute(
                    update(Segment)
                    .where(Segment.key == key, Segment.state != STORED)
                    .values(last_error=reason)
                )
            log.warning(
                "segment not verified recording=%s seq=%d key=%s reason=%s",
                result.recording_id,
                result.sequence,
                key,
                reason,
            )
            return _refused(result.recording_id, result.sequence, key, reason)
        self._mark_stored(result.recording_id, result.sequence, sha256)
        return _confirmed(result.recording_id, result.sequence, key, size, sha256)

    def _mark_stored(self, recording_id: str, sequence: int, sha256: str) -> None:
        with self._db.session() as session:
            stored = affected(
                session.execute(
                    update(Segment)
                    .where(
                        Segment.recording_id == recording_id,
                        Segment.sequence == sequence,
                        Segment.sha256 == sha256,
                        Segment.state != STORED,
                    )
                    .values(state=STORED, stored_at=self._clock(), last_error=None)
                )
            )
            if stored:
                session.execute(
                    update(Recording)
                    .where(Recording.id == recording_id)
                    .values(revision=Recording.revision + 1)
                )
        if stored:
            log.info("segment stored recording=%s seq=%d", recording_id, sequence)
            self._write_manifest(recording_id)

    # --- manifests in storage ----------------------------------------------------------------

    def _write_manifest(self, recording_id: str) -> bool:
        """Writes the manifest if storage lags the database; False if storage refused."""
        lock = self._manifest_locks[zlib.crc32(recording_id.encode()) % _LOCK_STRIPES]
        with lock:
            with self._db.session(readonly=True) as session:
                recording = session.get(Recording, recording_id)
                if recording is None or recording.revision <= recording.manifest_revision:
                    return True
                revision = recording.revision
                document = _manifest_document(recording)
                key = self._storage.key_for(recording.device_id, recording_id, MANIFEST_FILENAME)
            data = json.dumps(document, indent=2, sort_keys=True).encode()
            try:
                self._storage.put_bytes(key, data, "application/json")
            except StorageError as exc:
                log.warning(
                    "manifest not written recording=%s key=%s error=%s", recording_id, key, exc
                )
                return False
            with self._db.session() as session:
                session.execute(
                    update(Recording)
                    .where(Recording.id == recording_id, Recording.manifest_revision < revision)
                    .values(manifest_revision=revision, manifest_key=key)
                )
        log.info("manifest written recording=%s key=%s revision=%d", recording_id, key, revision)
        return True

    def write_pending_manifests(self, limit: int = 100) -> int:
        """Writes manifests a failed write left behind (call it periodically); returns how many
        were written."""
        with self._db.session(readonly=True) as session:
            pending = builtins.list(
                session.scalars(
                    select(Recording.id)
                    .where(Recording.revision > Recording.manifest_revision)
                    .limit(limit)
                )
            )
        return sum(1 for recording_id in pending if self._write_manifest(recording_id))

    # --- reading -----------------------------------------------------------------------------

    def list(
        self,
        *,
        device_id: str | None = None,
        school: str | None = None,
        status: str | None = None,
        page: int = 1,
        per_page: int = 50,
    ) -> Page[RecordingView]:
        """Newest first, without segments; ``segments_stored`` counted for the page at once."""
        query = select(Recording)
        if device_id is not None:
            query = query.where(Recording.device_id == device_id)
        if school is not None:
            query = query.where(Recording.school == school)
        if status is not None:
            query = query.where(Recording.status == status)
        with self._db.session(readonly=True) as session:
            window = paginate(
                session, query, (Recording.started_at.desc(), Recording.id.desc()), page, per_page
            )
            recordings = session.scalars(window.query).all()
            stored = _stored_counts(session, [recording.id for recording in recordings])
            titles = _titles(session, [r.window_id for r in recordings if r.window_id])
            items = [
                _recording_view(
                    recording,
                    stored.get(recording.id, 0),
                    [],
                    titles.get(recording.window_id or ""),
                )
                for recording in recordings
            ]
        return Page(items, window.total, window.page, window.per_page)

    def get(self, recording_id: str) -> RecordingView | None:
        """One recording with its segments; stored ones carry a download URL."""
        with self._db.session(readonly=True) as session:
            recording = session.get(Recording, recording_id)
            if recording is None:
                return None
            segments = builtins.list(recording.segments)
            stored = sum(1 for segment in segments if segment.state == STORED)
            views = [self._segment_view(segment) for segment in segments]
            titles = _titles(session, [recording.window_id] if recording.window_id else [])
            return _recording_view(recording, stored, views, titles.get(recording.window_id or ""))

    def _segment_view(self, segment: Segment) -> SegmentView:
        url: str | None = None
        if segment.state == STORED:
            try:
                url = self._storage.presign_get(segment.key, self._download_expires_s)
            except StorageError as exc:
                log.warning("no download url key=%s error=%s", segment.key, exc)
        return SegmentView(
            sequence=segment.sequence,
            key=segment.key,
            size=segment.size,
            sha256=segment.sha256,
            started_at=segment.started_at,
            ended_at=segment.ended_at,
            state=segment.state,
            recovered=segment.recovered,
            download_url=url,
        )

    def pending_segments(self) -> int:
        with self._db.session(readonly=True) as session:
            return int(
                session.scalar(
                    select(func.count()).select_from(Segment).where(Segment.state != STORED)
                )
                or 0
            )

    def stored_bytes(self) -> int:
        with self._db.session(readonly=True) as session:
            return int(
                session.scalar(select(func.sum(Segment.size)).where(Segment.state == STORED)) or 0
            )


def _once_more_on_conflict(action: Callable[[], T]) -> T:
    """Runs ``action`` again when another handler inserted the same row first."""
    try:
        return action()
    except IntegrityError as exc:
        log.info("concurrent insert, retrying: %s", exc.orig)
        return action()


def _confirmed(
    recording_id: str, sequence: int, key: str, size: int, sha256: str
) -> StoredConfirmation:
    return StoredConfirmation(
        recording_id=recording_id,
        sequence=sequence,
        key=key,
        verified=True,
        sha256=sha256,
        size=size,
    )


def _refused(recording_id: str, sequence: int, key: str, reason: str) -> StoredConfirmation:
    return StoredConfirmation(
        recording_id=recording_id, sequence=sequence, key=key, verified=False, reason=reason
    )


def _stored_counts(session: Session, recording_ids: builtins.list[str]) -> dict[str, int]:
    if not recording_ids:
        return {}
    rows = session.execute(
        select(Segment.recording_id, func.count())
        .where(Segment.recording_id.in_(recording_ids), Segment.state == STORED)
        .group_by(Segment.recording_id)
    )
    return {recording_id: int(count) for recording_id, count in rows}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _manifest_document(recording: Recording) -> dict[str, Any]:
    segments = builtins.list(recording.segments)
    stored = sum(1 for segment in segments if segment.state == STORED)
    return {
        "schema": MANIFEST_SCHEMA,
        "recording_id": recording.id,
        "device_id": recording.device_id,
        "school": recording.school,
        "room": recording.room,
        "trigger": recording.trigger,
        "window_id": recording.window_id,
        "started_at": _iso(recording.started_at),
        "ended_at": _iso(recording.ended_at),
        "status": recording.status,
        "end_reason": recording.end_reason,
        "completeness": completeness(recording.status, recording.segments_reported, stored),
        "video": recording.video,
        "audio": recording.audio,
        "bookmarks": recording.bookmarks,
        "gaps": recording.gaps,
        "segments_reported": recording.segments_reported,
        "segments_stored": stored,
        "segments": [
            {
                "sequence": segment.sequence,
                "file": segment.key.rsplit("/", 1)[-1],
                "key": segment.key,
                "size": segment.size,
                "sha256": segment.sha256,
                "started_at": _iso(segment.started_at),
                "ended_at": _iso(segment.ended_at),
                "recovered": segment.recovered,
                "stored": segment.state == STORED,
            }
            for segment in segments
        ],
    }


def _titles(session: Session, window_ids: builtins.list[str]) -> dict[str, str]:
    if not window_ids:
        return {}
    rows = session.execute(
        select(CaptureWindowRow.window_id, CaptureWindowRow.title).where(
            CaptureWindowRow.window_id.in_(window_ids)
        )
    )
    return {window_id: title for window_id, title in rows}


def _recording_view(
    recording: Recording,
    stored: int,
    segments: builtins.list[SegmentView],
    title: str | None = None,
) -> RecordingView:
    return RecordingView(
        id=recording.id,
        device_id=recording.device_id,
        school=recording.school,
        room=recording.room,
        trigger=recording.trigger,
        window_id=recording.window_id,
        started_at=recording.started_at,
        ended_at=recording.ended_at,
        status=recording.status,
        end_reason=recording.end_reason,
        bookmarks=builtins.list(recording.bookmarks),
        gaps=builtins.list(recording.gaps),
        segments_reported=recording.segments_reported,
        segments_stored=stored,
        completeness=completeness(recording.status, recording.segments_reported, stored),
        segments=segments,
        manifest_key=recording.manifest_key,
        title=title,
    )
