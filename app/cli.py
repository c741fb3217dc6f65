"""`orch`: serve the API, manage products, operate engines, stop everything, read the audit log.

Exit status: 0 done; 1 refused (no such product, it already exists, it still has engines; the
engine's state or the product's limits refuse the operation: the API's 409 and 429);
2 bad usage or configuration (nothing was changed); 3 no database where the settings say, or
it cannot be reached; 4 no such engine or rollout (the API's 404); 5 the operation failed or
could not run (the scheduler, a boot or an upgrade failed, the engine was held by another
operation: the API's 5xx; `orch down`: an engine could not be stopped); 141 the output was
closed early (`orch audit | head -1`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import peewee as pw

from app import cli_down, cli_engines, cli_ops, cli_output, cli_rollouts, naming, products, registry, statedir
from app.cli_ops import NO_DATABASE, OK, REFUSED, USAGE
from app.config import ConfigError, Settings
from app.errors import DomainError
from app.states import STATES

ENGINE_COLUMNS = ("product", "user_id", "status", "url", "engine_version", "restarts",
                  "failure_reason", "updated_at")
EVENT_COLUMNS = ("at", "product", "user_id", "event", "from", "to", "reason")


def main(argv: list[str] | None = None) -> int:
    statedir.private()  # before anything is written: the database, keys, logs, run dirs
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE
    try:
        settings = _reachable_engine_cmd(Settings.from_env())
        code: int = args.func(settings, args) or OK
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        cli_output.silence_stdout()
        return cli_output.PIPE_CLOSED
    except ConfigError as exc:
        return _fail(str(exc), USAGE)
    except products.ProductError as exc:
        return _fail(str(exc), REFUSED)
    except DomainError as exc:  # the API's errors, with the API's codes
        return _fail(f"{exc.code}: {exc.message}", cli_ops.exit_status(exc))
    except statedir.NoDatabase as exc:
        return _fail(str(exc), NO_DATABASE)
    except (pw.OperationalError, pw.InterfaceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _fail(f"the database cannot be used: {first} (check ORCH_DATABASE_URL)",
                     NO_DATABASE)


# Where `make run` finds an interpreter `nobody` can run (the Makefile's ENGINE_PY).
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def _reachable_engine_cmd(settings: Settings) -> Settings:
    """Run as root with the default engine user, engines run as `nobody`, who usually cannot
    run our interpreter (a pyenv or venv under /root). Then, unless ORCH_ENGINE_CMD says
    otherwise, the reference engine runs by path under the system's Python, as `make run`
    sets it: `orch serve` and the commands that start engines here (`engines start`,
    `reconcile`, ...) work from a fresh clone without the Makefile's variables."""
    if (settings.driver != "local" or os.geteuid() != 0 or settings.engine_user is not None
            or settings.engine_cmd != Settings.engine_cmd or os.environ.get("ORCH_ENGINE_CMD")):
        return settings
    python = next((p for p in SYSTEM_PYTHONS if os.access(p, os.X_OK)), None)
    if python is None:
        return settings  # the preflight names what engines cannot reach
    script = Path(__file__).resolve().parent / "refengine"
    return dataclasses.replace(settings, engine_cmd=(python, str(script)))


def _fail(message: str, code: int) -> int:
    print(f"orch: {message}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, with where to look, instead of argparse's usage block.
        self.exit(USAGE, f"orch: {message} (see: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="orch", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(metavar="COMMAND", parser_class=_Parser)

    serve = _cmd(sub, "serve", cmd_serve, "serve the HTTP API", output=False)
    serve.add_argument("--host", help="address to listen on (default: ORCH_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=_port, help="port to listen on (default: ORCH_PORT, 8080)")

    prod = sub.add_parser("products", help="manage products (tenants and their platform keys)"
                          ).add_subparsers(metavar="ACTION", parser_class=_Parser, required=True)
    create = _cmd(prod, "create", cmd_products_create, "create a product; prints its key once")
    create.add_argument("name", type=_product_name, help="product name, [a-z0-9-]{1,32}")
    _limits(create, products.DEFAULT_MAX_ENGINES, products.DEFAULT_RATE_LIMIT_RPM)
    ensure = _cmd(prod, "ensure", cmd_products_ensure, "create a product if missing; keep its "
                  "key in the state dir (local demo)", output=False)
    ensure.add_argument("name", type=_product_name, help="product name, [a-z0-9-]{1,32}")
    _cmd(prod, "list", cmd_products_list, "list products with their limits and engine counts")
    update = _cmd(prod, "update", cmd_products_update,
                  "change a product's limits (give at least one option)")
    update.add_argument("name", help="the product to change")
    _limits(update, None, None)
    _cmd(prod, "rotate-key", cmd_products_rotate, "new platform key; the old one stops working"
         ).add_argument("name", help="the product whose key to replace")
    _cmd(prod, "delete", cmd_products_delete, "delete a product that has no engines left"
         ).add_argument("name", help="the product to delete")

    engines = sub.add_parser("engines", help="list and operate engines"
                             ).add_subparsers(metavar="ACTION", parser_class=_Parser, required=True)
    elist = _cmd(engines, "list", cmd_engines_list, "list engines, every product's by default")
    elist.add_argument("--product", help="only this product's engines")
    elist.add_argument("--status", choices=STATES, metavar="STATUS",
                       help=f"only engines in this state: {', '.join(STATES)}")

    cli_engines.add_commands(engines, _cmd)
    cli_rollouts.add_commands(sub, engines, _cmd)
    _cmd(sub, "down", cli_down.cmd_down, "stop this state dir's server and every engine, brains kept; "
         "each comes back on its user's next admit with auto_wake")

    audit = _cmd(sub, "audit", cmd_audit, "print the audit log, newest first")
    audit.add_argument("--product", help="only this product's events")
    audit.add_argument("--user", help="only this user's events (needs --product: user ids are "
                       "per product)")
    audit.add_argument("--limit", type=_positive("--limit", 1_000_000), default=50,
                       help="at most this many events, 1 to 1000000 (default 50)")

    jobspec = sub.add_parser("jobspec", help="Nomad job templates"
                             ).add_subparsers(metavar="ACTION", parser_class=_Parser, required=True)
    render = _cmd(jobspec, "render", cmd_jobspec_render,
                  "print the Nomad job JSON that would be submitted for an engine", output=False)
    render.add_argument("--product", required=True, type=_product_name, help="product name")
    render.add_argument("--user", required=True, help="the engine's user id")
    render.add_argument("--version", help="engine_version (default: ORCH_ENGINE_IMAGE)")

    _cmd(sub, "reconcile", cmd_reconcile, "run one reconciler pass and print what it did")
    _cmd(sub, "openapi", cmd_openapi, "print the API's OpenAPI document (what GET /openapi.json "
         "serves)", output=False)
    return parser


def _cmd(sub: Any, name: str, func: Callable[..., Any], help_: str,
         output: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    parser.set_defaults(func=func, json=not output)  # no --json: the output is JSON or prose
    if output:
        parser.add_argument("--json", action="store_true",
                            help="print JSON (the default when stdout is not a terminal)")
    return parser


def _limits(parser: argparse.ArgumentParser, engines: int | None, rpm: int | None) -> None:
    parser.add_argument("--max-engines", type=_count("max_engines"), default=engines,
                        help="most engines the product may have, every state counted"
                        + (f" (default {engines})" if engines is not None else ""))
    parser.add_argument("--rate-limit-rpm", type=_positive("rate_limit_rpm", 10**9), default=rpm,
                        help="admits per minute"
                        + (f" (default {rpm})" if rpm is not None else ""))
    parser.add_argument("--warm-pool", type=_count("warm_pool"), default=0 if engines else None,
                        help="engines kept booted for new users, counted in --max-engines"
                        + (" (default 0)" if engines else ""))


def _whole(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be a whole number, not {raw!r}") from None


def _count(name: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _whole(raw, name)
        if not 0 <= value <= 10**9:
            raise argparse.ArgumentTypeError(f"{name} must be 0 or more, not {raw}")
        return value
    return parse


def _positive(name: str, most: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = _whole(raw, name)
        if not 1 <= value <= most:
            raise argparse.ArgumentTypeError(f"{name} must be from 1 to {most}, not {raw}")
        return value
    return parse


def _port(raw: str) -> int:
    value = _whole(raw, "--port")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be 0 to 65535, not {raw}")
    return value


def _product_name(raw: str) -> str:
    if not naming.valid_product_name(raw):
        raise argparse.ArgumentTypeError(f"product name must match [a-z0-9-]{{1,32}}, not {raw!r}")
    return raw


def _show(args: argparse.Namespace, data: Any, columns: tuple[str, ...] | None = None) -> None:
    cli_output.show_for(args, data, columns)


def _db(settings: Settings, create: bool = False) -> None:
    cli_ops.connect(settings, create)


# ---- commands ----------------------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from app import logs
    from app.api import server
    from app.api.app import OrchestratorApp
    from app.crypto import load_keybox

    logs.setup(settings.log_level)
    load_keybox(settings)  # a bad ORCH_SECRET_KEY stops start-up here, with one line
    _db(settings, create=True)
    if settings.driver == "local":
        from app.drivers.local import preflight

        preflight(settings)  # engines that could not run stop start-up here, with one line
    with cli_down.serving(settings):
        server.serve(OrchestratorApp(settings).app, settings, args.host, args.port)
    return OK


def cmd_products_create(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings, create=True)
    product, key = products.create(args.name, args.max_engines, args.rate_limit_rpm, args.warm_pool)
    _show(args, {**products.as_json(product), "platform_key": key})
    return OK


def cmd_products_ensure(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings, create=True)
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
    return OK


def cmd_products_list(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    _show(args, [products.as_json(p) for p in registry.all_products()])
    return OK


def cmd_products_update(settings: Settings, args: argparse.Namespace) -> int:
    if args.max_engines is None and args.rate_limit_rpm is None and args.warm_pool is None:
        return _fail("nothing to change: give --max-engines N, --rate-limit-rpm R and/or "
                     "--warm-pool N", USAGE)
    _db(settings)
    _show(args, products.as_json(products.update(args.name, args.max_engines,
                                                 args.rate_limit_rpm, args.warm_pool)))
    return OK


def cmd_products_rotate(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    product, key = products.rotate_key(args.name)
    _show(args, {**products.as_json(product), "platform_key": key})
    return OK


def cmd_products_delete(settings: Settings, args: argparse.Namespace) -> int:
    _db(settings)
    products.delete(args.name)
    _show(args, {"name": args.name, "deleted": True})
    return OK


def cmd_engines_list(settings: Settings, args: argparse.Namespace) -> int:
    from app.api.handlers import engine_json

    _db(settings)
    product_id = products.get(args.product).id if args.product else None
    rows = registry.list_engines(product_id, args.status, limit=1_000_000)
    names = _product_names()
    _show(args, [{"product": names.get(e.product_id), "name": e.name, **engine_json(e)}
                 for e in rows], ENGINE_COLUMNS)
    return OK


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    from app.api.handlers import event_json

    if args.user is not None and not args.product:
        # A user id is unique only within a product: "carol" of two products is two people.
        return _fail("--user needs --product: user ids are per product "
                     "(orch audit --product P --user U)", USAGE)
    _db(settings)
    if args.product:
        rows = registry.events_for(products.get(args.product).id, args.user, args.limit)
    else:
        rows = registry.recent_events(args.limit)
    # Without --product the trail spans products, where one user id may be two people: each
    # event names its product (None once the product is deleted).
    names = _product_names()
    _show(args, [{"product": names.get(e.product_id), "user_id": e.user_id,
                  "engine": e.engine_name, **event_json(e)} for e in rows], EVENT_COLUMNS)
    return OK


def cmd_jobspec_render(settings: Settings, args: argparse.Namespace) -> int:
    from app.drivers.base import EngineSpec
    from app.jobspec import render_checked

    problem = naming.user_id_problem(args.user)
    if problem:
        return _fail(f"--user: {problem}", USAGE)
    spec = EngineSpec(naming.engine_name(args.product, args.user), args.product, args.user,
                      args.version or settings.engine_image)
    try:
        job = render_checked(settings, spec)
    except ValueError as exc:   # what the API would refuse: show nothing
        return _fail(str(exc), USAGE)
    _show(args, job)
    return OK


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    _show(args, cli_ops.reconcile(settings))
    return OK


def cmd_openapi(settings: Settings, args: argparse.Namespace) -> int:
    from app.api import openapi

    _show(args, openapi.document())
    return OK


def _product_names() -> dict[int, str]:
    return {int(p.id): p.name for p in registry.all_products()}


def _write_private(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


if __name__ == "__main__":
    sys.exit(main())
