"""The reconciler against real units' journals, a real catalogue (SQLite and PostgreSQL) and
real storage (LocalStorage and SeaweedFS): what it counts, what it explains, how it exits."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from controller.alerts import AlertEngine, AlertKind, set_alert
from controller.catalogue import Catalogue
from controller.db import Database
from controller.reconcile import (
    CatalogueRecording,
    CatalogueSegment,
    CatalogueState,
    Finding,
    Kind,
    Listing,
    ObjectFacts,
    Report,
    reconcile,
    render_table,
    render_text,
)
from controller.reconcile_sources import JournalSource, gather, journal_source
from controller.registry import Registry
from controller.storage.base import Storage
from controller.storage.local import LocalStorage
from controller.storage.s3 import S3Storage
from device.http_put import put_file
from device.journal import Journal
from shared.cli import main
from shared.messages import (
    CaptureWindow,
    DesiredState,
    EndReason,
    Gap,
    RecordingStatus,
    SegmentAnnouncement,
    Trigger,
    UploadGrant,
    UploadResult,
)
from tests.controller.conftest import FakeClock
from tests.support.s3 import PREFIX
from tests.support.seaweed_server import SeaweedServer

REPO = Path(__file__).resolve().parents[2]
UNIT = "room-204"
T0 = datetime(2026, 3, 3, 8, 0, tzinfo=UTC)
SECRET = b"0123456789abcdef0123456789abcdef"


# --- a real store, reached the ways a unit and a tamperer reach it --------------------------


@dataclass
class Store:
    storage: Storage
    put: Callable[[UploadGrant, Path], int]
    delete: Callable[[str], None]
    config: str  # the [storage] section of a controller config

    def write(self, key: str, data: bytes) -> None:
        self.storage.put_bytes(key, data, "video/mp4")


def _local_store(tmp_path: Path) -> Store:
    storage = LocalStorage(tmp_path / "objects", "http://127.0.0.1:9", SECRET)

    def put(grant: UploadGrant, path: Path) -> int:
        parts = urlsplit(grant.url)
        key = parts.path.removeprefix("/storage/objects/")
        with path.open("rb") as body:
            status, _ = storage.receive_upload(
                key, dict(parse_qsl(parts.query)), grant.headers, body
            )
        return status

    def delete(key: str) -> None:
        (storage.root / key).unlink()

    config = f'backend = "local"\nlocal_dir = "{storage.root}"\n'
    return Store(storage, put, delete, config)


def _seaweed_store(request: pytest.FixtureRequest) -> Store:
    server: SeaweedServer = request.getfixturevalue("seaweedfs")
    storage: S3Storage = request.getfixturevalue("s3_storage")

    def put(grant: UploadGrant, path: Path) -> int:
        return put_file(grant.url, path, grant.headers, 20).status

    def delete(key: str) -> None:
        server.client().delete_object(Bucket=storage.bucket, Key=key)

    config = (
        f'backend = "s3"\nendpoint_url = "{server.endpoint_url}"\nregion = "{server.region}"\n'
        f'bucket = "{storage.bucket}"\nprefix = "{PREFIX}"\n'
        f'access_key = "{server.access_key}"\nsecret_key = "{server.secret_key}"\n'
    )
    return Store(storage, put, delete, config)


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    return _local_store(tmp_path)


@pytest.fixture(params=["local", "seaweedfs"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return _local_store(tmp_path)
    return _seaweed_store(request)


@pytest.fixture
def registry(db: Database, clock: FakeClock) -> Registry:
    registry = Registry(db, AlertEngine(db, clock=clock), clock=clock)
    registry.add_device(UNIT, "North High", "204")
    registry.add_device("room-205", "North High", "205")
    return registry


# --- a unit: its journal and spool, and what it and the controller do with a segment -----------


class Unit:
    def __init__(self, root: Path, device_id: str = UNIT) -> None:
        self.device_id = device_id
        self.path = root / "journal.sqlite3"
        self.spool = root / "spool"
        self.journal = Journal(self.path, device_id)

    def close(self) -> None:
        self.journal.close()

    def begin(
        self,
        recording_id: str,
        started_at: datetime = T0,
        *,
        window_id: str | None = None,
        gap: Gap | None = None,
    ) -> None:
        trigger = Trigger.SCHEDULE if window_id else Trigger.BUTTON
        self.journal.begin_recording(recording_id, trigger, started_at, "h264", "aac", window_id)
        if gap is not None:
            self.journal.add_gap(recording_id, gap)

    def segment(
        self,
        recording_id: str,
        sequence: int,
        start: datetime,
        seconds: float = 10,
        *,
        recovered: bool = False,
    ) -> Path:
        path = self.spool / recording_id / f"seg-{sequence:05d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"{self.device_id} {recording_id} {sequence} ".encode() * 300
        path.write_bytes(data)
        self.journal.segment_closed(
            recording_id,
            sequence,
            path,
            len(data),
            hashlib.sha256(data).hexdigest(),
            start,
            start + timedelta(seconds=seconds),
            recovered=recovered,
        )
        return path

    def record(
        self,
        recording_id: str,
        segments: int,
        started_at: datetime = T0,
        *,
        status: RecordingStatus = RecordingStatus.COMPLETE,
        reason: EndReason = EndReason.BUTTON,
        window_id: str | None = None,
        gap: Gap | None = None,
    ) -> None:
        """A recording of contiguous 10 s segments, ended."""
        self.begin(recording_id, started_at, window_id=window_id, gap=gap)
        for sequence in range(segments):
            self.segment(recording_id, sequence, started_at + timedelta(seconds=10 * sequence))
        self.end(recording_id, started_at + timedelta(seconds=10 * segments), status, reason)

    def end(
        self,
        recording_id: str,
        ended_at: datetime,
        status: RecordingStatus = RecordingStatus.COMPLETE,
        reason: EndReason = EndReason.BUTTON,
    ) -> None:
        self.journal.end_recording(recording_id, ended_at, status, reason)

    def deliver(
        self,
        catalogue: Catalogue,
        store: Store,
        recording_id: str,
        sequence: int,
        *,
        upload: bool = True,
        confirm: bool = True,
        delete: bool = True,
    ) -> str:
        """Announce, PUT through the grant, have it verified, delete the file: the agent's way."""
        row = self.journal.segment(recording_id, sequence)
        assert row is not None and row.size is not None and row.sha256 is not None
        assert row.ended_at is not None
        grant = catalogue.on_announcement(
            self.device_id,
            SegmentAnnouncement(
                recording_id=recording_id,
                sequence=sequence,
                size=row.size,
                sha256=row.sha256,
                started_at=row.started_at,
                ended_at=row.ended_at,
                recovered=row.recovered,
            ),
        )
        assert isinstance(grant, UploadGrant), grant
        self.journal.mark_granted(recording_id, sequence, grant.key)
        if not upload:
            return grant.key
        assert store.put(grant, row.path) == 200
        self.journal.mark_uploaded(recording_id, sequence)
        if not confirm:
            return grant.key
        result = UploadResult(
            recording_id=recording_id, sequence=sequence, key=grant.key, ok=True, http_status=200
        )
        confirmation = catalogue.on_upload_result(self.device_id, result)
        assert confirmation.verified, confirmation.reason
        self.journal.mark_stored(recording_id, sequence)
        if delete:
            row.path.unlink()
        return grant.key

    def deliver_all(self, catalogue: Catalogue, store: Store, recording_id: str) -> list[str]:
        manifest = self.journal.manifest(recording_id)
        assert manifest is not None
        catalogue.on_manifest(self.device_id, manifest)
        return [
            self.deliver(catalogue, store, recording_id, row.sequence)
            for row in self.journal.all_segments(recording_id)
        ]


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    made = Unit(tmp_path / "unit")
    yield made
    made.close()


def _catalogue(db: Database, store: Store, clock: FakeClock) -> Catalogue:
    return Catalogue(db, store.storage, clock=clock)


def _reconciled(db: Database, store: Store, *sources: JournalSource) -> Report:
    found = gather(sources, db, store.storage)
    return reconcile(found.units, found.catalogue, found.listings)


def _row(report: Report, recording_id: str) -> dict[str, Any]:
    rows = [r for r in report.as_dict()["recordings"] if r["recording_id"] == recording_id]
    assert len(rows) == 1, report.as_dict()["recordings"]
    return rows[0]


def _kinds(report: Report, recording_id: str) -> list[tuple[Kind, int | None]]:
    return sorted(
        ((f.kind, f.sequence) for f in report.findings if f.recording_id == recording_id),
        key=lambda item: (item[0].value, item[1] or 0),
    )


def _finding(report: Report, recording_id: str, kind: Kind) -> Finding:
    (found,) = [f for f in report.findings if f.recording_id == recording_id and f.kind is kind]
    return found


def _config(tmp_path: Path, db: Database, store: Store) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(
        f'data_dir = "{tmp_path / "controller"}"\n'
        f'[database]\nurl = "{db.url.render_as_string(hide_password=False)}"\n'
        f"migrate_on_start = false\n[storage]\n{store.config}"
    )
    return path


def _args(config: Path, journals: tuple[str, ...], json_output: bool) -> list[str]:
    args = ["controller", "reconcile", "--config", str(config)]
    for journal in journals:
        args += ["--journal", journal]
    return [*args, "--json"] if json_output else args


def _cli(config: Path, *journals: str) -> subprocess.CompletedProcess[str]:
    """``classcap controller reconcile --json`` as its own process."""
    command = [sys.executable, "-m", "shared.cli", "--log-level", "warning"]
    return subprocess.run(
        [*command, *_args(config, journals, json_output=True)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def _main(
    capsys: pytest.CaptureFixture[str], config: Path, *journals: str, json_output: bool = False
) -> tuple[int, str, str]:
    """The same command in this process: (exit status, stdout, stderr)."""
    status = main(_args(config, journals, json_output))
    out, err = capsys.readouterr()
    return status, out, err


# --- the verdict --------------------------------------------------------------------------------


def test_a_clean_run_reports_every_segment_stored_once_and_exits_0(
    tmp_path: Path,
    db: Database,
    registry: Registry,
    any_store: Store,
    clock: FakeClock,
    unit: Unit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalogue = _catalogue(db, any_store, clock)
    unit.record("rec-a", 3)
    unit.record("rec-b", 2, T0 + timedelta(minutes=5), reason=EndReason.COMMAND)
    for recording_id in ("rec-a", "rec-b"):
        unit.deliver_all(catalogue, any_store, recording_id)

    report = _reconciled(db, any_store, JournalSource(unit.path))

    assert report.ok, render_text(report)
    assert report.findings == ()
    assert _row(report, "rec-a")["device_id"] == UNIT
    totals = report.as_dict()["totals"]
    assert totals["journalled"] == totals["catalogued"] == totals["stored"] == 5
    assert totals["missing"] == totals["duplicate"] == totals["unexplained_gaps"] == 0

    status, out, _ = _main(capsys, _config(tmp_path, db, any_store), str(unit.path))
    assert status == 0, out
    header, _rule, *lines = out.splitlines()
    assert header.split("  ")[0] == "recording"
    for column in ("unit", "journalled", "catalogued", "stored", "missing", "bad checksum"):
        assert column in header
    assert lines[0].startswith("rec-a") and lines[1].startswith("rec-b")
    assert lines[3].split() == ["total", "(2)", "-", "5", "5", "5", *["0"] * 7]
    assert out.rstrip().endswith("OK: every segment stored exactly once, intact")


def test_a_missing_segment_a_wrong_checksum_and_a_duplicate_are_each_reported_and_exit_1(
    tmp_path: Path,
    db: Database,
    registry: Registry,
    any_store: Store,
    clock: FakeClock,
    unit: Unit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalogue = _catalogue(db, any_store, clock)
    unit.record("rec-a", 4)
    keys = unit.deliver_all(catalogue, any_store, "rec-a")
    prefix = keys[0].rsplit("/", 1)[0] + "/"
    # Segment 1 is lost, segment 2 is overwritten with other bytes of the same size, and
    # segment 3 is stored a second time under another key.
    any_store.delete(keys[1])
    any_store.write(keys[2], bytes(reversed(_content(unit, "rec-a", 2))))
    any_store.write(prefix + "seg-00003 (1).mp4", _content(unit, "rec-a", 3))

    result = _cli(_config(tmp_path, db, any_store), str(unit.path))

    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    row = report["recordings"][0]
    assert (row["journalled"], row["catalogued"], row["stored"]) == (4, 4, 2)
    assert (row["missing"], row["bad_checksum"], row["duplicate"]) == (1, 1, 1)
    assert row["wrong_size"] == row["unverified"] == row["unexplained_gaps"] == 0
    problems = {(f["kind"], f["sequence"], f["key"]) for f in report["findings"] if f["problem"]}
    assert problems == {
        ("missing", 1, keys[1]),
        ("bad checksum", 2, keys[2]),
        ("duplicate", None, prefix + "seg-00003 (1).mp4"),
    }
    duplicate = next(f for f in report["findings"] if f["kind"] == "duplicate")
    assert duplicate["detail"] == "same content as segment 3, under another key"
    missing = next(f for f in report["findings"] if f["kind"] == "missing")
    assert "the unit was told it was stored" in missing["detail"]

    status, out, _ = _main(capsys, _config(tmp_path, db, any_store), str(unit.path))
    assert status == 1
    assert "FAILED: 1 missing, 1 bad checksum, 1 duplicate" in out


def _content(unit: Unit, recording_id: str, sequence: int) -> bytes:
    return f"{unit.device_id} {recording_id} {sequence} ".encode() * 300


def test_wrong_size_unverified_and_an_unknown_sequence_are_told_apart(
    db: Database, registry: Registry, local_store: Store, clock: FakeClock, unit: Unit
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    unit.record("rec-a", 3)
    manifest = unit.journal.manifest("rec-a")
    assert manifest is not None
    catalogue.on_manifest(UNIT, manifest)
    key0 = unit.deliver(catalogue, local_store, "rec-a", 0)
    # Put, but the unit crashed before asking for verification: stored, not verified.
    key1 = unit.deliver(catalogue, local_store, "rec-a", 1, confirm=False)
    key2 = unit.deliver(catalogue, local_store, "rec-a", 2)
    local_store.write(key0, _content(unit, "rec-a", 0) + b"tail")
    local_store.write(key2.replace("seg-00002", "seg-00007"), b"from nowhere")

    report = _reconciled(db, local_store, JournalSource(unit.path))

    assert _kinds(report, "rec-a") == [
        (Kind.DUPLICATE, 7),
        (Kind.UNVERIFIED, 1),
        (Kind.PENDING, 1),
        (Kind.WRONG_SIZE, 0),
    ]
    unverified = next(f for f in report.findings if f.kind is Kind.UNVERIFIED)
    assert unverified.key == key1
    assert unverified.detail == "in storage, but the catalogue has it as granted"
    row = _row(report, "rec-a")
    assert (row["stored"], row["wrong_size"], row["unverified"], row["pending"]) == (2, 1, 1, 1)
    assert not report.ok


def test_two_catalogue_rows_for_one_sequence_are_a_duplicate() -> None:
    # The catalogue's schema forbids this; the reconciler still says so if it ever happens.
    data = b"video"
    sha = hashlib.sha256(data).hexdigest()
    rows = tuple(
        CatalogueSegment(0, key, len(data), sha, "stored", T0, T0 + timedelta(seconds=10), False)
        for key in ("u/r/seg-00000.mp4", "u/r/seg-00000-again.mp4")
    )
    catalogue = CatalogueState(
        (CatalogueRecording("r", "u", "complete", "button", (), rows),), open_alerts=()
    )
    listing = Listing(
        "u/r/",
        "u/r/manifest.json",
        tuple(ObjectFacts(row.key, len(data), sha) for row in rows),
    )

    report = reconcile([], catalogue, {"r": listing})

    assert [(f.kind, f.key) for f in report.problems] == [(Kind.DUPLICATE, rows[1].key)]
    assert report.findings[0].kind is Kind.NOT_IN_JOURNAL


# --- the timeline ---------------------------------------------------------------------------


def test_an_unexplained_gap_is_a_failure_and_one_the_manifest_explains_is_not(
    db: Database, registry: Registry, local_store: Store, clock: FakeClock, unit: Unit
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    at = T0
    for recording_id in ("rec-gap", "rec-noted"):
        unit.begin(recording_id, at)
        unit.segment(recording_id, 0, at)
        unit.segment(recording_id, 1, at + timedelta(seconds=10))
        unit.segment(recording_id, 2, at + timedelta(seconds=25))  # 5 s after segment 1
        unit.end(recording_id, at + timedelta(seconds=35))
        at += timedelta(minutes=5)
    noted = unit.journal.manifest("rec-noted")
    assert noted is not None
    unit.journal.add_gap(
        "rec-noted",
        Gap(
            start=noted.started_at + timedelta(seconds=20),
            end=noted.started_at + timedelta(seconds=25),
            reason="camera restarted",
        ),
    )
    # A crash cut segment 1; the unit recovered what was playable and noted nothing else.
    unit.begin("rec-crash", at)
    unit.segment("rec-crash", 0, at)
    unit.segment("rec-crash", 1, at + timedelta(seconds=13), 4, recovered=True)
    unit.end("rec-crash", at + timedelta(seconds=17), RecordingStatus.INTERRUPTED, EndReason.ERROR)
    at += timedelta(minutes=5)
    unit.begin("rec-holes", at)
    unit.segment("rec-holes", 0, at)
    unit.segment("rec-holes", 2, at + timedelta(seconds=10))
    unit.end("rec-holes", at + timedelta(seconds=20))
    for recording_id in ("rec-gap", "rec-noted", "rec-crash", "rec-holes"):
        unit.deliver_all(catalogue, local_store, recording_id)

    report = _reconciled(db, local_store, JournalSource(unit.path))

    assert _kinds(report, "rec-gap") == [(Kind.UNEXPLAINED_GAP, 2)]
    assert _kinds(report, "rec-noted") == [(Kind.EXPLAINED_GAP, 2)]
    assert _kinds(report, "rec-crash") == [(Kind.EXPLAINED_GAP, 1)]
    assert _kinds(report, "rec-holes") == [(Kind.UNEXPLAINED_GAP, 1)]
    details = {f.recording_id: f.detail for f in report.findings}
    assert details["rec-gap"] == "5.0 s between segments 1 and 2"
    assert details["rec-noted"] == (
        "5.0 s between segments 1 and 2: gap in the manifest (camera restarted)"
    )
    assert "recovered" in details["rec-crash"]
    assert details["rec-holes"] == "segment 1 is absent from the sequence"
    assert [_row(report, r)["unexplained_gaps"] for r in ("rec-gap", "rec-noted")] == [1, 0]
    assert sum(f.kind is Kind.MISSING for f in report.findings) == 0
    assert not report.ok


def test_time_a_capture_window_lost_must_be_explained(
    db: Database, registry: Registry, local_store: Store, clock: FakeClock, unit: Unit
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    first = CaptureWindow(window_id="w-1", start=T0, end=T0 + timedelta(seconds=90))
    second = CaptureWindow(
        window_id="w-2", start=T0 + timedelta(minutes=2), end=T0 + timedelta(minutes=3)
    )
    unit.journal.set_value(
        "desired_state", DesiredState(version=1, schedule=[first, second]).to_json().decode()
    )
    # w-1: started late (noted), cut by a crash, resumed (noted), stopped by the teacher.
    late = T0 + timedelta(seconds=20)
    unit.record(
        "rec-1",
        2,
        late,
        status=RecordingStatus.INTERRUPTED,
        reason=EndReason.POWER_LOSS,
        window_id="w-1",
        gap=Gap(start=T0, end=late, reason="started late"),
    )
    resumed = T0 + timedelta(seconds=45)
    unit.record(
        "rec-2",
        1,
        resumed,
        reason=EndReason.BUTTON,
        window_id="w-1",
        gap=Gap(start=late + timedelta(seconds=20), end=resumed, reason="resumed after power_loss"),
    )
    # w-2: ten seconds late and nothing says why; ends with its window.
    unit.record(
        "rec-3",
        5,
        second.start + timedelta(seconds=10),
        reason=EndReason.SCHEDULE,
        window_id="w-2",
    )
    for recording_id in ("rec-1", "rec-2", "rec-3"):
        unit.deliver_all(catalogue, local_store, recording_id)

    report = _reconciled(db, local_store, JournalSource(unit.path))

    found = sorted((f.recording_id, f.kind.value, f.detail) for f in report.findings)
    late_start = "started 20.0 s after window w-1 opened: gap in the manifest (started late)"
    resumed = "5.0 s in window w-1 after rec-1: gap in the manifest (resumed after power_loss)"
    stopped = "ended 35.0 s before window w-1 closed: stopped by teacher"
    assert found == [
        ("rec-1", "explained gap", late_start),
        ("rec-2", "explained gap", resumed),
        ("rec-2", "explained gap", stopped),
        ("rec-3", "unexplained gap", "started 10.0 s after window w-2 opened"),
    ]


# --- units and spools -------------------------------------------------------------------------


def test_pending_segments_and_files_left_in_the_spool_are_reported(
    tmp_path: Path,
    db: Database,
    registry: Registry,
    local_store: Store,
    clock: FakeClock,
    unit: Unit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    unit.record("rec-a", 3)
    manifest = unit.journal.manifest("rec-a")
    assert manifest is not None
    catalogue.on_manifest(UNIT, manifest)
    unit.deliver(catalogue, local_store, "rec-a", 0)
    unit.deliver(catalogue, local_store, "rec-a", 1, upload=False)  # granted, never PUT
    unit.deliver(catalogue, local_store, "rec-a", 2, delete=False)  # confirmed, file kept
    stray = unit.spool / "rec-a" / "seg-00003.mp4.part"
    stray.write_bytes(b"half a segment")
    bookkeeping = unit.spool / "rec-a" / "segments.csv"
    bookkeeping.write_text("seg-00000.mp4,0,10\n")

    report = _reconciled(db, local_store, JournalSource(unit.path))

    assert _kinds(report, "rec-a") == [
        (Kind.SPOOL_FILE, None),
        (Kind.SPOOL_FILE, 2),
        (Kind.MISSING, 1),
        (Kind.PENDING, 1),
    ]
    pending = next(f for f in report.findings if f.kind is Kind.PENDING)
    assert pending.detail == "journal state granted; the file is still in the unit's spool"
    missing = next(f for f in report.findings if f.kind is Kind.MISSING)
    assert "the unit still holds the file (journal state granted)" in missing.detail
    spooled = sorted(f.detail for f in report.findings if f.kind is Kind.SPOOL_FILE)
    assert spooled[0].startswith(str(unit.spool / "rec-a" / "seg-00002.mp4"))
    assert spooled[1].startswith(str(stray))
    assert _row(report, "rec-a")["pending"] == 1

    status, out, _ = _main(capsys, _config(tmp_path, db, local_store), str(unit.path))
    assert status == 1
    assert "pending (1):" in out and "left in spool (2):" in out


def test_open_alerts_are_listed_without_failing_the_run(
    db: Database, registry: Registry, local_store: Store, clock: FakeClock, unit: Unit
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    unit.record("rec-a", 1)
    unit.deliver_all(catalogue, local_store, "rec-a")
    with db.session() as session:
        set_alert(session, UNIT, AlertKind.DISK_LOW, "disk nearly full", now=T0)

    report = _reconciled(db, local_store, JournalSource(unit.path))

    assert report.ok
    assert [(a.device_id, a.kind, a.message) for a in report.open_alerts] == [
        (UNIT, "disk_low", "disk nearly full")
    ]
    assert f"{UNIT} disk_low [warning]" in render_text(report)


def test_the_unit_comes_from_the_catalogue_or_is_given(
    tmp_path: Path,
    db: Database,
    registry: Registry,
    local_store: Store,
    clock: FakeClock,
    unit: Unit,
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    never_sent = Unit(tmp_path / "other", "room-205")
    try:
        never_sent.record("rec-lost", 1)
        unit.record("rec-a", 1)
        unit.deliver_all(catalogue, local_store, "rec-a")
        # The catalogue knows a recording of room-204 that its journal does not.
        catalogue.on_announcement(
            UNIT,
            SegmentAnnouncement(
                recording_id="rec-elsewhere",
                sequence=0,
                size=5,
                sha256=hashlib.sha256(b"video").hexdigest(),
                started_at=T0,
                ended_at=T0 + timedelta(seconds=10),
            ),
        )

        inferred = _reconciled(
            db, local_store, JournalSource(unit.path), JournalSource(never_sent.path)
        )
        given = _reconciled(db, local_store, journal_source(f"room-205={never_sent.path}"))
    finally:
        never_sent.close()

    assert _row(inferred, "rec-a")["device_id"] == UNIT
    assert _row(inferred, "rec-lost")["device_id"] is None
    lost = _finding(inferred, "rec-lost", Kind.MISSING)
    assert lost.detail.startswith("storage not asked: the unit is unknown; not in the catalogue")
    assert _kinds(inferred, "rec-elsewhere") == [(Kind.MISSING, 0), (Kind.NOT_IN_JOURNAL, None)]
    assert _row(inferred, "rec-elsewhere")["journalled"] == 0
    assert _row(given, "rec-lost")["device_id"] == "room-205"
    lost = _finding(given, "rec-lost", Kind.MISSING)
    assert lost.key == "room-205/rec-lost/seg-00000.mp4"
    assert lost.detail.startswith("not in storage; not in the catalogue")
    assert "rec-elsewhere" in render_table(inferred)


def test_bad_input_exits_2(
    tmp_path: Path,
    db: Database,
    registry: Registry,
    local_store: Store,
    clock: FakeClock,
    unit: Unit,
    capsys: pytest.CaptureFixture[str],
) -> None:
    catalogue = _catalogue(db, local_store, clock)
    unit.record("rec-a", 1)
    unit.deliver_all(catalogue, local_store, "rec-a")
    config = _config(tmp_path, db, local_store)
    not_a_journal = tmp_path / "notes.sqlite3"
    not_a_journal.write_bytes(b"not a database at all" * 100)

    for journal, message in [
        (str(tmp_path / "nowhere.sqlite3"), "no such file"),
        (str(not_a_journal), "notes.sqlite3"),
        (f"room-205={unit.path}", "files its recordings under room-204"),
    ]:
        status, out, err = _main(capsys, config, journal)
        assert status == 2, (journal, out, err)
        assert out == ""
        assert err.startswith("classcap controller reconcile: ") and message in err


def test_a_unit_still_recording_is_read_without_stopping_it(
    tmp_path: Path, db: Database, local_store: Store
) -> None:
    running = Unit(tmp_path / "unit")
    try:
        running.begin("rec-now")
        running.segment("rec-now", 0, T0)
        path = running.spool / "rec-now" / "seg-00001.mp4"
        running.journal.segment_opened("rec-now", 1, path, T0 + timedelta(seconds=10))

        report = _reconciled(db, local_store, JournalSource(running.path))

        # The reader holds no lock that would stop the unit writing.
        running.segment("rec-now", 2, T0 + timedelta(seconds=20))
    finally:
        running.close()
    missing = {f.sequence: f.detail for f in report.findings if f.kind is Kind.MISSING}
    assert missing[1] == "never closed: the unit's journal still has it as being written"
    assert missing[0] == (
        "storage not asked: the unit is unknown; not in the catalogue; "
        "the unit still holds the file (journal state closed)"
    )
    assert _row(report, "rec-now")["status"] == "recording"
