"""What the reference engine keeps: its API key (from the key file) and its brain (a directory
of small values, one file per memory key)."""

from __future__ import annotations

import itertools
import os
import threading

from app.refengine.config import ConfigError, say

MAX_KEY_CHARS = 200
MAX_VALUE_BYTES = 1024 * 1024
# File names are "m-" + hex of the key's UTF-8 while that fits in NAME_MAX (255 bytes, with room
# to spare); longer keys use "h-" + their SHA-256. The prefixes keep the two from ever clashing.
_MAX_HEX = 240
_TMP_PREFIX = ".tmp-"
_tmp_serial = itertools.count()  # next() on it is atomic under the GIL


class KeyStore:
    """The current API key. Requests read it without a lock (one attribute read); reloads swap
    it under a lock so two overlapping SIGHUPs cannot interleave."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._key = self._read()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"refengine: ENGINE_API_KEY_FILE {path}: {_why(exc)}") from None

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            key = f.read().strip()
        if not key:
            raise ValueError("the file is empty")
        return key

    def reload(self) -> None:
        """Re-read the key file. A missing or empty file keeps the current key: locking every
        client out is worse than a rotation that did not happen (and the orchestrator, which
        confirms rotations, notices)."""
        with self._lock:
            try:
                self._key = self._read()
            except (OSError, ValueError) as exc:
                say(f"key reload failed, keeping the current key: {_why(exc)}")
                return
        say("reloaded key")  # never the key, nor anything derived from it

    def authorised(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Imported here, not at the top: hmac loads OpenSSL, milliseconds of boot that only
        # authenticated requests need. After the first call this is a dict lookup.
        from hmac import compare_digest

        # Header values arrive decoded as latin-1; encoding back gives the bytes on the wire.
        return compare_digest(token.strip().encode("latin-1", "replace"), self._key)


class WriteGate:
    """Writes to the brain pass one at a time; a checkpoint holds them all (`hold`) until it
    is let go (`release`) or its hold runs out, so an orchestrator that dies mid-snapshot never
    leaves the engine frozen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by each write, and by a checkpoint
        self._meta = threading.Lock()
        self._held: int | None = None  # the generation of the checkpoint holding the gate
        self._generation = 0

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def hold(self, seconds: float, wait: float) -> bool:
        """Wait (at most `wait`) for the writes in progress, then hold the next ones."""
        with self._meta:
            if self._held is not None:
                return True  # already held: the same checkpoint asked again
        if not self._lock.acquire(timeout=wait):
            return False
        with self._meta:
            self._generation += 1
            self._held = generation = self._generation
        timer = threading.Timer(seconds, self._expire, (generation,))
        timer.daemon = True
        timer.start()
        return True

    def release(self) -> bool:
        """False: nothing was held (the hold had run out)."""
        with self._meta:
            if self._held is None:
                return False
            self._held = None
            self._lock.release()
            return True

    def _expire(self, generation: int) -> None:
        with self._meta:
            if self._held == generation:
                self._held = None
                self._lock.release()
                say("checkpoint hold ran out; writing again")


class Brain:
    """Memory values as files in the brain directory, written atomically (a temporary file,
    then os.replace), so a crash leaves the old value or the new one, never half of one. There
    is no fsync: values survive the process (SIGKILL included), not a power cut."""

    def __init__(self, root: str):
        self.root = root
        self.gate = WriteGate()
        try:
            if not os.path.isdir(root):
                os.makedirs(root, mode=0o700, exist_ok=True)
                os.chmod(root, 0o700)  # makedirs' mode is filtered by the umask
            self._sweep()
        except OSError as exc:
            raise ConfigError(f"refengine: ENGINE_BRAIN_DIR {root}: {_why(exc)}") from None

    def _sweep(self) -> None:
        # Temporary files left by a process that died mid-write: never a value, so drop them.
        for name in os.listdir(self.root):
            if name.startswith(_TMP_PREFIX):
                try:
                    os.unlink(os.path.join(self.root, name))
                except OSError:
                    pass

    def file_for(self, key: str) -> str:
        """The file of a memory key. The name is built only from hex digits, so whatever the
        key holds ('..', '/', NUL), the file is a direct child of the brain directory."""
        raw = key.encode("utf-8")
        stem = raw.hex()
        if len(stem) <= _MAX_HEX:
            return os.path.join(self.root, "m-" + stem)
        import hashlib  # only for very long keys; it costs milliseconds of boot otherwise

        return os.path.join(self.root, "h-" + hashlib.sha256(raw).hexdigest())

    def put(self, key: str, value: bytes) -> None:
        # Our own unique name rather than tempfile (whose imports cost boot time): pid and a
        # serial make it unique, O_EXCL makes sure.
        tmp = os.path.join(self.root, f"{_TMP_PREFIX}{os.getpid()}-{next(_tmp_serial)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, self.file_for(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def get(self, key: str) -> bytes | None:
        try:
            with open(self.file_for(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self.file_for(key))
        except FileNotFoundError:
            return False
        return True


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
