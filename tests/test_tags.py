"""Tags given at enqueue find their jobs: the admin API's ``?tag=``, ``outbox-worker jobs list
--tag`` and the dashboard's filter, each showing the tags."""

from __future__ import annotations

import asyncpg
import httpx
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import enqueue
from tests.admin_support import AUTH
from tests.cli_support import cli, ok, ok_json
from tests.dashboard_support import SIGNED_IN


async def tagged(engine: AsyncEngine) -> dict[str, int]:
    async with AsyncSession(engine) as session, session.begin():
        acme = await enqueue(session, "echo", {"n": 1}, tags=["tenant:acme", "vip"])
        other = await enqueue(session, "echo", {"n": 2}, tags=["tenant:globex"])
        plain = await enqueue(session, "echo", {"n": 3})
    return {"acme": acme.id, "other": other.id, "plain": plain.id}


async def test_the_admin_api_filters_by_tag_and_shows_them(
    engine: AsyncEngine, admin_app: FastAPI, admin_client: httpx.AsyncClient
) -> None:
    ids = await tagged(engine)
    page = (await admin_client.get("/jobs", params={"tag": "tenant:acme"}, headers=AUTH)).json()
    assert [item["id"] for item in page["items"]] == [ids["acme"]]
    assert page["items"][0]["tags"] == ["tenant:acme", "vip"]
    everything = (await admin_client.get("/jobs", headers=AUTH)).json()["items"]
    assert {item["id"]: item["tags"] for item in everything} == {
        ids["acme"]: ["tenant:acme", "vip"],
        ids["other"]: ["tenant:globex"],
        ids["plain"]: [],
    }
    refused = await admin_client.get("/jobs", params={"tag": ""}, headers=AUTH)
    assert refused.status_code == 422, refused.text
    assert "tag" in refused.json()["detail"]


async def test_the_cli_and_the_dashboard_filter_by_tag(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    database_url: str,
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
) -> None:
    ids = await tagged(engine)
    listed = ok_json(await cli(database_url, "jobs", "list", "--tag", "vip", "--json"))
    assert [item["id"] for item in listed["items"]] == [ids["acme"]]
    shown = ok(await cli(database_url, "jobs", "show", str(ids["acme"])))
    assert "tenant:acme, vip" in shown
    page = await admin_client.get(
        "/dashboard/jobs", params={"tag": "tenant:globex"}, headers=SIGNED_IN
    )
    assert page.status_code == 200
    assert f"/dashboard/jobs/{ids['other']}" in page.text
    assert f"/dashboard/jobs/{ids['acme']}" not in page.text
    job_page = await admin_client.get(f"/dashboard/jobs/{ids['acme']}", headers=SIGNED_IN)
    assert "<code>tenant:acme</code>" in job_page.text
