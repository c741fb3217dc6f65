"""Products: tenants with a platform key, an engine quota and an admit rate limit."""

from __future__ import annotations

import time

import peewee as pw

from app import crypto, naming, policy, registry
from app.registry import Engine, Product

DEFAULT_MAX_ENGINES = 100
DEFAULT_RATE_LIMIT_RPM = 600


class ProductError(ValueError):
    pass


def create(name: str, max_engines: int = DEFAULT_MAX_ENGINES,
           rate_limit_rpm: int = DEFAULT_RATE_LIMIT_RPM) -> tuple[Product, str]:
    """The new product and its platform key: the only time the key is seen in plain text."""
    if not naming.valid_product_name(name):
        raise ProductError("product name must match [a-z0-9-]{1,32}")
    _check_limits(max_engines, rate_limit_rpm)
    key = crypto.new_platform_key()
    try:
        product = Product.create(name=name, key_hash=crypto.hash_key(key), max_engines=max_engines,
                                 rate_limit_rpm=rate_limit_rpm, created_at=time.time())
    except pw.IntegrityError:
        raise ProductError(f"product {name!r} already exists") from None
    return product, key


def get(name: str) -> Product:
    product = registry.product_by_name(name)
    if product is None:
        raise ProductError(f"no product {name!r}")
    return product


def update(name: str, max_engines: int | None = None, rate_limit_rpm: int | None = None) -> Product:
    product = get(name)
    _check_limits(max_engines if max_engines is not None else product.max_engines,
                  rate_limit_rpm if rate_limit_rpm is not None else product.rate_limit_rpm)
    if max_engines is not None:
        product.max_engines = max_engines
    if rate_limit_rpm is not None:
        product.rate_limit_rpm = rate_limit_rpm
        policy.reset(product.id)
    product.save()
    return product


def rotate_key(name: str) -> tuple[Product, str]:
    product = get(name)
    key = crypto.new_platform_key()
    product.key_hash = crypto.hash_key(key)
    product.save()
    return product, key


def delete(name: str) -> None:
    product = get(name)
    count = Engine.select().where(Engine.product == product.id).count()
    if count:
        raise ProductError(f"product {name!r} still has {count} engines; destroy them first")
    policy.reset(product.id)
    product.delete_instance()


def as_json(product: Product) -> dict:
    engines = Engine.select().where(Engine.product == product.id).count()
    return {"name": product.name, "max_engines": product.max_engines,
            "rate_limit_rpm": product.rate_limit_rpm, "engines": engines}


def _check_limits(max_engines: int, rate_limit_rpm: int) -> None:
    if max_engines < 0:
        raise ProductError("max_engines must be 0 or more")
    if rate_limit_rpm <= 0:
        raise ProductError("rate_limit_rpm must be greater than 0")
