"""The controller's config: defaults under data_dir, every bad key named, non-zero exits."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from controller.broker import CONTROLLER_USER, acl_text
from controller.config import (
    ControllerConfig,
    load_controller_config,
    load_or_create_secret,
)
from shared.cli import main
from shared.configfile import ConfigError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = 'data_dir = "/srv/cc"\n'
S3 = """
data_dir = "/srv/cc"
[storage]
backend = "s3"
endpoint_url = "https://s3.district.example"
region = "eu-west-1"
bucket = "district-recordings"
prefix = "lessons"
access_key = "AKIA1"
sse = "aws:kms"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text)
    return path


def test_minimal_config_puts_everything_under_data_dir(tmp_path: Path) -> None:
    config = load_controller_config(_write(tmp_path, MINIMAL))
    assert config.database.url == "sqlite:////srv/cc/controller.sqlite3"
    assert config.server.secret_key_file == Path("/srv/cc/secret_key")
    assert config.broker.embedded.directory == Path("/srv/cc/broker")
    assert config.storage.local_dir == Path("/srv/cc/objects")
    assert config.broker.mode == "embedded"
    assert config.broker.connect_url == "mqtt://127.0.0.1:1883"
    assert config.broker.username == CONTROLLER_USER
    assert config.broker.resolved_password_file == Path("/srv/cc/broker/controller-password")
    assert config.broker_password_file == Path("/srv/cc/broker/passwords")
    assert config.storage.backend == "local"
    assert config.server.base_url() == "http://127.0.0.1:8080"
    assert config.server.base_url(port=4321) == "http://127.0.0.1:4321"


def test_explicit_paths_win_over_data_dir(tmp_path: Path) -> None:
    text = MINIMAL + '[database]\nurl = "postgresql+psycopg://cc@db.example/cc"\n'
    text += '[storage]\nlocal_dir = "/mnt/video"\n[broker.embedded]\ndirectory = "/etc/cc-broker"\n'
    config = load_controller_config(_write(tmp_path, text))
    assert config.database.url == "postgresql+psycopg://cc@db.example/cc"
    assert config.storage.local_dir == Path("/mnt/video")
    assert config.broker.embedded.directory == Path("/etc/cc-broker")


def test_s3_settings_come_from_the_storage_section(tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text("s3cr3t\n")
    path = _write(tmp_path, S3 + f'secret_key_file = "{secret}"\n')
    settings = load_controller_config(path).storage.s3_settings()
    assert settings.endpoint_url == "https://s3.district.example"
    assert settings.region == "eu-west-1"
    assert settings.bucket == "district-recordings"
    assert settings.prefix == "lessons"
    assert settings.access_key == "AKIA1"
    assert settings.secret_key == "s3cr3t"
    assert settings.sse == "aws:kms"


def test_unit_broker_url_follows_the_broker_set_up() -> None:
    plain = ControllerConfig.model_validate({"broker": {"embedded": {"port": 1999}}})
    assert plain.broker.unit_broker_url() == "mqtt://127.0.0.1:1999"
    tls = ControllerConfig.model_validate(
        {
            "broker": {
                "embedded": {
                    "host": "0.0.0.0",
                    "tls_port": 8883,
                    "certfile": "/etc/cc/cert.pem",
                    "keyfile": "/etc/cc/key.pem",
                },
                "unit_url": "mqtts://controller.district.example:8883",
            }
        }
    )
    assert tls.broker.connect_url == "mqtt://127.0.0.1:1883"
    assert tls.broker.unit_broker_url() == "mqtts://controller.district.example:8883"
    external = ControllerConfig.model_validate(
        {"broker": {"mode": "external", "url": "mqtts://mq.example:8883", "password": "x"}}
    )
    assert external.broker.tls and external.broker.port == 8883
    assert external.broker.unit_broker_url() == "mqtts://mq.example:8883"
    assert external.broker.resolved_password() == "x"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (MINIMAL + "colour = 1\n", "colour: unknown key"),
        (MINIMAL + "[server]\nport = 70000\n", "server.port"),
        (MINIMAL + '[server]\npublic_url = "ftp://x"\n', "server.public_url"),
        (MINIMAL + "[server]\nthreads = 0\n", "server.threads"),
        (MINIMAL + '[database]\nurl = "mysql://x/y"\n', "database.url"),
        (MINIMAL + '[broker]\nmode = "cloud"\n', "broker.mode"),
        (MINIMAL + '[broker]\nmode = "external"\n', "an external broker needs url"),
        (MINIMAL + '[broker]\nurl = "mqtt://x:1883"\n', "url is for an external broker"),
        (MINIMAL + '[broker]\nmode = "external"\nurl = "http://x"\n', "broker.url"),
        (MINIMAL + '[broker]\npassword = "a"\npassword_file = "/b"\n', "not both"),
        (MINIMAL + '[broker]\nusername = "me"\n', CONTROLLER_USER),
        (MINIMAL + "[broker.embedded]\ntls_port = 8883\n", "tls_port needs certfile and keyfile"),
        (MINIMAL + "[broker.embedded]\nprot = 1\n", "broker.embedded.prot: unknown key"),
        (MINIMAL + "[broker]\nworkers = 0\n", "broker.workers"),
        (MINIMAL + '[storage]\nbackend = "s3"\n', "the s3 backend needs bucket"),
        (S3.replace("district-recordings", "Bad_Bucket"), "storage.bucket"),
        (S3.replace('"aws:kms"', '"rot13"'), "storage.sse"),
        (MINIMAL + "[storage]\ngrant_expires_s = 0\n", "storage.grant_expires_s"),
        (MINIMAL + '[storage]\nendpoint_url = "s3.example"\n', "storage.endpoint_url"),
        (MINIMAL + '[alerts]\noffline_after_s = "soon"\n', "alerts.offline_after_s"),
        (MINIMAL + "[auth]\nsession_lifetime_s = 1\n", "auth.session_lifetime_s"),
        (MINIMAL + "[storage\n", "not valid TOML"),
        ("data_dir = 5\n", "data_dir"),
        ('server = "x"\n', "server"),
    ],
)
def test_bad_config_names_the_key_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_controller_config(path)
    assert named in str(error.value)
    assert main(["controller", "check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and str(path) in err


def test_every_command_refuses_a_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, MINIMAL + "[server]\nport = -1\n")
    for argv in (
        ["run"],
        ["migrate"],
        ["device", "add", "room-1", "--school", "s", "--room", "r"],
        ["device", "list"],
        ["token", "create", "--name", "n", "--role", "admin"],
        ["user", "add", "alice", "--role", "viewer"],
    ):
        assert main(["controller", *argv, "--config", str(path)]) == 2, argv
        assert "server.port" in capsys.readouterr().err
    assert not (tmp_path / "srv").exists()


def test_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["controller", "run", "--config", str(missing)]) == 2
    assert f"{missing}: config file not found" in capsys.readouterr().err


def test_cli_entry_point_in_a_real_process(tmp_path: Path) -> None:
    good = _write(tmp_path, MINIMAL)
    ok = subprocess.run(
        [sys.executable, "-m", "shared.cli", "controller", "check-config", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "broker embedded, storage local" in ok.stdout
    good.write_text(MINIMAL + "[storage]\nbucket = 1\n")
    bad = subprocess.run(
        [sys.executable, "-m", "shared.cli", "controller", "run", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "storage.bucket" in bad.stderr


def test_secret_is_created_once_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secret_key"
    first = load_or_create_secret(path)
    assert len(first) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        load_or_create_secret(path)


def test_controller_unit_file_runs_the_controller_under_systemd_supervision() -> None:
    text = (REPO / "systemd" / "classcap-controller.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["Restart"] == "always"
    assert settings["ExecStart"] == (
        "/opt/classcap/venv/bin/classcap controller run --config /etc/classcap/controller.toml"
    )
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["StateDirectory"] == "classcap-controller"


def _doc_block(text: str, after: str, language: str) -> str:
    start = text.index(f"```{language}\n", text.index(after)) + len(language) + 4
    return text[start : text.index("```", start)]


def test_documented_config_is_valid_and_documented_acl_is_the_generated_one(
    tmp_path: Path,
) -> None:
    doc = (REPO / "docs" / "controller.md").read_text()
    path = _write(tmp_path, _doc_block(doc, "## The config file", "toml"))
    config = load_controller_config(path)
    assert config == ControllerConfig.model_validate(
        {"server": {"public_url": "https://classcap.district.example"}}
    )
    assert _doc_block(doc, "### The ACL", "text") == acl_text()
