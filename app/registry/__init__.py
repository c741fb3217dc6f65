"""The registry: the database and the only code that writes it.

Products, engines, audit events, rate-limit slots and the local driver's port leases are
written here and nowhere else. Modules:
- models: the tables;  db: connecting, migrating, transactions, the hot path's SQL;
- engines: the typed `EngineRow`, compare-and-set transitions, leases;
- events: the audit log and the transitions published to subscribers (metrics, logs);
- products, limits (rate-limit slots), ports (the local driver's port pool);
- shards: the reconciler's work split across replicas, leased;
- pool: the warm pool's claims, reads and refill lease.
- leases: the lease compare-and-set that engines and rollouts share.
"""

from __future__ import annotations

from app.errors import Conflict, QuotaExceeded
from app.registry import limits, pool, ports, rollouts, shards
from app.registry.db import (
    Changes,
    checkpoint,
    connect,
    execute_hot,
    hot_sql,
    is_sqlite,
    request_id_var,
    write_lock,
)
from app.registry.engines import (
    HOT_COLUMNS,
    EngineRow,
    acquire_lease,
    delete_engine,
    engine_counts,
    engine_named,
    engines_by_ids,
    engines_in,
    entered_since,
    failed_because,
    find_engine,
    find_engine_hot,
    idle_running,
    insert_engine,
    known_names,
    list_engines,
    needing_recovery,
    release_lease,
    reload,
    restartable_failed,
    touch_admit,
    transition,
    update,
    with_state_key,
)
from app.registry.events import (
    Transition,
    events_after,
    events_for,
    events_page,
    publish,
    recent_events,
    record_orphan_removed,
    subscribe,
)
from app.registry.models import Engine, Event, IdCounter, PortLease, Product, RateLimit, Rollout, db
from app.registry.products import (
    ProductExists,
    ProductInUse,
    all_products,
    create_product,
    delete_product,
    engine_count,
    product_by_key_hash,
    product_by_name,
    product_name,
    set_product_key,
    update_product,
)

__all__ = [
    "HOT_COLUMNS", "Changes", "Conflict", "Engine", "EngineRow", "Event",
    "IdCounter", "PortLease", "Product", "ProductExists", "ProductInUse", "QuotaExceeded",
    "RateLimit", "Rollout", "Transition", "acquire_lease", "all_products", "checkpoint", "connect",
    "create_product", "db",
    "delete_engine", "delete_product", "engine_count", "engine_counts", "engine_named",
    "engines_by_ids", "engines_in", "entered_since", "events_after", "events_for", "events_page",
    "execute_hot", "failed_because", "find_engine", "find_engine_hot", "hot_sql", "idle_running",
    "insert_engine",
    "is_sqlite", "known_names", "limits", "list_engines", "needing_recovery", "pool", "ports",
    "product_by_key_hash", "product_by_name", "product_name", "publish", "recent_events",
    "record_orphan_removed", "release_lease", "reload", "request_id_var", "restartable_failed",
    "rollouts", "set_product_key",
    "shards", "subscribe", "touch_admit", "transition", "update", "update_product", "with_state_key",
    "write_lock"
]
