"""Products: tenants with a platform key, an engine quota and an admit rate limit. The rules
(names, limits, keys) live here; the rows are written by the registry."""

from __future__ import annotations

from typing import Any

from app import crypto, errors, naming, registry
from app.registry import Product

DEFAULT_MAX_ENGINES = 100
DEFAULT_RATE_LIMIT_RPM = 600


class ProductError(errors.InvalidRequest, ValueError):
    pass


def create(name: str, max_engines: int = DEFAULT_MAX_ENGINES,
           rate_limit_rpm: int = DEFAULT_RATE_LIMIT_RPM, warm_pool: int = 0) -> tuple[Product, str]:
    """The new product and its platform key: the only time the key is seen in plain text."""
    if not naming.valid_product_name(name):
        raise ProductError("product name must match [a-z0-9-]{1,32}")
    _check_limits(max_engines, rate_limit_rpm, warm_pool)
    key = crypto.new_platform_key()
    try:
        product = registry.create_product(name, crypto.hash_key(key), max_engines, rate_limit_rpm,
                                          warm_pool)
    except registry.ProductExists:
        raise ProductError(f"product {name!r} already exists") from None
    return product, key


def get(name: str) -> Product:
    product = registry.product_by_name(name)
    if product is None:
        raise ProductError(f"no product {name!r}")
    return product


def update(name: str, max_engines: int | None = None, rate_limit_rpm: int | None = None,
           warm_pool: int | None = None) -> Product:
    product = get(name)
    _check_limits(max_engines if max_engines is not None else product.max_engines,
                  rate_limit_rpm if rate_limit_rpm is not None else product.rate_limit_rpm,
                  warm_pool if warm_pool is not None else product.warm_pool)
    return registry.update_product(product, max_engines, rate_limit_rpm, warm_pool)


def rotate_key(name: str) -> tuple[Product, str]:
    key = crypto.new_platform_key()
    return registry.set_product_key(get(name), crypto.hash_key(key)), key


def delete(name: str) -> None:
    product = get(name)
    try:
        registry.delete_product(product)
    except registry.ProductInUse as exc:
        pooled = len(registry.pool.pooled(product.id))
        if pooled == exc.engines:
            raise ProductError(f"product {name!r} still has {pooled} warm pool engines; "
                               f"set --warm-pool 0 and wait for them to go") from None
        raise ProductError(f"product {name!r} still has {exc.engines} engines; destroy them first") \
            from None


def as_json(product: Product) -> dict[str, Any]:
    """`engines` counts the product's users' engines and its pool's; `warm` is how many of the
    pool's are ready to be claimed now, of the `warm_pool` it keeps."""
    return {"name": product.name, "max_engines": product.max_engines,
            "rate_limit_rpm": product.rate_limit_rpm, "engines": registry.engine_count(product.id),
            "warm_pool": product.warm_pool,
            "warm": registry.pool.warm_counts().get(product.id, 0)}


def _check_limits(max_engines: int, rate_limit_rpm: int, warm_pool: int = 0) -> None:
    if warm_pool < 0:
        raise ProductError("warm_pool must be 0 or more")
    if max_engines < 0:
        raise ProductError("max_engines must be 0 or more")
    if rate_limit_rpm <= 0:
        raise ProductError("rate_limit_rpm must be greater than 0")
