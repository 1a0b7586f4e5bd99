"""The controller's configuration: one TOML file, ``/etc/classcap/controller.toml`` by default.

Every path that is not set lies under ``data_dir``, so a config of a few lines runs a
complete controller: SQLite database, embedded broker, local-directory storage.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from controller.broker import CONTROLLER_USER
from shared.configfile import load_toml_config

if TYPE_CHECKING:
    # boto3 comes with the controller extra; a unit loads this module's CLI without it.
    from controller.storage.s3 import S3Settings

DEFAULT_CONFIG_PATH = Path("/etc/classcap/controller.toml")
DEFAULT_DATA_DIR = Path("/var/lib/classcap-controller")
# Any S3 bucket name (3-63 of a-z 0-9 . -, starting and ending with a letter or digit).
_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
_SECRET_BYTES = 32
Port = Annotated[int, Field(ge=0, le=65535)]
# Listening on every address; the controller itself reaches such a listener on loopback.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str, schemes: set[str]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        expected = " or ".join(f"{s}://host[:port]" for s in sorted(schemes))
        raise ValueError(f"expected {expected}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return value


def _mqtt_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080  # 0 picks a free port (tests)
    # How browsers and units reach this server (the local store's upload URLs use it).
    public_url: str | None = None
    # Signs sessions and the local store's upload URLs; created on first start.
    secret_key_file: Path = DEFAULT_DATA_DIR / "secret_key"
    threads: int = Field(default=8, ge=1, le=128)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, {"http", "https"}).rstrip("/")

    def base_url(self, port: int | None = None) -> str:
        """``public_url``, or the address the server listens on (``port``: the bound one)."""
        if self.public_url is not None:
            return self.public_url
        host = "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host
        return f"http://{host}:{port if port is not None else self.port}"


class DatabaseConfig(_Section):
    # sqlite:////path/file.sqlite3 or postgresql+psycopg://user@host/db
    url: str = f"sqlite:///{DEFAULT_DATA_DIR / 'controller.sqlite3'}"
    migrate_on_start: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError("expected sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return value


class EmbeddedBrokerConfig(_Section):
    """The Mosquitto the controller runs itself (``broker.mode = "embedded"``)."""

    directory: Path = DEFAULT_DATA_DIR / "broker"
    # The plain listener; units on other machines need host = "0.0.0.0" or, better, TLS.
    host: str = "127.0.0.1"
    port: Port = 1883
    tls_port: Port | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None

    @model_validator(mode="after")
    def _tls(self) -> EmbeddedBrokerConfig:
        if self.tls_port is not None and (self.certfile is None or self.keyfile is None):
            raise ValueError("tls_port needs certfile and keyfile")
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError("tls_port must differ from port")
        return self


class BrokerConfig(_Section):
    mode: Literal["embedded", "external"] = "embedded"
    # external: where the controller connects (mqtt:// or mqtts://)
    url: str | None = None
    # What units connect to, written into each unit's agent.toml by `device add`.
    unit_url: str | None = None
    username: str = CONTROLLER_USER
    password: str | None = None
    # embedded: defaults to <directory>/controller-password, created on first start
    password_file: Path | None = None
    ca_file: Path | None = None
    # Each controller sharing a fleet needs its own client id.
    client_id: str = Field(default="classcap-controller", min_length=1, max_length=128)
    keepalive_s: int = Field(default=30, ge=5, le=600)
    # The broker keeps QoS 1 messages for a restarting controller this long.
    session_expiry_s: int = Field(default=3600, ge=0, le=7 * 24 * 3600)
    workers: int = Field(default=4, ge=1, le=64)
    embedded: EmbeddedBrokerConfig = Field(default_factory=EmbeddedBrokerConfig)

    @field_validator("url", "unit_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, {"mqtt", "mqtts"})

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        if self.mode == "external" and self.url is None:
            raise ValueError("an external broker needs url")
        if self.mode == "embedded" and self.url is not None:
            raise ValueError(
                "url is for an external broker; the embedded one uses [broker.embedded]"
            )
        if self.mode == "embedded" and self.username != CONTROLLER_USER:
            raise ValueError(f"the embedded broker's ACL knows the controller as {CONTROLLER_USER}")
        return self

    @property
    def connect_url(self) -> str:
        """Where the controller itself connects."""
        if self.url is not None:
            return self.url
        host = self.embedded.host
        host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
        return f"mqtt://{host}:{self.embedded.port}"

    @property
    def host(self) -> str:
        host = urlsplit(self.connect_url).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        return _mqtt_port(self.connect_url)

    @property
    def tls(self) -> bool:
        return urlsplit(self.connect_url).scheme == "mqtts"

    @property
    def resolved_password_file(self) -> Path | None:
        if self.password_file is None and self.mode == "embedded" and self.password is None:
            return self.embedded.directory / "controller-password"
        return self.password_file

    def resolved_password(self) -> str | None:
        """Raises OSError when the password file cannot be read."""
        path = self.resolved_password_file
        if path is not None:
            return path.read_text(encoding="utf-8").strip()
        return self.password

    def unit_broker_url(self) -> str:
        """The URL written into a unit's config."""
        if self.unit_url is not None:
            return self.unit_url
        if self.mode == "embedded" and self.embedded.tls_port is not None:
            return f"mqtts://{self.host}:{self.embedded.tls_port}"
        return self.connect_url


class StorageConfig(_Section):
    backend: Literal["local", "s3"] = "local"
    local_dir: Path = DEFAULT_DATA_DIR / "objects"
    endpoint_url: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    bucket: Annotated[str, Field(pattern=_BUCKET_PATTERN)] | None = None
    prefix: str = "classcap"
    access_key: str | None = None
    secret_key: str | None = None
    secret_key_file: Path | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    grant_expires_s: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    download_expires_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, {"http", "https"})

    @model_validator(mode="after")
    def _s3_complete(self) -> StorageConfig:
        if self.secret_key is not None and self.secret_key_file is not None:
            raise ValueError("set either secret_key or secret_key_file, not both")
        if self.backend == "s3" and self.bucket is None:
            raise ValueError("the s3 backend needs bucket")
        return self

    def s3_settings(self) -> S3Settings:
        """Raises OSError when ``secret_key_file`` cannot be read."""
        from controller.storage.s3 import S3Settings

        if self.bucket is None:
            raise ValueError("storage.bucket is not set")
        secret = self.secret_key
        if self.secret_key_file is not None:
            secret = self.secret_key_file.read_text(encoding="utf-8").strip()
        return S3Settings(
            endpoint_url=self.endpoint_url,
            region=self.region,
            bucket=self.bucket,
            prefix=self.prefix,
            access_key=self.access_key,
            secret_key=secret,
            sse=self.sse,
        )


class AlertsConfig(_Section):
    offline_after_s: float = Field(default=300, gt=0)
    disk_free_min_mb: int = Field(default=2048, ge=0)
    temp_max_c: float = 80
    backlog_max_segments: int = Field(default=30, ge=1)
    mic_silent_dbfs: float = -60
    # How often offline units and expired commands are looked for.
    sweep_interval_s: float = Field(default=10, gt=0, le=3600)


class ScheduleConfig(_Section):
    # Days ahead each unit holds (plus yesterday and today), so it records through an outage.
    horizon_days: int = Field(default=14, ge=14, le=60)
    refresh_interval_s: float = Field(default=300, gt=0, le=86400)
    check_interval_s: float = Field(default=15, gt=0, le=3600)
    missed_grace_s: float = Field(default=120, ge=0, le=3600)
    at_risk_before_s: float = Field(default=1800, ge=0, le=86400)


class AuthConfig(_Section):
    session_lifetime_s: int = Field(default=8 * 3600, ge=60, le=30 * 24 * 3600)


# Where each key lives under data_dir when the file does not set it.
_UNDER_DATA_DIR: tuple[tuple[tuple[str, ...], str], ...] = (
    (("server", "secret_key_file"), "secret_key"),
    (("broker", "embedded", "directory"), "broker"),
    (("storage", "local_dir"), "objects"),
)


class ControllerConfig(_Section):
    data_dir: Path = DEFAULT_DATA_DIR
    server: ServerConfig = Field(default_factory=ServerConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_data_dir(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        raw = data.get("data_dir", DEFAULT_DATA_DIR)
        if not isinstance(raw, str | Path):
            return data  # field validation names it
        base = Path(raw)
        data = dict(data)
        for path, name in _UNDER_DATA_DIR:
            _set_default(data, path, str(base / name))
        _set_default(data, ("database", "url"), f"sqlite:///{base / 'controller.sqlite3'}")
        return data

    @property
    def broker_password_file(self) -> Path:
        """The embedded broker's password file."""
        return self.broker.embedded.directory / "passwords"


def _set_default(data: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    """Sets ``data[path]`` unless present; leaves sections of a wrong type to validation."""
    node = data
    for key in path[:-1]:
        child = node.get(key, {})
        if not isinstance(child, dict):
            return
        child = dict(child)
        node[key] = child
        node = child
    node.setdefault(path[-1], value)


def load_controller_config(path: Path) -> ControllerConfig:
    """Raises ``shared.configfile.ConfigError`` naming each bad key."""
    return load_toml_config(ControllerConfig, path)


def load_or_create_secret(path: Path) -> bytes:
    """The secret in ``path``, made (random, owner-only) if the file does not exist yet."""
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(_SECRET_BYTES).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_or_create_secret(path)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret + b"\n")
        return secret
    if len(secret) < 16:
        raise ValueError(f"{path}: secret key is shorter than 16 bytes")
    return secret
