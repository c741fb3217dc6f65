"""What `orch` prints: aligned tables for a person at a terminal, JSON for scripts.

JSON when `--json` is given or stdout is not a terminal (a pipe, a file, a test), so a script
never parses a table by accident; a table otherwise. A closed pipe (`orch audit | head -1`)
ends the command quietly with status 141, as a SIGPIPE would.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

PIPE_CLOSED = 141  # 128 + SIGPIPE, what shells report for `yes | head -1`


def show_for(args: Any, data: Any, columns: Sequence[str] | None = None) -> None:
    """`data` as the command's `--json` flag (args.json) and stdout ask."""
    show(data, wants_json(bool(getattr(args, "json", False))), columns)


def wants_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def show(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    elif isinstance(data, Mapping):
        _fields(data)
    else:
        _table(list(data), columns)


def silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _fields(data: Mapping[str, Any]) -> None:
    width = max((len(k) for k in data), default=0)
    for key, value in data.items():
        print(f"{key:<{width}}  {_cell(value)}")


def _table(rows: list[Mapping[str, Any]], columns: Sequence[str] | None) -> None:
    if not rows:
        print("(none)")
        return
    cols = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # One line per row, whatever a user id holds.
    return str(value).replace("\n", "\\n").replace("\t", " ")
