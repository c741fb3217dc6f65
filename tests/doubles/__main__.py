"""python -m tests.doubles --data-dir DIR [--port-range A-B] [--nodes N] [--nomad-port 0]
[--consul-port 0] [--control-port 0]

Prints one JSON line {"nomad": url, "consul": url, "control": url} when ready, serves until
SIGTERM/SIGINT, then stops every task it runs (SIGTERM, SIGKILL after 2s) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from tests.doubles.consul_api import ConsulAPI
from tests.doubles.control import Control, Listener
from tests.doubles.nomad_api import NomadAPI
from tests.doubles.scheduler import Cluster
from tests.doubles.state import NODE_CPU, NODE_MEMORY_MB, State


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.doubles")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--port-range", default="31000-31009",
                        help="dynamic ports for allocations, inclusive: LOW-HIGH")
    parser.add_argument("--nodes", type=int, default=1, help="client nodes in the cluster")
    parser.add_argument("--dev", action="store_true",
                        help="a -dev agent's timing (1 s node updates, checks at once) instead "
                             "of a production client's")
    parser.add_argument("--node-cpu", type=int, default=NODE_CPU,
                        help=f"each node's CPU in MHz (default {NODE_CPU})")
    parser.add_argument("--node-memory", type=int, default=NODE_MEMORY_MB,
                        help=f"each node's memory in MB (default {NODE_MEMORY_MB})")
    parser.add_argument("--nomad-port", type=int, default=0)
    parser.add_argument("--consul-port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    args = parser.parse_args(argv)
    low, _, high = args.port_range.partition("-")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
        parser.error(f"--port-range must be LOW-HIGH, not {args.port_range!r}")
    args.ports = (int(low), int(high))
    return args


async def serve(args: argparse.Namespace) -> None:
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state = State(data_dir, args.ports, nodes=max(1, args.nodes),
                  timing="dev" if args.dev else "production", cpu=args.node_cpu,
                  memory_mb=args.node_memory)
    cluster = Cluster(state)
    nomad_api = NomadAPI(cluster)
    cluster.acl = nomad_api.acl   # tasks' templates read variables by workload identity
    nomad = Listener(nomad_api.app(), args.nomad_port)
    consul = Listener(ConsulAPI(state).app(), args.consul_port)
    control = Listener(Control(cluster, nomad, consul, nomad_api.acl).app(), args.control_port)
    for listener in (nomad, consul, control):
        listener.up()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _watch_children_with_pidfds(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.sleep(0.05)   # let the servers start before announcing them
    urls = {name: f"http://127.0.0.1:{listener.port}"
            for name, listener in (("nomad", nomad), ("consul", consul), ("control", control))}
    sys.stdout.write(json.dumps(urls) + "\n")
    sys.stdout.flush()
    await stop.wait()
    await cluster.shutdown()
    for listener in (nomad, consul, control):
        await listener.down()


def _watch_children_with_pidfds(loop: asyncio.AbstractEventLoop) -> None:
    """Task exits seen through a pidfd each on the loop (Python 3.12 does this by itself),
    not 3.11's default of one thread blocked in waitpid per task: 1,000 engines (the fleet
    bench) would be 1,000 threads. Nomad has an executor process per task instead."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return   # a kernel without pidfds: keep the threads
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
