"""District storage on any S3-compatible store: upload grants and their verification.

A grant is a presigned PUT bound to the segment's size and SHA-256: the store
itself refuses a body that differs (BadDigest) and a request whose signed
headers were changed or left out, so the unit needs no storage credentials.
Verification reads the checksum the store kept (``ChecksumMode=ENABLED``) and,
where a store keeps none, reads the object back and hashes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.clock import utcnow

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.literals import BucketLocationConstraintType

log = logging.getLogger(__name__)

_READ_BLOCK = 1024 * 1024
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
_NO_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
# SigV4 presigned URLs are valid for at most seven days.
_MAX_EXPIRES_S = 7 * 24 * 3600


class StorageError(Exception):
    """The store could not be asked (unreachable, refused, misconfigured): not an answer."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str
    bucket: str
    prefix: str
    access_key: str | None
    secret_key: str | None
    sse: str | None = None  # "AES256" or "aws:kms"


@dataclass(frozen=True)
class PresignedPut:
    url: str
    headers: dict[str, str]  # exactly the headers the PUT must carry: they are signed
    expires_at: datetime


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


@dataclass(frozen=True)
class Verification:
    ok: bool
    size: int | None
    sha256: str | None
    reason: str | None


def sha256_hex_to_base64(sha256_hex: str) -> str:
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        raise ValueError(f"sha256 {sha256_hex!r} is not hex") from None
    if len(raw) != 32:
        raise ValueError(f"sha256 {sha256_hex!r} is not 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def _base64_to_sha256_hex(value: str) -> str | None:
    """The hex digest of a full-object ChecksumSHA256, None for a composite (multipart) one."""
    if "-" in value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code", "")) or str(
        exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


class S3Storage:
    def __init__(self, settings: S3Settings) -> None:
        if settings.sse not in (None, "AES256", "aws:kms"):
            raise ValueError(f"sse must be 'AES256' or 'aws:kms', got {settings.sse!r}")
        self._settings = settings
        self._prefix = settings.prefix.strip("/")
        # Custom endpoints (SeaweedFS, MinIO, Ceph) rarely serve virtual-host buckets.
        addressing: Literal["path", "virtual"] = "path" if settings.endpoint_url else "virtual"
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            region_name=settings.region,
        )
        self._client: S3Client = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": addressing},
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=5,
                # The controller only sends small requests (HEAD, manifests, listings) and
                # streams reads; 20 s without a byte is a stalled store, and the unit asks again.
                read_timeout=20,
            ),
        )

    @property
    def bucket(self) -> str:
        return self._settings.bucket

    def key_for(self, device_id: str, recording_id: str, filename: str) -> str:
        for part, value in (("device_id", device_id), ("recording_id", recording_id)):
            if not value or "/" in value or value in {".", ".."}:
                raise ValueError(f"{part} {value!r} cannot be a key segment")
        if not filename or "/" in filename:
            raise ValueError(f"filename {filename!r} cannot be a key segment")
        parts = [self._prefix] if self._prefix else []
        return "/".join([*parts, device_id, recording_id, filename])

    # --- grants -------------------------------------------------------------------------

    def presign_put(self, key: str, size: int, sha256_hex: str, expires_s: int) -> PresignedPut:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not 0 < expires_s <= _MAX_EXPIRES_S:
            raise ValueError(f"expires_s must be in 1..{_MAX_EXPIRES_S}, got {expires_s}")
        checksum = sha256_hex_to_base64(sha256_hex)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "ContentLength": size,
            "ChecksumSHA256": checksum,
        }
        known = {"content-length": str(size), "x-amz-checksum-sha256": checksum}
        if self._settings.sse is not None:
            params["ServerSideEncryption"] = self._settings.sse
            known["x-amz-server-side-encryption"] = self._settings.sse
        issued = utcnow()
        try:
            url = self._client.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=expires_s, HttpMethod="PUT"
            )
        except BotoCoreError as exc:
            raise StorageError(f"cannot presign PUT for {key}: {exc}") from exc
        headers = self._signed_headers(url, known)
        log.debug("put presigned key=%s size=%d expires_s=%d", key, size, expires_s)
        return PresignedPut(
            url=url, headers=headers, expires_at=issued + timedelta(seconds=expires_s)
        )

    @staticmethod
    def _signed_headers(url: str, known: dict[str, str]) -> dict[str, str]:
        """The headers the URL's signature covers, each with the value we signed.

        Derived from ``X-Amz-SignedHeaders`` so a grant can never omit one the
        store will check; a signed header we cannot fill is a bug, not a guess.
        """
        query = parse_qs(urlsplit(url).query)
        signed = query.get("X-Amz-SignedHeaders", [""])[0].split(";")
        headers: dict[str, str] = {}
        for name in signed:
            if name in ("", "host"):
                continue
            if name not in known:
                raise StorageError(f"presigned URL signs header {name!r} the grant cannot carry")
            headers[name] = known[name]
        missing = set(known) - set(headers)
        if missing:
            raise StorageError(f"presigned URL does not sign {sorted(missing)}")
        return headers

    def presign_get(self, key: str, expires_s: int) -> str:
        if not 0 < expires_s <= _MAX_EXPIRES_S:
            raise ValueError(f"expires_s must be in 1..{_MAX_EXPIRES_S}, got {expires_s}")
        try:
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        except BotoCoreError as exc:
            raise StorageError(f"cannot presign GET for {key}: {exc}") from exc

    # --- verification ---------------------------------------------------------------------

    def verify(self, key: str, size: int, sha256_hex: str) -> Verification:
        """Whether ``key`` holds exactly ``size`` bytes hashing to ``sha256_hex``.

        A missing object or a mismatch is an answer (``ok=False`` with a reason);
        a store that cannot be asked raises StorageError.
        """
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND:
                return Verification(False, None, None, "object not found")
            raise StorageError(f"cannot read {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc
        stored_size = int(head["ContentLength"])
        if stored_size != size:
            return Verification(
                False, stored_size, None, f"size {stored_size} differs from expected {size}"
            )
        stored = head.get("ChecksumSHA256")
        digest = _base64_to_sha256_hex(stored) if stored else None
        if digest is None:
            log.info("no stored sha256, reading back key=%s size=%d", key, stored_size)
            stored_size, digest = self._hash_object(key)
            if stored_size != size:
                return Verification(
                    False, stored_size, digest, f"read {stored_size} bytes, expected {size}"
                )
        if digest != sha256_hex.lower():
            return Verification(
                False, stored_size, digest, f"sha256 {digest} differs from expected {sha256_hex}"
            )
        return Verification(True, stored_size, digest, None)

    def _hash_object(self, key: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                for block in body.iter_chunks(_READ_BLOCK):
                    digest.update(block)
                    size += len(block)
            finally:
                body.close()
        except ClientError as exc:
            raise StorageError(f"cannot read back {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot read back {key}: {exc}") from exc
        return size, digest.hexdigest()

    # --- listing ---------------------------------------------------------------------------

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in key order."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"], int(item["Size"]))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {prefix!r}: {exc}") from exc

    def sha256_of(self, key: str) -> str:
        """The SHA-256 of the object's body, read back in blocks (never the stored checksum)."""
        return self._hash_object(key)[1]

    # --- small objects and set-up ---------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "ContentType": content_type,
            "ChecksumSHA256": base64.b64encode(hashlib.sha256(data).digest()).decode("ascii"),
        }
        if self._settings.sse is not None:
            params["ServerSideEncryption"] = self._settings.sse
        try:
            self._client.put_object(**params)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot write {key}: {exc}") from exc

    def ensure_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in _NO_BUCKET:
                raise StorageError(f"cannot check bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot check bucket {self.bucket}: {exc}") from exc
        try:
            region = self._settings.region
            if region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={
                        "LocationConstraint": cast("BucketLocationConstraintType", region)
                    },
                )
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc
        log.info("bucket created bucket=%s region=%s", self.bucket, self._settings.region)
