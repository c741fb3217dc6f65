"""The OpenAPI document's patterns refuse exactly what the server refuses (app/api/openapi.py,
app/api/spec.py): printable characters as str.isprintable() says, versions not all spaces,
cursors only as the API gives them out."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import errors
from app.api import spec
from app.api.handlers import decode_cursor, encode_cursor
from app.api.openapi import document, printable_patterns
from app.api.validate import Checks
from app.naming import user_id_problem

EVERYTHING = "".join(map(chr, range(0x110000)))


def exact(name: str) -> re.Pattern[str]:
    return re.compile(document()["components"]["schemas"][name]["pattern"])


def test_the_user_id_pattern_refuses_exactly_what_the_server_refuses() -> None:
    pattern = exact("UserId")
    # Every code point, one at a time (as a one-character user id), in one pass.
    accepted = "".join(re.findall(pattern.pattern[1:-len("{1,128}$")], EVERYTHING))
    assert accepted
    assert accepted == "".join(c for c in EVERYTHING if user_id_problem(c) is None)
    for user_id in ("bob", "a b", "é-ü", "a\u00a0b", "a\ue000", "a\u2028b", "a\u200bb", "a/b",
                    "x" * 128, "x" * 129, " "):
        assert bool(pattern.search(user_id)) == (user_id_problem(user_id) is None), user_id


@pytest.mark.parametrize("version", ["1.0", " 1 ", "   ", "", "a\x07", "v\u00a0", "x" * 257])
def test_the_version_pattern_refuses_exactly_what_the_server_refuses(version: str) -> None:
    pattern = exact("EngineVersion")
    try:
        body = msgspec.json.decode(msgspec.json.encode({"engine_version": version}),
                                   type=spec.UpgradeBody)
        served = body.engine_version.isprintable()  # the handler's own check, after decoding
    except msgspec.ValidationError:
        served = False
    documented = bool(pattern.search(version)) and len(version) <= 256
    assert documented == served == (version in ("1.0", " 1 ")), version


def test_every_cheap_pattern_has_its_exact_schema() -> None:
    text = msgspec.json.encode(document()).decode()
    for cheap, (_, name, _) in printable_patterns().items():
        assert msgspec.json.encode(cheap).decode() not in text, name
        assert f'"#/components/schemas/{name}"' in text


def test_the_cursors_the_api_gives_out_are_the_documented_ones() -> None:
    pattern = re.compile(spec.cursor_pattern())
    for last_id in (*range(1, 2000), 10**9 + 7, 10**17, 10**18 - 1):
        assert pattern.search(encode_cursor(last_id)), last_id
    for refused in ("", "abc", encode_cursor(10**18), "ZTo", "ZTox=", "ZToxMA=="):
        assert not pattern.search(refused), refused


@settings(max_examples=200, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.from_regex(spec.cursor_pattern(), fullmatch=True))
def test_every_documented_cursor_is_taken(cursor: str) -> None:
    try:
        decode_cursor(cursor)
    except errors.InvalidRequest as exc:
        raise AssertionError(f"{cursor!r} is documented but refused") from exc


def test_a_whole_number_written_as_a_float_is_the_integer_json_schema_says_it_is() -> None:
    checks = Checks(spec.BY_NAME["start_rollout"])
    body = checks.body(b'{"to_version": "v2", "batch_size": 5.0, "max_failures": 0.0}')
    assert (body.batch_size, body.max_failures) == (5, 0)
    assert isinstance(body.batch_size, int)
    for refused in (b'{"to_version": "v2", "batch_size": 1.5}',
                    b'{"to_version": "v2", "batch_size": "5"}',
                    b'{"to_version": "v2", "batch_size": 5.0, "batch_size": 6}'):
        with pytest.raises(errors.InvalidRequest):
            checks.body(refused)
