"""A stand-in for the controller's upload grant service, and an in-process transport for it.

``Grantor`` is transport-agnostic: it answers a unit's segment announcements
with presigned grants (or a confirmation when the object is already stored
and verified) and its upload results with a verified or refused confirmation,
counting what it did. ``InProcessControl`` wires it to an uploader without a
broker: ``publish`` queues, one thread answers, answers go back through the
uploader's ``on_grant``/``on_stored``, so no call re-enters the uploader.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from controller.storage.s3 import S3Storage, StorageError
from device.segmentlist import segment_filename
from shared.messages import (
    Message,
    SegmentAnnouncement,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel

log = logging.getLogger(__name__)

GRANT_EXPIRES_S = 900


@dataclass(frozen=True)
class _Announced:
    key: str
    size: int
    sha256: str


class Grantor:
    def __init__(
        self, storage: S3Storage, device_id: str, expires_s: int = GRANT_EXPIRES_S
    ) -> None:
        self.storage = storage
        self.device_id = device_id
        # Tests may change this between grants (a short-lived grant that expires in transit).
        self.expires_s = expires_s
        self._lock = threading.Lock()
        self._announced: dict[tuple[str, int], _Announced] = {}
        self._verified: set[str] = set()
        self.announcements = 0
        self.grants: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()  # key -> times found newly stored and verified
        self.failed_results: list[UploadResult] = []
        self.refusals: list[StoredConfirmation] = []

    @property
    def grants_issued(self) -> int:
        with self._lock:
            return sum(self.grants.values())

    @property
    def stored_keys(self) -> set[str]:
        with self._lock:
            return set(self._verified)

    def key_for(self, recording_id: str, sequence: int) -> str:
        return self.storage.key_for(self.device_id, recording_id, segment_filename(sequence))

    def on_announcement(
        self, announcement: SegmentAnnouncement
    ) -> UploadGrant | StoredConfirmation:
        key = self.key_for(announcement.recording_id, announcement.sequence)
        entry = _Announced(key, announcement.size, announcement.sha256)
        with self._lock:
            self.announcements += 1
            previous = self._announced.get((announcement.recording_id, announcement.sequence))
            self._announced[(announcement.recording_id, announcement.sequence)] = entry
            known_stored = key in self._verified and previous == entry
            granted_before = self.grants[key] > 0
        if known_stored:
            return self._confirmation(announcement.recording_id, announcement.sequence, entry)
        if granted_before:
            # The unit may have crashed between its PUT and its report: look before granting.
            try:
                verification = self.storage.verify(key, entry.size, entry.sha256)
            except StorageError as exc:
                log.info("grantor could not check key=%s error=%s", key, exc)
            else:
                if verification.ok:
                    self._mark_stored(key)
                    return self._confirmation(
                        announcement.recording_id, announcement.sequence, entry
                    )
        presigned = self.storage.presign_put(key, entry.size, entry.sha256, self.expires_s)
        with self._lock:
            self.grants[key] += 1
        return UploadGrant(
            recording_id=announcement.recording_id,
            sequence=announcement.sequence,
            key=key,
            url=presigned.url,
            headers=presigned.headers,
            expires_at=presigned.expires_at,
        )

    def on_upload_result(self, result: UploadResult) -> StoredConfirmation:
        with self._lock:
            entry = self._announced.get((result.recording_id, result.sequence))
            if not result.ok:
                self.failed_results.append(result)
        if entry is None or entry.key != result.key:
            return self._refuse(result.recording_id, result.sequence, result.key, "not granted")
        # Even a failed PUT may have reached the store (a timeout after the body was sent).
        try:
            verification = self.storage.verify(entry.key, entry.size, entry.sha256)
        except StorageError as exc:
            return self._refuse(
                result.recording_id, result.sequence, entry.key, f"storage unavailable: {exc}"
            )
        if not verification.ok:
            return self._refuse(
                result.recording_id, result.sequence, entry.key, verification.reason or "mismatch"
            )
        self._mark_stored(entry.key)
        return self._confirmation(result.recording_id, result.sequence, entry)

    def _mark_stored(self, key: str) -> None:
        with self._lock:
            if key not in self._verified:
                self._verified.add(key)
                self.stored[key] += 1

    @staticmethod
    def _confirmation(recording_id: str, sequence: int, entry: _Announced) -> StoredConfirmation:
        return StoredConfirmation(
            recording_id=recording_id,
            sequence=sequence,
            key=entry.key,
            verified=True,
            sha256=entry.sha256,
            size=entry.size,
        )

    def _refuse(
        self, recording_id: str, sequence: int, key: str, reason: str
    ) -> StoredConfirmation:
        refusal = StoredConfirmation(
            recording_id=recording_id, sequence=sequence, key=key, verified=False, reason=reason
        )
        with self._lock:
            self.refusals.append(refusal)
        return refusal


Answer = UploadGrant | StoredConfirmation
RequestFilter = Callable[[Channel, Message], bool]
AnswerHook = Callable[[Answer], Answer | None]


class InProcessControl:
    """The controller side of an uploader test, on one thread instead of a broker.

    ``accept`` may drop a request (return False: lost on the way); ``deliver``
    may delay, replace or drop (return None) an answer. While ``online`` is
    False, ``publish`` refuses like a disconnected link.
    """

    def __init__(
        self,
        grantor: Grantor,
        *,
        accept: RequestFilter | None = None,
        deliver: AnswerHook | None = None,
    ) -> None:
        self.grantor = grantor
        self.online = True
        self._on_grant: Callable[[UploadGrant], None] | None = None
        self._on_stored: Callable[[StoredConfirmation], None] | None = None
        self._accept = accept
        self._deliver = deliver
        self._queue: queue.Queue[tuple[Channel, Message] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="in-process-control", daemon=True)
        self.published: list[tuple[Channel, Message]] = []
        self.errors: list[BaseException] = []

    def connect(
        self,
        on_grant: Callable[[UploadGrant], None],
        on_stored: Callable[[StoredConfirmation], None],
    ) -> None:
        """Where answers go; may be re-pointed (a restarted uploader) while running."""
        self._on_grant = on_grant
        self._on_stored = on_stored

    def start(self) -> InProcessControl:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def publish(self, channel: Channel, message: Message) -> bool:
        if not self.online:
            return False
        self.published.append((channel, message))
        self._queue.put((channel, message))
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            channel, message = item
            try:
                self._handle(channel, message)
            except Exception as exc:  # recorded for the test to assert on, never swallowed
                log.exception("in-process control failed on %s", channel.value)
                self.errors.append(exc)

    def _handle(self, channel: Channel, message: Message) -> None:
        if self._accept is not None and not self._accept(channel, message):
            return
        answer: Answer
        if isinstance(message, SegmentAnnouncement):
            answer = self.grantor.on_announcement(message)
        elif isinstance(message, UploadResult):
            answer = self.grantor.on_upload_result(message)
        else:
            return
        delivered = self._deliver(answer) if self._deliver is not None else answer
        if isinstance(delivered, UploadGrant) and self._on_grant is not None:
            self._on_grant(delivered)
        elif isinstance(delivered, StoredConfirmation) and self._on_stored is not None:
            self._on_stored(delivered)
