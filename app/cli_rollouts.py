"""`orch rollout start|status|pause|resume|abort|list` and `orch engines upgrade`.

Like the other commands, these work on the database directly: a rollout started here is
driven by a running `orch serve` (the replica holding its lease), and `status --follow`
shows its progress bar (rich) until it ends, fed by the server's event stream when it can
reach one (app/cli_follow.py). `engines upgrade` runs the upgrade in this process, under the
same engine lease as the server's operations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from app import products, registry
from app.config import Settings

Command = Callable[[Any, str, Callable[..., Any], str], argparse.ArgumentParser]
MOVES = {"pause": (("running",), "paused"), "resume": (("paused",), "running"),
         "abort": (("running", "paused"), "aborted")}


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
    registry.connect(settings.database_url, settings.db_timeout_s)
    if args.batch_size < 1 or args.max_failures < 0:
        print("orch: --batch-size must be at least 1, --max-failures at least 0", file=sys.stderr)
        return 2
    product = products.get(args.product)
    made = registry.rollouts.create_rollout(product.id, args.to_version, args.from_version,
                                            args.batch_size, args.max_failures)
    _out(_shown(made))
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    registry.connect(settings.database_url, settings.db_timeout_s)
    rollout = _find(args.id)
    if rollout is None:
        return 1
    if args.follow:
        from app import cli_follow

        url = args.url or cli_follow.server_url(settings.host, settings.port)
        cli_follow.follow(args.id, url, settings.platform_key)
        rollout = _find(args.id)
        if rollout is None:
            return 1
    _out(_shown(rollout))
    return 0


def cmd_move(settings: Settings, args: argparse.Namespace) -> int:
    registry.connect(settings.database_url, settings.db_timeout_s)
    rollout = _find(args.id)
    if rollout is None:
        return 1
    sources, target = MOVES[args.cmd_action]
    if rollout.status != target and not registry.rollouts.set_status(rollout, sources, target):
        now = _find(args.id)
        print(f"orch: rollout {args.id} is {now.status if now else 'gone'}", file=sys.stderr)
        return 1
    _out(_shown(_find(args.id)))
    return 0


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    registry.connect(settings.database_url, settings.db_timeout_s)
    _out([_shown(r) for r in registry.rollouts.list_rollouts(products.get(args.product).id)])
    return 0


def cmd_engines_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from app.api.handlers import engine_json
    from app.crypto import load_keybox
    from app.drivers import make_driver
    from app.errors import DomainError
    from app.operations import Engines, Op

    registry.connect(settings.database_url, settings.db_timeout_s)
    product = products.get(args.product)

    async def once() -> Any:
        engines = Engines(settings, make_driver(settings, registry.ports), load_keybox(settings))
        try:
            return await engines.run(Op.UPGRADE, (product.id, args.user), version=args.version)
        finally:
            await engines.close()
            await engines.driver.close()

    try:
        _out(engine_json(asyncio.run(once())))
    except DomainError as exc:
        print(f"orch: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _find(rollout_id: int) -> Any:
    rollout = registry.rollouts.reload_rollout(rollout_id)
    if rollout is None:
        print(f"orch: no rollout {rollout_id}", file=sys.stderr)
    return rollout


def _shown(rollout: Any) -> dict[str, Any]:
    from app.api.rollouts import rollout_struct

    shown: dict[str, Any] = msgspec.to_builtins(rollout_struct(rollout))
    shown["product_id"] = rollout.product_id
    return shown


def _out(data: Any) -> None:
    print(json.dumps(data, indent=2))
