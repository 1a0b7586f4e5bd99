"""Who may do what: users with hashed passwords, API tokens, roles, sessions and CSRF.

Every view declares the least role it needs with :func:`requires` (or :data:`PUBLIC`);
``create_app`` refuses to build an app with an undeclared view, and the request hook
below refuses anything the caller's role does not cover. Dashboard sessions are Flask's
signed cookie; every unsafe request made with a session must carry that session's CSRF
token. Requests with a bearer token carry no ambient credentials and are exempt.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, TypeVar

from flask import Flask, g, request, session
from sqlalchemy import select
from werkzeug.exceptions import BadRequest, Forbidden, Unauthorized
from werkzeug.security import check_password_hash, generate_password_hash

from controller.db import Database
from controller.models import ApiToken, User
from shared.clock import utcnow

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., object])

ACCESS_ATTR = "classcap_access"
CSRF_EXEMPT_ATTR = "classcap_csrf_exempt"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_COOKIE = "classcap_session"
TOKEN_PREFIX = "cct"  # noqa: S105 - a label, not a secret
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}$"
MIN_PASSWORD_CHARS = 10

_USERNAME = re.compile(USERNAME_PATTERN)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Writing last_used_at on every request would turn every read into a write.
_TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
# Checked against when a username is unknown, so a miss costs as much as a wrong password.
_DUMMY_HASH = generate_password_hash(secrets.token_urlsafe(16))


class Role(StrEnum):
    VIEWER = "viewer"
    TECHNICIAN = "technician"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.TECHNICIAN: 1, Role.ADMIN: 2}

Access = Role | Literal["public"]
PUBLIC: Literal["public"] = "public"


def role_allows(have: Role, need: Role) -> bool:
    return _RANK[have] >= _RANK[need]


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    via: Literal["session", "token"]


@dataclass(frozen=True)
class UserView:
    username: str
    role: Role
    created_at: datetime


@dataclass(frozen=True)
class TokenView:
    id: str
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class AuthError(Exception):
    """A user or token request that cannot be done; the message says why."""


class UserExists(AuthError):
    pass


class UnknownUser(AuthError):
    pass


class UnknownToken(AuthError):
    pass


# --- declaring access -------------------------------------------------------------------


def requires(access: Access) -> Callable[[F], F]:
    """Marks a view with the least role it needs (or PUBLIC)."""

    def mark(view: F) -> F:
        setattr(view, ACCESS_ATTR, access)
        return view

    return mark


def csrf_exempt(view: F) -> F:
    """For views whose requests authenticate themselves (signed storage URLs)."""
    setattr(view, CSRF_EXEMPT_ATTR, True)
    return view


def access_of(view: Callable[..., object]) -> Access | None:
    value = getattr(view, ACCESS_ATTR, None)
    return value if value == PUBLIC or isinstance(value, Role) else None


def undeclared_views(app: Flask) -> list[str]:
    """Endpoints with no declared access; ``static`` is Flask's own and public."""
    return sorted(
        name
        for name, view in app.view_functions.items()
        if name != "static" and access_of(view) is None
    )


# --- users ---------------------------------------------------------------------------------


def _validate_user(username: str, password: str) -> None:
    if not _USERNAME.match(username):
        raise AuthError(
            f"invalid username {username!r}: 1-200 of A-Z a-z 0-9 _ . @ -, "
            "starting with a letter or digit"
        )
    if len(password) < MIN_PASSWORD_CHARS:
        raise AuthError(f"password must have at least {MIN_PASSWORD_CHARS} characters")


def create_user(db: Database, username: str, password: str, role: Role) -> UserView:
    _validate_user(username, password)
    with db.session() as s:
        if s.get(User, username) is not None:
            raise UserExists(f"user {username!r} already exists")
        user = User(
            username=username,
            password_hash=generate_password_hash(password),
            role=Role(role).value,
            created_at=utcnow(),
        )
        s.add(user)
        view = UserView(user.username, Role(user.role), user.created_at)
    log.info("user created username=%s role=%s", username, role)
    return view


def set_password(db: Database, username: str, password: str) -> None:
    _validate_user(username, password)
    with db.session() as s:
        user = s.get(User, username)
        if user is None:
            raise UnknownUser(f"no user {username!r}")
        user.password_hash = generate_password_hash(password)
    log.info("password changed username=%s", username)


def delete_user(db: Database, username: str) -> None:
    with db.session() as s:
        user = s.get(User, username)
        if user is None:
            raise UnknownUser(f"no user {username!r}")
        s.delete(user)
    log.info("user deleted username=%s", username)


def list_users(db: Database) -> list[UserView]:
    with db.session(readonly=True) as s:
        rows = s.scalars(select(User).order_by(User.username)).all()
        return [UserView(u.username, Role(u.role), u.created_at) for u in rows]


def user_role(db: Database, username: str) -> Role | None:
    with db.session(readonly=True) as s:
        user = s.get(User, username)
        return Role(user.role) if user is not None else None


def check_password(db: Database, username: str, password: str) -> Role | None:
    """The user's role if the password is right, otherwise None."""
    with db.session(readonly=True) as s:
        user = s.get(User, username)
        stored = user.password_hash if user is not None else None
        role = Role(user.role) if user is not None else None
    if stored is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return role if check_password_hash(stored, password) else None


# --- API tokens ------------------------------------------------------------------------------


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(db: Database, name: str, role: Role) -> str:
    """A new token ``cct_<id>_<secret>``; only the secret's sha256 is kept, so show it once."""
    name = name.strip()
    if not name or len(name) > 200:
        raise AuthError("token name must have 1-200 characters")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with db.session() as s:
        s.add(
            ApiToken(
                id=token_id,
                name=name,
                role=Role(role).value,
                secret_hash=_digest(secret),
                created_at=utcnow(),
            )
        )
    log.info("api token created id=%s name=%s role=%s", token_id, name, role)
    return f"{TOKEN_PREFIX}_{token_id}_{secret}"


def token_id_of(token: str) -> str | None:
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret:
        return None
    return token_id


def revoke_token(db: Database, token_id: str) -> None:
    with db.session() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise UnknownToken(f"no token {token_id!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    log.info("api token revoked id=%s", token_id)


def list_tokens(db: Database) -> list[TokenView]:
    with db.session(readonly=True) as s:
        rows = s.scalars(select(ApiToken).order_by(ApiToken.created_at)).all()
        return [
            TokenView(t.id, t.name, Role(t.role), t.created_at, t.last_used_at, t.revoked_at)
            for t in rows
        ]


def authenticate_token(db: Database, token: str) -> Principal | None:
    token_id = token_id_of(token)
    if token_id is None:
        return None
    secret = token.split("_", 2)[2]
    now = utcnow()
    with db.session() as s:
        row = s.get(ApiToken, token_id)
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.secret_hash, _digest(secret)):
            return None
        if row.last_used_at is None or now - row.last_used_at > _TOKEN_TOUCH_INTERVAL:
            row.last_used_at = now
        return Principal(f"token:{row.name}", Role(row.role), "token")


# --- sessions and CSRF -------------------------------------------------------------------------


def login_session(username: str) -> None:
    session.clear()
    session.permanent = True
    session["user"] = username
    session[CSRF_FIELD] = secrets.token_urlsafe(32)


def logout_session() -> None:
    session.clear()


def csrf_token() -> str:
    """This session's CSRF token, created on first use (the login form needs one too)."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF_FIELD] = token
    return token


def current_principal() -> Principal | None:
    principal = g.get("principal")
    return principal if isinstance(principal, Principal) else None


def _check_csrf() -> None:
    expected = session.get(CSRF_FIELD)
    given = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not isinstance(expected, str) or not given or not hmac.compare_digest(expected, given):
        log.warning("csrf check failed path=%s", request.path)
        raise BadRequest("missing or invalid CSRF token; reload the page and try again")


def _principal_from_request(db: Database) -> Principal | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        principal = authenticate_token(db, token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            log.warning("bad bearer token path=%s remote=%s", request.path, request.remote_addr)
            raise Unauthorized("invalid or revoked API token")
        return principal
    username = session.get("user")
    if not isinstance(username, str):
        return None
    role = user_role(db, username)
    if role is None:
        session.clear()
        return None
    return Principal(username, role, "session")


def install(app: Flask, db: Database) -> None:
    """Authenticates every request and enforces the view's declared access and CSRF."""

    @app.before_request
    def _authorise() -> None:
        view = app.view_functions.get(request.endpoint or "")
        if view is None or request.endpoint == "static":
            return  # routing answers 404/405; static files are public and need no lookup
        access = access_of(view)
        principal = _principal_from_request(db)
        g.principal = principal
        if access != PUBLIC:
            if principal is None:
                raise Unauthorized("log in or send an API token")
            # An undeclared view is refused at create_app; treat one as admin-only regardless.
            need = access if isinstance(access, Role) else Role.ADMIN
            if not role_allows(principal.role, need):
                log.warning(
                    "forbidden principal=%s role=%s need=%s path=%s",
                    principal.name,
                    principal.role,
                    need,
                    request.path,
                )
                raise Forbidden(f"this needs the {need} role; you have {principal.role}")
        if (
            request.method not in _SAFE_METHODS
            and not getattr(view, CSRF_EXEMPT_ATTR, False)
            and (principal is None or principal.via == "session")
        ):
            _check_csrf()
