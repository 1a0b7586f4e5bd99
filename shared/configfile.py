"""Loading a TOML config file into a pydantic model, with errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and each bad key."""


def load_toml_config(model: type[C], path: Path) -> C:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key")
            elif err["type"] == "missing":
                lines.append(f"  {key}: required key is missing")
            else:
                given = err.get("input")
                shown = f" (got {given!r})" if not isinstance(given, dict | list) else ""
                lines.append(f"  {key}: {err['msg']}{shown}")
        raise ConfigError(f"{path}: invalid config:\n" + "\n".join(lines)) from None
