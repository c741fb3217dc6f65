"""Platform-key authentication.

The key is hashed and looked up by hash (a timing difference could only reveal a hash prefix,
which says nothing about the key), then compared in constant time. Products are cached for a
couple of seconds so the hot path does not read them per request; a rotated or deleted key
stops working within that time on every replica.
"""

from __future__ import annotations

import time
from typing import Any

from app import errors, registry
from app.crypto import hash_key, same_hash
from app.operations import ProductRef

CACHE_TTL_S = 2.0
CACHE_MAX = 10_000


class Authenticator:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[ProductRef, float]] = {}

    def product(self, key: str | None) -> ProductRef:
        if not key:
            raise errors.unauthorized()
        now = time.monotonic()
        hit = self._cache.get(key)  # keyed by the key itself: the hot path skips the hash
        if hit is not None and hit[1] > now:
            return hit[0]
        digest = hash_key(key)
        row: Any = registry.product_by_key_hash(digest)
        if row is None or not same_hash(row.key_hash, digest):
            self._cache.pop(key, None)
            raise errors.unauthorized()
        ref = ProductRef(row.id, row.name, row.max_engines, row.rate_limit_rpm)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = (ref, now + CACHE_TTL_S)
        return ref
