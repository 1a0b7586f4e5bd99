"""District storage in a local directory, served by the controller itself (the embedded default).

It keeps the S3 grant contract: a PUT URL is signed (HMAC-SHA256 with the
controller's secret) over the key, the expiry, the size and the SHA-256, and
the upload must carry exactly the ``content-length`` and
``x-amz-checksum-sha256`` headers the grant lists. The body is streamed to a
temporary file while it is hashed and only renamed into place when its size
and digest match, so a refused upload leaves nothing behind.

Reasons are ``"Code: message"`` with S3's error codes, so a unit reads a
refusal from us the way it reads one from S3. ``make_storage`` picks this store
or an S3 bucket from the configuration.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote, urlencode

from controller.storage.base import (
    PresignedPut,
    Storage,
    StorageAccessError,
    StorageError,
    StoredObject,
    Verification,
)
from controller.storage.s3 import S3Storage
from shared.clock import from_timestamp, utcnow

if TYPE_CHECKING:
    from controller.config import StorageConfig

log = logging.getLogger(__name__)

_BLOCK = 1024 * 1024
_MAX_KEY_CHARS = 512
_MAX_EXPIRES_S = 7 * 24 * 3600
_ROUTE = "/storage/objects/"


class LocalStorage:
    def __init__(
        self,
        root: Path,
        base_url: str,
        secret: bytes,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the storage signing secret must be at least 16 bytes")
        self.root = root
        self._base_url = base_url.rstrip("/")
        self._secret = secret
        self._clock = clock
        root.mkdir(parents=True, exist_ok=True)

    # --- keys -----------------------------------------------------------------------------

    def key_for(self, device_id: str, recording_id: str, filename: str) -> str:
        for part in (device_id, recording_id, filename):
            if "/" in part:
                raise ValueError(f"{part!r} cannot be one part of a key")
        key = "/".join((device_id, recording_id, filename))
        self._path(key)
        return key

    def _path(self, key: str) -> Path:
        """The file of ``key``; a key that could leave the root or hit a temp file is refused."""
        if not key or len(key) > _MAX_KEY_CHARS:
            raise ValueError(f"key of {len(key)} characters is not 1..{_MAX_KEY_CHARS}")
        for part in key.split("/"):
            if not part or part.startswith(".") or "\\" in part or "\0" in part:
                raise ValueError(f"key {key!r} has an empty, hidden or unsafe part {part!r}")
        return self.root.joinpath(*key.split("/"))

    # --- signing --------------------------------------------------------------------------

    def _sign(self, *fields: str) -> str:
        message = "\n".join(fields).encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _expiry(self, expires_s: int) -> int:
        if not 0 < expires_s <= _MAX_EXPIRES_S:
            raise ValueError(f"expires_s must be in 1..{_MAX_EXPIRES_S}, got {expires_s}")
        return int(self._clock().timestamp()) + expires_s

    def _url(self, key: str, params: dict[str, str]) -> str:
        return f"{self._base_url}{_ROUTE}{quote(key, safe='/')}?{urlencode(params)}"

    def presign_put(self, key: str, size: int, sha256_hex: str, expires_s: int) -> PresignedPut:
        self._path(key)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        digest = _sha256_bytes(sha256_hex)
        expires = self._expiry(expires_s)
        sig = self._sign("PUT", key, str(expires), str(size), sha256_hex.lower())
        params = {
            "expires": str(expires),
            "size": str(size),
            "sha256": sha256_hex.lower(),
            "sig": sig,
        }
        headers = {
            "content-length": str(size),
            "x-amz-checksum-sha256": base64.b64encode(digest).decode("ascii"),
        }
        return PresignedPut(
            url=self._url(key, params), headers=headers, expires_at=from_timestamp(expires)
        )

    def presign_get(self, key: str, expires_s: int) -> str:
        self._path(key)
        expires = self._expiry(expires_s)
        return self._url(
            key, {"expires": str(expires), "sig": self._sign("GET", key, str(expires))}
        )

    def _check_expiry(self, expires: int) -> None:
        if self._clock() >= from_timestamp(expires):
            raise StorageAccessError(403, "AccessDenied: Request has expired")

    # --- serving --------------------------------------------------------------------------

    def receive_upload(
        self,
        key: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: BinaryIO,
    ) -> tuple[int, str]:
        """Stores one granted PUT; answers ``(HTTP status, "Code: message")``."""
        try:
            path = self._path(key)
            size, sha256_hex = self._check_put(key, query, headers)
        except StorageAccessError as exc:
            log.warning("upload refused key=%s status=%d reason=%s", key, exc.status, exc.reason)
            return exc.status, exc.reason
        except ValueError as exc:
            return 400, f"InvalidArgument: {exc}"
        try:
            status, reason = self._store(path, body, size, sha256_hex)
        except OSError as exc:
            log.error("upload failed key=%s error=%s", key, exc)
            return 500, f"InternalError: cannot write the object: {exc.strerror or exc}"
        if status == 200:
            log.info("object stored key=%s size=%d", key, size)
        else:
            log.warning("upload refused key=%s status=%d reason=%s", key, status, reason)
        return status, reason

    def _check_put(
        self, key: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[int, str]:
        try:
            expires = int(query["expires"])
            size = int(query["size"])
            sha256_hex = query["sha256"]
            sig = query["sig"]
        except (KeyError, ValueError):
            raise StorageAccessError(
                403, "AccessDenied: missing or malformed signature parameters"
            ) from None
        expected = self._sign("PUT", key, str(expires), str(size), sha256_hex)
        if not hmac.compare_digest(sig, expected):
            raise StorageAccessError(403, "SignatureDoesNotMatch: the signature does not match")
        self._check_expiry(expires)
        lowered = {name.lower(): value.strip() for name, value in headers.items()}
        if lowered.get("content-length") != str(size):
            raise StorageAccessError(
                403,
                f"SignatureDoesNotMatch: Content-Length {lowered.get('content-length')!r} "
                f"is not the signed {size}",
            )
        checksum = base64.b64encode(_sha256_bytes(sha256_hex)).decode("ascii")
        if lowered.get("x-amz-checksum-sha256") != checksum:
            raise StorageAccessError(
                403, "SignatureDoesNotMatch: x-amz-checksum-sha256 is missing or not the signed one"
            )
        return size, sha256_hex

    def _store(self, path: Path, body: BinaryIO, size: int, sha256_hex: str) -> tuple[int, str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        digest = hashlib.sha256()
        received = 0
        try:
            with temp.open("wb") as out:
                while received < size:
                    block = body.read(min(_BLOCK, size - received))
                    if not block:
                        break
                    digest.update(block)
                    out.write(block)
                    received += len(block)
                out.flush()
                os.fsync(out.fileno())
            if received != size:
                return 400, f"IncompleteBody: received {received} of {size} bytes"
            if digest.hexdigest() != sha256_hex:
                return 400, "BadDigest: the body's sha256 differs from the signed one"
            os.replace(temp, path)
            _fsync_dir(path.parent)
            return 200, "OK"
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def open_download(self, key: str, query: Mapping[str, str]) -> Path:
        """The file a signed GET URL names; StorageAccessError 403 or 404 otherwise."""
        try:
            path = self._path(key)
            expires = int(query["expires"])
            sig = query["sig"]
        except (KeyError, ValueError):
            raise StorageAccessError(
                403, "AccessDenied: missing or malformed signature parameters"
            ) from None
        if not hmac.compare_digest(sig, self._sign("GET", key, str(expires))):
            raise StorageAccessError(403, "SignatureDoesNotMatch: the signature does not match")
        self._check_expiry(expires)
        if not path.is_file():
            raise StorageAccessError(404, "NoSuchKey: the object does not exist")
        return path

    # --- verification and small objects ----------------------------------------------------

    def verify(self, key: str, size: int, sha256_hex: str) -> Verification:
        path = self._path(key)
        digest = hashlib.sha256()
        stored = 0
        try:
            with path.open("rb") as source:
                stored_size = os.fstat(source.fileno()).st_size
                if stored_size != size:
                    return Verification(
                        False, stored_size, None, f"size {stored_size} differs from expected {size}"
                    )
                while block := source.read(_BLOCK):
                    digest.update(block)
                    stored += len(block)
        except FileNotFoundError:
            return Verification(False, None, None, "object not found")
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from exc
        found = digest.hexdigest()
        if stored != size:
            return Verification(False, stored, found, f"read {stored} bytes, expected {size}")
        if found != sha256_hex.lower():
            return Verification(
                False, stored, found, f"sha256 {found} differs from expected {sha256_hex}"
            )
        return Verification(True, stored, found, None)

    # --- listing --------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``; uploads still in progress are not."""
        folder = prefix.rpartition("/")[0]
        top = self._path(folder) if folder else self.root

        def failed(exc: OSError) -> None:
            if isinstance(exc, FileNotFoundError):
                return  # nothing stored under this prefix (or removed while listing)
            raise StorageError(f"cannot list {prefix!r}: {exc.strerror or exc}") from exc

        for directory, subdirs, files in os.walk(top, onerror=failed):
            # Hidden names are temporary files (``_path`` refuses them as keys).
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(directory, name)
                key = path.relative_to(self.root).as_posix()
                if name.startswith(".") or not key.startswith(prefix):
                    continue
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue  # removed while listing
                yield StoredObject(key, size)

    def sha256_of(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            with self._path(key).open("rb") as source:
                while block := source.read(_BLOCK):
                    digest.update(block)
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {key}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        log.debug("object written key=%s size=%d type=%s", key, len(data), content_type)


def _sha256_bytes(sha256_hex: str) -> bytes:
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        raise ValueError(f"sha256 {sha256_hex!r} is not hex") from None
    if len(raw) != 32:
        raise ValueError(f"sha256 {sha256_hex!r} is not 32 bytes")
    return raw


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_storage(config: StorageConfig, base_url: str, secret: bytes) -> Storage:
    """The configured store: this directory served at ``base_url``, or an S3 bucket.

    Raises OSError when the S3 secret key file cannot be read.
    """
    if config.backend == "local":
        return LocalStorage(config.local_dir, base_url, secret)
    return S3Storage(config.s3_settings())
