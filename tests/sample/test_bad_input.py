"""Bad input to the sample service's HTTP routes, through the ASGI app on real PostgreSQL:
a 4xx with a JSON detail that names what is wrong and never echoes the input, and nothing
written."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.sample.support import assert_json_detail, table_counts

BAD_INPUT: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/signup", {"content": b'{"email": "a@example.com"'}, 422),
    ("POST", "/signup", {"content": b"not json at all"}, 422),
    ("POST", "/signup", {"json": {"email": 5}}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "name": 7}}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "admin": True}}, 422),
    ("POST", "/signup", {"json": {"email": "not-an-email"}}, 422),
    ("POST", "/signup", {"json": {"email": "a@"}}, 422),
    ("POST", "/signup", {"json": {}}, 422),
    ("POST", "/signup", {"json": ["a@example.com"]}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "name": "n" * 201}}, 422),
    ("POST", "/reports", {"content": b"{"}, 422),
    ("POST", "/reports", {"json": {"recent_limit": "many"}}, 422),
    ("POST", "/reports", {"json": {"recent_limit": 101}}, 422),
    ("POST", "/reports", {"json": {"recent_limit": -1}}, 422),
    ("POST", "/reports", {"json": {"format": "pdf"}}, 422),
    ("POST", "/reports", {"json": [1, 2]}, 422),
    ("POST", "/reports", {"json": "{}"}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
        422,
    ),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
        422,
    ),
    ("POST", "/reports", {"json": {"since": "2026-01-01T00:00:00"}}, 422),
    ("POST", "/reports", {"json": {"until": "2026-01-01T00:00:00"}}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00", "until": "2026-02-01T00:00:00Z"}},
        422,
    ),
    ("POST", "/reports", {"json": {"until": "yesterday"}}, 422),
    # Moments before year 1 or after 9999 in UTC, which the report job cannot pass on.
    ("POST", "/reports", {"json": {"since": "0001-01-01T00:59:59.999999+01:00"}}, 422),
    ("POST", "/reports", {"json": {"until": "0001-01-01T00:30:00+00:31"}}, 422),
    ("POST", "/reports", {"json": {"until": "9999-12-31T23:00:00-01:00"}}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00Z", "until": "9999-12-31T20:00:00-05:00"}},
        422,
    ),
    # Text PostgreSQL cannot store (NUL, unpaired surrogates), and a 422 that must not echo
    # a surrogate back (it cannot be encoded).
    ("POST", "/comments", {"content": rb'{"author": "a\u0000b", "body": "x"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "x\u0000"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "\ud800", "body": "x"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "\udfffx\ud800"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "b", "\ud800": 1}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": ["\ud800"], "body": "b"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a@example.com", "name": "A\u0000"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a@example.com", "name": "\udbff"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a\u0000@example.com"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "\ud800@example.com"}'}, 422),
    ("POST", "/reports", {"content": rb'{"since": "\ud800"}'}, 422),
    ("POST", "/comments", {"json": {"author": "", "body": "b"}}, 422),
    ("POST", "/comments", {"json": {"author": "a"}}, 422),
    ("POST", "/comments", {"json": {"author": "a", "body": "b", "likes": 1}}, 422),
    ("POST", "/comments", {"content": b"author=a&body=b"}, 422),
    ("GET", f"/reports/{uuid.UUID(int=0)}", {}, 404),
    ("GET", "/reports/not-a-uuid", {}, 422),
    ("GET", "/reports/12345", {}, 422),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    BAD_INPUT,
    ids=[f"{m} {p} {k}"[:80] for m, p, k, _ in BAD_INPUT],
)
async def test_bad_input_is_a_4xx_with_a_json_detail_and_writes_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    headers = {"Content-Type": "application/json"} if "content" in kwargs else {}
    response = await client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert_json_detail(response)
    assert "x-request-id" in response.headers
    assert await table_counts(pool) == {
        "users": 0,
        "comments": 0,
        "reports": 0,
        "sent_emails": 0,
        "jobs": 0,
    }


UNSTORABLE_TEXT = [
    pytest.param(
        "/comments", rb'{"author": "a\u0000b", "body": "x"}', "author", "NUL", id="nul-author"
    ),
    pytest.param(
        "/comments", rb'{"author": "a", "body": "\ud800"}', "body", "unicode", id="lone-body"
    ),
    pytest.param(
        "/signup",
        rb'{"email": "ann@example.com", "name": "Ann\udfff"}',
        "name",
        "unicode",
        id="lone-name",
    ),
]


@pytest.mark.parametrize(("path", "raw", "field", "word"), UNSTORABLE_TEXT)
async def test_text_the_database_cannot_store_is_a_422_that_names_the_field(
    client: httpx.AsyncClient, path: str, raw: bytes, field: str, word: str
) -> None:
    response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    [error] = assert_json_detail(response)
    assert error["loc"] == ["body", field]
    assert word in error["msg"]
    assert "input" not in error


# Bodies whose default 422 echoed them back: unencodable (a 500 instead), or as big as the
# body itself (a 2.7 MB body of 200,000 unknown keys answered 20 MB).
UNECHOABLE = [
    pytest.param(rb'{"author": "a", "body": "b", "\ud800": 1}', id="lone-surrogate-key"),
    pytest.param(rb'{"author": ["\udfff"], "body": "b"}', id="lone-surrogate-input"),
    pytest.param(
        b'{"author": "a", "body": "b", "' + b"k" * 200_000 + b'": 1}', id="200-kB-unknown-key"
    ),
    pytest.param(json.dumps({f"k{n}": n for n in range(60_000)}).encode(), id="60000-unknown-keys"),
    pytest.param(
        json.dumps([{"author": n} for n in range(20_000)]).encode(), id="a-20000-item-list"
    ),
]


@pytest.mark.parametrize("raw", UNECHOABLE)
async def test_a_422_lists_a_few_errors_and_never_echoes_the_input(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    assert len(raw) < 1024 * 1024  # under the body limit: these reach validation
    response = await client.post(
        "/comments", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text[:500]
    detail = assert_json_detail(response)
    assert len(response.content) < 4096, len(response.content)
    assert 1 <= len(detail) <= 11
    for error in detail:
        assert set(error) <= {"type", "loc", "msg", "ctx"}, error
        assert isinstance(error["msg"], str)


async def test_an_unknown_report_names_it_in_the_detail(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await client.get(f"/reports/{missing}")
    assert response.status_code == 404
    assert str(missing) in assert_json_detail(response)
