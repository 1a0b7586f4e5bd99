"""What the catalogue needs from district storage, whichever store holds the objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from controller.storage.s3 import PresignedPut, StorageError, StoredObject, Verification

__all__ = [
    "PresignedPut",
    "Storage",
    "StorageAccessError",
    "StorageError",
    "StoredObject",
    "Verification",
]


class StorageAccessError(StorageError):
    """A request to the controller's object routes refused (403) or finding nothing (404)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class Storage(Protocol):
    def key_for(self, device_id: str, recording_id: str, filename: str) -> str:
        """The object key of one file of one recording."""
        ...

    def presign_put(self, key: str, size: int, sha256_hex: str, expires_s: int) -> PresignedPut:
        """A URL accepting one PUT of exactly ``size`` bytes hashing to ``sha256_hex``."""
        ...

    def verify(self, key: str, size: int, sha256_hex: str) -> Verification:
        """Whether ``key`` holds exactly that; raises StorageError if the store cannot be asked."""
        ...

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL to download ``key`` until it expires."""
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        """Writes a small object (a manifest) whole; raises StorageError on failure."""
        ...

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose key starts with ``prefix``; raises StorageError if it cannot list."""
        ...

    def sha256_of(self, key: str) -> str:
        """The SHA-256 of ``key``'s content, streamed; raises StorageError if it cannot be read."""
        ...
