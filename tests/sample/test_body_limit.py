"""The request body limit of the sample service's HTTP routes, through the ASGI app on real
PostgreSQL: a body over it is a 413 read no further than the limit, a body at it is read
whole."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.sample.support import assert_json_detail, table_counts

LIMIT = 1000
MiB = 1024 * 1024


class PulledBody:
    """A request body handed to the app one chunk at a time, as it asks, counting the bytes
    it took: what a server holds in memory for the app."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk


@pytest.fixture
def small_limit(app: FastAPI) -> int:
    app.state.settings.max_body_bytes = LIMIT
    return LIMIT


BODY_ROUTES = [
    ("/comments", "application/json"),
    ("/signup", "application/json"),
    ("/reports", "application/json"),
    ("/dashboard/login", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize(("path", "content_type"), BODY_ROUTES)
@pytest.mark.parametrize(
    "declared", [None, "10", str(50 * MiB)], ids=["chunked", "length-that-lies", "length"]
)
async def test_a_body_over_the_limit_is_a_413_read_no_further_than_the_limit(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    small_limit: int,
    path: str,
    content_type: str,
    declared: str | None,
) -> None:
    body = PulledBody(b"x" * 512 for _ in range(100_000))  # 50 MiB, if it were all read
    headers = {"Content-Type": content_type}
    if declared is not None:
        headers["Content-Length"] = declared
    response = await client.post(path, content=body, headers=headers)
    assert response.status_code == 413, response.text
    assert f"{small_limit} bytes" in assert_json_detail(response)
    assert "x-request-id" in response.headers
    if declared == str(50 * MiB):
        assert body.pulled == 0, "refused on its Content-Length, before reading"
    else:
        assert body.pulled <= small_limit + 512
    assert set((await table_counts(pool)).values()) == {0}


async def test_a_body_exactly_at_the_limit_is_read_whole(
    client: httpx.AsyncClient, small_limit: int
) -> None:
    prefix, suffix = b'{"author": "a", "body": "', b'"}'
    raw = prefix + b"x" * (small_limit - len(prefix) - len(suffix)) + suffix
    assert len(raw) == small_limit
    body = PulledBody(raw[n : n + 100] for n in range(0, len(raw), 100))
    response = await client.post(
        "/comments", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert body.pulled == small_limit


async def test_the_default_body_limit_is_one_mebibyte(client: httpx.AsyncClient) -> None:
    body = PulledBody(b"x" for _ in range(MiB + 1))
    response = await client.post(
        "/comments",
        content=body,
        headers={"Content-Type": "application/json", "Content-Length": str(MiB + 1)},
    )
    assert response.status_code == 413, response.text
    assert f"{MiB} bytes" in assert_json_detail(response)
