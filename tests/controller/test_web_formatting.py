"""The dashboard's formatting of times, sizes, durations and pager links."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from controller.alerts import AlertKind
from controller.web.dashboard import ALERT_LABELS
from controller.web.formatting import ago, human_bytes, human_duration, pager_pages

NOW = datetime(2026, 3, 3, 8, 0, tzinfo=UTC)


def test_ago() -> None:
    assert ago(None, NOW) == "never"
    assert ago(NOW + timedelta(seconds=2), NOW) == "just now"
    assert ago(NOW - timedelta(seconds=42), NOW) == "42 s ago"
    assert ago(NOW - timedelta(minutes=5, seconds=59), NOW) == "5 min ago"
    assert ago(NOW - timedelta(hours=3), NOW) == "3 h ago"
    assert ago(NOW - timedelta(days=9), NOW) == "9 d ago"


def test_human_bytes() -> None:
    assert human_bytes(None) == "-"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KB"
    assert human_bytes(20 * 1024**3) == "20.0 GB"
    assert human_bytes(3 * 1024**5) == "3072.0 TB"


def test_human_duration() -> None:
    assert human_duration(None) == "-"
    assert human_duration(59) == "0 min 59 s"
    assert human_duration(3600 + 120) == "1 h 2 min"
    assert human_duration(2 * 86400 + 5 * 3600) == "2 d 5 h"


def test_pager_pages_elide_long_runs() -> None:
    assert pager_pages(1, 1) == [1]
    assert pager_pages(2, 4) == [1, 2, 3, 4]
    assert pager_pages(6, 400) == [1, None, 4, 5, 6, 7, 8, None, 400]
    assert pager_pages(400, 400) == [1, None, 398, 399, 400]


def test_every_alert_kind_has_a_label() -> None:
    assert set(ALERT_LABELS) == {kind.value for kind in AlertKind}
