"""Schemathesis hooks for tests/integration/test_fuzz.py (imported there, and loaded by the
`schemathesis run` of the stateful test through SCHEMATHESIS_HOOKS).

OpenAPI states one rule of ours only in words: `cursor` does not go with `follow=true` (a
stream has no pages). Generated queries that break it would be "schema-valid" and refused,
so they are not generated: the rule is the document's, taught to the generator."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_query(context: Any, query: dict[str, Any] | None) -> bool:
    if not query or "cursor" not in query:
        return True
    return query.get("follow") not in (True, "true")
