"""The job state machine, model-checked: hypothesis drives enqueue, claim, complete, fail,
release, heartbeat, lease expiry, rescue, retry-now, cancel and late writes of workers that
lost their lease in random orders against the real database, through the library's own SQL
(``outbox_worker.sql``) and ``enqueue``, and after every step compares every row with a small
Python model of what each of those statements must do. The operator's side (cancel and
retry) goes through the admin API that the HTTP routes, the CLI and the dashboard share.

One database for the whole test, emptied (``TRUNCATE … RESTART IDENTITY``) at the start of
every example: the per-test fixtures cannot reach inside hypothesis's examples. The model and
the machine are in tests/job_model.py and tests/job_state_machine.py.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from sqlalchemy.ext.asyncio import create_async_engine

from outbox_worker.config import sqlalchemy_url
from outbox_worker.devdb import PostgresServer, admin
from tests.conftest import TEMPLATE
from tests.job_model import Env
from tests.job_state_machine import JobStateMachine


# About 25 s when it passes; a failure is shrunk to a minimal sequence, which takes minutes
# of database round trips: the suite's 120 s timeout would cut the shrinking short.
@pytest.mark.timeout(900)
def test_job_state_machine_matches_its_model(
    pg_server: PostgresServer,
    template_url: str,  # the migrated template exists
) -> None:
    name = f"model_{os.getpid()}"
    loop = asyncio.new_event_loop()
    loop.run_until_complete(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    loop.run_until_complete(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
    try:
        url = pg_server.url_for(name)
        engine = create_async_engine(sqlalchemy_url(url), pool_size=2)
        env = Env(loop, url, engine)

        class OnThisDatabase(JobStateMachine):
            def __init__(self) -> None:
                super().__init__(env)

        try:
            run_state_machine_as_test(
                OnThisDatabase,
                settings=settings(
                    max_examples=300,
                    stateful_step_count=40,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        finally:
            loop.run_until_complete(engine.dispose())
        # The machine did reach the interesting places, fenced writes above all.
        assert env.steps > 500
        for write in ("complete", "fail", "release", "unclaim", "snooze", "cancel"):
            assert env.writes.get(f"{write}:ok", 0) > 0, (env.steps, env.writes)
        fenced = sum(n for what, n in env.writes.items() if what.endswith(":fenced"))
        assert fenced >= 5, env.writes
    finally:
        loop.run_until_complete(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        loop.close()
