"""Product rows: create (with a never-reused id), change, delete, look up."""

from __future__ import annotations

import time

import peewee as pw

from app.registry import limits
from app.registry.db import next_id, write_lock
from app.registry.models import Engine, Product


class ProductExists(Exception):
    pass


class ProductInUse(Exception):
    def __init__(self, engines: int):
        super().__init__(engines)
        self.engines = engines


def create_product(name: str, key_hash: str, max_engines: int, rate_limit_rpm: int,
                   warm_pool: int = 0) -> Product:
    with write_lock():
        product_id = next_id(Product)
        try:
            with Product._meta.database.atomic():
                return Product.create(id=product_id, name=name, key_hash=key_hash,
                                      max_engines=max_engines, rate_limit_rpm=rate_limit_rpm,
                                      created_at=time.time(), warm_pool=warm_pool)
        except pw.IntegrityError:
            raise ProductExists(name) from None


def update_product(product: Product, max_engines: int | None, rate_limit_rpm: int | None,
                   warm_pool: int | None = None) -> Product:
    if warm_pool is not None:
        product.warm_pool = warm_pool
    if max_engines is not None:
        product.max_engines = max_engines
    if rate_limit_rpm is not None:
        product.rate_limit_rpm = rate_limit_rpm
        limits.reset(product.id)
    product.save()
    return product


def set_product_key(product: Product, key_hash: str) -> Product:
    product.key_hash = key_hash
    product.save()
    return product


def delete_product(product: Product) -> None:
    with write_lock():
        count = engine_count(product.id)
        if count:
            raise ProductInUse(count)
        limits.reset(product.id)
        product.delete_instance()


def engine_count(product_id: int) -> int:
    return int(Engine.select().where(Engine.product == product_id).count())


def product_by_key_hash(key_hash: str) -> Product | None:
    return Product.get_or_none(Product.key_hash == key_hash)


def product_by_name(name: str) -> Product | None:
    return Product.get_or_none(Product.name == name)


def product_name(product_id: int) -> str:
    return str(Product.get_by_id(product_id).name)


def all_products() -> list[Product]:
    return list(Product.select().order_by(Product.name))
