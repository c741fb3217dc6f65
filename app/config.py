"""One typed settings object, read once from the environment.

Every variable is optional. A bad value raises ConfigError whose message is one line that
names the variable; `orch` prints it and exits, so start-up stops before anything runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def _package_version() -> str:
    # The default image's tag is the package version (docker always pulls `latest`)
    try:
        return importlib.metadata.version("engine-orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


ENGINE_IMAGE_DEFAULT = f"orch-refengine:{_package_version()}"

SLEEP_MODES = ("pause", "stop")
DRIVERS = ("local", "nomad")
# nomad/structs Task.Validate: a KillTimeout above the update block's progress_deadline
# (10 m by default, api/jobs.go) makes a service job invalid.
PROGRESS_DEADLINE_S = 600.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A bad configuration value; str() is the one line shown to the operator."""


@dataclass(frozen=True)
class Settings:
    database_url: str = "sqlite:///.orch/orch.db"  # always under state_dir unless set
    driver: str = "local"
    engine_image: str = ENGINE_IMAGE_DEFAULT
    boot_timeout_s: float = 60.0
    stop_grace_s: float = 30.0
    idle_sleep_s: float = 900.0
    sleep_mode: str = "pause"
    max_restarts: int = 3
    port_range: tuple[int, int] = (20000, 20999)
    state_dir: Path = Path(".orch")
    brain_root: Path = Path(".orch/brains")
    nomad_jobspec: Path = Path("jobspecs/engine.docker.json")
    secret_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    # Beyond the spec's list: knobs an operator (and the test-suite) needs.
    engine_cmd: tuple[str, ...] = (sys.executable, "-m", "app.refengine")
    tick_s: float = 1.0
    health_grace_s: float = 10.0
    restart_backoff_s: float = 1.0
    log_level: str = "INFO"
    db_timeout_s: float = 5.0
    lease_s: float = 15.0
    nomad_addr: str = "http://127.0.0.1:4646"
    nomad_token: str | None = None
    nomad_namespace: str | None = None
    nomad_region: str | None = None
    consul_addr: str = "http://127.0.0.1:8500"
    consul_token: str | None = None
    # Images an engine_version may name, and who owns an
    # engine's brain volume and key file on Nomad (the image's user).
    engine_images: tuple[str, ...] = ()   # repositories; () = only engine_image's
    nomad_volume_uid: int = 65534
    nomad_volume_gid: int = 65534
    nomad_volume_mode: str = "0700"
    # The HTTP server: /metrics' bearer token, and uvicorn's guards.
    metrics_token: str | None = None
    limit_concurrency: int = 1000
    head_timeout_s: float = 10.0
    body_timeout_s: float = 10.0  # a request body must be whole this long after its head
    # An idle keep-alive connection is closed after this long: longer than clients keep theirs
    # (httpx 5 s, aiohttp 15 s), so a client never reuses one the server is closing.
    keepalive_s: int = 30
    # Hostile tenants: who engines run as and what they inherit.
    engine_user: str | None = None  # None: "nobody" when we are root, else ourselves
    engine_env: tuple[str, ...] = ()
    engine_gid_base: int = 200_000
    # A fleet of engines: each running engine is health-checked this often (with
    # jitter), and every row is looked at again in a full resync this often.
    health_interval_s: float = 10.0
    resync_s: float = 60.0
    # The fleet on Nomad: follow Nomad's event stream and Consul's blocking queries ("on"),
    # or learn of ends from the scheduled health checks alone ("off": the bench's baseline).
    nomad_events: bool = True
    # The Nomad clients' max_kill_timeout (Nomad's default 30 s): a longer stop grace is cut.
    nomad_max_kill_timeout_s: float = 30.0
    # Rollouts: the platform key `orch rollout status --follow` shows the server's
    # event stream with (None: it follows the database instead).
    platform_key: str | None = None
    rollout_concurrency: int = 4  # rollouts one replica drives side by side
    # Snapshots of brains: where ("": file under state_dir/snapshots), how many kept per
    # engine, how often the changed ones are taken (0: only on demand).
    snapshot_store: str = ""
    snapshot_keep: int = 24
    snapshot_interval_s: float = 900.0
    # The image of the brain's sidecar on Nomad (the `snapshot` task of engine.docker.json:
    # `python -m app.snapshots.sidecar`; jobspecs/Dockerfile.snapshot builds it).
    snapshot_image: str = f"orch-snapshot:{_package_version()}"
    # An engine whose node is lost this long is created again elsewhere from its latest
    # snapshot (0: never; it waits for its node).
    node_lost_restore_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        state_dir = r.get("ORCH_STATE_DIR", Path, cls.state_dir)
        settings = cls(
            # The database lives in the state dir unless named: `make run`, `orch serve` and
            # every CLI command agree by construction.
            database_url=r.get("ORCH_DATABASE_URL", _database_url,
                               f"sqlite:///{state_dir / 'orch.db'}"),
            driver=r.get("ORCH_DRIVER", _choice(DRIVERS), cls.driver),
            engine_image=r.get("ORCH_ENGINE_IMAGE", _nonempty, cls.engine_image),
            boot_timeout_s=r.get("ORCH_BOOT_TIMEOUT_S", _positive, cls.boot_timeout_s),
            stop_grace_s=r.get("ORCH_STOP_GRACE_S", _non_negative, cls.stop_grace_s),
            idle_sleep_s=r.get("ORCH_IDLE_SLEEP_S", _non_negative, cls.idle_sleep_s),
            sleep_mode=r.get("ORCH_SLEEP_MODE", _choice(SLEEP_MODES), cls.sleep_mode),
            max_restarts=r.get("ORCH_MAX_RESTARTS", _non_negative_int, cls.max_restarts),
            port_range=r.get("ORCH_PORT_RANGE", _port_range, cls.port_range),
            state_dir=state_dir,
            brain_root=r.get("ORCH_BRAIN_ROOT", Path, state_dir / "brains"),
            nomad_jobspec=r.get("ORCH_NOMAD_JOBSPEC", Path, cls.nomad_jobspec),
            secret_key=r.get("ORCH_SECRET_KEY", _nonempty, None),
            host=r.get("ORCH_HOST", _nonempty, cls.host),
            port=r.get("ORCH_PORT", _tcp_port, cls.port),
            engine_cmd=r.get("ORCH_ENGINE_CMD", _command, cls.engine_cmd),
            tick_s=r.get("ORCH_TICK_S", _positive, cls.tick_s),
            health_grace_s=r.get("ORCH_HEALTH_GRACE_S", _non_negative, cls.health_grace_s),
            restart_backoff_s=r.get("ORCH_RESTART_BACKOFF_S", _non_negative, cls.restart_backoff_s),
            lease_s=r.get("ORCH_LEASE_S", _positive, cls.lease_s),
            db_timeout_s=r.get("ORCH_DB_TIMEOUT_S", _positive, cls.db_timeout_s),
            log_level=r.get("ORCH_LOG_LEVEL", _choice(LOG_LEVELS, upper=True), cls.log_level),
            nomad_addr=r.get("NOMAD_ADDR", _http_url, cls.nomad_addr),
            nomad_token=r.get("NOMAD_TOKEN", _nonempty, None),
            nomad_namespace=r.get("NOMAD_NAMESPACE", _nonempty, None),
            nomad_region=r.get("NOMAD_REGION", _nonempty, None),
            consul_addr=r.get("CONSUL_HTTP_ADDR", _consul_addr, cls.consul_addr),
            consul_token=r.get("CONSUL_HTTP_TOKEN", _nonempty, None),
            # Nomad
            engine_images=r.get("ORCH_ENGINE_IMAGES", _repositories, cls.engine_images),
            nomad_volume_uid=r.get("ORCH_NOMAD_VOLUME_UID", _non_negative_int, cls.nomad_volume_uid),
            nomad_volume_gid=r.get("ORCH_NOMAD_VOLUME_GID", _non_negative_int, cls.nomad_volume_gid),
            nomad_volume_mode=r.get("ORCH_NOMAD_VOLUME_MODE", _octal_mode, cls.nomad_volume_mode),
            # The HTTP server.
            metrics_token=r.get("ORCH_METRICS_TOKEN", _nonempty, None),
            limit_concurrency=r.get("ORCH_LIMIT_CONCURRENCY", _positive_int, cls.limit_concurrency),
            head_timeout_s=r.get("ORCH_HEAD_TIMEOUT_S", _positive, cls.head_timeout_s),
            body_timeout_s=r.get("ORCH_BODY_TIMEOUT_S", _positive, cls.body_timeout_s),
            keepalive_s=r.get("ORCH_KEEPALIVE_S", _positive_int, cls.keepalive_s),
            # Hostile tenants.
            engine_user=r.get("ORCH_ENGINE_USER", _nonempty, None),
            engine_env=r.get("ORCH_ENGINE_ENV", _env_names, cls.engine_env),
            engine_gid_base=r.get("ORCH_ENGINE_GID_BASE", _gid_base, cls.engine_gid_base),
            # A fleet of engines.
            health_interval_s=r.get("ORCH_HEALTH_INTERVAL_S", _positive, cls.health_interval_s),
            resync_s=r.get("ORCH_RESYNC_S", _positive, cls.resync_s),
            # The fleet on Nomad.
            nomad_events=r.get("ORCH_NOMAD_EVENTS", _choice(("on", "off")), "on") == "on",
            nomad_max_kill_timeout_s=r.get("ORCH_NOMAD_MAX_KILL_TIMEOUT_S", _positive,
                                           cls.nomad_max_kill_timeout_s),
            # Rollouts.
            platform_key=r.get("ORCH_PLATFORM_KEY", _nonempty, None),
            rollout_concurrency=r.get("ORCH_ROLLOUT_CONCURRENCY", _positive_int,
                                      cls.rollout_concurrency),
            snapshot_store=r.get("ORCH_SNAPSHOT_STORE", _snapshot_store, ""),
            snapshot_keep=r.get("ORCH_SNAPSHOT_KEEP", _positive_int, cls.snapshot_keep),
            snapshot_interval_s=r.get("ORCH_SNAPSHOT_INTERVAL_S", _non_negative,
                                      cls.snapshot_interval_s),
            snapshot_image=r.get("ORCH_SNAPSHOT_IMAGE", _nonempty, cls.snapshot_image),
            node_lost_restore_s=r.get("ORCH_NODE_LOST_RESTORE_S", _non_negative,
                                      cls.node_lost_restore_s),
        )
        problem = settings.kill_timeout_problem() if settings.driver == "nomad" else None
        if problem:
            raise ConfigError(problem)
        return settings

    def kill_timeout_problem(self) -> str | None:
        """Why Nomad would not give engines ORCH_STOP_GRACE_S as their KillTimeout, or None."""
        grace, cap = self.stop_grace_s, self.nomad_max_kill_timeout_s
        if grace > PROGRESS_DEADLINE_S:
            return (f"ORCH_STOP_GRACE_S={grace:g} is longer than Nomad's update "
                    f"progress_deadline ({PROGRESS_DEADLINE_S:g}s): Nomad refuses the job")
        if grace > cap:
            return (f"ORCH_STOP_GRACE_S={grace:g} is longer than ORCH_NOMAD_MAX_KILL_TIMEOUT_S="
                    f"{cap:g} (the Nomad clients' max_kill_timeout): Nomad would cut the "
                    f"engines' stop grace to {cap:g}s")
        return None

    @property
    def secret_key_file(self) -> Path:
        return self.state_dir / "secret.key"

    @property
    def snapshot_store_url(self) -> str:
        """ORCH_SNAPSHOT_STORE, or the default directory store under the state directory."""
        return self.snapshot_store or (self.state_dir / "snapshots").resolve().as_uri()

    @property
    def run_dir(self) -> Path:
        """Per-engine key files and logs of the local driver; never inside a brain."""
        return self.state_dir / "run"


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self.env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be blank")
    return raw.strip()


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return value


def _positive(raw: str) -> float:
    value = _number(raw)
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative(raw: str) -> float:
    value = _number(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _positive_int(raw: str) -> int:
    value = _non_negative_int(raw)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _tcp_port(raw: str) -> int:
    value = _non_negative_int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _port_range(raw: str) -> tuple[int, int]:
    lo, sep, hi = raw.partition("-")
    if not sep:
        raise ValueError("must look like 20000-20999")
    low, high = _tcp_port(lo.strip()), _tcp_port(hi.strip())
    if not 1024 <= low <= high:
        raise ValueError("must be LOW-HIGH with 1024 <= LOW <= HIGH")
    return (low, high)


def _choice(options: tuple[str, ...], upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _database_url(raw: str) -> str:
    if not raw.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("must start with sqlite:/// or postgresql://")
    return raw


def _http_url(raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return raw.rstrip("/")


def _consul_addr(raw: str) -> str:
    # Consul's CLI accepts a bare host:port here.
    return _http_url(raw if "://" in raw else f"http://{raw}")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a variable name")
        if name.startswith(("ORCH_", "NOMAD_", "CONSUL_", "ENGINE_")):
            raise ValueError(f"{name} is the orchestrator's own (or the engine contract's); "
                             "it never reaches engines")
    return names


def _gid_base(raw: str) -> int:
    value = _non_negative_int(raw)
    if not 1000 <= value <= 2**31 - 65536:
        raise ValueError(f"must be a group id from 1000 to {2**31 - 65536} (a port is added)")
    return value


def _command(raw: str) -> tuple[str, ...]:
    parts = tuple(shlex.split(raw))
    if not parts:
        raise ValueError("must name a command")
    return parts


def _repositories(raw: str) -> tuple[str, ...]:
    repos = tuple(r.strip() for r in raw.split(",") if r.strip())
    bad = [r for r in repos if ":" in r.rsplit("/", 1)[-1] or "@" in r or "$" in r]
    if bad:
        raise ValueError(f"list repositories without a tag or digest: {bad[0]!r}")
    return repos


def _snapshot_store(raw: str) -> str:
    scheme, _, rest = raw.partition("://")
    if scheme == "file" and rest.startswith("/"):
        return raw
    if scheme == "s3" and rest.split("/", 1)[0]:
        return raw
    raise ValueError("file:///absolute/path or s3://bucket/prefix")


def _octal_mode(raw: str) -> str:
    if not raw.isdigit() or any(c not in "01234567" for c in raw) or int(raw, 8) > 0o777:
        raise ValueError("an octal mode such as 0700 or 0770")
    return raw
