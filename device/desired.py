"""The desired state the controller asked for, persisted so the unit keeps it across restarts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from device.journal import Journal
from shared.clock import utcnow
from shared.codec import DecodeError, decode
from shared.messages import DesiredState, ReportedState

log = logging.getLogger(__name__)

_DESIRED_KEY = "desired_state"
_APPLIED_AT_KEY = "desired_applied_at"


@dataclass(frozen=True)
class ApplyResult:
    applied: bool
    reason: str | None = None


class DesiredStateStore:
    def __init__(self, journal: Journal, agent_version: str) -> None:
        self._journal = journal
        self._agent_version = agent_version
        self._current = self._load()

    @property
    def current(self) -> DesiredState | None:
        return self._current

    def apply(self, desired: DesiredState) -> ApplyResult:
        """Keeps ``desired`` if it is newer than what runs; otherwise changes nothing."""
        running = self._current.version if self._current else 0
        if desired.version <= running:
            return ApplyResult(False, f"version {desired.version} is not newer than {running}")
        self._journal.set_value(_DESIRED_KEY, desired.to_json().decode())
        self._journal.set_value(_APPLIED_AT_KEY, utcnow().isoformat())
        self._current = desired
        log.info(
            "desired state applied version=%d windows=%d", desired.version, len(desired.schedule)
        )
        return ApplyResult(True)

    def reported(self, error: str | None = None) -> ReportedState:
        applied_at = self._journal.get_value(_APPLIED_AT_KEY)
        return ReportedState(
            desired_version=self._current.version if self._current else 0,
            applied_at=datetime.fromisoformat(applied_at) if applied_at else None,
            agent_version=self._agent_version,
            error=error,
        )

    def _load(self) -> DesiredState | None:
        raw = self._journal.get_value(_DESIRED_KEY)
        if raw is None:
            return None
        try:
            return decode(DesiredState, raw.encode())
        except DecodeError as exc:
            log.error("persisted desired state is unreadable, ignoring it: %s", exc.reason)
            return None
