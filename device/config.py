"""The unit's configuration: one TOML file, ``/etc/classcap/agent.toml`` by default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.configfile import load_toml_config
from shared.topics import DEVICE_ID_PATTERN

DEFAULT_CONFIG_PATH = Path("/etc/classcap/agent.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(_Section):
    url: str = Field(description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=600)
    will_delay_s: int = Field(default=10, ge=0, le=600)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname:
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_password(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set either password or password_file, not both")
        return self

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return self.password


class CaptureConfig(_Section):
    backend: Literal["picamera2", "synthetic"] = "picamera2"
    width: int = Field(default=1280, ge=160, le=3840)
    height: int = Field(default=720, ge=120, le=2160)
    framerate: int = Field(default=30, ge=1, le=60)
    bitrate_kbps: int = Field(default=3000, ge=100, le=50_000)
    segment_seconds: int = Field(default=60, ge=2, le=3600)
    audio: bool = True
    audio_device: str = Field(default="default", description="ALSA/Pulse device for picamera2")
    audio_bitrate_kbps: int = Field(default=96, ge=16, le=320)
    # Above this many seconds without a new frame the camera counts as stalled.
    stall_timeout_s: float = Field(default=10.0, gt=0)


class GpioConfig(_Section):
    button_pin: int = Field(default=17, ge=0, le=27)
    light_pin: int = Field(default=27, ge=0, le=27)
    mock: bool = Field(default=False, description="gpiozero MockFactory pins (simulated unit)")
    long_press_s: float = Field(default=2.0, gt=0, le=10)
    double_press_s: float = Field(default=0.5, gt=0, le=2)

    @model_validator(mode="after")
    def _distinct(self) -> GpioConfig:
        if self.button_pin == self.light_pin:
            raise ValueError("button_pin and light_pin must differ")
        return self


class SpoolConfig(_Section):
    # Below this much free space the unit refuses new recordings (and stops one
    # in progress) instead of ever deleting video that storage has not confirmed.
    min_free_mb: int = Field(default=1024, ge=0)


class UploadConfig(_Section):
    concurrency: int = Field(default=2, ge=1, le=8)
    bandwidth_kbps: int = Field(default=0, ge=0, description="0 means no cap")
    retry_initial_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    request_timeout_s: float = Field(default=60.0, gt=0)
    grant_timeout_s: float = Field(default=30.0, gt=0)
    # After a lesson ends, uploads start at a random moment within this many
    # seconds so a school's units do not all upload in the same second.
    spread_s: float = Field(default=60.0, ge=0)


class HealthConfig(_Section):
    interval_s: float = Field(default=30.0, ge=1, le=3600)


class SystemConfig(_Section):
    reboot_command: list[str] = Field(default_factory=lambda: ["systemctl", "reboot"])
    control_socket: Path = Path("/run/classcap/agent.sock")
    simulated_clock: bool = Field(
        default=False,
        description="simulated unit: the control socket may set the wall clock off, "
        "to rehearse a clock that jumps",
    )


class AgentConfig(_Section):
    device_id: Annotated[str, Field(pattern=f"^{DEVICE_ID_PATTERN}$")]
    data_dir: Path = Path("/var/lib/classcap")
    broker: BrokerConfig
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    gpio: GpioConfig = Field(default_factory=GpioConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite3"


def load_agent_config(path: Path) -> AgentConfig:
    """Raises ``shared.configfile.ConfigError`` naming each bad key."""
    return load_toml_config(AgentConfig, path)
