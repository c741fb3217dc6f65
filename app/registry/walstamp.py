"""Has anything been committed to the SQLite database since we last looked? The WAL-index
header, read from shared memory: about 0.2 us and no system call, where a query takes two
lock system calls and `PRAGMA data_version` a statement as well (about 9 us). Admit's hot read
uses it to answer from rows it has already read (app.registry.engines.find_engine_hot).

SQLite's unix VFS keeps a WAL database's wal-index in `<database>-shm`. Its first 96 bytes are
two copies of the WAL-index header (sqlite.org/walformat.html, "The WAL-Index Header"), which
the writer rewrites at every commit: iChange counts transactions, mxFrame and the last frame's
checksum move, and a WAL restarted after a checkpoint gets new salts. The same 96 bytes as
before mean no commit since, by any connection of any process: SQLite's own readers decide
the same way whether their page cache is still good. A header caught mid-update differs from
the last one, so a torn read errs toward "changed".

The header is mapped read-only through SQLite's own descriptor of the file (found in
/proc/self/fd), with mmap(2) called directly: no descriptor of ours is ever opened or closed
on it, because closing any descriptor of a file drops every POSIX lock the process holds on
that file, SQLite's included (Python's mmap module duplicates and later closes one). SQLite
truncates or unlinks the file only when its last connection opens or closes, which cannot
happen under ours; a new connection (peewee reconnects, a test opens another database) is
mapped afresh.
`stamp()` is None where there is nothing to map (PostgreSQL, an in-memory database, a file
that does not look like a wal-index): callers then read the database every time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
from typing import Any

import peewee as pw

from app.registry.models import db

HEADER = 96  # two copies of the 48-byte WalIndexHdr
_MAPPED = 136  # the header and the checkpoint info after it: what SQLite makes first
_WAL_INDEX_VERSION = 3007000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_FAILED = ctypes.c_void_p(-1).value

class _Mapping(threading.local):
    """Per thread, as peewee's connections are: a thread unmaps only what it mapped."""

    conn: Any = None  # the connection the mapping was made for
    address: int | None = None  # where the header is mapped


_mapping = _Mapping()


def stamp() -> bytes | None:
    """The WAL-index header now (compare it with an earlier one), or None (see the module)."""
    database: Any = db.obj
    if type(database) is not pw.SqliteDatabase:
        return None
    conn = getattr(database, "_state").conn  # noqa: B009 - peewee's, of this thread (None: closed)
    mapping = _mapping
    if conn is not mapping.conn:
        _remap(mapping, database, conn)
    address = mapping.address
    return None if address is None else ctypes.string_at(address, HEADER)


def _remap(mapping: _Mapping, database: Any, conn: Any) -> None:
    if mapping.address is not None:
        _libc.munmap(mapping.address, _MAPPED)
    mapping.conn, mapping.address = conn, None
    if conn is None or database.database in ("", ":memory:"):
        return
    fd = _sqlites_descriptor(os.path.realpath(database.database) + "-shm")
    if fd is None or os.fstat(fd).st_size < _MAPPED:
        mapping.conn = None  # no transaction yet made it: look again next time
        return
    address = _libc.mmap(None, _MAPPED, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, _FAILED):
        return
    if _looks_like_wal_index(ctypes.string_at(address, 48), conn):
        mapping.address = address
    else:
        _libc.munmap(address, _MAPPED)


def _sqlites_descriptor(path: str) -> int | None:
    """The descriptor SQLite holds on `path` (one per file and process, whatever the number
    of connections)."""
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == path:
                return int(entry)
        except OSError:
            continue
    return None


def _looks_like_wal_index(header: bytes, conn: Any) -> bool:
    """iVersion, isInit and szPage (1 for 64 KiB) as SQLite writes them (native byte order)."""
    version, _unused, _change, is_init, _big_end, page = struct.unpack("=IIIBBH", header[:16])
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    return bool(version == _WAL_INDEX_VERSION and is_init == 1
                and (65536 if page == 1 else page) == page_size)
