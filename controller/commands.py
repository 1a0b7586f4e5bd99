"""Commands to units: a record per unit and command, from queued to its final answer.

queued → sent → accepted → done / failed / rejected, or expired when no final
answer came before ``expires_at``. A unit re-publishes the result it gave when
it sees a command again, so results are idempotent: a final status never
changes, and a late ``accepted`` never undoes ``done``. A real answer does
replace ``expired``, which only ever meant "no answer yet".
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from controller.db import Database, affected, paginate
from controller.models import CommandRecord, Device
from controller.registry import UnknownDevice
from controller.views import CommandView, Page
from shared.clock import utcnow
from shared.ids import new_command_id
from shared.messages import (
    Command,
    CommandAction,
    CommandResult,
    CommandStatus,
    DesiredState,
)

__all__ = ["CommandService", "CommandView", "Page", "UnknownDevice"]

log = logging.getLogger(__name__)

QUEUED = "queued"
SENT = "sent"
ACCEPTED = "accepted"
EXPIRED = "expired"
OPEN_STATUSES = (QUEUED, SENT, ACCEPTED)
FINAL_STATUSES = (
    CommandStatus.DONE.value,
    CommandStatus.FAILED.value,
    CommandStatus.REJECTED.value,
)
MAX_EXPIRES_S = 24 * 3600
_LATENCY_SAMPLES = 1000


class CommandService:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utcnow) -> None:
        self._db = db
        self._clock = clock

    def create(
        self,
        device_ids: builtins.list[str],
        action: CommandAction,
        *,
        created_by: str,
        expires_in_s: int = 60,
        note: str | None = None,
        desired: DesiredState | None = None,
    ) -> builtins.list[CommandView]:
        """Queues one command per unit (all or none); UnknownDevice names the ids not enrolled."""
        if not device_ids:
            raise ValueError("no units given")
        if not 0 < expires_in_s <= MAX_EXPIRES_S:
            raise ValueError(f"expires_in_s must be in 1..{MAX_EXPIRES_S}, got {expires_in_s}")
        now = self._clock()
        expires_at = now + timedelta(seconds=expires_in_s)
        unique_ids = list(dict.fromkeys(device_ids))
        params: dict[str, Any] = {}
        if note is not None:
            params["note"] = note
        if desired is not None:
            params["desired"] = desired.model_dump(mode="json", by_alias=True)
        # Validates action, note and desired together exactly as the unit will.
        Command(
            id="validation",
            action=action,
            issued_at=now,
            expires_at=expires_at,
            note=note,
            desired=desired,
        )
        with self._db.session() as session:
            found = set(session.scalars(select(Device.id).where(Device.id.in_(unique_ids))))
            missing = [device_id for device_id in unique_ids if device_id not in found]
            if missing:
                raise UnknownDevice(", ".join(missing))
            records = [
                CommandRecord(
                    id=new_command_id(),
                    device_id=device_id,
                    action=action.value,
                    params=params,
                    status=QUEUED,
                    created_by=created_by,
                    created_at=now,
                    expires_at=expires_at,
                )
                for device_id in unique_ids
            ]
            session.add_all(records)
            session.flush()
            views = [_view(record) for record in records]
        log.info(
            "commands queued action=%s units=%d by=%s expires_in_s=%d",
            action.value,
            len(views),
            created_by,
            expires_in_s,
        )
        return views

    def to_message(self, command_id: str) -> Command | None:
        """The wire command for a record still worth sending (queued or sent, not expired)."""
        with self._db.session(readonly=True) as session:
            record = session.get(CommandRecord, command_id)
            if record is None or record.status not in (QUEUED, SENT):
                return None
            if record.expires_at <= self._clock():
                return None
            return _message(record)

    def mark_sent(self, command_id: str) -> None:
        with self._db.session() as session:
            session.execute(
                update(CommandRecord)
                .where(CommandRecord.id == command_id, CommandRecord.status.in_((QUEUED, SENT)))
                .values(status=SENT, sent_at=self._clock())
            )

    def on_result(self, device_id: str, result: CommandResult) -> None:
        with self._db.session() as session:
            record = session.get(CommandRecord, result.command_id, with_for_update=True)
            if record is None or record.device_id != device_id:
                log.warning(
                    "result for unknown command ignored device=%s command=%s status=%s",
                    device_id,
                    result.command_id,
                    result.status.value,
                )
                return
            self._apply(record, result)

    def _apply(self, record: CommandRecord, result: CommandResult) -> None:
        if record.status in FINAL_STATUSES:
            if record.status != result.status.value:
                log.info(
                    "late result ignored command=%s status=%s kept=%s",
                    record.id,
                    result.status.value,
                    record.status,
                )
            return
        now = self._clock()
        if result.recording_id is not None:
            record.recording_id = result.recording_id
        if result.status is CommandStatus.ACCEPTED:
            if record.status == ACCEPTED:
                return
            record.status = ACCEPTED
            record.accepted_at = now
            record.reason = result.reason
            # an answer after our expiry sweep is still the truth
            record.finished_at = None
        else:
            record.status = result.status.value
            record.reason = result.reason
            record.finished_at = now
        log.info(
            "command %s command=%s device=%s action=%s reason=%s",
            record.status,
            record.id,
            record.device_id,
            record.action,
            record.reason,
        )

    def expire_due(self) -> int:
        """Marks every open command past its expiry as expired; returns how many."""
        now = self._clock()
        with self._db.session() as session:
            count = affected(
                session.execute(
                    update(CommandRecord)
                    .where(CommandRecord.status.in_(OPEN_STATUSES), CommandRecord.expires_at <= now)
                    .values(status=EXPIRED, finished_at=now, reason="no answer before it expired")
                    .execution_options(synchronize_session=False)
                )
            )
        return int(count or 0)

    def due_for(self, device_id: str) -> builtins.list[Command]:
        """Queued, unexpired commands for a unit that just came online, oldest first."""
        with self._db.session(readonly=True) as session:
            records = session.scalars(
                select(CommandRecord)
                .where(
                    CommandRecord.device_id == device_id,
                    CommandRecord.status == QUEUED,
                    CommandRecord.expires_at > self._clock(),
                )
                .order_by(CommandRecord.created_at, CommandRecord.id)
            )
            return [_message(record) for record in records]

    def get(self, command_id: str) -> CommandView | None:
        with self._db.session(readonly=True) as session:
            record = session.get(CommandRecord, command_id)
            return _view(record) if record is not None else None

    def list(
        self, *, device_id: str | None = None, page: int = 1, per_page: int = 50
    ) -> Page[CommandView]:
        query = select(CommandRecord)
        if device_id is not None:
            query = query.where(CommandRecord.device_id == device_id)
        with self._db.session(readonly=True) as session:
            window = paginate(
                session,
                query,
                (CommandRecord.created_at.desc(), CommandRecord.id.desc()),
                page,
                per_page,
            )
            records = session.scalars(window.query)
            items = [_view(record) for record in records]
        return Page(items, window.total, window.page, window.per_page)

    def latency_seconds(self, limit: int = _LATENCY_SAMPLES) -> builtins.list[float]:
        """Created → done of the latest ``limit`` commands that succeeded."""
        with self._db.session(readonly=True) as session:
            rows = session.execute(
                select(CommandRecord.created_at, CommandRecord.finished_at)
                .where(
                    CommandRecord.status == CommandStatus.DONE.value,
                    CommandRecord.finished_at.is_not(None),
                )
                .order_by(CommandRecord.finished_at.desc())
                .limit(limit)
            ).all()
        return [
            (finished - created).total_seconds()
            for created, finished in rows
            if finished is not None
        ]


def _message(record: CommandRecord) -> Command:
    desired = record.params.get("desired")
    return Command(
        id=record.id,
        action=CommandAction(record.action),
        issued_at=record.created_at,
        expires_at=record.expires_at,
        note=record.params.get("note"),
        desired=DesiredState.model_validate(desired) if desired is not None else None,
    )


def _view(record: CommandRecord) -> CommandView:
    return CommandView(
        id=record.id,
        device_id=record.device_id,
        action=record.action,
        status=record.status,
        reason=record.reason,
        created_by=record.created_by,
        created_at=record.created_at,
        expires_at=record.expires_at,
        sent_at=record.sent_at,
        accepted_at=record.accepted_at,
        finished_at=record.finished_at,
        recording_id=record.recording_id,
        note=record.params.get("note"),
    )
