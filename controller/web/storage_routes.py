"""The embedded store's HTTP face: units PUT segments to signed URLs, people GET downloads.

There is no session or token here: the URL's signature (bound to key, size, sha256
and expiry) is the authorisation, checked by LocalStorage. Errors are S3-style XML
documents, because that is what a unit's uploader reads the reason from.
"""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import Iterator, Mapping
from typing import BinaryIO, cast
from xml.sax.saxutils import escape

from flask import Blueprint, Response, request, send_file
from werkzeug.datastructures import Headers
from werkzeug.exceptions import ClientDisconnected

from controller.storage.base import StorageAccessError, StorageError
from controller.storage.local import LocalStorage
from controller.web.auth import PUBLIC, csrf_exempt, requires
from controller.web.services import services

log = logging.getLogger(__name__)

_CODE_PREFIX = re.compile(r"^([A-Z][A-Za-z]+):\s*(.*)$", re.DOTALL)
_DEFAULT_CODE = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    411: "MissingContentLength",
    413: "EntityTooLarge",
    500: "InternalError",
    503: "ServiceUnavailable",
}

bp = Blueprint("storage", __name__, url_prefix="/storage/objects")


class _Headers(Mapping[str, str]):
    """The request's headers as a Mapping that, like HTTP, ignores the case of names."""

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        return self._headers[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._headers.items())

    def __len__(self) -> int:
        return len(self._headers)


def _local() -> LocalStorage:
    storage = services().storage
    assert isinstance(storage, LocalStorage)  # routes are registered only for local storage
    return storage


def s3_error(status: int, reason: str) -> Response:
    """An S3 error document: ``reason`` may start with its code, as in ``"BadDigest: ..."``."""
    matched = _CODE_PREFIX.match(reason)
    code, message = (
        (matched.group(1), matched.group(2))
        if matched
        else (_DEFAULT_CODE.get(status, "Error"), reason)
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(request.path)}</Resource></Error>"
    )
    return Response(body, status=status, mimetype="application/xml")


@bp.put("/<path:key>")
@requires(PUBLIC)
@csrf_exempt
def put_object(key: str) -> Response:
    # request.stream hands the body over as it arrives; the store hashes it on the way to disk.
    try:
        status, reason = _local().receive_upload(
            key, request.args.to_dict(), _Headers(request.headers), cast(BinaryIO, request.stream)
        )
    except ClientDisconnected:
        log.warning("upload cut short by the client key=%s", key)
        return s3_error(400, "IncompleteBody: the connection closed before the whole body came")
    # LocalStorage has logged the outcome.
    return Response(status=status) if 200 <= status < 300 else s3_error(status, reason)


@bp.get("/<path:key>")
@requires(PUBLIC)
def get_object(key: str) -> Response:
    try:
        path = _local().open_download(key, request.args.to_dict())
    except StorageAccessError as exc:
        return s3_error(exc.status, exc.reason)
    except ValueError as exc:
        return s3_error(400, f"InvalidArgument: {exc}")
    except StorageError as exc:
        log.error("download failed key=%s error=%s", key, exc)
        return s3_error(500, f"InternalError: {exc}")
    mimetype = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return send_file(
        path, mimetype=mimetype, conditional=True, download_name=key.rsplit("/", 1)[-1]
    )
