"""Schedules against a real database: declaring them, firing them from several schedulers at
once, what a change or a removal in the code does, and how operators see them (CLI, admin
API, dashboard). Worker processes, kill -9 and restarts: tests/faults/test_schedules.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import structlog
from fastapi import FastAPI

from outbox_worker import JobContext, Registry
from outbox_worker._worker.scheduler import Scheduler
from outbox_worker.schedules import DEFAULT_GRACE, Missed
from tests.admin_support import AUTH
from tests.cli_support import cli, ok, ok_json
from tests.conftest import WorkerProcess, wait_until
from tests.dashboard_support import SIGNED_IN

log = structlog.get_logger()


def registry_with(
    *schedules: tuple[str, str], missed: Missed = "latest", grace: timedelta = DEFAULT_GRACE
) -> Registry:
    """A registry of one task, ``report``, and the given (name, cron) schedules of it."""
    registry = Registry()

    @registry.task(queue="reports", max_attempts=3, priority=2)
    async def report(ctx: JobContext, kind: str = "daily") -> None:
        return None

    for name, cron in schedules:
        registry.schedule(name, report, cron, args={"kind": name}, missed=missed, grace=grace)
    return registry


def scheduler(pool: asyncpg.Pool, registry: Registry) -> Scheduler:
    return Scheduler(pool=pool, registry=registry, interval=0.2, log=log)


async def schedule_row(pool: asyncpg.Pool, name: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM outbox_schedules WHERE name = $1", name)
    assert row is not None, f"no row for schedule {name!r}"
    return row


async def tick_jobs(pool: asyncpg.Pool, name: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT id, task, queue, args, priority, max_attempts, run_at, dedupe_key"
        " FROM outbox_jobs WHERE dedupe_key LIKE $1 || '@%' ORDER BY run_at",
        name,
    )
    return rows


async def test_a_declared_schedule_starts_from_now_with_its_task_options(
    pool: asyncpg.Pool,
) -> None:
    registry = registry_with(("nightly", "0 3 * * *"))
    await scheduler(pool, registry).declare()
    row = await schedule_row(pool, "nightly")
    now = await pool.fetchval("SELECT now()")
    assert (row["task"], row["queue"], row["priority"], row["max_attempts"]) == (
        "report",
        "reports",
        2,
        3,
    )
    assert json.loads(row["args"]) == {"kind": "nightly"}
    assert row["last_tick"] <= now < row["next_tick"] <= now + timedelta(days=1)
    assert (row["next_tick"].hour, row["next_tick"].minute) == (3, 0)
    # Nothing is due yet: firing enqueues nothing, and says when to look again.
    wait = await scheduler(pool, registry).fire_once()
    assert 0 < wait <= 0.2
    assert await tick_jobs(pool, "nightly") == []


async def test_due_ticks_are_enqueued_as_jobs_keyed_by_their_tick(pool: asyncpg.Pool) -> None:
    registry = registry_with(("often", "* * * * * *"))
    fires = scheduler(pool, registry)
    await fires.declare()
    started = await pool.fetchval("SELECT now()")
    await asyncio.sleep(2.2)
    await fires.fire_once()
    jobs = await tick_jobs(pool, "often")
    assert len(jobs) >= 2
    for job in jobs:
        tick = job["run_at"]
        assert tick.microsecond == 0
        assert started < tick
        assert job["dedupe_key"] == f"often@{tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
        assert (job["task"], job["queue"], job["priority"], job["max_attempts"]) == (
            "report",
            "reports",
            2,
            3,
        )
        assert json.loads(job["args"]) == {"kind": "often"}
    row = await schedule_row(pool, "often")
    assert row["last_tick"] == jobs[-1]["run_at"]
    assert row["last_job_id"] == jobs[-1]["id"]
    assert row["next_tick"] == jobs[-1]["run_at"] + timedelta(seconds=1)
    ready = await pool.fetchval(
        "SELECT count(*) FROM outbox_ready WHERE job_id = ANY($1::bigint[])",
        [job["id"] for job in jobs],
    )
    assert ready == len(jobs), "a tick's job is claimable like any other"


async def test_schedulers_firing_at_once_enqueue_each_tick_once(pool: asyncpg.Pool) -> None:
    registry = registry_with(("often", "* * * * * *"), ("also", "*/2 * * * * *"))
    schedulers = [scheduler(pool, registry) for _ in range(6)]
    await asyncio.gather(*(each.declare() for each in schedulers))
    first = await pool.fetchval("SELECT min(next_tick) FROM outbox_schedules")

    async def keep_firing(each: Scheduler) -> None:
        for _ in range(80):  # about 4 s
            await asyncio.sleep(min(await each.fire_once(), 0.05))

    await asyncio.gather(*(keep_firing(each) for each in schedulers))
    last = await pool.fetchval("SELECT max(last_tick) FROM outbox_schedules")
    for name, step in (("often", 1), ("also", 2)):
        ticks = [job["run_at"] for job in await tick_jobs(pool, name)]
        assert len(ticks) == len(set(ticks))
        expected = []
        tick = (await schedule_row(pool, name))["last_tick"]
        while tick >= first:
            expected.append(tick)
            tick -= timedelta(seconds=step)
        assert ticks == expected[::-1], f"{name}: every tick from {first} to {last} once"


async def test_a_changed_expression_starts_again_and_an_unchanged_one_keeps_its_place(
    pool: asyncpg.Pool,
) -> None:
    await scheduler(
        pool, registry_with(("nightly", "0 3 * * *"), ("weekly", "0 4 * * 1"))
    ).declare()
    await pool.execute(
        "UPDATE outbox_schedules SET last_tick = last_tick - interval '2 days',"
        " next_tick = next_tick - interval '2 days'"
    )
    before = {name: await schedule_row(pool, name) for name in ("nightly", "weekly")}
    await scheduler(
        pool, registry_with(("nightly", "30 5 * * *"), ("weekly", "0 4 * * 1"))
    ).declare()
    nightly = await schedule_row(pool, "nightly")
    weekly = await schedule_row(pool, "weekly")
    now = await pool.fetchval("SELECT now()")
    assert nightly["cron"] == "30 5 * * *"
    assert nightly["last_tick"] == nightly["declared_at"] <= now
    assert nightly["next_tick"] > now
    assert (nightly["next_tick"].hour, nightly["next_tick"].minute) == (5, 30)
    # Unchanged: where its ticks stood, so the ticks it missed follow its policy.
    assert (weekly["last_tick"], weekly["next_tick"]) == (
        before["weekly"]["last_tick"],
        before["weekly"]["next_tick"],
    )
    assert weekly["declared_at"] > before["weekly"]["declared_at"]


async def test_missed_ticks_follow_the_policy_when_workers_come_back(pool: asyncpg.Pool) -> None:
    policies: list[tuple[Missed, int]] = [("skip", 0), ("latest", 1), (3, 3)]
    for policy, expected in policies:
        name = f"hourly-{policy}"
        # No grace: every tick before now counts as missed, the last hour's included.
        registry = registry_with((name, "0 * * * *"), missed=policy, grace=timedelta(0))
        fires = scheduler(pool, registry)
        await fires.declare()
        # As if no worker had run for ten hours: ten ticks have passed since.
        await pool.execute(
            "UPDATE outbox_schedules SET last_tick = date_trunc('hour', now())"
            " - interval '10 hours', next_tick = date_trunc('hour', now()) - interval '9 hours'"
            " WHERE name = $1",
            name,
        )
        await fires.fire_once()
        hour = (await pool.fetchval("SELECT date_trunc('hour', now())")).astimezone(UTC)
        ticks = [job["run_at"] for job in await tick_jobs(pool, name)]
        assert ticks == [hour - timedelta(hours=n) for n in range(expected - 1, -1, -1)], policy
        row = await schedule_row(pool, name)
        assert row["last_tick"] == hour
        assert row["next_tick"] == hour + timedelta(hours=1)


async def test_a_schedule_taken_out_of_the_code_is_no_longer_fired(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await scheduler(pool, registry_with(("gone", "* * * * * *"))).declare()
    remaining = scheduler(pool, registry_with(("kept", "* * * * * *")))
    await remaining.declare()
    await asyncio.sleep(1.5)
    await remaining.fire_once()
    assert await tick_jobs(pool, "kept")
    assert await tick_jobs(pool, "gone") == []
    for _ in range(11):  # the workers that still have "kept" go on firing it
        await asyncio.sleep(0.5)
        await remaining.fire_once()
    listed = ok_json(await cli(database_url, "schedules", "--json"))["schedules"]
    by_name = {entry["name"]: entry for entry in listed}
    assert by_name["gone"]["overdue_seconds"] > 5
    table = ok(await cli(database_url, "schedules"))
    assert "! gone: its next tick is" in table
    assert "no worker fires it" in table
    assert "! kept" not in table


async def test_a_schedule_edited_into_nonsense_is_reported_and_left_alone(
    pool: asyncpg.Pool,
) -> None:
    registry = registry_with(("often", "* * * * * *"))
    await scheduler(pool, registry).declare()
    await pool.execute("UPDATE outbox_schedules SET cron = 'every now and then'")
    await asyncio.sleep(1.2)
    with structlog.testing.capture_logs() as logs:
        fires = Scheduler(pool=pool, registry=registry, interval=0.2, log=structlog.get_logger())
        await fires.fire_once()
    assert [entry["schedule"] for entry in logs if entry["event"] == "schedule_invalid"] == [
        "often"
    ]
    assert await tick_jobs(pool, "often") == []
    row = await schedule_row(pool, "often")
    assert row["next_tick"] > await pool.fetchval("SELECT now() + interval '50 seconds'")
    await fires.declare()  # the next start declares it from the code again
    assert (await schedule_row(pool, "often"))["cron"] == "* * * * * *"


async def test_operators_see_schedules_in_the_cli_the_admin_api_and_the_dashboard(
    pool: asyncpg.Pool, database_url: str, admin_app: FastAPI, admin_client: httpx.AsyncClient
) -> None:
    assert "no schedules" in ok(await cli(database_url, "schedules"))
    fires = scheduler(pool, registry_with(("often", "* * * * * *"), ("nightly", "0 3 * * *")))
    await fires.declare()
    await asyncio.sleep(1.2)
    await fires.fire_once()
    last_job = (await tick_jobs(pool, "often"))[-1]["id"]

    listed = ok_json(await cli(database_url, "schedules", "--json"))["schedules"]
    assert [entry["name"] for entry in listed] == ["nightly", "often"]
    often = listed[1]
    assert (often["task"], often["cron"], often["timezone"], often["last_job_id"]) == (
        "report",
        "* * * * * *",
        "UTC",
        last_job,
    )
    assert often["last_job_state"] == "queued"
    assert datetime.fromisoformat(often["next_tick"]) > datetime.fromisoformat(often["last_tick"])
    table = ok(await cli(database_url, "schedules"))
    assert "nightly" in table
    assert "0 3 * * *" in table
    assert f"{last_job} queued" in table

    assert (await admin_client.get("/schedules")).status_code == 401
    answer = await admin_client.get("/schedules", headers=AUTH)
    assert answer.status_code == 200
    assert [entry["name"] for entry in answer.json()["schedules"]] == ["nightly", "often"]
    assert answer.json()["schedules"][1]["last_job_id"] == last_job

    page = await admin_client.get("/dashboard", headers=SIGNED_IN)
    assert page.status_code == 200
    assert 'data-schedule="often"' in page.text
    assert 'data-schedule="nightly"' in page.text
    assert f"/dashboard/jobs/{last_job}" in page.text


async def test_a_burst_worker_leaves_schedules_to_the_long_running_ones(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker("--burst", target="tests.schedule_tasks:registry")
    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output()[-3000:]
    assert await pool.fetchval("SELECT count(*) FROM outbox_schedules") == 0
    running = spawn_worker(target="tests.schedule_tasks:registry")

    async def fired() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE task = 'beat'"))

    await wait_until(fired, timeout=30, what="a tick enqueued by a long-running worker")
    running.kill()
