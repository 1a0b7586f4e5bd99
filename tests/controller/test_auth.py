"""Roles on every route, tokens kept only as hashes, session login and CSRF."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from flask import Flask
from sqlalchemy import select

from controller.models import ApiToken, User
from controller.web import auth
from controller.web.auth import Role
from shared.clock import utcnow
from shared.messages import (
    Bookmark,
    Event,
    EventKind,
    RecordingManifest,
    RecordingStatus,
    SegmentAnnouncement,
    Severity,
    Trigger,
)
from tests.support.web import PASSWORD, WebStack, csrf_from, enrol, unit_health

_PARAM = re.compile(r"<(?:([a-z]+):)?([A-Za-z_]+)>")


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """(method, concrete path, endpoint) for every rule, with placeholder path values."""
    out = []
    for rule in app.url_map.iter_rules():
        path = _PARAM.sub(
            lambda m: (
                "room-1" if m.group(2) == "device_id" else "1" if m.group(1) == "int" else "x"
            ),
            rule.rule,
        )
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, path, rule.endpoint))
    return out


def _public(app: Flask, endpoint: str) -> bool:
    return endpoint == "static" or auth.access_of(app.view_functions[endpoint]) == auth.PUBLIC


def test_every_route_declares_its_role(web_stack: WebStack) -> None:
    assert web_stack.app is not None
    assert auth.undeclared_views(web_stack.app) == []
    public = {e for _, _, e in _routes(web_stack.app) if _public(web_stack.app, e)}
    assert public == {
        "static",
        "healthz",
        "metrics.metrics",
        "dashboard.login",
        "storage.put_object",
        "storage.get_object",
    }


def test_a_view_without_a_role_is_found() -> None:
    app = Flask(__name__)
    app.add_url_rule("/open", "open", lambda: "hi")
    assert auth.undeclared_views(app) == ["open"]


def test_every_route_without_credentials_is_refused(web_stack: WebStack) -> None:
    app = web_stack.app
    assert app is not None
    client = web_stack.client()
    checked = 0
    for method, path, endpoint in _routes(app):
        if _public(app, endpoint):
            continue
        answer = client.open(path, method=method)
        checked += 1
        if path.startswith("/api/"):
            assert answer.status_code == 401, (method, path)
            assert answer.is_json and answer.get_json()["error"] == "unauthorized"
        elif method == "GET":
            assert answer.status_code == 302, (method, path)
            assert answer.headers["Location"].startswith("/login?next=")
        else:
            assert answer.status_code == 401, (method, path)
    assert checked >= 30


def test_viewer_cannot_change_anything(web_stack: WebStack) -> None:
    app = web_stack.app
    assert app is not None
    web_stack.registry.add_device("room-1", "North High", "101")
    viewer = web_stack.bearer(Role.VIEWER)
    client = web_stack.client()
    unsafe = [
        (m, p, e)
        for m, p, e in _routes(app)
        if m != "GET" and not _public(app, e) and e != "dashboard.logout"
    ]
    assert len(unsafe) >= 10
    for method, path, _endpoint in unsafe:
        answer = client.open(path, method=method, headers=viewer, json={})
        assert answer.status_code == 403, (method, path, answer.get_data(as_text=True))
    assert web_stack.published == []


def test_technician_commands_but_cannot_administer(web_stack: WebStack) -> None:
    web_stack.registry.add_device("room-1", "North High", "101")
    tech = web_stack.bearer(Role.TECHNICIAN)
    client = web_stack.client()
    sent = client.post("/api/v1/devices/room-1/commands", headers=tech, json={"action": "snapshot"})
    assert sent.status_code == 202
    for method, path in [
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/tokens"),
        ("PUT", "/api/v1/devices/room-1/desired"),
        ("GET", "/admin"),
    ]:
        answer = client.open(path, method=method, headers=tech, json={})
        assert answer.status_code == 403, (method, path)
        assert "admin" in answer.get_data(as_text=True)


def test_token_is_kept_only_as_its_hash(web_stack: WebStack) -> None:
    token = web_stack.token(Role.VIEWER, "prometheus")
    prefix, token_id, secret = token.split("_", 2)
    assert prefix == "cct"
    with web_stack.db.session() as s:
        row = s.scalars(select(ApiToken)).one()
        assert row.id == token_id
        assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in (row.secret_hash, row.name, row.id)
    answer = web_stack.client().get("/api/v1/schools", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Bearer cct_0000000000000000_nope",
        "Bearer not-a-token",
        "Basic dXNlcjpwYXNz",
        "Bearer ",
    ],
)
def test_bad_credentials_are_401(web_stack: WebStack, header: str) -> None:
    web_stack.token(Role.ADMIN)
    answer = web_stack.client().get("/api/v1/devices", headers={"Authorization": header})
    assert answer.status_code == 401
    assert answer.get_json()["detail"] == "invalid or revoked API token"


def test_tampered_and_revoked_tokens_are_refused(web_stack: WebStack) -> None:
    token = web_stack.token(Role.ADMIN)
    client = web_stack.client()
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert (
        client.get("/api/v1/devices", headers={"Authorization": f"Bearer {tampered}"}).status_code
        == 401
    )
    auth.revoke_token(web_stack.db, token.split("_")[1])
    assert (
        client.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )


def test_passwords_are_hashed_and_checked(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.TECHNICIAN)
    with web_stack.db.session() as s:
        stored = s.get(User, "ada")
        assert stored is not None
        assert PASSWORD not in stored.password_hash
    assert auth.check_password(web_stack.db, "ada", PASSWORD) is Role.TECHNICIAN
    assert auth.check_password(web_stack.db, "ada", PASSWORD + "x") is None
    assert auth.check_password(web_stack.db, "nobody", PASSWORD) is None
    with pytest.raises(auth.UserExists):
        auth.create_user(web_stack.db, "ada", PASSWORD, Role.VIEWER)
    with pytest.raises(auth.AuthError, match="at least 10"):
        auth.create_user(web_stack.db, "bob", "short", Role.VIEWER)
    with pytest.raises(auth.AuthError, match="invalid username"):
        auth.create_user(web_stack.db, "bad name", PASSWORD, Role.VIEWER)


def test_login_logout_and_wrong_password(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.VIEWER)
    client = web_stack.client()
    token = csrf_from(client.get("/login").get_data(as_text=True))
    wrong = client.post("/login", data={"username": "ada", "password": "nope", "csrf_token": token})
    assert wrong.status_code == 401
    assert "Wrong username or password" in wrong.get_data(as_text=True)
    assert client.get("/").status_code == 302

    csrf = web_stack.login(client, "ada")
    assert client.get("/").status_code == 200
    assert client.get("/api/v1/devices").status_code == 200  # the session works for the API too
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    assert client.get("/").status_code == 302


def test_login_without_csrf_token_is_refused(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.VIEWER)
    client = web_stack.client()
    answer = client.post("/login", data={"username": "ada", "password": PASSWORD})
    assert answer.status_code == 400
    assert "CSRF" in answer.get_data(as_text=True)


def test_login_never_redirects_off_site(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.VIEWER)
    client = web_stack.client()
    for target, expected in [
        ("/units/room-1", "/units/room-1"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
    ]:
        token = csrf_from(client.get("/login").get_data(as_text=True))
        answer = client.post(
            "/login",
            query_string={"next": target},
            data={"username": "ada", "password": PASSWORD, "csrf_token": token},
        )
        assert answer.headers["Location"] == expected


def test_session_posts_need_the_csrf_token(web_stack: WebStack) -> None:
    web_stack.registry.add_device("room-1", "North High", "101")
    web_stack.user("tech", Role.TECHNICIAN)
    client = web_stack.client()
    csrf = web_stack.login(client, "tech")

    missing = client.post("/units/room-1/commands", data={"action": "snapshot"})
    wrong = client.post(
        "/units/room-1/commands", data={"action": "snapshot", "csrf_token": csrf + "x"}
    )
    api_missing = client.post("/api/v1/devices/room-1/commands", json={"action": "snapshot"})
    assert [missing.status_code, wrong.status_code, api_missing.status_code] == [400, 400, 400]
    assert web_stack.published == []

    form = client.post("/units/room-1/commands", data={"action": "snapshot", "csrf_token": csrf})
    api = client.post(
        "/api/v1/devices/room-1/commands",
        json={"action": "snapshot"},
        headers={auth.CSRF_HEADER: csrf},
    )
    assert form.status_code == 302 and api.status_code == 202
    assert len(web_stack.published) == 2


def test_bearer_requests_need_no_csrf_token(web_stack: WebStack) -> None:
    web_stack.registry.add_device("room-1", "North High", "101")
    answer = web_stack.client().post(
        "/api/v1/devices/room-1/commands",
        json={"action": "snapshot"},
        headers=web_stack.bearer(Role.TECHNICIAN),
    )
    assert answer.status_code == 202


def test_removed_user_loses_the_session(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.ADMIN)
    client = web_stack.client()
    web_stack.login(client, "ada")
    assert client.get("/admin").status_code == 200
    auth.delete_user(web_stack.db, "ada")
    assert client.get("/admin").status_code == 302


def test_role_change_applies_to_a_live_session(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.ADMIN)
    client = web_stack.client()
    web_stack.login(client, "ada")
    with web_stack.db.session() as s:
        user = s.get(User, "ada")
        assert user is not None
        user.role = Role.VIEWER.value
    assert client.get("/admin").status_code == 403


def test_session_cookie_is_http_only_and_same_site(web_stack: WebStack) -> None:
    web_stack.user("ada", Role.VIEWER)
    client = web_stack.client()
    token = csrf_from(client.get("/login").get_data(as_text=True))
    answer = client.post(
        "/login", data={"username": "ada", "password": PASSWORD, "csrf_token": token}
    )
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{auth.SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_every_page_renders_for_an_admin(web_stack: WebStack) -> None:
    """Each dashboard GET route with real data behind it answers 200 (no template errors)."""
    app = web_stack.app
    assert app is not None
    enrol(web_stack, "room-1", "North High", "101")
    web_stack.registry.on_health("room-1", unit_health(camera_present=False))
    web_stack.registry.on_event(
        "room-1", Event(kind=EventKind.DISK_LOW, severity=Severity.WARNING, message="low")
    )
    now = utcnow()
    web_stack.catalogue.on_manifest(
        "room-1",
        RecordingManifest(
            recording_id="x",
            device_id="room-1",
            trigger=Trigger.SCHEDULE,
            window_id="p1",
            started_at=now,
            status=RecordingStatus.RECORDING,
            segments=1,
            video="h264",
            bookmarks=[Bookmark(at=now, source="button", note="good bit")],
        ),
    )
    web_stack.catalogue.on_announcement(
        "room-1",
        SegmentAnnouncement(
            recording_id="x",
            sequence=0,
            size=10,
            sha256="0" * 64,
            started_at=now,
            ended_at=now + timedelta(seconds=10),
        ),
    )
    web_stack.user("root", Role.ADMIN)
    client = web_stack.client()
    csrf = web_stack.login(client, "root")
    client.post(
        "/units/room-1/commands", data={"action": "bookmark", "note": "hi", "csrf_token": csrf}
    )
    pages = [
        path
        for method, path, endpoint in _routes(app)
        if method == "GET" and endpoint.startswith("dashboard.") and endpoint != "dashboard.login"
    ]
    assert len(pages) >= 9
    for path in pages:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.get_data(as_text=True)[:2000])
    unit = client.get("/units/room-1").get_data(as_text=True)
    assert "no camera" in unit and "low" in unit and "Bookmark" in unit and "“hi”" in unit
    assert "good bit" in client.get("/recordings/x").get_data(as_text=True)
    missing = client.get("/units/nobody")
    assert missing.status_code == 404 and "no unit" in missing.get_data(as_text=True)
    bad = client.get("/?per_page=9999")
    assert bad.status_code == 422 and "per_page" in bad.get_data(as_text=True)
