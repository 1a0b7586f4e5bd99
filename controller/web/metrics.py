"""``GET /metrics`` in the Prometheus text format (version 0.0.4).

It needs no authentication, like most scrape targets: it exposes only fleet-wide
counts (no unit ids, schools or names). Where even that must stay private, let
the reverse proxy in front of the controller allow only the Prometheus server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flask import Blueprint, Response
from sqlalchemy import and_, case, func, select

from controller.models import Device
from controller.web.auth import PUBLIC, requires
from controller.web.services import WebServices, services
from shared.messages import RecorderState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.5, 0.9, 0.99)
_MQTT_HELP = {
    "messages_rejected_total": "MQTT messages rejected as invalid since the controller started.",
}

bp = Blueprint("metrics", __name__)


@dataclass(frozen=True)
class Sample:
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    suffix: str = ""


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # gauge, counter or summary
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels)
            shown = "{" + labels + "}" if labels else ""
            lines.append(f"{family.name}{sample.suffix}{shown} {_number(sample.value)}")
    return "\n".join(lines) + "\n"


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list; NaN when there is nothing to rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _fleet(svc: WebServices) -> list[Family]:
    recording = and_(Device.online.is_(True), Device.state == RecorderState.RECORDING.value)
    with svc.db.session(readonly=True) as s:
        total, online, recording_count = s.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((Device.online.is_(True), 1), else_=0)), 0),
                func.coalesce(func.sum(case((recording, 1), else_=0)), 0),
            ).select_from(Device)
        ).one()
    open_alerts = svc.alerts.open_counts()
    return [
        Family("classcap_units_total", "gauge", "Units registered.", (Sample(total),)),
        Family("classcap_units_online", "gauge", "Units connected now.", (Sample(online),)),
        Family(
            "classcap_units_recording",
            "gauge",
            "Online units whose latest health says recording.",
            (Sample(recording_count),),
        ),
        Family(
            "classcap_alerts_open",
            "gauge",
            "Open alerts by kind (every kind, zero included).",
            tuple(Sample(n, (("kind", k),)) for k, n in sorted(open_alerts.items())),
        ),
    ]


def _storage(svc: WebServices) -> list[Family]:
    return [
        Family(
            "classcap_segments_pending",
            "gauge",
            "Announced segments not yet verified in storage.",
            (Sample(svc.catalogue.pending_segments()),),
        ),
        Family(
            "classcap_upload_bytes_total",
            "counter",
            "Bytes of segments verified in storage.",
            (Sample(svc.catalogue.stored_bytes()),),
        ),
    ]


def _latency(svc: WebServices) -> Family:
    values = sorted(svc.commands.latency_seconds())
    samples = [Sample(quantile(values, q), (("quantile", str(q)),)) for q in QUANTILES]
    samples += [Sample(math.fsum(values), suffix="_sum"), Sample(len(values), suffix="_count")]
    return Family(
        "classcap_command_latency_seconds",
        "summary",
        "Seconds from a command's creation to its done answer, over recent commands.",
        tuple(samples),
    )


def _mqtt(counters: Mapping[str, float]) -> list[Family]:
    families = []
    for name, value in sorted(counters.items()):
        kind = "counter" if name.endswith("_total") else "gauge"
        help_text = _MQTT_HELP.get(name, f"MQTT service {name.replace('_', ' ')}.")
        full = f"classcap_{name}" if name.startswith("mqtt_") else f"classcap_mqtt_{name}"
        families.append(Family(full, kind, help_text, (Sample(value),)))
    return families


def collect(svc: WebServices) -> list[Family]:
    families = [*_fleet(svc), *_storage(svc), _latency(svc)]
    if svc.mqtt_metrics is not None:
        families += _mqtt(svc.mqtt_metrics())
    return families


@bp.get("/metrics")
@requires(PUBLIC)
def metrics() -> Response:
    return Response(render(collect(services())), content_type=CONTENT_TYPE)
