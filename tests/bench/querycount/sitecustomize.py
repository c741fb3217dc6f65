"""The bench's database query counter ("database queries per second at rest").

On the orchestrator's PYTHONPATH only in the bench (tests/bench/fleet.py), never in the
product: every SQLite connection the process opens (peewee's, the checkpoint's) reports each
statement it starts to SQLite's trace callback, and a daemon thread writes the running count,
with the monotonic time it was read at, to $BENCH_QUERY_COUNT_FILE.<pid> once a second. Statements
run by triggers (reported with a leading "--") are not counted: they are part of one query.
"""

import os
import sqlite3
import threading
import time

_PATH = os.environ.get("BENCH_QUERY_COUNT_FILE")
_count = 0


def _traced(connect):  # type: ignore[no-untyped-def]
    def connect_and_count(*args, **kwargs):  # type: ignore[no-untyped-def]
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(_seen)
        return conn

    return connect_and_count


def _seen(statement: str) -> None:
    global _count
    if not statement.startswith("--"):
        _count += 1


def _report(path: str) -> None:
    while True:
        line = f"{time.monotonic()} {_count}\n"
        with open(path + ".tmp", "w") as out:
            out.write(line)
        os.replace(path + ".tmp", path)
        time.sleep(1.0)


if _PATH:
    sqlite3.connect = _traced(sqlite3.connect)
    threading.Thread(target=_report, args=(f"{_PATH}.{os.getpid()}",), name="bench-query-count",
                     daemon=True).start()
