"""The controller's web app: REST API, dashboard, /metrics and the local store's object routes."""

from __future__ import annotations

import logging
from datetime import timedelta

from flask import Flask, Response, jsonify
from sqlalchemy import text

from controller.storage.local import LocalStorage
from controller.web import (
    api,
    auth,
    dashboard,
    errors,
    metrics,
    schedule_pages,
    storage_routes,
)
from controller.web.auth import PUBLIC, requires
from controller.web.services import EXTENSION_KEY, WebConfig, WebServices, services

__all__ = ["WebConfig", "WebServices", "create_app"]

log = logging.getLogger(__name__)


def create_app(services_: WebServices, config: WebConfig) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=config.secret_key,
        SESSION_COOKIE_NAME=auth.SESSION_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=config.session_lifetime_s),
        # Uploads to the embedded store are streamed; nothing else takes large bodies.
        MAX_FORM_MEMORY_SIZE=64 * 1024,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = services_
    app.extensions[EXTENSION_KEY + ".config"] = config

    # The scheduling routes join api.bp when schedule_pages imports schedule_api.
    app.register_blueprint(api.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(schedule_pages.bp)
    app.register_blueprint(metrics.bp)
    if isinstance(services_.storage, LocalStorage):
        app.register_blueprint(storage_routes.bp)
    app.add_url_rule("/healthz", "healthz", _healthz)

    errors.install(app)
    auth.install(app, services_.db)

    undeclared = auth.undeclared_views(app)
    if undeclared:
        raise RuntimeError(f"views without a declared role: {', '.join(undeclared)}")

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'",
        )
        return response

    log.info(
        "web app ready local_storage=%s mqtt_metrics=%s",
        isinstance(services_.storage, LocalStorage),
        services_.mqtt_metrics is not None,
    )
    return app


@requires(PUBLIC)
def _healthz() -> Response:
    """Liveness for load balancers and service checks: the database answers."""
    with services().db.session(readonly=True) as s:
        s.execute(text("SELECT 1"))
    return jsonify({"status": "ok"})
