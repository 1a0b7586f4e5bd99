"""The REST API under /api/v1: JSON in and out, bearer tokens or a dashboard session."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel

from controller.registry import UnknownDevice
from controller.views import CommandView, Page
from controller.web import auth
from controller.web.auth import Role, current_principal
from controller.web.errors import ApiError
from controller.web.openapi import ApiTable, build_document
from controller.web.schemas import (
    AlertOut,
    AlertPageOut,
    AlertQuery,
    CommandBatchOut,
    CommandIn,
    CommandOut,
    CommandPageOut,
    CommandQuery,
    DesiredIn,
    DesiredOut,
    DeviceDetailOut,
    DeviceLinks,
    DeviceOut,
    DevicePageOut,
    DeviceQuery,
    HealthHistoryOut,
    HealthQuery,
    OkOut,
    RecordingDetailOut,
    RecordingOut,
    RecordingPageOut,
    RecordingQuery,
    SchoolOut,
    SchoolsOut,
    TokenCreatedOut,
    TokenIn,
    TokenOut,
    TokensOut,
    UserIn,
    UserOut,
    UsersOut,
)
from controller.web.services import services
from shared import __version__
from shared.messages import CommandAction

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
LATEST_COMMANDS = 10

bp = Blueprint("api", __name__, url_prefix=PREFIX)
table = ApiTable(bp)
PageT = TypeVar("PageT", bound=BaseModel)


def _principal_name() -> str:
    principal = current_principal()
    assert principal is not None  # every API route needs a role
    return principal.name


def _require_device(device_id: str) -> None:
    if not services().registry.known(device_id):
        raise ApiError(404, "unknown unit", f"no unit {device_id!r}")


def issue_commands(
    device_ids: list[str],
    action: CommandAction,
    *,
    created_by: str,
    expires_in_s: int,
    note: str | None,
) -> list[CommandView]:
    """Queues one command per unit and sends each at once where its unit is online.

    A command that cannot be sent now stays queued: it goes out when the unit
    comes online, or expires. A publishing failure therefore never fails the request.
    """
    svc = services()
    try:
        created = svc.commands.create(
            device_ids, action, created_by=created_by, expires_in_s=expires_in_s, note=note
        )
    except UnknownDevice as exc:
        raise ApiError(404, "unknown unit", f"no unit {exc}") from None
    except ValueError as exc:
        raise ApiError(422, "invalid command", str(exc)) from None
    for view in created:
        try:
            svc.publish_command(view.id)
        except Exception:
            log.exception(
                "command not sent, left queued command=%s device=%s", view.id, view.device_id
            )
    return created


# --- devices ---------------------------------------------------------------------------------


def _page_out(out: type[PageT], item: type[BaseModel], page: Page[Any]) -> PageT:
    return out(
        items=[item.model_validate(entry) for entry in page.items],
        total=page.total,
        page=page.page,
        per_page=page.per_page,
    )


@table.route(
    "GET",
    "/devices",
    summary="List units",
    access=Role.VIEWER,
    query=DeviceQuery,
    response=DevicePageOut,
)
def list_devices(query: DeviceQuery) -> DevicePageOut:
    page = services().registry.list(
        school=query.school,
        state=query.state.value if query.state else None,
        online=query.online,
        alert=query.alert,
        q=query.q,
        page=query.page,
        per_page=query.per_page,
    )
    return _page_out(DevicePageOut, DeviceOut, page)


@table.route(
    "GET",
    "/devices/<device_id>",
    summary="One unit with its alerts and latest commands",
    access=Role.VIEWER,
    response=DeviceDetailOut,
    errors=(404,),
)
def get_device(device_id: str) -> DeviceDetailOut:
    svc = services()
    device = svc.registry.get(device_id)
    if device is None:
        raise ApiError(404, "unknown unit", f"no unit {device_id!r}")
    alerts = svc.alerts.list(open_only=True, device_id=device_id, per_page=100).items
    commands = svc.commands.list(device_id=device_id, per_page=LATEST_COMMANDS).items
    desired = svc.registry.desired(device_id)
    base = DeviceOut.model_validate(device).model_dump()
    return DeviceDetailOut(
        **base,
        alerts=[AlertOut.model_validate(a) for a in alerts],
        latest_commands=[CommandOut.model_validate(c) for c in commands],
        desired=desired.model_dump(mode="json", by_alias=True) if desired else None,
        links=DeviceLinks(
            health=url_for("api.device_health", device_id=device_id),
            snapshot=url_for("api.device_snapshot", device_id=device_id),
            commands=url_for("api.list_commands", device_id=device_id),
            recordings=url_for("api.list_recordings", device_id=device_id),
            alerts=url_for("api.list_alerts", device_id=device_id),
        ),
    )


@table.route(
    "GET",
    "/devices/<device_id>/health",
    summary="Health history, newest first",
    access=Role.VIEWER,
    query=HealthQuery,
    response=HealthHistoryOut,
    errors=(404,),
)
def device_health(device_id: str, query: HealthQuery) -> HealthHistoryOut:
    _require_device(device_id)
    items = services().registry.health_history(device_id, limit=query.limit)
    return HealthHistoryOut(device_id=device_id, items=items)


@table.route(
    "GET",
    "/devices/<device_id>/snapshot",
    summary="Latest snapshot picture",
    access=Role.VIEWER,
    media_type="image/jpeg",
    errors=(404,),
)
def device_snapshot(device_id: str) -> ResponseReturnValue:
    _require_device(device_id)
    found = services().registry.snapshot(device_id)
    if found is None:
        raise ApiError(404, "no snapshot", f"unit {device_id!r} has sent no snapshot yet")
    jpeg, taken_at = found
    response = Response(jpeg, mimetype="image/jpeg")
    response.last_modified = taken_at
    response.cache_control.private = True
    if "v" in request.args:
        # The dashboard versions the URL by the picture's time: that URL never changes content.
        response.cache_control.max_age = 86400
    else:
        response.cache_control.no_cache = True
    return response.make_conditional(request)


@table.route(
    "GET",
    "/devices/<device_id>/desired",
    summary="The unit's desired state document",
    access=Role.VIEWER,
    response=DesiredOut,
    errors=(404,),
)
def get_desired(device_id: str) -> DesiredOut:
    _require_device(device_id)
    desired = services().registry.desired(device_id)
    if desired is None:
        raise ApiError(404, "no desired state", f"unit {device_id!r} has none yet")
    return DesiredOut(device_id=device_id, desired=desired.model_dump(mode="json", by_alias=True))


@table.route(
    "PUT",
    "/devices/<device_id>/desired",
    summary="Change settings and/or schedule; a new version is published to the unit",
    access=Role.ADMIN,
    body=DesiredIn,
    response=DesiredOut,
    status=202,
    errors=(400, 404, 415),
)
def put_desired(device_id: str, body: DesiredIn) -> DesiredOut:
    _require_device(device_id)
    if body.settings is None and body.schedule is None:
        raise ApiError(422, "nothing to change", "give settings, schedule or both")
    svc = services()
    desired = svc.registry.set_desired(device_id, settings=body.settings, schedule=body.schedule)
    log.info(
        "desired state set device=%s version=%d by=%s",
        device_id,
        desired.version,
        _principal_name(),
    )
    if svc.publish_desired is not None:
        svc.publish_desired(device_id, desired)
    else:
        log.warning("no desired-state publisher; stored only device=%s", device_id)
    return DesiredOut(device_id=device_id, desired=desired.model_dump(mode="json", by_alias=True))


# --- commands --------------------------------------------------------------------------------


@table.route(
    "POST",
    "/devices/<device_id>/commands",
    summary="Send a command to one unit",
    access=Role.TECHNICIAN,
    body=CommandIn,
    response=CommandOut,
    status=202,
    errors=(400, 404, 415),
)
def command_device(device_id: str, body: CommandIn) -> CommandOut:
    _require_device(device_id)
    (created,) = issue_commands(
        [device_id],
        CommandAction(body.action),
        created_by=_principal_name(),
        expires_in_s=body.expires_in_s,
        note=body.note,
    )
    return CommandOut.model_validate(services().commands.get(created.id) or created)


@table.route(
    "POST",
    "/schools/<school>/commands",
    summary="Send a command to every unit of a school",
    access=Role.TECHNICIAN,
    body=CommandIn,
    response=CommandBatchOut,
    status=202,
    errors=(400, 404, 415),
)
def command_school(school: str, body: CommandIn) -> CommandBatchOut:
    device_ids = services().registry.device_ids(school)
    if not device_ids:
        raise ApiError(404, "unknown school", f"no units in school {school!r}")
    created = issue_commands(
        device_ids,
        CommandAction(body.action),
        created_by=_principal_name(),
        expires_in_s=body.expires_in_s,
        note=body.note,
    )
    return CommandBatchOut(
        count=len(created), items=[CommandOut.model_validate(c) for c in created]
    )


@table.route(
    "GET",
    "/commands",
    summary="Commands, newest first",
    access=Role.VIEWER,
    query=CommandQuery,
    response=CommandPageOut,
)
def list_commands(query: CommandQuery) -> CommandPageOut:
    page = services().commands.list(
        device_id=query.device_id, page=query.page, per_page=query.per_page
    )
    return _page_out(CommandPageOut, CommandOut, page)


@table.route(
    "GET",
    "/commands/<command_id>",
    summary="One command and how it ended",
    access=Role.VIEWER,
    response=CommandOut,
    errors=(404,),
)
def get_command(command_id: str) -> CommandOut:
    found = services().commands.get(command_id)
    if found is None:
        raise ApiError(404, "unknown command", f"no command {command_id!r}")
    return CommandOut.model_validate(found)


# --- recordings, alerts, schools --------------------------------------------------------------


@table.route(
    "GET",
    "/recordings",
    summary="Recordings, newest first",
    access=Role.VIEWER,
    query=RecordingQuery,
    response=RecordingPageOut,
)
def list_recordings(query: RecordingQuery) -> RecordingPageOut:
    page = services().catalogue.list(
        device_id=query.device_id,
        school=query.school,
        status=query.status.value if query.status else None,
        page=query.page,
        per_page=query.per_page,
    )
    return _page_out(RecordingPageOut, RecordingOut, page)


@table.route(
    "GET",
    "/recordings/<recording_id>",
    summary="One recording with its segments (key, size, sha256, download URL)",
    access=Role.VIEWER,
    response=RecordingDetailOut,
    errors=(404,),
)
def get_recording(recording_id: str) -> RecordingDetailOut:
    found = services().catalogue.get(recording_id)
    if found is None:
        raise ApiError(404, "unknown recording", f"no recording {recording_id!r}")
    return RecordingDetailOut.model_validate(found)


@table.route(
    "GET",
    "/alerts",
    summary="Alerts, open ones by default",
    access=Role.VIEWER,
    query=AlertQuery,
    response=AlertPageOut,
)
def list_alerts(query: AlertQuery) -> AlertPageOut:
    page = services().alerts.list(
        open_only=query.open_only,
        school=query.school,
        device_id=query.device_id,
        kind=query.kind,
        page=query.page,
        per_page=query.per_page,
    )
    return _page_out(AlertPageOut, AlertOut, page)


@table.route(
    "GET",
    "/schools",
    summary="Schools with their unit and online counts",
    access=Role.VIEWER,
    response=SchoolsOut,
)
def list_schools() -> SchoolsOut:
    return SchoolsOut(
        items=[
            SchoolOut(school=school, units=units, online=online)
            for school, units, online in services().registry.schools()
        ]
    )


# --- users and tokens ---------------------------------------------------------------------------


@table.route("GET", "/users", summary="Dashboard users", access=Role.ADMIN, response=UsersOut)
def list_users() -> UsersOut:
    return UsersOut(items=[UserOut.model_validate(u) for u in auth.list_users(services().db)])


@table.route(
    "POST",
    "/users",
    summary="Add a dashboard user",
    access=Role.ADMIN,
    body=UserIn,
    response=UserOut,
    status=201,
    errors=(400, 409, 415),
)
def add_user(body: UserIn) -> UserOut:
    try:
        user = auth.create_user(services().db, body.username, body.password, body.role)
    except auth.UserExists as exc:
        raise ApiError(409, "user exists", str(exc)) from None
    except auth.AuthError as exc:
        raise ApiError(422, "invalid user", str(exc)) from None
    return UserOut.model_validate(user)


@table.route(
    "DELETE",
    "/users/<username>",
    summary="Remove a dashboard user",
    access=Role.ADMIN,
    response=OkOut,
    errors=(404, 409),
)
def delete_user(username: str) -> OkOut:
    if username == _principal_name():
        raise ApiError(409, "cannot remove yourself", "another admin must remove this user")
    try:
        auth.delete_user(services().db, username)
    except auth.UnknownUser as exc:
        raise ApiError(404, "unknown user", str(exc)) from None
    return OkOut()


@table.route(
    "GET",
    "/tokens",
    summary="API tokens (never their secrets)",
    access=Role.ADMIN,
    response=TokensOut,
)
def list_tokens() -> TokensOut:
    return TokensOut(items=[TokenOut.model_validate(t) for t in auth.list_tokens(services().db)])


@table.route(
    "POST",
    "/tokens",
    summary="Create an API token; its secret is shown only in this answer",
    access=Role.ADMIN,
    body=TokenIn,
    response=TokenCreatedOut,
    status=201,
    errors=(400, 415),
)
def add_token(body: TokenIn) -> TokenCreatedOut:
    try:
        token = auth.create_token(services().db, body.name, body.role)
    except auth.AuthError as exc:
        raise ApiError(422, "invalid token", str(exc)) from None
    token_id = auth.token_id_of(token)
    assert token_id is not None
    return TokenCreatedOut(id=token_id, name=body.name.strip(), role=body.role, token=token)


@table.route(
    "DELETE",
    "/tokens/<token_id>",
    summary="Revoke an API token",
    access=Role.ADMIN,
    response=OkOut,
    errors=(404,),
)
def revoke_token(token_id: str) -> OkOut:
    try:
        auth.revoke_token(services().db, token_id)
    except auth.UnknownToken as exc:
        raise ApiError(404, "unknown token", str(exc)) from None
    return OkOut()


# --- the document itself -------------------------------------------------------------------------


@table.route(
    "GET", "/openapi.json", summary="This API as an OpenAPI 3.1 document", access=Role.VIEWER
)
def openapi_document() -> ResponseReturnValue:
    cached = current_app.extensions.get("classcap.openapi")
    if cached is None:
        cached = build_document(
            table.routes, prefix=PREFIX, title="classcap fleet controller", version=__version__
        )
        current_app.extensions["classcap.openapi"] = cached
    return jsonify(cached)
