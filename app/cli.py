"""`orch`: serve the API, manage products, look at engines and the audit log."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import cli_rollouts, products, registry
from app.config import ConfigError, Settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        settings = Settings.from_env()
        return args.func(settings, args) or 0
    except ConfigError as exc:
        print(f"orch: {exc}", file=sys.stderr)
        return 2
    except products.ProductError as exc:
        print(f"orch: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orch", description=__doc__)
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = _cmd(sub, "serve", cmd_serve, "serve the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    prod = sub.add_parser("products", help="manage products").add_subparsers(metavar="ACTION")
    create = _cmd(prod, "create", cmd_products_create, "create a product; prints its key once")
    create.add_argument("name")
    _limits(create, products.DEFAULT_MAX_ENGINES, products.DEFAULT_RATE_LIMIT_RPM)
    ensure = _cmd(prod, "ensure", cmd_products_ensure,
                  "create a product if missing; keep its key in the state dir (local demo)")
    ensure.add_argument("name")
    _cmd(prod, "list", cmd_products_list, "list products")
    update = _cmd(prod, "update", cmd_products_update, "change a product's limits")
    update.add_argument("name")
    _limits(update, None, None)
    _cmd(prod, "rotate-key", cmd_products_rotate, "new platform key; the old one stops working"
         ).add_argument("name")
    _cmd(prod, "delete", cmd_products_delete, "delete a product with no engines").add_argument("name")

    engines = sub.add_parser("engines", help="look at engines").add_subparsers(metavar="ACTION")
    elist = _cmd(engines, "list", cmd_engines_list, "list engines")
    elist.add_argument("--product")
    elist.add_argument("--status")

    cli_rollouts.add_commands(sub, engines, _cmd)  # issue 13: rollout ..., engines upgrade

    audit = _cmd(sub, "audit", cmd_audit, "print the audit log, newest first")
    audit.add_argument("--product")
    audit.add_argument("--user")
    audit.add_argument("--limit", type=int, default=50)

    jobspec = sub.add_parser("jobspec", help="Nomad job templates").add_subparsers(metavar="ACTION")
    render = _cmd(jobspec, "render", cmd_jobspec_render, "print the Nomad job JSON for an engine")
    render.add_argument("--product", required=True)
    render.add_argument("--user", required=True)
    render.add_argument("--version")

    _cmd(sub, "reconcile", cmd_reconcile, "run one reconciler pass")
    return parser


def _cmd(sub: Any, name: str, func: Callable[..., Any], help_: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_)
    parser.set_defaults(func=func)
    return parser


def _limits(parser: argparse.ArgumentParser, engines: int | None, rpm: int | None) -> None:
    parser.add_argument("--max-engines", type=int, default=engines)
    parser.add_argument("--rate-limit-rpm", type=int, default=rpm)


def _out(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _db(settings: Settings) -> None:
    registry.connect(settings.database_url, settings.db_timeout_s)


# ---- commands ----------------------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from app import logs
    from app.api import server
    from app.api.app import OrchestratorApp
    from app.crypto import load_keybox

    logs.setup(settings.log_level)
    load_keybox(settings)  # a bad ORCH_SECRET_KEY stops start-up here, with one line
    _db(settings)
    server.serve(OrchestratorApp(settings).app, settings, args.host, args.port)
    return 0


def cmd_products_create(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    product, key = products.create(args.name, args.max_engines, args.rate_limit_rpm)
    _out({**products.as_json(product), "platform_key": key})
    return 0


def cmd_products_ensure(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    key_file = settings.state_dir / f"{args.name}.platform-key"
    product = registry.product_by_name(args.name)
    if product is None or not key_file.exists():
        if product is None:
            product, key = products.create(args.name)
        else:
            product, key = products.rotate_key(args.name)
        _write_private(key_file, key)
    key = key_file.read_text().strip()
    print(f"product {product.name!r}: export ORCH_PLATFORM_KEY={key}")
    print(f"  (kept in {key_file}; try: curl -s -XPOST -H \"X-Platform-Key: $ORCH_PLATFORM_KEY\" "
          f"http://{settings.host}:{settings.port}/engines/alice/admit -d '{{\"auto_provision\":true}}')")
    return 0


def cmd_products_list(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    _out([products.as_json(p) for p in registry.Product.select().order_by(registry.Product.name)])
    return 0


def cmd_products_update(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    _out(products.as_json(products.update(args.name, args.max_engines, args.rate_limit_rpm)))
    return 0


def cmd_products_rotate(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    product, key = products.rotate_key(args.name)
    _out({**products.as_json(product), "platform_key": key})
    return 0


def cmd_products_delete(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    products.delete(args.name)
    _out({"name": args.name, "deleted": True})
    return 0


def cmd_engines_list(settings: Settings, args: argparse.Namespace) -> int:
    from app.api.handlers import engine_json

    _db(settings)
    product_id = products.get(args.product).id if args.product else None
    rows = registry.list_engines(product_id, args.status, limit=1_000_000)
    names = {p.id: p.name for p in registry.Product.select()}
    _out([{"product": names.get(e.product_id), "name": e.name, **engine_json(e)}
          for e in rows])
    return 0


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from app.api.handlers import event_json

    _db(settings)
    if args.product:
        rows = registry.events_for(products.get(args.product).id, args.user, args.limit)
    else:
        rows = registry.recent_events(args.limit)
    _out([{"user_id": e.user_id, "engine": e.engine_name, **event_json(e)} for e in rows])
    return 0


def cmd_jobspec_render(settings: Settings, args: argparse.Namespace) -> int:
    from app import naming
    from app.drivers.base import EngineSpec
    from app.jobspec import render_job

    if not naming.valid_product_name(args.product):
        raise products.ProductError("product name must match [a-z0-9-]{1,32}")
    problem = naming.user_id_problem(args.user)
    if problem:
        raise products.ProductError(problem)
    spec = EngineSpec(naming.engine_name(args.product, args.user), args.product, args.user,
                      args.version or settings.engine_image)
    _out(render_job(settings, spec))
    return 0


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from app.crypto import load_keybox
    from app.drivers import make_driver
    from app.lifecycle import Lifecycle
    from app.reconciler import Reconciler

    _db(settings)

    async def once() -> dict[str, int]:
        lifecycle = Lifecycle(settings, make_driver(settings), load_keybox(settings))
        try:
            return await Reconciler(lifecycle).pass_once(wait=True)
        finally:
            await lifecycle.close()
            await lifecycle.driver.close()

    _out(asyncio.run(once()))
    return 0


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


if __name__ == "__main__":
    sys.exit(main())
