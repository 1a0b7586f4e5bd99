"""The dashboard: server-rendered pages for people, with small fragments the page script polls.

Every list is paged on the server, so a fleet of 20,000 units costs one page of rows.
Forms post with the session's CSRF token and redirect back (post/redirect/get).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from controller.web import auth, formatting
from controller.web.api import issue_commands
from controller.web.auth import PUBLIC, Role, current_principal, requires
from controller.web.errors import ApiError
from controller.web.openapi import parse_query
from controller.web.schemas import AlertQuery, DeviceQuery, RecordingQuery
from controller.web.services import services, web_config
from shared.clock import utcnow
from shared.messages import CommandAction, RecorderState

log = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__)

UNIT_COMMANDS = 20
UNIT_HEALTH_ROWS = 20
UNIT_EVENTS = 20
UNIT_RECORDINGS = 10
PAGE_SIZES = (25, 50, 100, 200)
DASHBOARD_COMMAND_EXPIRY_S = 60

ACTION_LABELS: dict[str, str] = {
    "start_recording": "Start recording",
    "stop_recording": "Stop recording",
    "snapshot": "Take snapshot",
    "bookmark": "Bookmark",
    "reboot": "Reboot",
}
# Bookmarks belong to one lesson, never to a whole school.
SCHOOL_ACTIONS = {k: v for k, v in ACTION_LABELS.items() if k != "bookmark"}
ALERT_LABELS: dict[str, str] = {
    "offline": "offline",
    "disk_low": "disk low",
    "temperature": "hot",
    "under_voltage": "under-voltage",
    "camera_missing": "no camera",
    "mic_silent": "mic silent",
    "upload_backlog": "upload backlog",
    "clock_unsynced": "clock not synced",
    "capture_missed": "capture missed",
    "capture_at_risk": "capture at risk",
}
STATES = [s.value for s in RecorderState]


def _principal_name() -> str:
    principal = current_principal()
    assert principal is not None
    return principal.name


def _action(form_value: str | None) -> CommandAction:
    if form_value not in ACTION_LABELS:
        raise ApiError(422, "unknown action", f"{form_value!r} is not a command")
    return CommandAction(form_value)


def _safe_next(target: str | None) -> str:
    """Only a path on this site, so the login form cannot bounce people elsewhere."""
    if not target:
        return url_for("dashboard.fleet")
    parts = urlsplit(target)
    # Browsers read "/\\host" like "//host": another site.
    if parts.scheme or parts.netloc or not target.startswith("/") or target[1:2] in ("/", "\\"):
        return url_for("dashboard.fleet")
    return target


def _args_except(*names: str) -> dict[str, str]:
    """The current query string minus ``names`` and empty fields (for pager links)."""
    return {k: v for k, v in request.args.items() if k not in names and v != ""}


# --- login ---------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
@requires(PUBLIC)
def login() -> ResponseReturnValue:
    error = None
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        password = request.form.get("password", "")
        role = auth.check_password(services().db, username, password)
        if role is not None:
            auth.login_session(username)
            log.info("login username=%s role=%s remote=%s", username, role, request.remote_addr)
            return redirect(_safe_next(request.args.get("next")))
        log.warning("login failed username=%s remote=%s", username, request.remote_addr)
        error = "Wrong username or password."
    status = 401 if error else 200
    return render_template("login.html", error=error), status


@bp.post("/logout")
@requires(Role.VIEWER)
def logout() -> ResponseReturnValue:
    auth.logout_session()
    return redirect(url_for("dashboard.login"))


# --- fleet ---------------------------------------------------------------------------------------


def _fleet_context() -> dict[str, Any]:
    query: DeviceQuery = parse_query(DeviceQuery)
    svc = services()
    page = svc.registry.list(
        school=query.school,
        state=query.state.value if query.state else None,
        online=query.online,
        alert=query.alert,
        q=query.q,
        page=query.page,
        per_page=query.per_page,
    )
    return {"query": query, "page": page, "args": _args_except("page")}


@bp.get("/")
@requires(Role.VIEWER)
def fleet() -> ResponseReturnValue:
    context = _fleet_context()
    return render_template(
        "fleet.html",
        schools=services().registry.schools(),
        states=STATES,
        page_sizes=PAGE_SIZES,
        school_actions=SCHOOL_ACTIONS,
        **context,
    )


@bp.get("/fleet/rows")
@requires(Role.VIEWER)
def fleet_rows() -> ResponseReturnValue:
    return render_template("_fleet_table.html", **_fleet_context())


@bp.get("/schools")
@requires(Role.VIEWER)
def schools() -> ResponseReturnValue:
    return render_template("schools.html", schools=services().registry.schools())


@bp.post("/schools/<school>/commands")
@requires(Role.TECHNICIAN)
def school_command(school: str) -> ResponseReturnValue:
    action = _action(request.form.get("action"))
    device_ids = services().registry.device_ids(school)
    if not device_ids:
        raise ApiError(404, "unknown school", f"no units in school {school!r}")
    created = issue_commands(
        device_ids,
        action,
        created_by=_principal_name(),
        expires_in_s=DASHBOARD_COMMAND_EXPIRY_S,
        note=None,
    )
    flash(f"{ACTION_LABELS[action.value]} sent to {len(created)} units of {school}.", "ok")
    return redirect(url_for("dashboard.fleet", school=school))


# --- one unit ------------------------------------------------------------------------------------


def _unit_context(device_id: str) -> dict[str, Any]:
    svc = services()
    device = svc.registry.get(device_id)
    if device is None:
        raise ApiError(404, "unknown unit", f"no unit {device_id!r}")
    return {
        "device": device,
        "alerts": svc.alerts.list(open_only=True, device_id=device_id, per_page=100).items,
        "commands": svc.commands.list(device_id=device_id, per_page=UNIT_COMMANDS).items,
        "history": svc.registry.health_history(device_id, limit=UNIT_HEALTH_ROWS),
        "events": svc.registry.events(device_id, limit=UNIT_EVENTS),
        "recordings": svc.catalogue.list(device_id=device_id, per_page=UNIT_RECORDINGS).items,
    }


@bp.get("/units/<device_id>")
@requires(Role.VIEWER)
def unit(device_id: str) -> ResponseReturnValue:
    return render_template("unit.html", **_unit_context(device_id))


@bp.get("/units/<device_id>/live")
@requires(Role.VIEWER)
def unit_live(device_id: str) -> ResponseReturnValue:
    return render_template("_unit_live.html", **_unit_context(device_id))


@bp.post("/units/<device_id>/commands")
@requires(Role.TECHNICIAN)
def unit_command(device_id: str) -> ResponseReturnValue:
    if not services().registry.known(device_id):
        raise ApiError(404, "unknown unit", f"no unit {device_id!r}")
    action = _action(request.form.get("action"))
    note = request.form.get("note", "").strip() or None
    if note is not None and len(note) > 500:
        raise ApiError(422, "note too long", "a note may have at most 500 characters")
    (created,) = issue_commands(
        [device_id],
        action,
        created_by=_principal_name(),
        expires_in_s=DASHBOARD_COMMAND_EXPIRY_S,
        note=note,
    )
    flash(f"{ACTION_LABELS[action.value]}: command {created.id} sent to {device_id}.", "ok")
    return redirect(url_for("dashboard.unit", device_id=device_id))


# --- recordings and alerts -----------------------------------------------------------------------


@bp.get("/recordings")
@requires(Role.VIEWER)
def recordings() -> ResponseReturnValue:
    query: RecordingQuery = parse_query(RecordingQuery)
    page = services().catalogue.list(
        device_id=query.device_id,
        school=query.school,
        status=query.status.value if query.status else None,
        page=query.page,
        per_page=query.per_page,
    )
    return render_template(
        "recordings.html",
        query=query,
        page=page,
        args=_args_except("page"),
        schools=services().registry.schools(),
    )


@bp.get("/recordings/<recording_id>")
@requires(Role.VIEWER)
def recording(recording_id: str) -> ResponseReturnValue:
    found = services().catalogue.get(recording_id)
    if found is None:
        raise ApiError(404, "unknown recording", f"no recording {recording_id!r}")
    return render_template("recording.html", recording=found)


@bp.get("/alerts")
@requires(Role.VIEWER)
def alerts() -> ResponseReturnValue:
    query: AlertQuery = parse_query(AlertQuery)
    page = services().alerts.list(
        open_only=query.open_only,
        school=query.school,
        device_id=query.device_id,
        kind=query.kind,
        page=query.page,
        per_page=query.per_page,
    )
    return render_template(
        "alerts.html",
        query=query,
        page=page,
        args=_args_except("page"),
        schools=services().registry.schools(),
    )


# --- users and tokens ----------------------------------------------------------------------------


def _admin_page(new_token: str | None = None, status: int = 200) -> ResponseReturnValue:
    db = services().db
    return (
        render_template(
            "admin.html",
            users=auth.list_users(db),
            tokens=auth.list_tokens(db),
            roles=[r.value for r in Role],
            new_token=new_token,
        ),
        status,
    )


@bp.get("/admin")
@requires(Role.ADMIN)
def admin() -> ResponseReturnValue:
    return _admin_page()


@bp.post("/admin/users")
@requires(Role.ADMIN)
def admin_add_user() -> ResponseReturnValue:
    try:
        role = Role(request.form.get("role", ""))
        auth.create_user(
            services().db,
            request.form.get("username", "").strip(),
            request.form.get("password", ""),
            role,
        )
    except ValueError:
        flash("Choose a role.", "error")
    except auth.AuthError as exc:
        flash(str(exc), "error")
    else:
        flash(f"User {request.form.get('username', '').strip()} added.", "ok")
    return redirect(url_for("dashboard.admin"))


@bp.post("/admin/users/<username>/delete")
@requires(Role.ADMIN)
def admin_delete_user(username: str) -> ResponseReturnValue:
    if username == _principal_name():
        flash("You cannot remove yourself; ask another admin.", "error")
        return redirect(url_for("dashboard.admin"))
    try:
        auth.delete_user(services().db, username)
    except auth.UnknownUser as exc:
        flash(str(exc), "error")
    else:
        flash(f"User {username} removed.", "ok")
    return redirect(url_for("dashboard.admin"))


@bp.post("/admin/tokens")
@requires(Role.ADMIN)
def admin_add_token() -> ResponseReturnValue:
    try:
        role = Role(request.form.get("role", ""))
        token = auth.create_token(services().db, request.form.get("name", ""), role)
    except ValueError:
        flash("Choose a role.", "error")
    except auth.AuthError as exc:
        flash(str(exc), "error")
    else:
        # Rendered, not flashed: a flash would carry the secret in the session cookie.
        return _admin_page(new_token=token, status=201)
    return redirect(url_for("dashboard.admin"))


@bp.post("/admin/tokens/<token_id>/revoke")
@requires(Role.ADMIN)
def admin_revoke_token(token_id: str) -> ResponseReturnValue:
    try:
        auth.revoke_token(services().db, token_id)
    except auth.UnknownToken as exc:
        flash(str(exc), "error")
    else:
        flash(f"Token {token_id} revoked.", "ok")
    return redirect(url_for("dashboard.admin"))


def snapshot_url(device_id: str, taken_at: datetime | None) -> str | None:
    if taken_at is None:
        return None
    # The version parameter changes with each new picture, so browsers cache each one once.
    return url_for("api.device_snapshot", device_id=device_id, v=int(taken_at.timestamp() * 1000))


@bp.app_context_processor
def _template_helpers() -> dict[str, Any]:
    principal = current_principal()

    def can(role: str) -> bool:
        return principal is not None and auth.role_allows(principal.role, Role(role))

    return {
        "principal": principal,
        "can": can,
        "csrf_token": auth.csrf_token,
        "now": utcnow(),
        "alert_labels": ALERT_LABELS,
        "action_labels": ACTION_LABELS,
        "pager_pages": formatting.pager_pages,
        "snapshot_url": snapshot_url,
        "refresh_ms": int(web_config().refresh_interval_s * 1000),
        "title": web_config().title,
    }


bp.add_app_template_filter(formatting.ago, "ago")
bp.add_app_template_filter(formatting.human_bytes, "bytes")
bp.add_app_template_filter(formatting.human_duration, "duration")
