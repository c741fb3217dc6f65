"""`orch engines get|start|stop|destroy|rotate-key|snapshot|snapshots PRODUCT USER` and
`orch engines restore PRODUCT USER SNAPSHOT_ID`: the API's engine operations from the command
line.

Each runs the endpoint's own handler through app/cli_ops.py, in this process, under the same
engine lease as a server's operations; its errors are the API's (code and message on one line,
exit status from the code: app/cli.py's docstring).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from app import cli_ops, naming
from app.api import spec
from app.cli_output import show_for as show
from app.config import Settings
from app.snapshots.service import valid_id as valid_snapshot_id

Command = Callable[..., argparse.ArgumentParser]

# command -> (the endpoint it runs, what it does)
OPERATIONS = {
    "get": ("get", "show one engine"),
    "start": ("start", "start a stopped, sleeping or failed engine (brain kept)"),
    "stop": ("stop", "stop an engine (brain kept); only `engines start` brings it back"),
    "destroy": ("destroy", "destroy an engine and its brain"),
    "rotate-key": ("rotate_key", "give a running engine a new API key; prints it once"),
    "snapshot": ("snapshot", "copy the engine's brain into the snapshot store now"),
    "snapshots": ("snapshots", "list the engine's snapshots, newest first"),
}
SNAPSHOT_COLUMNS = ("id", "created_at", "size_bytes", "files", "engine_version", "consistent")


def add_commands(engines: Any, cmd: Command) -> None:
    for name, (endpoint, help_) in OPERATIONS.items():
        parser = cmd(engines, name, _runner(endpoint), help_)
        parser.add_argument("product", help="the product's name")
        parser.add_argument("user", help="the engine's user id")
    parser = cmd(engines, "restore", _restore,
                 "stop the engine, replace its brain with a snapshot's, start it again")
    parser.add_argument("product", help="the product's name")
    parser.add_argument("user", help="the engine's user id")
    parser.add_argument("snapshot_id", help="the snapshot's id (orch engines snapshots)")


def _runner(endpoint: str) -> Callable[[Settings, argparse.Namespace], int]:
    def command(settings: Settings, args: argparse.Namespace) -> int:
        problem = naming.user_id_problem(args.user)
        if problem:
            print(f"orch: user id: {problem}", file=sys.stderr)
            return cli_ops.USAGE
        if endpoint == "snapshots":
            query = spec.SnapshotsQuery(limit=1000)
            page = cli_ops.run(settings, endpoint, args.product, args.user, query=query)
            show(args, page["snapshots"], SNAPSHOT_COLUMNS)
            return cli_ops.OK
        show(args, cli_ops.run(settings, endpoint, args.product, args.user))
        return cli_ops.OK

    return command


def _restore(settings: Settings, args: argparse.Namespace) -> int:
    problem = naming.user_id_problem(args.user)
    if problem or not valid_snapshot_id(args.snapshot_id):
        print(f"orch: {(problem and 'user id: ' + problem) or 'not a snapshot id'}", file=sys.stderr)
        return cli_ops.USAGE
    body = spec.RestoreBody(args.snapshot_id)
    show(args, cli_ops.run(settings, "restore", args.product, args.user, body))
    return cli_ops.OK
