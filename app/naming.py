"""Validation of user ids and product names, and the engine's external name.

The external name is what Nomad sees as the job ID, what Consul sees as the service name, and
what the local driver uses for the brain directory. It must be `[a-z0-9-]`, at most 63
characters, start and end with a letter or digit, stay the same for one (product, user_id),
and differ for user ids that differ only in case or punctuation: a readable slug of the user id
plus a hash of the exact (product, user_id) pair.
"""

from __future__ import annotations

import hashlib
import re

PRODUCT_RE = re.compile(r"[a-z0-9-]{1,32}")
USER_ID_MAX = 128
_SLUG_DROP = re.compile(r"[^a-z0-9]+")


def valid_product_name(name: object) -> bool:
    return isinstance(name, str) and PRODUCT_RE.fullmatch(name) is not None


def user_id_problem(user_id: object) -> str | None:
    """Why `user_id` is not acceptable, or None when it is."""
    if not isinstance(user_id, str):
        return "user_id must be a string"
    if not 1 <= len(user_id) <= USER_ID_MAX:
        return f"user_id must be 1 to {USER_ID_MAX} characters"
    if "/" in user_id:
        return "user_id must not contain '/'"
    if not user_id.isprintable():
        return "user_id must not contain control or non-printable characters"
    return None


def engine_name(product: str, user_id: str) -> str:
    digest = hashlib.sha256(f"{product}\0{user_id}".encode()).hexdigest()[:12]
    user_slug = _SLUG_DROP.sub("-", user_id.lower()).strip("-")[:24].strip("-")
    parts = ["e", product[:20].strip("-"), user_slug, digest]
    return "-".join(p for p in parts if p)
