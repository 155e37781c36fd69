"""The sample service's admin: the token it reads from OUTBOX_ADMIN_TOKEN (a guessable one
stops it, an empty one turns admin off), and its mount of pgoutbox's admin router, whose
session dependency opens the transaction, committing each change once. The router itself is
tested on the library's own host (tests/test_admin_*.py, tests/test_dashboard_*.py)."""

from __future__ import annotations

import secrets

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import event

from app.core.config import Settings
from tests.test_admin_commits import TOKEN, each_change_commits_once

ANY_URL = "postgresql://localhost/any"


@pytest.mark.parametrize(
    "weak",
    ["a" * 16, "ab" * 16, "abcd" * 8, "0123456789012345", "password12345678", "tooshort-123"],
)
def test_a_guessable_admin_token_stops_the_app_with_a_clear_message(weak: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(database_url=ANY_URL, admin_token=weak)
    message = str(refused.value)
    assert "OUTBOX_ADMIN_TOKEN" in message
    assert weak not in message  # the secret stays out of logs


@pytest.mark.parametrize(
    "strong",
    [
        # Ids fixed by hand: random values differ at every collection, and pytest-xdist
        # needs every worker to collect the same test ids.
        pytest.param(secrets.token_hex(32), id="token_hex"),
        pytest.param(secrets.token_urlsafe(24), id="token_urlsafe"),
        pytest.param(TOKEN, id="the-tests-token"),
        pytest.param(f"  {TOKEN}\n", id="padded"),
    ],
)
def test_a_random_admin_token_is_taken(strong: str) -> None:
    assert Settings(database_url=ANY_URL, admin_token=strong).admin_token == strong.strip()


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_admin_token_means_admin_is_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OUTBOX_ADMIN_TOKEN", value)
    assert Settings(database_url=ANY_URL).admin_token is None


async def test_the_sample_app_commits_each_change_once(
    app: FastAPI, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Its dependency opens the transaction (session.begin()) and commits it on the way out;
    the route's own commit must not make that a second one, nor an error."""
    app.state.settings.admin_token = TOKEN
    commits: list[object] = []
    event.listen(app.state.engine.sync_engine, "commit", commits.append)
    await each_change_commits_once(client, pool, commits)
