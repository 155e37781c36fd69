"""Fixtures of the sample service's tests (app/): the service on the test's database, and a
client of it. The database fixtures come from tests/conftest.py, shared with the library's
tests, which never use these."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.core.config import Settings
from app.main import create_app


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[FastAPI]:
    """The sample service on this test's database, its lifespan running."""
    application = create_app(Settings(database_url=database_url))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP requests through the ASGI app (no network, no mocks)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client
