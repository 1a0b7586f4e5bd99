"""Reconciling what units recorded, what the catalogue says and what storage holds.

Pure: plain frozen facts in (``controller.reconcile_sources`` reads them from unit
journals, the catalogue database and storage), a ``Report`` out. A segment is settled
when its object is stored exactly once, under its catalogue key, with the size and
SHA-256 the unit journalled; the catalogue has verified it; and the unit has been told
(its journal says stored and its spool no longer holds the file). Every break in a
recording's timeline must be explained by what the unit itself wrote down: a gap in its
manifest, a crash it recovered from, or a person stopping it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any

from controller.catalogue import STORED, segment_filename
from device.journal import SegmentState
from device.segmentlist import sequence_of
from shared.messages import EndReason, RecordingStatus

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE_S = 0.5
# A unit records a late start as a gap only past 5 s (``device.scheduler.LATE_START``),
# and its scheduler may wake a second after a window opens.
DEFAULT_WINDOW_TOLERANCE_S = 6.0
_PENDING = frozenset({SegmentState.CLOSED, SegmentState.GRANTED, SegmentState.UPLOADED})
_PERSON_STOPS: dict[str | None, str] = {
    EndReason.BUTTON.value: "stopped by teacher",
    EndReason.COMMAND.value: "stopped by command",
}


# --- what the sources say -------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A gap a unit wrote into a recording's manifest."""

    start: datetime
    end: datetime
    reason: str


@dataclass(frozen=True)
class JournalSegment:
    sequence: int
    state: SegmentState
    size: int | None  # None while the segment is being written
    sha256: str | None
    started_at: datetime
    ended_at: datetime | None
    recovered: bool
    path: str
    file_present: bool  # the unit's spool still holds the file


@dataclass(frozen=True)
class JournalRecording:
    recording_id: str
    trigger: str
    window_id: str | None
    started_at: datetime
    ended_at: datetime | None
    status: str
    end_reason: str | None
    gaps: tuple[Span, ...]
    segments: tuple[JournalSegment, ...]


@dataclass(frozen=True)
class Window:
    window_id: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class SpoolFile:
    recording_id: str  # the spool folder it lies in
    path: str
    size: int


@dataclass(frozen=True)
class UnitJournal:
    source: str
    device_id: str | None  # None when neither given nor found in the catalogue
    recordings: tuple[JournalRecording, ...]
    windows: tuple[Window, ...]  # the capture windows of the unit's last desired state
    spool_files: tuple[SpoolFile, ...]  # files other than bookkeeping in its spool folders


@dataclass(frozen=True)
class CatalogueSegment:
    sequence: int
    key: str
    size: int
    sha256: str
    state: str
    started_at: datetime
    ended_at: datetime
    recovered: bool


@dataclass(frozen=True)
class CatalogueRecording:
    recording_id: str
    device_id: str
    status: str
    end_reason: str | None
    gaps: tuple[Span, ...]
    segments: tuple[CatalogueSegment, ...]


@dataclass(frozen=True)
class OpenAlert:
    device_id: str
    kind: str
    severity: str
    message: str
    raised_at: datetime


@dataclass(frozen=True)
class CatalogueState:
    recordings: tuple[CatalogueRecording, ...]
    open_alerts: tuple[OpenAlert, ...]


@dataclass(frozen=True)
class ObjectFacts:
    key: str
    size: int
    sha256: str  # of the content, read back


@dataclass(frozen=True)
class Listing:
    """Everything storage holds under one recording's prefix."""

    prefix: str
    manifest_key: str  # the catalogue's manifest.json, expected beside the segments
    objects: tuple[ObjectFacts, ...]


# --- what the report says -------------------------------------------------------------------


class Kind(StrEnum):
    MISSING = "missing"
    BAD_CHECKSUM = "bad checksum"
    WRONG_SIZE = "wrong size"
    UNVERIFIED = "not verified"
    DUPLICATE = "duplicate"
    UNEXPLAINED_GAP = "unexplained gap"
    PENDING = "pending"
    SPOOL_FILE = "left in spool"
    EXPLAINED_GAP = "explained gap"
    NOT_IN_JOURNAL = "not in journal"


# Facts worth showing that are not faults.
INFORMATIONAL = frozenset({Kind.EXPLAINED_GAP, Kind.NOT_IN_JOURNAL})


@dataclass(frozen=True)
class Finding:
    kind: Kind
    recording_id: str
    device_id: str | None
    detail: str
    sequence: int | None = None
    key: str | None = None


@dataclass(frozen=True)
class RecordingRow:
    recording_id: str
    device_id: str | None
    status: str
    journalled: int
    catalogued: int
    stored: int
    missing: int
    bad_checksum: int
    wrong_size: int
    unverified: int
    duplicate: int
    unexplained_gaps: int
    pending: int


_COUNTED = {
    Kind.MISSING: "missing",
    Kind.BAD_CHECKSUM: "bad_checksum",
    Kind.WRONG_SIZE: "wrong_size",
    Kind.UNVERIFIED: "unverified",
    Kind.DUPLICATE: "duplicate",
    Kind.UNEXPLAINED_GAP: "unexplained_gaps",
    Kind.PENDING: "pending",
}
_NUMBERS = ("journalled", "catalogued", "stored", *_COUNTED.values())


@dataclass(frozen=True)
class Report:
    rows: tuple[RecordingRow, ...]
    findings: tuple[Finding, ...]
    open_alerts: tuple[OpenAlert, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.kind not in INFORMATIONAL)

    @property
    def ok(self) -> bool:
        """Nothing lost, damaged, duplicated, unexplained or still waiting on a unit."""
        return not self.problems

    @property
    def totals(self) -> RecordingRow:
        sums = {name: sum(getattr(row, name) for row in self.rows) for name in _NUMBERS}
        return RecordingRow(
            recording_id=f"total ({len(self.rows)})", device_id=None, status="", **sums
        )

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {
            "ok": self.ok,
            "recordings": [asdict(row) for row in self.rows],
            "totals": {name: getattr(self.totals, name) for name in _NUMBERS},
            "findings": [
                asdict(f) | {"kind": f.kind.value, "problem": f.kind not in INFORMATIONAL}
                for f in self.findings
            ],
            "open_alerts": [
                asdict(a) | {"raised_at": a.raised_at.isoformat()} for a in self.open_alerts
            ],
        }


# --- reconciling ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Subject:
    """One recording as each source sees it."""

    recording_id: str
    device_id: str | None
    journal: JournalRecording | None
    catalogue: CatalogueRecording | None
    listing: Listing | None

    def finding(
        self, kind: Kind, detail: str, sequence: int | None = None, key: str | None = None
    ) -> Finding:
        return Finding(kind, self.recording_id, self.device_id, detail, sequence, key)

    def expected_key(self, sequence: int) -> str | None:
        return None if self.listing is None else self.listing.prefix + segment_filename(sequence)


def reconcile(
    units: Sequence[UnitJournal],
    catalogue: CatalogueState,
    listings: Mapping[str, Listing],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    window_tolerance_s: float = DEFAULT_WINDOW_TOLERANCE_S,
) -> Report:
    """Compares the sources; ``listings`` maps a recording id to what storage holds for it
    (absent: storage could not be asked, because the recording's unit is unknown)."""
    catalogued = {r.recording_id: r for r in catalogue.recordings}
    subjects: list[_Subject] = []
    findings: list[Finding] = []
    journalled: set[str] = set()
    for unit in units:
        for recording in unit.recordings:
            if recording.recording_id in journalled:
                log.warning(
                    "recording in two journals, second ignored recording=%s journal=%s",
                    recording.recording_id,
                    unit.source,
                )
                continue
            journalled.add(recording.recording_id)
            entry = catalogued.get(recording.recording_id)
            device = unit.device_id or (entry.device_id if entry else None)
            subjects.append(
                _Subject(
                    recording.recording_id,
                    device,
                    recording,
                    entry,
                    listings.get(recording.recording_id),
                )
            )
        findings.extend(_check_windows(unit, tolerance_s, window_tolerance_s))
        findings.extend(_check_spool(unit))
    for entry in catalogue.recordings:
        if entry.recording_id not in journalled:
            subject = _Subject(
                entry.recording_id, entry.device_id, None, entry, listings.get(entry.recording_id)
            )
            subjects.append(subject)
            findings.append(
                subject.finding(Kind.NOT_IN_JOURNAL, "catalogued, but in none of the journals")
            )
    stored: dict[str, int] = {}
    for subject in subjects:
        stored[subject.recording_id], checked = _check_segments(subject)
        findings.extend(checked)
        findings.extend(_check_duplicates(subject))
        findings.extend(_check_timeline(subject, tolerance_s))
        findings.extend(_check_pending(subject))
    counts = Counter((f.recording_id, f.kind) for f in findings)
    report = Report(
        rows=tuple(_row(subject, stored[subject.recording_id], counts) for subject in subjects),
        findings=tuple(findings),
        open_alerts=catalogue.open_alerts,
    )
    log.info(
        "reconciled recordings=%d problems=%d open_alerts=%d ok=%s",
        len(report.rows),
        len(report.problems),
        len(report.open_alerts),
        report.ok,
    )
    return report


def _row(subject: _Subject, stored: int, counts: Counter[tuple[str, Kind]]) -> RecordingRow:
    source = subject.journal or subject.catalogue
    assert source is not None
    return RecordingRow(
        recording_id=subject.recording_id,
        device_id=subject.device_id,
        status=source.status,
        journalled=len(subject.journal.segments) if subject.journal else 0,
        catalogued=len(subject.catalogue.segments) if subject.catalogue else 0,
        stored=stored,
        **{name: counts[subject.recording_id, kind] for kind, name in _COUNTED.items()},
    )


# --- segments -------------------------------------------------------------------------------


def _catalogue_rows(subject: _Subject) -> dict[int, list[CatalogueSegment]]:
    rows: dict[int, list[CatalogueSegment]] = defaultdict(list)
    for row in subject.catalogue.segments if subject.catalogue else ():
        rows[row.sequence].append(row)
    return rows


def _check_segments(subject: _Subject) -> tuple[int, list[Finding]]:
    """How many segments storage holds intact, and what is wrong with the others."""
    journal = {s.sequence: s for s in subject.journal.segments} if subject.journal else {}
    rows = _catalogue_rows(subject)
    objects = {o.key: o for o in subject.listing.objects} if subject.listing else {}
    stored = 0
    findings: list[Finding] = []
    for sequence in sorted(journal.keys() | rows.keys()):
        entries = rows.get(sequence, [])
        for extra in entries[1:]:
            findings.append(
                subject.finding(
                    Kind.DUPLICATE, "a second catalogue row for this sequence", sequence, extra.key
                )
            )
        entry = entries[0] if entries else None
        key = entry.key if entry else subject.expected_key(sequence)
        found = objects.get(key) if key else None
        problem = _segment_problem(subject, journal.get(sequence), entry, found)
        if found is not None and (problem is None or problem[0] is Kind.UNVERIFIED):
            stored += 1
        if problem is not None:
            findings.append(subject.finding(problem[0], problem[1], sequence, key))
    return stored, findings


def _segment_problem(
    subject: _Subject,
    journalled: JournalSegment | None,
    entry: CatalogueSegment | None,
    found: ObjectFacts | None,
) -> tuple[Kind, str] | None:
    if journalled is not None and journalled.sha256 is not None and journalled.size is not None:
        size, sha256 = journalled.size, journalled.sha256
    elif entry is not None:
        size, sha256 = entry.size, entry.sha256
    else:
        return Kind.MISSING, "never closed: the unit's journal still has it as being written"
    if found is None:
        return Kind.MISSING, _why_missing(subject, journalled, entry)
    if found.size != size:
        return Kind.WRONG_SIZE, f"storage holds {found.size} bytes, expected {size}"
    if found.sha256 != sha256:
        return Kind.BAD_CHECKSUM, f"storage holds sha256 {found.sha256}, expected {sha256}"
    if entry is None:
        return Kind.UNVERIFIED, "in storage, but the catalogue has no row for it"
    if (entry.size, entry.sha256) != (size, sha256):
        return Kind.BAD_CHECKSUM, (
            f"the catalogue has size {entry.size} sha256 {entry.sha256}, "
            f"the unit journalled size {size} sha256 {sha256}"
        )
    if entry.state != STORED:
        return Kind.UNVERIFIED, f"in storage, but the catalogue has it as {entry.state}"
    return None


def _why_missing(
    subject: _Subject, journalled: JournalSegment | None, entry: CatalogueSegment | None
) -> str:
    parts = ["not in storage" if subject.listing else "storage not asked: the unit is unknown"]
    if entry is None:
        parts.append("not in the catalogue")
    elif entry.state == STORED:
        parts.append("the catalogue has it as stored")
    if journalled is not None:
        if journalled.state is SegmentState.STORED:
            parts.append("the unit was told it was stored")
        held = "still holds" if journalled.file_present else "no longer holds"
        parts.append(f"the unit {held} the file (journal state {journalled.state.value})")
    return "; ".join(parts)


def _check_duplicates(subject: _Subject) -> list[Finding]:
    """Objects under the recording's prefix beyond one per segment."""
    listing = subject.listing
    if listing is None:
        return []
    sequences: dict[str, int] = {}  # sha256 -> sequence, of what the segments should hold
    expected: set[str] = set()
    for segment in subject.journal.segments if subject.journal else ():
        key = subject.expected_key(segment.sequence)
        assert key is not None
        expected.add(key)
        if segment.sha256 is not None:
            sequences.setdefault(segment.sha256, segment.sequence)
    reported: set[str] = set()  # second catalogue rows, already a duplicate each
    for entries in _catalogue_rows(subject).values():
        expected.add(entries[0].key)
        sequences.setdefault(entries[0].sha256, entries[0].sequence)
        reported.update(extra.key for extra in entries[1:])
    findings: list[Finding] = []
    holders: dict[str, str] = {}  # sha256 -> first expected key holding it
    for found in sorted(listing.objects, key=lambda o: o.key):
        if found.key == listing.manifest_key or found.key in reported:
            continue
        sequence = sequence_of(found.key.removeprefix(listing.prefix))
        if found.key in expected:
            first = holders.setdefault(found.sha256, found.key)
            if first != found.key:
                findings.append(
                    subject.finding(Kind.DUPLICATE, f"same content as {first}", sequence, found.key)
                )
        elif found.sha256 in sequences:
            detail = f"same content as segment {sequences[found.sha256]}, under another key"
            findings.append(subject.finding(Kind.DUPLICATE, detail, sequence, found.key))
        elif sequence is not None:
            detail = f"an object for segment {sequence}, which neither unit nor catalogue knows"
            findings.append(subject.finding(Kind.DUPLICATE, detail, sequence, found.key))
        else:
            detail = "an object neither unit nor catalogue knows"
            findings.append(subject.finding(Kind.DUPLICATE, detail, None, found.key))
    return findings


def _check_pending(subject: _Subject) -> list[Finding]:
    findings = []
    for segment in subject.journal.segments if subject.journal else ():
        if segment.state in _PENDING:
            held = "still in" if segment.file_present else "gone from"
            detail = f"journal state {segment.state.value}; the file is {held} the unit's spool"
            findings.append(subject.finding(Kind.PENDING, detail, segment.sequence))
    return findings


def _check_spool(unit: UnitJournal) -> list[Finding]:
    """Files left in the unit's spool, beyond those of segments still pending upload."""
    pending = {
        segment.path
        for recording in unit.recordings
        for segment in recording.segments
        if segment.state in _PENDING
    }
    return [
        Finding(
            Kind.SPOOL_FILE,
            spooled.recording_id,
            unit.device_id,
            f"{spooled.path} ({spooled.size} bytes) is still in the unit's spool",
            sequence_of(spooled.path.rsplit("/", 1)[-1]),
        )
        for spooled in unit.spool_files
        if spooled.path not in pending
    ]


# --- timeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    sequence: int
    start: datetime
    end: datetime | None
    recovered: bool


def _check_timeline(subject: _Subject, tolerance_s: float) -> list[Finding]:
    """Sequences contiguous from 0 and each segment starting where the one before ended."""
    if subject.journal is not None:
        pieces = [
            _Piece(s.sequence, s.started_at, s.ended_at, s.recovered)
            for s in subject.journal.segments
        ]
        status, gaps = subject.journal.status, subject.journal.gaps
    elif subject.catalogue is not None:
        pieces = [
            _Piece(s.sequence, s.started_at, s.ended_at, s.recovered)
            for s in subject.catalogue.segments
        ]
        status, gaps = subject.catalogue.status, subject.catalogue.gaps
    else:
        return []
    by_sequence = {piece.sequence: piece for piece in pieces}
    ordered = [by_sequence[n] for n in sorted(by_sequence)]
    findings = [
        subject.finding(Kind.UNEXPLAINED_GAP, f"segment {n} is absent from the sequence", n)
        for n in range(ordered[-1].sequence + 1 if ordered else 0)
        if n not in by_sequence
    ]
    for before, after in pairwise(ordered):
        if after.sequence != before.sequence + 1 or before.end is None:
            continue  # an absent segment is reported above; an open one has no end yet
        seconds = (after.start - before.end).total_seconds()
        if abs(seconds) <= tolerance_s:
            continue
        where = f"segments {before.sequence} and {after.sequence}"
        if seconds < 0:
            detail = f"{where} overlap by {-seconds:.1f} s"
            findings.append(subject.finding(Kind.UNEXPLAINED_GAP, detail, after.sequence))
            continue
        why = _covering_gap(gaps, before.end, after.start, tolerance_s)
        recovered = before.recovered or after.recovered
        if why is None and recovered and status == RecordingStatus.INTERRUPTED:
            why = "interrupted, and the segment cut by the crash was recovered"
        if why is None and status == RecordingStatus.PARTIAL:
            overlapping = [g for g in gaps if g.start < after.start and g.end > before.end]
            if overlapping:
                why = f"partial recording ({overlapping[0].reason})"
        what = f"{seconds:.1f} s between {where}"
        findings.append(_gap(subject.recording_id, subject.device_id, what, why, after.sequence))
    return findings


def _covering_gap(
    gaps: Iterable[Span], start: datetime, end: datetime, tolerance_s: float
) -> str | None:
    for gap in gaps:
        if (gap.start - start).total_seconds() <= tolerance_s and (
            end - gap.end
        ).total_seconds() <= tolerance_s:
            return f"gap in the manifest ({gap.reason})"
    return None


def _gap(
    recording_id: str, device_id: str | None, what: str, why: str | None, sequence: int | None
) -> Finding:
    if why is None:
        return Finding(Kind.UNEXPLAINED_GAP, recording_id, device_id, what, sequence)
    return Finding(Kind.EXPLAINED_GAP, recording_id, device_id, f"{what}: {why}", sequence)


def _check_windows(
    unit: UnitJournal, tolerance_s: float, window_tolerance_s: float
) -> list[Finding]:
    """Each capture window the unit still knows, covered by its recordings but for time
    the unit explained: a late start or a resumption it noted as a gap, a person stopping
    the lesson, a crash."""
    windows = {w.window_id: w for w in unit.windows}
    inside: dict[str, list[JournalRecording]] = defaultdict(list)
    for recording in unit.recordings:
        window = windows.get(recording.window_id or "")
        if window is not None and _inside(recording, window):
            inside[window.window_id].append(recording)
    findings: list[Finding] = []
    for window_id, recordings in inside.items():
        window = windows[window_id]
        recordings.sort(key=lambda r: r.started_at)
        first, last = recordings[0], recordings[-1]
        late = (first.started_at - window.start).total_seconds()
        if late > window_tolerance_s:
            why = _covering_gap(first.gaps, window.start, first.started_at, tolerance_s)
            what = f"started {late:.1f} s after window {window_id} opened"
            findings.append(_gap(first.recording_id, unit.device_id, what, why, None))
        for before, after in pairwise(recordings):
            if before.ended_at is None:
                continue
            hole = (after.started_at - before.ended_at).total_seconds()
            if hole > tolerance_s:
                why = _covering_gap(after.gaps, before.ended_at, after.started_at, tolerance_s)
                what = f"{hole:.1f} s in window {window_id} after {before.recording_id}"
                findings.append(_gap(after.recording_id, unit.device_id, what, why, None))
        if last.ended_at is not None:
            early = (window.end - last.ended_at).total_seconds()
            if early > window_tolerance_s:
                what = f"ended {early:.1f} s before window {window_id} closed"
                why = _why_ended_early(last)
                findings.append(_gap(last.recording_id, unit.device_id, what, why, None))
    return findings


def _inside(recording: JournalRecording, window: Window) -> bool:
    """Same rule as the unit's scheduler: a recording before a moved window's span is not its."""
    ended = recording.ended_at
    return recording.started_at < window.end and (ended is None or ended > window.start)


def _why_ended_early(recording: JournalRecording) -> str | None:
    reason = recording.end_reason
    if reason in _PERSON_STOPS:
        return _PERSON_STOPS[reason]
    if recording.status == RecordingStatus.INTERRUPTED:
        return f"interrupted ({reason or 'no end reason'})"
    return None


# --- rendering ------------------------------------------------------------------------------

_COLUMNS = (
    ("recording", "recording_id"),
    ("unit", "device_id"),
    ("status", "status"),
    ("journalled", "journalled"),
    ("catalogued", "catalogued"),
    ("stored", "stored"),
    ("missing", "missing"),
    ("bad checksum", "bad_checksum"),
    ("wrong size", "wrong_size"),
    ("not verified", "unverified"),
    ("duplicate", "duplicate"),
    ("unexplained gaps", "unexplained_gaps"),
    ("pending", "pending"),
)
_TEXT_COLUMNS = 3


def render_table(report: Report) -> str:
    """One line per recording and a totals line, in fixed-width columns."""
    header = [title for title, _ in _COLUMNS]
    body = [_cells(row) for row in report.rows]
    totals = _cells(report.totals)
    widths = [max(len(line[i]) for line in (header, *body, totals)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < _TEXT_COLUMNS else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body), rule, line(totals)])


def _cells(row: RecordingRow) -> list[str]:
    values = [getattr(row, attr) for _, attr in _COLUMNS]
    return ["-" if value is None else str(value) for value in values]


def render_text(report: Report) -> str:
    """The table, then every finding grouped by kind, open alerts and the verdict."""
    parts = [render_table(report)]
    grouped: dict[Kind, list[Finding]] = defaultdict(list)
    for finding in report.findings:
        grouped[finding.kind].append(finding)
    for kind in Kind:
        if grouped[kind]:
            parts.append(f"\n{kind.value} ({len(grouped[kind])}):")
            parts.extend(f"  {_describe(f)}" for f in grouped[kind])
    if report.open_alerts:
        parts.append(f"\nopen alerts ({len(report.open_alerts)}):")
        parts.extend(
            f"  {a.device_id} {a.kind} [{a.severity}] since {a.raised_at.isoformat()}: {a.message}"
            for a in report.open_alerts
        )
    counts = Counter(f.kind for f in report.problems)
    verdict = "OK" if report.ok else "FAILED"
    summary = ", ".join(f"{counts[kind]} {kind.value}" for kind in Kind if counts[kind])
    parts.append(f"\n{verdict}: {summary or 'every segment stored exactly once, intact'}")
    return "\n".join(parts)


def _describe(finding: Finding) -> str:
    where = f"{finding.device_id or '?'}/{finding.recording_id}"
    if finding.sequence is not None:
        where += f" segment {finding.sequence}"
    key = f" [{finding.key}]" if finding.key else ""
    return f"{where}{key}: {finding.detail}"
