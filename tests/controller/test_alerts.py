"""Alerts: every health kind raised and cleared, hysteresis, one open alert per kind, and the
offline sweep on an injected clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from controller.alerts import AlertEngine, AlertKind, AlertThresholds
from controller.db import Database
from controller.models import Alert
from controller.registry import Registry
from shared.messages import RecorderState, Status, Throttling
from tests.controller.conftest import FakeClock, health

MB = 1024 * 1024


def throttling(under_voltage_now: bool) -> Throttling:
    return Throttling(
        raw=0x50005 if under_voltage_now else 0,
        under_voltage_now=under_voltage_now,
        throttled_now=False,
        freq_capped_now=False,
        soft_temp_limit_now=False,
        under_voltage_occurred=True,
        throttled_occurred=False,
        freq_capped_occurred=False,
        soft_temp_limit_occurred=False,
    )


@pytest.fixture
def alerts(db: Database, clock: FakeClock) -> AlertEngine:
    return AlertEngine(db, AlertThresholds(offline_after_s=300), clock=clock)


@pytest.fixture
def registry(db: Database, alerts: AlertEngine, clock: FakeClock) -> Registry:
    registry = Registry(db, alerts, clock=clock)
    registry.add_device("room-204", "North High", "204")
    registry.add_device("room-205", "South Middle", "205")
    return registry


def open_kinds(registry: Registry, device_id: str = "room-204") -> list[str]:
    view = registry.get(device_id)
    assert view is not None
    return view.open_alerts


CASES: list[tuple[AlertKind, dict[str, Any], dict[str, Any]]] = [
    (AlertKind.DISK_LOW, {"disk_free_bytes": 1000 * MB}, {"disk_free_bytes": 20_000 * MB}),
    (AlertKind.TEMPERATURE, {"soc_temp_c": 85.0}, {"soc_temp_c": 60.0}),
    (
        AlertKind.UNDER_VOLTAGE,
        {"throttling": throttling(True)},
        {"throttling": throttling(False)},
    ),
    (AlertKind.CAMERA_MISSING, {"camera_present": False}, {"camera_present": True}),
    (
        AlertKind.MIC_SILENT,
        {"state": RecorderState.RECORDING, "recording_id": "r", "mic_level_dbfs": -90.0},
        {"state": RecorderState.RECORDING, "recording_id": "r", "mic_level_dbfs": -25.0},
    ),
    (AlertKind.UPLOAD_BACKLOG, {"spool_segments": 31}, {"spool_segments": 3}),
    (AlertKind.CLOCK_UNSYNCED, {"clock_synced": False}, {"clock_synced": True}),
]


@pytest.mark.parametrize(("kind", "bad", "good"), CASES, ids=[case[0].value for case in CASES])
def test_each_health_alert_is_raised_and_cleared(
    registry: Registry,
    alerts: AlertEngine,
    clock: FakeClock,
    kind: AlertKind,
    bad: dict[str, Any],
    good: dict[str, Any],
) -> None:
    registry.on_health("room-204", health(clock, **bad))
    assert open_kinds(registry) == [kind.value]
    raised = alerts.list(device_id="room-204").items
    assert [(a.kind, a.school, a.room, a.raised_at) for a in raised] == [
        (kind.value, "North High", "204", clock())
    ]
    assert raised[0].message
    clock.advance(30)
    registry.on_health("room-204", health(clock, **good))
    assert open_kinds(registry) == []
    history = alerts.list(open_only=False, device_id="room-204").items
    assert [(a.kind, a.cleared_at) for a in history] == [(kind.value, clock())]


def test_a_repeated_condition_keeps_one_open_alert_with_the_latest_message(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    registry.on_health("room-204", health(clock, spool_segments=40))
    clock.advance(30)
    registry.on_health("room-204", health(clock, spool_segments=55))
    page = alerts.list(open_only=False)
    assert page.total == 1
    assert "55 segments" in page.items[0].message
    assert page.items[0].raised_at == clock() - timedelta(seconds=30)


def test_temperature_clears_only_below_its_hysteresis(registry: Registry, clock: FakeClock) -> None:
    registry.on_health("room-204", health(clock, soc_temp_c=81.0))
    registry.on_health("room-204", health(clock, soc_temp_c=78.5))
    assert open_kinds(registry) == ["temperature"]
    registry.on_health("room-204", health(clock, soc_temp_c=76.9))
    assert open_kinds(registry) == []
    registry.on_health("room-204", health(clock, soc_temp_c=79.0))
    assert open_kinds(registry) == []


def test_disk_low_is_an_error_when_the_unit_cannot_record(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    registry.on_health(
        "room-204",
        health(
            clock,
            disk_free_bytes=500 * MB,
            can_record=False,
            cannot_record_reason="disk budget",
        ),
    )
    (alert,) = alerts.list().items
    assert (alert.kind, alert.severity) == ("disk_low", "error")
    assert "500 MB" in alert.message


def test_a_silent_microphone_matters_only_while_recording(
    registry: Registry, clock: FakeClock
) -> None:
    registry.on_health("room-204", health(clock, mic_level_dbfs=-90.0))
    assert open_kinds(registry) == []
    registry.on_health(
        "room-204",
        health(clock, state=RecorderState.RECORDING, recording_id="r", mic_level_dbfs=-90.0),
    )
    assert open_kinds(registry) == ["mic_silent"]
    registry.on_health("room-204", health(clock, mic_level_dbfs=-90.0))
    assert open_kinds(registry) == []


def test_unknown_readings_leave_alerts_as_they_are(registry: Registry, clock: FakeClock) -> None:
    registry.on_health(
        "room-204", health(clock, camera_present=False, clock_synced=False, soc_temp_c=90.0)
    )
    registry.on_health(
        "room-204", health(clock, camera_present=None, clock_synced=None, soc_temp_c=None)
    )
    assert open_kinds(registry) == ["camera_missing", "clock_unsynced", "temperature"]


def test_the_database_refuses_a_second_open_alert_of_a_kind(
    db: Database, registry: Registry, clock: FakeClock
) -> None:
    registry.on_health("room-204", health(clock, camera_present=False))
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(
            Alert(
                device_id="room-204",
                kind="camera_missing",
                severity="error",
                message="twice",
                raised_at=clock(),
            )
        )


# --- offline sweep -------------------------------------------------------------------------------


def test_offline_is_raised_by_the_sweep_after_offline_after_s(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    for unit in ("room-204", "room-205"):
        registry.on_status(unit, Status(online=True, epoch=1))
    clock.advance(10)
    registry.on_status("room-204", Status(online=False, epoch=1))
    clock.advance(299)
    alerts.sweep()
    assert open_kinds(registry) == []
    clock.advance(1)
    alerts.sweep()
    alerts.sweep()
    assert open_kinds(registry) == ["offline"]
    assert open_kinds(registry, "room-205") == []
    (alert,) = alerts.list(kind="offline").items
    assert alert.severity == "error" and "offline since 2026-03-03 08:00" in alert.message


def test_coming_back_online_clears_offline(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    registry.on_status("room-204", Status(online=True, epoch=1))
    registry.on_status("room-204", Status(online=False, epoch=1))
    clock.advance(600)
    alerts.sweep()
    assert open_kinds(registry) == ["offline"]
    clock.advance(5)
    registry.on_status("room-204", Status(online=True, epoch=2))
    assert open_kinds(registry) == []
    (alert,) = alerts.list(open_only=False, kind="offline", device_id="room-204").items
    assert alert.cleared_at == clock()


def test_a_unit_never_seen_counts_offline_from_when_it_was_added(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    clock.advance(301)
    alerts.sweep()
    assert open_kinds(registry) == ["offline"]
    assert open_kinds(registry, "room-205") == ["offline"]


def test_alert_listing_filters_by_school_and_counts_open_alerts(
    registry: Registry, alerts: AlertEngine, clock: FakeClock
) -> None:
    registry.on_health("room-204", health(clock, camera_present=False))
    registry.on_health("room-205", health(clock, camera_present=False, clock_synced=False))
    assert [a.device_id for a in alerts.list(school="South Middle").items] == [
        "room-205",
        "room-205",
    ]
    page = alerts.list(per_page=2, page=2)
    assert page.total == 3 and len(page.items) == 1
    counts = alerts.open_counts()
    assert counts["camera_missing"] == 2 and counts["clock_unsynced"] == 1
    assert counts["offline"] == 0 and set(counts) == {kind.value for kind in AlertKind}
