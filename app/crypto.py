"""Keys: platform keys are stored as hashes, engine keys encrypted at rest.

Platform keys carry 256 bits of entropy, so a plain SHA-256 is the right hash: a slow password
hash would buy nothing and cost every request. Lookups go by hash, and the final comparison is
constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from functools import lru_cache
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from app.config import ConfigError, Settings

PLATFORM_KEY_PREFIX = "orch_pk_"
ENGINE_KEY_PREFIX = "eng_"


def new_platform_key() -> str:
    return PLATFORM_KEY_PREFIX + secrets.token_urlsafe(32)


def new_engine_key() -> str:
    return ENGINE_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class KeyBox:
    """Encrypts engine keys for the database; decryptions are cached for the hot path."""

    def __init__(self, secret: bytes):
        self._fernet = Fernet(secret)
        self.decrypt = lru_cache(maxsize=65536)(self._decrypt)

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def _decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise RuntimeError("an engine key cannot be decrypted: ORCH_SECRET_KEY changed?") from None


def load_keybox(settings: Settings) -> KeyBox:
    return KeyBox(_secret(settings))


def _secret(settings: Settings) -> bytes:
    if settings.secret_key is not None:
        return _checked(settings.secret_key.encode(), "ORCH_SECRET_KEY")
    path = settings.secret_key_file
    if not path.exists():
        _create_secret_file(path)
    for _ in range(50):  # another process may have created it and not written it yet
        secret = path.read_bytes().strip()
        if secret:
            break
        time.sleep(0.02)
    return _checked(secret, f"the secret key file {path}")


def _checked(secret: bytes, where: str) -> bytes:
    try:
        Fernet(secret)
    except ValueError:
        # Never echo the value: it is a secret, even when malformed.
        raise ConfigError(
            f"{where} is invalid: must be 32 url-safe base64-encoded bytes "
            "(make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())')"
        ) from None
    return secret


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first; use theirs
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key())
