"""The REST API and the local store's object routes on real services (SQLite, files, waitress)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient
from sqlalchemy import event, insert

from controller.config import ControllerConfig
from controller.models import Device
from controller.mqtt_service import MqttService
from controller.web.api import table
from controller.web.auth import Role
from controller.web.dashboard import ACTION_LABELS
from controller.web.schemas import ApiAction
from shared.clock import utcnow
from shared.messages import (
    CommandResult,
    CommandStatus,
    RecorderState,
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    Snapshot,
    Status,
    Trigger,
    UploadGrant,
    UploadResult,
)
from shared.topics import Channel, topic
from tests.support.broker import MosquittoBroker, MqttTestClient
from tests.support.processes import wait_for
from tests.support.web import LiveServer, WebStack, enrol, unit_health


@pytest.fixture
def api(web_stack: WebStack) -> tuple[WebStack, FlaskClient, dict[str, str]]:
    """The stack, a client, and technician bearer headers."""
    return web_stack, web_stack.client(), web_stack.bearer(Role.TECHNICIAN)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("jpeg") / "frame.jpg"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240",
            "-frames:v",
            "1",
            str(out),
        ],
        check=True,
        timeout=60,
    )
    return out.read_bytes()


def _fleet(stack: WebStack) -> None:
    enrol(stack, "north-101", "North High", "101")
    enrol(stack, "north-102", "North High", "102")
    enrol(stack, "south-201", "South Middle", "201", online=False)
    stack.registry.on_health(
        "north-102", unit_health(RecorderState.RECORDING, recording_id="rec-1")
    )


# --- devices ------------------------------------------------------------------------------


def test_list_devices_with_filters_and_paging(
    api: tuple[WebStack, FlaskClient, dict[str, str]],
) -> None:
    stack, client, headers = api
    _fleet(stack)

    def ids(**query: Any) -> list[str]:
        answer = client.get("/api/v1/devices", query_string=query, headers=headers)
        assert answer.status_code == 200, answer.get_json()
        return [d["id"] for d in answer.get_json()["items"]]

    assert ids() == ["north-101", "north-102", "south-201"]
    assert ids(school="South Middle") == ["south-201"]
    assert ids(online="false") == ["south-201"]
    assert ids(state="recording") == ["north-102"]
    assert ids(q="102") == ["north-102"]
    assert ids(q="NORTH") == ["north-101", "north-102"]
    assert ids(school="") == ["north-101", "north-102", "south-201"]  # an empty field is no filter
    page = client.get("/api/v1/devices?per_page=2&page=2", headers=headers).get_json()
    assert (page["total"], page["page"], page["per_page"]) == (3, 2, 2)
    assert [d["id"] for d in page["items"]] == ["south-201"]
    device = page["items"][0]
    assert device["online"] is False and device["drift"] is False and device["open_alerts"] == []


@pytest.mark.parametrize(
    ("query", "status", "where"),
    [
        ("per_page=501", 422, "per_page"),
        ("page=0", 422, "page"),
        ("state=dancing", 422, "state"),
        ("online=perhaps", 422, "online"),
        ("colour=red", 422, "colour"),
        ("school=a&school=b", 400, "school"),
    ],
)
def test_bad_query_parameters_say_why(
    api: tuple[WebStack, FlaskClient, dict[str, str]], query: str, status: int, where: str
) -> None:
    _, client, headers = api
    answer = client.get(f"/api/v1/devices?{query}", headers=headers)
    assert answer.status_code == status
    body = answer.get_json()
    assert body["error"] and where in str(body["detail"])


def test_device_detail_has_health_alerts_drift_and_commands(
    api: tuple[WebStack, FlaskClient, dict[str, str]],
) -> None:
    stack, client, headers = api
    _fleet(stack)
    stack.registry.on_health("north-101", unit_health(disk_free_bytes=100 * 1024**2))
    stack.registry.set_desired("north-101", schedule=[])
    client.post("/api/v1/devices/north-101/commands", json={"action": "snapshot"}, headers=headers)

    body = client.get("/api/v1/devices/north-101", headers=headers).get_json()
    assert body["health"]["disk_free_bytes"] == 100 * 1024**2
    assert body["open_alerts"] == ["disk_low"]
    assert body["alerts"][0]["kind"] == "disk_low" and "MB" in body["alerts"][0]["message"]
    assert body["drift"] is True and body["desired_version"] == 1 and body["reported_version"] == 0
    assert body["desired"]["version"] == 1
    assert [c["action"] for c in body["latest_commands"]] == ["snapshot"]
    assert body["links"]["health"] == "/api/v1/devices/north-101/health"
    assert client.get("/api/v1/devices/nobody", headers=headers).status_code == 404


def test_health_history_is_limited(api: tuple[WebStack, FlaskClient, dict[str, str]]) -> None:
    stack, client, headers = api
    _fleet(stack)
    history = client.get("/api/v1/devices/north-101/health?limit=1", headers=headers).get_json()
    assert history["device_id"] == "north-101"
    assert len(history["items"]) == 1 and history["items"][0]["state"] == "idle"
    assert (
        client.get("/api/v1/devices/north-101/health?limit=0", headers=headers).status_code == 422
    )
    assert client.get("/api/v1/devices/nobody/health", headers=headers).status_code == 404


def test_snapshot_is_404_until_one_arrives(
    api: tuple[WebStack, FlaskClient, dict[str, str]], jpeg: bytes
) -> None:
    stack, client, headers = api
    _fleet(stack)
    missing = client.get("/api/v1/devices/north-101/snapshot", headers=headers)
    assert missing.status_code == 404 and missing.get_json()["error"] == "no snapshot"
    stack.registry.on_snapshot(
        "north-101",
        Snapshot(
            taken_at=utcnow(), width=320, height=240, jpeg_base64=base64.b64encode(jpeg).decode()
        ),
    )
    found = client.get("/api/v1/devices/north-101/snapshot", headers=headers)
    assert found.status_code == 200 and found.mimetype == "image/jpeg"
    assert found.data == jpeg
    again = client.get(
        "/api/v1/devices/north-101/snapshot",
        headers={**headers, "If-Modified-Since": found.headers["Last-Modified"]},
    )
    assert again.status_code == 304


# --- commands ------------------------------------------------------------------------------


def test_command_to_one_unit(api: tuple[WebStack, FlaskClient, dict[str, str]]) -> None:
    stack, client, headers = api
    _fleet(stack)
    answer = client.post(
        "/api/v1/devices/north-101/commands",
        json={"action": "bookmark", "note": "great question", "expires_in_s": 30},
        headers=headers,
    )
    assert answer.status_code == 202
    command = answer.get_json()
    assert command["device_id"] == "north-101" and command["action"] == "bookmark"
    assert command["status"] == "queued" and command["note"] == "great question"
    assert command["created_by"] == "token:test-technician"
    assert stack.published == [command["id"]]
    assert client.get(f"/api/v1/commands/{command['id']}", headers=headers).get_json() == command
    listed = client.get("/api/v1/commands?device_id=north-101", headers=headers).get_json()
    assert [c["id"] for c in listed["items"]] == [command["id"]]
    assert client.get("/api/v1/commands/cmd-nope", headers=headers).status_code == 404


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"action": "dance"}, 422),
        ({"action": "apply"}, 422),
        ({"action": "snapshot", "expires_in_s": 4}, 422),
        ({"action": "snapshot", "expires_in_s": 3601}, 422),
        ({"action": "snapshot", "colour": "red"}, 422),
        ({"action": "bookmark", "note": "x" * 501}, 422),
        ([], 400),
    ],
)
def test_bad_command_bodies_change_nothing(
    api: tuple[WebStack, FlaskClient, dict[str, str]], body: Any, status: int
) -> None:
    stack, client, headers = api
    _fleet(stack)
    answer = client.post("/api/v1/devices/north-101/commands", json=body, headers=headers)
    assert answer.status_code == status
    assert answer.get_json()["detail"]
    assert stack.published == []
    assert stack.commands.list().total == 0


def test_command_needs_json_and_a_known_unit(
    api: tuple[WebStack, FlaskClient, dict[str, str]],
) -> None:
    stack, client, headers = api
    _fleet(stack)
    not_json = client.post(
        "/api/v1/devices/north-101/commands", data="action=snapshot", headers=headers
    )
    broken = client.post(
        "/api/v1/devices/north-101/commands",
        data="{broken",
        headers={**headers, "Content-Type": "application/json"},
    )
    unknown = client.post(
        "/api/v1/devices/nobody/commands", json={"action": "snapshot"}, headers=headers
    )
    assert [not_json.status_code, broken.status_code, unknown.status_code] == [415, 400, 404]
    assert stack.commands.list().total == 0


def test_command_to_a_whole_school(api: tuple[WebStack, FlaskClient, dict[str, str]]) -> None:
    stack, client, headers = api
    _fleet(stack)
    answer = client.post(
        "/api/v1/schools/North%20High/commands", json={"action": "stop_recording"}, headers=headers
    )
    assert answer.status_code == 202
    body = answer.get_json()
    assert body["count"] == 2
    assert sorted(c["device_id"] for c in body["items"]) == ["north-101", "north-102"]
    assert len(stack.published) == 2
    nobody = client.post(
        "/api/v1/schools/Nowhere/commands", json={"action": "snapshot"}, headers=headers
    )
    assert nobody.status_code == 404


def test_publish_failure_leaves_the_command_queued(web_stack: WebStack) -> None:
    def broken(_command_id: str) -> None:
        raise ConnectionError("broker gone")

    web_stack.build(publish_command=broken)
    enrol(web_stack, "north-101", "North High", "101")
    answer = web_stack.client().post(
        "/api/v1/devices/north-101/commands",
        json={"action": "snapshot"},
        headers=web_stack.bearer(Role.TECHNICIAN),
    )
    assert answer.status_code == 202 and answer.get_json()["status"] == "queued"


def test_dashboard_offers_exactly_the_api_actions() -> None:
    assert set(ACTION_LABELS) == set(get_args(ApiAction))


# --- desired state, schools, alerts ---------------------------------------------------------


def test_admin_changes_desired_state(web_stack: WebStack) -> None:
    enrol(web_stack, "north-101", "North High", "101")
    client, admin = web_stack.client(), web_stack.bearer(Role.ADMIN)
    assert client.get("/api/v1/devices/north-101/desired", headers=admin).status_code == 404
    start = utcnow() + timedelta(hours=1)
    answer = client.put(
        "/api/v1/devices/north-101/desired",
        json={
            "settings": {"health_interval_s": 10},
            "schedule": [
                {
                    "window_id": "p1",
                    "start": start.isoformat(),
                    "end": (start + timedelta(minutes=50)).isoformat(),
                }
            ],
        },
        headers=admin,
    )
    assert answer.status_code == 202
    assert answer.get_json()["desired"]["version"] == 1
    ((device_id, desired),) = web_stack.desired_published
    assert device_id == "north-101" and desired.settings.health_interval_s == 10
    backwards = client.put(
        "/api/v1/devices/north-101/desired",
        json={
            "schedule": [{"window_id": "p1", "start": start.isoformat(), "end": start.isoformat()}]
        },
        headers=admin,
    )
    empty = client.put("/api/v1/devices/north-101/desired", json={}, headers=admin)
    assert backwards.status_code == 422 and "end" in str(backwards.get_json()["detail"])
    assert empty.status_code == 422
    assert len(web_stack.desired_published) == 1


def test_schools_and_alerts(api: tuple[WebStack, FlaskClient, dict[str, str]]) -> None:
    stack, client, headers = api
    _fleet(stack)
    stack.registry.on_health("north-101", unit_health(camera_present=False))
    schools = client.get("/api/v1/schools", headers=headers).get_json()["items"]
    assert schools == [
        {"school": "North High", "units": 2, "online": 2},
        {"school": "South Middle", "units": 1, "online": 0},
    ]
    alerts = client.get("/api/v1/alerts?school=North%20High", headers=headers).get_json()
    assert [(a["device_id"], a["kind"]) for a in alerts["items"]] == [
        ("north-101", "camera_missing")
    ]
    assert (
        client.get("/api/v1/alerts?school=South%20Middle", headers=headers).get_json()["total"] == 0
    )
    stack.registry.on_health("north-101", unit_health())
    assert client.get("/api/v1/alerts", headers=headers).get_json()["total"] == 0
    history = client.get("/api/v1/alerts?open_only=false", headers=headers).get_json()
    assert history["items"][0]["cleared_at"] is not None


# --- users and tokens -----------------------------------------------------------------------


def test_admin_manages_users_and_tokens(web_stack: WebStack) -> None:
    client, admin = web_stack.client(), web_stack.bearer(Role.ADMIN)
    added = client.post(
        "/api/v1/users",
        json={"username": "ada", "password": "a long password", "role": "technician"},
        headers=admin,
    )
    assert added.status_code == 201 and added.get_json()["role"] == "technician"
    again = client.post(
        "/api/v1/users",
        json={"username": "ada", "password": "a long password", "role": "viewer"},
        headers=admin,
    )
    short = client.post(
        "/api/v1/users",
        json={"username": "bob", "password": "short", "role": "viewer"},
        headers=admin,
    )
    assert again.status_code == 409 and short.status_code == 422
    assert [
        u["username"] for u in client.get("/api/v1/users", headers=admin).get_json()["items"]
    ] == ["ada"]

    created = client.post("/api/v1/tokens", json={"name": "sis", "role": "viewer"}, headers=admin)
    assert created.status_code == 201
    token = created.get_json()
    assert (
        client.get(
            "/api/v1/devices", headers={"Authorization": f"Bearer {token['token']}"}
        ).status_code
        == 200
    )
    listed = client.get("/api/v1/tokens", headers=admin).get_json()["items"]
    assert token["token"] not in str(listed)
    assert client.delete(f"/api/v1/tokens/{token['id']}", headers=admin).status_code == 200
    assert (
        client.get(
            "/api/v1/devices", headers={"Authorization": f"Bearer {token['token']}"}
        ).status_code
        == 401
    )
    assert client.delete("/api/v1/tokens/nope", headers=admin).status_code == 404
    assert client.delete("/api/v1/users/ada", headers=admin).status_code == 200
    assert client.delete("/api/v1/users/ada", headers=admin).status_code == 404


# --- OpenAPI ------------------------------------------------------------------------------


def test_openapi_documents_every_api_route(
    api: tuple[WebStack, FlaskClient, dict[str, str]],
) -> None:
    stack, client, headers = api
    assert stack.app is not None
    doc = client.get("/api/v1/openapi.json", headers=headers).get_json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    registered = {
        (re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", rule.rule), method)
        for rule in stack.app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/")
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert registered == documented
    assert len(documented) == len(table.routes)
    listing = doc["paths"]["/api/v1/devices"]["get"]
    params = {p["name"] for p in listing["parameters"]}
    assert {"school", "state", "online", "alert", "q", "page", "per_page"} <= params
    command = doc["paths"]["/api/v1/devices/{device_id}/commands"]["post"]
    assert command["x-required-role"] == "technician"
    assert set(command["responses"]) >= {"202", "401", "403", "404", "422"}
    ref = command["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body_schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert body_schema["properties"]["expires_in_s"]["maximum"] == 3600
    calendar_import = doc["paths"]["/api/v1/scheduling/schools/{school_id}/import/calendar"]
    assert set(calendar_import["post"]["requestBody"]["content"]) == {"text/csv", "text/calendar"}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for response in op["responses"].values():
                for media in response.get("content", {}).values():
                    target = media["schema"].get("$ref")
                    if target:
                        assert target.rsplit("/", 1)[-1] in doc["components"]["schemas"], path


# --- scale -----------------------------------------------------------------------------------


def test_twenty_thousand_units_cost_one_page(web_stack: WebStack) -> None:
    now = utcnow()
    rows: list[dict[str, Any]] = [
        {
            "id": f"unit-{i:05d}",
            "school": f"School {i // 400:02d}",
            "room": f"{i % 400:03d}",
            "created_at": now,
            "online": i % 3 != 0,
            "epoch": 1,
            "capabilities": [],
            "desired_version": 0,
            "reported_version": 0,
            "state": "recording" if i % 7 == 0 else "idle",
        }
        for i in range(20_000)
    ]
    with web_stack.db.session() as s:
        s.execute(insert(Device), rows)
    client = web_stack.client()
    web_stack.user("ada", Role.VIEWER)
    web_stack.login(client, "ada")
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(web_stack.db.engine, "before_cursor_execute", count)
    try:
        page = client.get("/?per_page=50&page=7")
        api_page = client.get("/api/v1/devices?per_page=500&school=School%2003")
    finally:
        event.remove(web_stack.db.engine, "before_cursor_execute", count)
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert html.count('data-unit="') == 50
    assert "20000 units" in html and "page 7 of 400" in html
    assert html.count('class="group"') == 1  # 50 rows of one school, one heading
    assert api_page.get_json()["total"] == 400 and len(api_page.get_json()["items"]) == 400
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) <= 12, selects


# --- local storage routes (served by waitress) ----------------------------------------------


def _put(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("PUT", f"{parts.path}?{parts.query}", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _get(url: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def served(live_web: tuple[WebStack, LiveServer]) -> Iterator[WebStack]:
    stack, _server = live_web
    enrol(stack, "north-101", "North High", "101")
    yield stack


def _announce(stack: WebStack, data: bytes, sequence: int = 0) -> UploadGrant:
    now = utcnow()
    stack.catalogue.on_manifest(
        "north-101",
        RecordingManifest(
            recording_id="rec-1",
            device_id="north-101",
            trigger=Trigger.BUTTON,
            started_at=now,
            status=RecordingStatus.RECORDING,
            segments=sequence + 1,
            video="h264",
        ),
    )
    grant = stack.catalogue.on_announcement(
        "north-101",
        SegmentAnnouncement(
            recording_id="rec-1",
            sequence=sequence,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            started_at=now,
            ended_at=now + timedelta(seconds=10),
        ),
    )
    assert isinstance(grant, UploadGrant)
    return grant


def test_upload_to_a_grant_then_download_it(served: WebStack) -> None:
    data = b"\x00\x01segment" * 50_000
    grant = _announce(served, data)
    assert grant.url.startswith(served.base_url + "/storage/objects/")
    status, text = _put(grant.url, data, grant.headers)
    assert status == 200, text
    confirmation = served.catalogue.on_upload_result(
        "north-101",
        UploadResult(recording_id="rec-1", sequence=0, key=grant.key, ok=True, http_status=200),
    )
    assert confirmation.verified

    client, headers = served.client(), served.bearer(Role.VIEWER)
    recording = client.get("/api/v1/recordings/rec-1", headers=headers).get_json()
    (segment,) = recording["segments"]
    assert segment["state"] == "stored" and segment["sha256"] == hashlib.sha256(data).hexdigest()
    assert segment["size"] == len(data)
    status, body = _get(segment["download_url"])
    assert status == 200 and body == data
    listing = client.get("/api/v1/recordings?device_id=north-101", headers=headers).get_json()
    assert [(r["id"], r["segments_stored"]) for r in listing["items"]] == [("rec-1", 1)]
    assert (
        client.get("/api/v1/recordings?status=complete", headers=headers).get_json()["total"] == 0
    )
    assert client.get("/api/v1/recordings/rec-nope", headers=headers).status_code == 404


def test_refused_uploads_answer_like_s3(served: WebStack) -> None:
    data = b"the real segment" * 1000
    grant = _announce(served, data)
    other = bytes(reversed(data))
    status, text = _put(grant.url, other, grant.headers)
    assert status == 400 and "<Code>BadDigest</Code>" in text
    tampered = grant.url.replace("sig=", "sig=0")
    status, text = _put(tampered, data, grant.headers)
    assert status == 403 and "<Code>SignatureDoesNotMatch</Code>" in text
    no_checksum = {k: v for k, v in grant.headers.items() if k != "x-amz-checksum-sha256"}
    status, text = _put(grant.url, data, no_checksum)
    assert status == 403
    stored = sorted(p.name for p in (served.root / "objects").rglob("*") if p.is_file())
    assert "seg-00000.mp4" not in stored and not [n for n in stored if n.endswith(".part")]


def test_downloads_need_a_valid_signature(served: WebStack) -> None:
    data = b"segment" * 100
    grant = _announce(served, data)
    assert _put(grant.url, data, grant.headers)[0] == 200
    url = served.storage.presign_get(grant.key, 60)
    assert _get(url)[0] == 200
    status, body = _get(url.replace("sig=", "sig=f"))
    assert status == 403 and b"SignatureDoesNotMatch" in body
    missing = served.storage.presign_get(
        served.storage.key_for("north-101", "rec-1", "nope.mp4"), 60
    )
    status, body = _get(missing)
    assert status == 404 and b"NoSuchKey" in body


# --- with the real MQTT service --------------------------------------------------------------


@pytest.fixture
def mqtt_stack(
    web_stack: WebStack,
    broker: MosquittoBroker,
    mqtt_client: Callable[..., MqttTestClient],
    tmp_path: Path,
) -> Iterator[tuple[WebStack, MqttService, MqttTestClient]]:
    config = ControllerConfig.model_validate(
        {
            "data_dir": str(tmp_path / "controller"),
            "broker": {"mode": "external", "url": broker.url, "password": "unused"},
        }
    )
    service = MqttService(
        config, web_stack.registry, web_stack.commands, web_stack.catalogue, web_stack.alerts
    )
    web_stack.build(publish_command=service.send_command, mqtt_metrics=service.metrics)
    unit = mqtt_client(broker, topic("north-101", Channel.COMMAND), client_id="north-101")
    service.start()
    try:
        assert service.wait_connected(10)
        yield web_stack, service, unit
    finally:
        service.stop()


def test_command_goes_to_the_unit_over_mqtt_and_its_result_comes_back(
    mqtt_stack: tuple[WebStack, MqttService, MqttTestClient],
) -> None:
    stack, _service, unit = mqtt_stack
    stack.registry.add_device("north-101", "North High", "101")
    client, headers = stack.client(), stack.bearer(Role.TECHNICIAN)

    offline = client.post(
        "/api/v1/devices/north-101/commands", json={"action": "snapshot"}, headers=headers
    )
    assert offline.get_json()["status"] == "queued"

    unit.publish(
        topic("north-101", Channel.STATUS),
        Status(online=True, epoch=1, agent_version="0.1.0").to_json(),
        retain=True,
    )

    def online() -> bool:
        view = stack.registry.get("north-101")
        return view is not None and view.online

    assert wait_for(online, 10)
    answer = client.post(
        "/api/v1/devices/north-101/commands", json={"action": "start_recording"}, headers=headers
    )
    assert answer.status_code == 202
    command = answer.get_json()
    assert command["status"] == "sent"

    received = unit.wait_for(lambda m: m.topic == topic("north-101", Channel.COMMAND), count=2)
    sent_ids = [json.loads(m.payload)["id"] for m in received]
    assert sent_ids == [offline.get_json()["id"], command["id"]]
    assert all(m.expiry_s is not None and 0 < m.expiry_s <= 60 for m in received)

    for status in (CommandStatus.ACCEPTED, CommandStatus.DONE):
        unit.publish(
            topic("north-101", Channel.COMMAND_RESULT),
            CommandResult(command_id=command["id"], status=status, recording_id="rec-1").to_json(),
        )

    def finished() -> bool:
        answer = client.get(f"/api/v1/commands/{command['id']}", headers=headers)
        return bool(answer.get_json()["status"] == "done")

    assert wait_for(finished, 10)
    done = client.get(f"/api/v1/commands/{command['id']}", headers=headers).get_json()
    assert done["recording_id"] == "rec-1" and done["finished_at"] is not None


def test_upload_cut_short_leaves_nothing(web_stack: WebStack) -> None:
    enrol(web_stack, "north-101", "North High", "101")
    data = b"segment bytes" * 1000
    grant = _announce(web_stack, data)
    parts = urlsplit(grant.url)
    answer = web_stack.client().put(
        f"{parts.path}?{parts.query}",
        input_stream=io.BytesIO(data[:100]),
        headers=grant.headers,
        # The client promised the whole segment, then its connection ended after 100 bytes.
        environ_overrides={"CONTENT_LENGTH": str(len(data))},
    )
    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert "<Code>IncompleteBody</Code>" in answer.get_data(as_text=True)
    stored = [p.name for p in (web_stack.root / "objects").rglob("*.mp4*")]
    assert stored == []
