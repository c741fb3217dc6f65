"""The tables. Only the registry package writes them (see app/registry/__init__.py)."""

from __future__ import annotations

import peewee as pw

db = pw.DatabaseProxy()


class BaseModel(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Product(BaseModel):
    # Ids come from IdCounter, never reused: a new product never sees a deleted one's events.
    id = pw.IntegerField(primary_key=True)
    name = pw.CharField(max_length=32, unique=True)
    key_hash = pw.CharField(max_length=64, unique=True)
    max_engines = pw.IntegerField()
    rate_limit_rpm = pw.IntegerField()
    created_at = pw.DoubleField()
    warm_pool = pw.IntegerField(default=0)  # engines kept ready for new users (app.pool)


class IdCounter(BaseModel):
    """The highest id ever handed out, per table (SQLite's AUTOINCREMENT, on any database)."""

    name = pw.CharField(max_length=32, primary_key=True)
    value = pw.IntegerField()


class RateLimit(BaseModel):
    """GCRA state of a product's admit limiter: the theoretical arrival time."""

    product_id = pw.IntegerField(primary_key=True)
    tat = pw.DoubleField(default=0.0)


class Engine(BaseModel):
    id = pw.AutoField()
    product = pw.ForeignKeyField(Product, backref="engines", on_delete="RESTRICT")
    user_id = pw.CharField(max_length=128)
    name = pw.CharField(max_length=63, unique=True)
    status = pw.CharField(max_length=16, index=True)  # the lifecycle state (app.states)
    row_version = pw.IntegerField(default=0)  # bumped by every write: the compare in compare-and-set
    engine_version = pw.CharField(max_length=256)
    url = pw.CharField(max_length=256, null=True)
    key_enc = pw.TextField()
    pending_key_enc = pw.TextField(null=True)  # a rotation in flight (see operations.rotate_key)
    driver_state = pw.TextField(default="{}")  # the driver's JSON (pid and port, job ids, ...)
    restarts = pw.IntegerField(default=0)
    failure_reason = pw.CharField(max_length=64, null=True)
    next_restart_at = pw.DoubleField(null=True)
    created_at = pw.DoubleField()
    updated_at = pw.DoubleField()
    status_since = pw.DoubleField()
    last_admit_at = pw.DoubleField(null=True)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DoubleField(null=True)
    # An upgrade in flight: the version to go back to if it does not come up.
    previous_version = pw.CharField(max_length=256, null=True)
    # A warm pool's engine waiting for a user (its user_id is POOL_PREFIX..., never a user's).
    in_pool = pw.BooleanField(default=False)
    claimed_at = pw.DoubleField(null=True)  # when a user claimed it from the pool

    class Meta:
        indexes = ((("product", "user_id"), True),
                   # The reconciler's range reads (engines started since its last
                   # look; idle engines), without reading every running row.
                   (("status", "status_since"), False),
                   (("status", "last_admit_at"), False),
                   (("product", "in_pool", "status"), False))


class Event(BaseModel):
    """The audit log. Not tied to the engine row by a foreign key: it outlives destroy."""

    id = pw.AutoField()
    product_id = pw.IntegerField()
    user_id = pw.CharField(max_length=128)
    engine_name = pw.CharField(max_length=63)
    # Which engine of the user (ids are never reused); None for events recorded in a database
    # without the column, and for events of no engine (orphan_removed).
    engine_id = pw.IntegerField(null=True)
    at = pw.DoubleField()
    event = pw.CharField(max_length=32)
    from_status = pw.CharField(max_length=16, null=True)
    to_status = pw.CharField(max_length=16, null=True)
    reason = pw.CharField(max_length=256, null=True)
    request_id = pw.CharField(max_length=128, null=True)

    class Meta:
        indexes = ((("product_id", "user_id", "id"), False),)


class PortLease(BaseModel):
    """Ports of the local driver; the primary key makes two replicas' reservations exclusive."""

    port = pw.IntegerField(primary_key=True)
    engine_name = pw.CharField(max_length=63, index=True)


class ShardLease(BaseModel):
    """The reconciler's work is split in shards (engine id modulo their number); a
    replica does the shards it holds a lease on."""

    shard = pw.IntegerField(primary_key=True)
    owner = pw.CharField(max_length=64, null=True)
    until = pw.DoubleField(default=0.0)


class Replica(BaseModel):
    """The live reconcilers (a heartbeat each), so shards are shared out evenly."""

    owner = pw.CharField(max_length=64, primary_key=True)
    until = pw.DoubleField()




class PoolLease(BaseModel):
    """Who refills a product's warm pool: one replica at a time."""

    product_id = pw.IntegerField(primary_key=True)
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DoubleField(null=True)


class Rollout(BaseModel):
    """A product's fleet moving to `to_version`, batch by batch; run by the replica
    holding its lease."""

    id = pw.AutoField()
    product_id = pw.IntegerField(index=True)
    status = pw.CharField(max_length=16, index=True)  # running paused succeeded failed rolled_back aborted
    to_version = pw.CharField(max_length=256)
    from_version = pw.CharField(max_length=256, null=True)
    batch_size = pw.IntegerField()
    max_failures = pw.IntegerField()
    created_at = pw.DoubleField()
    updated_at = pw.DoubleField()
    lease_owner = pw.CharField(max_length=64, null=True)
    lease_until = pw.DoubleField(null=True)


class RolloutTarget(BaseModel):
    """One engine of a rollout: the version it had, and how far it got."""

    rollout_id = pw.IntegerField()
    user_id = pw.CharField(max_length=128)
    position = pw.IntegerField()  # order of the batches
    previous_version = pw.CharField(max_length=256)
    state = pw.CharField(max_length=16)  # pending upgraded failed rolled_back
    reason = pw.CharField(max_length=256, null=True)

    class Meta:
        indexes = ((("rollout_id", "user_id"), True),)


MODELS = (Product, IdCounter, RateLimit, Engine, Event, PortLease, ShardLease, Replica, Rollout,
          RolloutTarget, PoolLease)
ENGINE_COLUMNS = tuple(f.column_name for f in Engine._meta.sorted_fields)
