"""`orch rollout start|status|pause|resume|abort|list` and `orch engines upgrade`.

Start, pause, resume, abort and upgrade run the API's own handlers through app/cli_ops.py, with
its checks and errors. A rollout started here is driven by a running `orch serve` (the replica
holding its lease), and `status --follow` shows its progress bar (rich) until it ends, fed by
the server's event stream when it can reach one (app/cli_follow.py). `engines upgrade` runs
the upgrade in this process, under the same engine lease as the server's operations.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import msgspec

from app import cli_ops, errors, products, registry
from app.cli_output import show_for as show
from app.config import Settings

Command = Callable[..., argparse.ArgumentParser]
MOVES = {"pause": "pause_rollout", "resume": "resume_rollout", "abort": "abort_rollout"}
COLUMNS = ("id", "status", "to_version", "from_version", "total", "upgraded", "failed",
           "updated_at")


def add_commands(sub: Any, engines: Any, cmd: Command) -> None:
    upgrade = cmd(engines, "upgrade", cmd_engines_upgrade,
                  "move one engine to another version, brain kept (rolled back if not healthy)")
    upgrade.add_argument("product", help="the product's name")
    upgrade.add_argument("user", help="the engine's user id")
    upgrade.add_argument("version", help="the engine_version to move to")
    rollout = sub.add_parser("rollout", help="fleet rollouts").add_subparsers(metavar="ACTION")
    start = cmd(rollout, "start", cmd_start, "upgrade a product's engines batch by batch")
    start.add_argument("product", help="the product whose engines move")
    start.add_argument("to_version", help="the engine_version they move to")
    start.add_argument("--from-version", help="only the engines on this version (default: all)")
    start.add_argument("--batch-size", type=int, default=1,
                       help="engines upgraded at once; the next batch waits for this one (default 1)")
    start.add_argument("--max-failures", type=int, default=0,
                       help="failed engines tolerated; one more rolls every change back (default 0)")
    status = cmd(rollout, "status", cmd_status, "a rollout's progress")
    status.add_argument("id", type=int, help="the rollout's id")
    status.add_argument("--follow", action="store_true",
                        help="a live progress bar until it ends, fed by the server's event stream "
                             "(with ORCH_PLATFORM_KEY; else read from the database)")
    status.add_argument("--url", help="the server --follow reads (default: ORCH_HOST:ORCH_PORT)")
    for action in MOVES:
        move = cmd(rollout, action, cmd_move, f"{action} a rollout")
        move.add_argument("id", type=int, help="the rollout's id")
        move.set_defaults(cmd_action=action)
    listing = cmd(rollout, "list", cmd_list, "a product's rollouts, newest first")
    listing.add_argument("product", help="the product's name")


def cmd_start(settings: Settings, args: argparse.Namespace) -> int:
    body = cli_ops.body("start_rollout", {
        "to_version": args.to_version, "from_version": args.from_version,
        "batch_size": args.batch_size, "max_failures": args.max_failures})
    made = cli_ops.run(settings, "start_rollout", args.product, request=body)
    show(args, _with_product(made))
    return cli_ops.OK


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    cli_ops.connect(settings)
    rollout = _find(args.id)
    if args.follow:
        from app import cli_follow

        url = args.url or cli_follow.server_url(settings.host, settings.port)
        cli_follow.follow(args.id, url, settings.platform_key)
        rollout = _find(args.id)
    show(args, _shown(rollout))
    return cli_ops.OK


def cmd_move(settings: Settings, args: argparse.Namespace) -> int:
    moved = cli_ops.run(settings, MOVES[args.cmd_action], None, rollout_id=args.id)
    show(args, _with_product(moved))
    return cli_ops.OK


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    cli_ops.connect(settings)
    product = products.get(args.product)
    show(args, [_shown(r) for r in registry.rollouts.list_rollouts(product.id)], COLUMNS)
    return cli_ops.OK


def cmd_engines_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    body = cli_ops.body("upgrade", {"engine_version": args.version})
    show(args, cli_ops.run(settings, "upgrade", args.product, args.user, request=body))
    return cli_ops.OK


def _find(rollout_id: int) -> Any:
    rollout = registry.rollouts.reload_rollout(rollout_id)
    if rollout is None:
        raise errors.NotFound(f"no rollout {rollout_id}")
    return rollout


def _shown(rollout: Any) -> dict[str, Any]:
    from app.api.rollouts import rollout_struct

    shown: dict[str, Any] = msgspec.to_builtins(rollout_struct(rollout))
    shown["product_id"] = rollout.product_id
    return shown


def _with_product(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "product_id": _find(answer["id"]).product_id}
