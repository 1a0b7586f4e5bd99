"""Error answers: JSON ``{"error", "detail"}`` for API and script callers, a page for people."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WerkzeugResponse

log = logging.getLogger(__name__)

FETCH_HEADER = "X-Requested-With"


class ApiError(Exception):
    """An answer other than success, with a reason the caller can act on."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.detail = detail


def validation_detail(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"loc": ".".join(str(p) for p in err["loc"]) or "body", "msg": err["msg"]}
        for err in exc.errors(include_url=False)
    ]


def wants_json() -> bool:
    if request.path.startswith("/api/") or request.headers.get(FETCH_HEADER) == "fetch":
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def json_error(status: int, error: str, detail: Any = None) -> Response:
    response = jsonify({"error": error, "detail": detail})
    response.status_code = status
    return response


def install(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        if wants_json():
            return json_error(exc.status, exc.error, exc.detail)
        return _page(exc.status, exc.error, exc.detail)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> ResponseReturnValue:
        status = exc.code or 500
        error = (exc.name or "error").lower()
        response: WerkzeugResponse
        if wants_json():
            response = json_error(status, error, exc.description)
        elif status == 401 and request.method == "GET":
            response = redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
        else:
            response = _page(status, error, exc.description)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("request failed method=%s path=%s", request.method, request.path)
        if wants_json():
            return json_error(500, "internal error", "the controller failed; see its log")
        return _page(500, "internal error", "the controller failed; see its log")


def _page(status: int, error: str, detail: Any) -> Response:
    body = render_template("error.html", status=status, error=error, detail=detail)
    return Response(body, status=status, mimetype="text/html")
