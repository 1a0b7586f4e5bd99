"""The simulator's view of the controller: its REST API with an admin token, and /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

_TIMEOUT_S = 30.0
_PER_PAGE = 200


class ApiError(Exception):
    """The controller answered with an error status, or could not be reached."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status


class ControllerApi:
    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        """``/api/v1<path>``; the decoded JSON answer, ApiError on any failure."""
        url = f"{self.base_url}/api/v1{path}"
        if query:
            url += "?" + urlencode({k: _query_value(v) for k, v in query.items()})
        data = json.dumps(body, default=str).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - the controller's own loopback URL
            url,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")[:2000]) from None
        except (OSError, ValueError) as exc:
            raise ApiError(None, str(exc)) from None

    def pages(self, path: str, query: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every item of a paginated listing."""
        items: list[dict[str, Any]] = []
        page = 1
        while True:
            found = self.call(
                "GET", path, query={**(query or {}), "page": page, "per_page": _PER_PAGE}
            )
            items += found["items"]
            if page * found["per_page"] >= found["total"]:
                return items
            page += 1

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert, open or cleared."""
        return self.pages("/alerts", {"open_only": False})

    def online(self) -> set[str]:
        return {d["id"] for d in self.pages("/devices") if d["online"]}

    def device(self, device_id: str) -> dict[str, Any]:
        """One unit as the controller sees it, its latest health included."""
        found: dict[str, Any] = self.call("GET", f"/devices/{quote(device_id)}")
        return found

    def metrics(self) -> dict[str, float]:
        """/metrics samples without labels, by name."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - the controller's own loopback URL
                f"{self.base_url}/metrics", timeout=_TIMEOUT_S
            ) as response:
                text = response.read().decode()
        except OSError as exc:
            raise ApiError(None, str(exc)) from None
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or "{" in line or " " not in line:
                continue
            name, _, value = line.partition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
        return values


def parse_time(value: str) -> datetime:
    """A timestamp from the API; one without a zone is UTC (as the controller stores it)."""
    stamp = datetime.fromisoformat(value)
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
