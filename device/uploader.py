"""Every closed segment to district storage, verified, and only then deleted.

Per segment: announce it (size, sha256) -> the controller grants a presigned
PUT bound to that checksum -> PUT the file -> report the result -> the
controller verifies the stored object and confirms -> delete the local copy.
The journal holds each segment's state, so a restart resumes where it stopped:
segments left GRANTED or UPLOADED are announced again and the controller, which
is idempotent, answers with a new grant or with a confirmation.

A scheduler thread announces and paces retries (exponential backoff with
jitter, per segment); ``config.concurrency`` worker threads do the PUTs. Both
wait on one condition: nothing polls.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from device.config import UploadConfig
from device.http_put import PutAborted, PutError, TokenBucket, bits_to_bytes_per_s, put_file
from device.journal import Journal, JournalError, SegmentRow, SegmentState, SegmentStateError
from device.spool import Spool, SpoolError
from shared.clock import utcnow
from shared.messages import (
    Message,
    RecordingStatus,
    SegmentAnnouncement,
    StoredConfirmation,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel

log = logging.getLogger(__name__)

SegmentKey = tuple[str, int]
# After this many grants in a row that look expired on arrival, the unit's clock is
# more likely wrong than the grants: try the PUT and let the store decide.
_EXPIRED_GRANTS_BEFORE_TRYING = 3
_MAX_ERROR_CHARS = 500
# Pause after an unexpected error in a thread loop, so a persistent fault cannot spin.
_FAULT_PAUSE_S = 1.0


class _Phase(Enum):
    READY = auto()  # to be announced once ``due`` passes
    AWAITING_GRANT = auto()  # announced; re-announced (after backoff) if no grant by ``due``
    GRANTED = auto()  # a grant waits for a free worker
    UPLOADING = auto()  # a worker is PUTting it
    AWAITING_CONFIRMATION = auto()  # uploaded and reported; confirmation expected by ``due``


@dataclass
class _Task:
    row: SegmentRow
    phase: _Phase = _Phase.READY
    due: float = 0.0
    failures: int = 0
    grant: UploadGrant | None = None
    expired_grants: int = 0

    @property
    def key(self) -> SegmentKey:
        return (self.row.recording_id, self.row.sequence)


def backoff_delay(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds before retry number ``failures`` (1 = first retry).

    Uniform between ``initial_s`` and ``initial_s * 2**failures`` capped at
    ``max_s``: exponential growth, and the jitter keeps a school's units from
    retrying in step after a shared outage.
    """
    low = min(initial_s, max_s)
    high = min(max_s, initial_s * 2.0 ** min(max(failures, 0), 30))
    return rng.uniform(low, max(low, high))


class Uploader:
    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        publish: Callable[[Channel, Message], bool],
        config: UploadConfig,
        device_id: str,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._journal = journal
        self._spool = spool
        self._publish_fn = publish
        self._config = config
        self._device_id = device_id
        self._rng = rng or random.Random()
        self._limiter = TokenBucket(bits_to_bytes_per_s(config.bandwidth_kbps * 1000))
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._tasks: dict[SegmentKey, _Task] = {}
        self._online = False
        self._refresh = True
        self._hold_until = 0.0
        self._threads: list[threading.Thread] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._scheduler_loop, name="uploader-scheduler", daemon=True)
        ]
        self._threads += [
            threading.Thread(target=self._worker_loop, name=f"uploader-worker-{n}", daemon=True)
            for n in range(self._config.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "uploader started device=%s workers=%d bandwidth_kbps=%d",
            self._device_id,
            self._config.concurrency,
            self._config.bandwidth_kbps,
        )

    def stop(self) -> None:
        """Stops the threads; a PUT under way is aborted and resumes after the next start."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        log.info("uploader stopped device=%s", self._device_id)

    # --- signals from the agent -----------------------------------------------------------

    def wake(self) -> None:
        """A segment was closed: read the journal's backlog again."""
        with self._cond:
            self._refresh = True
            self._cond.notify_all()

    def set_online(self, online: bool) -> None:
        """Broker link up or down; on up, everything pending is announced again at once."""
        with self._cond:
            self._online = online
            if online:
                self._refresh = True
                now = time.monotonic()
                for task in self._tasks.values():
                    if task.phase in (
                        _Phase.READY,
                        _Phase.AWAITING_GRANT,
                        _Phase.AWAITING_CONFIRMATION,
                    ):
                        task.phase = _Phase.READY
                        task.due = now
            self._cond.notify_all()
        log.info("uploader link online=%s", online)

    def hold_for_spread(self) -> None:
        """A lesson just ended: start new uploads at a random moment within ``spread_s``."""
        delay = self._rng.uniform(0.0, self._config.spread_s)
        with self._cond:
            self._hold_until = max(self._hold_until, time.monotonic() + delay)
            self._cond.notify_all()
        log.info("uploads held for spread delay_s=%.1f", delay)

    def set_bandwidth_kbps(self, kbps: int) -> None:
        """Caps all uploads together at ``kbps`` kilobits per second (0: no cap), at once."""
        if kbps < 0:
            raise ValueError(f"bandwidth must be >= 0 kbps, got {kbps}")
        self._limiter.set_rate(bits_to_bytes_per_s(kbps * 1000))
        log.info("upload bandwidth set kbps=%d", kbps)

    # --- answers from the controller --------------------------------------------------------

    def on_grant(self, grant: UploadGrant) -> None:
        key = (grant.recording_id, grant.sequence)
        with self._cond:
            task = self._tasks.get(key)
            if task is None:
                log.info("grant ignored, segment unknown or stored recording=%s seq=%d", *key)
                return
            if task.phase in (_Phase.UPLOADING, _Phase.AWAITING_CONFIRMATION):
                log.info(
                    "grant ignored, upload under way recording=%s seq=%d phase=%s",
                    *key,
                    task.phase.name,
                )
                return
            # A newer grant replaces a queued one: it expires later.
            task.grant = grant
            task.phase = _Phase.GRANTED
            self._cond.notify_all()
        log.info("grant received recording=%s seq=%d key=%s", *key, grant.key)

    def on_stored(self, confirmation: StoredConfirmation) -> None:
        key = (confirmation.recording_id, confirmation.sequence)
        try:
            row = self._journal.segment(*key)
        except JournalError:
            log.exception("confirmation not handled, journal unreadable recording=%s seq=%d", *key)
            return
        if row is None or row.state is SegmentState.STORED:
            log.info("confirmation ignored, segment unknown or stored recording=%s seq=%d", *key)
            with self._cond:
                self._tasks.pop(key, None)
            return
        if confirmation.verified:
            if confirmation.sha256 == row.sha256 and confirmation.size == row.size:
                self._stored(row, confirmation.key)
                return
            log.error(
                "confirmation does not match journal recording=%s seq=%d "
                "sha256=%s size=%s journal_sha256=%s journal_size=%s",
                *key,
                confirmation.sha256,
                confirmation.size,
                row.sha256,
                row.size,
            )
        with self._cond:
            task = self._tasks.get(key)
            if task is None or task.phase is not _Phase.AWAITING_CONFIRMATION:
                log.info(
                    "unverified confirmation ignored, not awaited recording=%s seq=%d reason=%s",
                    *key,
                    confirmation.reason,
                )
                return
            delay = self._retry_later(task)
        log.warning(
            "segment not verified recording=%s seq=%d reason=%s retry_in_s=%.1f",
            *key,
            confirmation.reason,
            delay,
        )
        self._reset(task.row)

    def _stored(self, row: SegmentRow, object_key: str) -> None:
        key = (row.recording_id, row.sequence)
        try:
            self._journal.mark_stored(*key)
        except JournalError:
            log.exception("cannot mark segment stored recording=%s seq=%d", *key)
            return
        with self._cond:
            self._tasks.pop(key, None)
        log.info("segment confirmed recording=%s seq=%d key=%s", *key, object_key)
        try:
            self._spool.delete_stored_segment(row.path)
        except SpoolError:
            log.exception("stored segment not deleted recording=%s seq=%d", *key)
            return
        self.forget_recording_if_done(row.recording_id)

    def forget_recording_if_done(self, recording_id: str) -> None:
        """Removes an ended recording's folder once storage has confirmed all of its segments."""
        manifest = self._journal.manifest(recording_id)
        if manifest is None or manifest.status is RecordingStatus.RECORDING:
            return
        rows = self._journal.all_segments(recording_id)
        if any(r.state is not SegmentState.STORED for r in rows):
            return
        # The manifest sent when the recording ended or the link came back can be lost if it
        # reached a restarted broker before the controller subscribed again; the controller
        # that just confirmed the last segment is surely listening.
        self._publish_fn(Channel.RECORDING, manifest)
        try:
            self._spool.remove_finished_recording(recording_id)
        except SpoolError:
            log.exception("recording folder not removed recording=%s", recording_id)

    # --- scheduler --------------------------------------------------------------------------

    def _scheduler_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._schedule_once()
            except Exception:
                log.exception("uploader scheduler fault")
                self._stop.wait(_FAULT_PAUSE_S)

    def _schedule_once(self) -> None:
        with self._cond:
            refresh, self._refresh = self._refresh, False
        if refresh:
            self._load()
        with self._cond:
            announce, timeout = self._plan(time.monotonic())
            if not announce:
                if not self._refresh and not self._stop.is_set():
                    self._cond.wait(timeout)
                return
        for task in announce:
            self._announce(task)

    def _load(self) -> None:
        try:
            rows = self._journal.pending_segments()
        except JournalError:
            log.exception("cannot read upload backlog from journal")
            with self._cond:
                self._refresh = True
            self._stop.wait(_FAULT_PAUSE_S)
            return
        now = time.monotonic()
        with self._cond:
            pending = set()
            for row in rows:
                key = (row.recording_id, row.sequence)
                pending.add(key)
                task = self._tasks.get(key)
                if task is None:
                    self._tasks[key] = _Task(row=row, due=now)
                    log.debug("segment queued recording=%s seq=%d state=%s", *key, row.state)
                else:
                    task.row = row
            for key, task in list(self._tasks.items()):
                if key not in pending and task.phase in (_Phase.READY, _Phase.AWAITING_GRANT):
                    del self._tasks[key]

    def _plan(self, now: float) -> tuple[list[_Task], float | None]:
        """Moves timed-out waits to READY and picks the segments to announce now.

        Returns them (already marked AWAITING_GRANT, so an instant grant finds them
        waiting) and how long to sleep when there is nothing to do. Under the lock.
        """
        held = now < self._hold_until
        announce: list[_Task] = []
        wake_at = math.inf
        for task in self._tasks.values():
            if task.phase in (_Phase.AWAITING_GRANT, _Phase.AWAITING_CONFIRMATION):
                if now < task.due:
                    wake_at = min(wake_at, task.due)
                    continue
                waited = "grant" if task.phase is _Phase.AWAITING_GRANT else "confirmation"
                delay = self._retry_later(task)
                log.warning(
                    "no %s in time recording=%s seq=%d retry_in_s=%.1f", waited, *task.key, delay
                )
            if task.phase is not _Phase.READY or not self._online:
                continue
            if held or now < task.due:
                wake_at = min(wake_at, max(task.due, self._hold_until))
                continue
            task.phase = _Phase.AWAITING_GRANT
            task.due = now + self._config.grant_timeout_s
            announce.append(task)
        return announce, (None if math.isinf(wake_at) else max(0.0, wake_at - now))

    def _announce(self, task: _Task) -> None:
        row = task.row
        if row.size is None or row.sha256 is None or row.ended_at is None:
            log.error("pending segment lacks size or checksum recording=%s seq=%d", *task.key)
            with self._cond:
                self._tasks.pop(task.key, None)
            return
        announcement = SegmentAnnouncement(
            recording_id=row.recording_id,
            sequence=row.sequence,
            size=row.size,
            sha256=row.sha256,
            started_at=row.started_at,
            ended_at=row.ended_at,
            recovered=row.recovered,
        )
        if self._publish(Channel.SEGMENT, announcement):
            log.info(
                "segment announced recording=%s seq=%d size=%d state=%s",
                *task.key,
                row.size,
                row.state,
            )
            return
        with self._cond:
            if task.phase is _Phase.AWAITING_GRANT:
                task.phase = _Phase.READY
                task.due = time.monotonic() + self._backoff(max(task.failures, 1))
        log.info("segment announcement not sent, link down recording=%s seq=%d", *task.key)

    # --- workers ----------------------------------------------------------------------------

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                task, grant = self._next_granted(time.monotonic())
                if task is None or grant is None:
                    if not self._stop.is_set():
                        self._cond.wait(self._hold_remaining())
                    continue
            try:
                self._upload(task, grant)
            except Exception:
                log.exception("upload fault recording=%s seq=%d", *task.key)
                with self._cond:
                    if self._tasks.get(task.key) is task:
                        self._retry_later(task)
                self._stop.wait(_FAULT_PAUSE_S)

    def _hold_remaining(self) -> float | None:
        remaining = self._hold_until - time.monotonic()
        return remaining if remaining > 0 else None

    def _next_granted(self, now: float) -> tuple[_Task | None, UploadGrant | None]:
        if now < self._hold_until:
            return None, None
        for task in self._tasks.values():
            if task.phase is _Phase.GRANTED and task.grant is not None:
                grant, task.grant = task.grant, None
                task.phase = _Phase.UPLOADING
                return task, grant
        return None, None

    def _upload(self, task: _Task, grant: UploadGrant) -> None:
        key = task.key
        if grant.expires_at <= utcnow():
            task.expired_grants += 1
            if task.expired_grants < _EXPIRED_GRANTS_BEFORE_TRYING:
                log.warning(
                    "grant expired before upload, asking again recording=%s seq=%d expires_at=%s",
                    *key,
                    grant.expires_at.isoformat(),
                )
                with self._cond:
                    if self._tasks.get(key) is task:
                        task.phase = _Phase.READY
                        task.due = time.monotonic()
                        self._cond.notify_all()
                return
            log.warning(
                "grants keep arriving expired, unit clock may be ahead; trying anyway "
                "recording=%s seq=%d",
                *key,
            )
        else:
            task.expired_grants = 0

        row = self._journal.segment(*key)
        if row is None or row.state is SegmentState.STORED:
            with self._cond:
                self._tasks.pop(key, None)
            return
        try:
            if row.state is SegmentState.UPLOADED:
                # Uploaded before, but the controller could not confirm it: upload anew.
                self._journal.reset_to_closed(*key)
            self._journal.mark_granted(*key, grant.key)
        except SegmentStateError:
            # Confirmed stored by another path between the read and the write.
            log.info("grant dropped, segment changed meanwhile recording=%s seq=%d", *key)
            with self._cond:
                if self._tasks.get(key) is task:
                    task.phase = _Phase.READY
                    task.due = time.monotonic()
                    self._cond.notify_all()
            return
        started = time.monotonic()
        try:
            response = put_file(
                grant.url,
                row.path,
                grant.headers,
                self._config.request_timeout_s,
                stop=self._stop,
                limiter=self._limiter,
            )
        except PutAborted:
            log.info("upload aborted by stop recording=%s seq=%d", *key)
            return
        except (PutError, ValueError) as exc:
            self._failed(task, grant, None, str(exc))
            return
        if not response.ok:
            error = response.s3_error() or f"HTTP {response.status}"
            if error.startswith("BadDigest") and self._file_changed(row):
                error = f"{error} (the file on disk no longer matches its recorded sha256)"
            self._failed(task, grant, response.status, error)
            return

        self._journal.mark_uploaded(*key)
        with self._cond:
            if self._tasks.get(key) is not task:
                return  # confirmed meanwhile (an earlier upload was verified)
            task.phase = _Phase.AWAITING_CONFIRMATION
            task.due = time.monotonic() + self._config.grant_timeout_s
        elapsed = time.monotonic() - started
        log.info(
            "segment uploaded recording=%s seq=%d bytes=%d seconds=%.2f status=%d",
            *key,
            row.size or 0,
            elapsed,
            response.status,
        )
        self._publish(
            Channel.UPLOAD,
            UploadResult(
                recording_id=key[0],
                sequence=key[1],
                key=grant.key,
                ok=True,
                http_status=response.status,
            ),
        )

    def _failed(self, task: _Task, grant: UploadGrant, status: int | None, error: str) -> None:
        with self._cond:
            current = self._tasks.get(task.key) is task
            delay = self._retry_later(task) if current else 0.0
        log.warning(
            "upload failed recording=%s seq=%d status=%s error=%s retry_in_s=%.1f",
            *task.key,
            status,
            error,
            delay,
        )
        if not current:
            return
        self._reset(task.row)
        self._publish(
            Channel.UPLOAD,
            UploadResult(
                recording_id=task.key[0],
                sequence=task.key[1],
                key=grant.key,
                ok=False,
                http_status=status,
                error=error[:_MAX_ERROR_CHARS],
            ),
        )

    def _file_changed(self, row: SegmentRow) -> bool:
        try:
            size, digest = self._spool.hash_file(row.path)
        except OSError as exc:
            log.error("cannot re-read segment path=%s error=%s", row.path, exc)
            return False
        if size == row.size and digest == row.sha256:
            return False
        log.error(
            "segment changed on disk since it was hashed recording=%s seq=%d path=%s",
            row.recording_id,
            row.sequence,
            row.path,
        )
        return True

    # --- helpers ----------------------------------------------------------------------------

    def _retry_later(self, task: _Task) -> float:
        """Counts a failure and schedules the next announcement. Under the lock."""
        task.failures += 1
        task.grant = None
        task.phase = _Phase.READY
        delay = self._backoff(task.failures)
        task.due = time.monotonic() + delay
        self._cond.notify_all()
        return delay

    def _backoff(self, failures: int) -> float:
        return backoff_delay(
            failures, self._config.retry_initial_s, self._config.retry_max_s, self._rng
        )

    def _reset(self, row: SegmentRow) -> None:
        try:
            self._journal.reset_to_closed(row.recording_id, row.sequence)
        except JournalError:
            log.exception(
                "cannot reset segment recording=%s seq=%d", row.recording_id, row.sequence
            )

    def _publish(self, channel: Channel, message: Message) -> bool:
        try:
            return self._publish_fn(channel, message)
        except Exception:
            log.exception("publish failed channel=%s", channel.value)
            return False
