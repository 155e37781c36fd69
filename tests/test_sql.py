"""Every statement of ``outbox_worker.sql`` prepares against the migrated schema (so that a
typo fails the suite, not production); each worker-side statement's declared parameters are
exactly its placeholders, of the type its names promise; every statement that writes about
an attempt carries the fence; and the NOTIFY trigger fires once per inserting statement,
without data."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import sql

# Upper-case string constants of outbox_worker.sql that are fragments or names, not statements.
NOT_STATEMENTS = frozenset({"JOB_SELECT_LIST", "NOTIFY_CHANNEL", "DONE_CHANNEL"})

ASYNCPG_PARAM = re.compile(r"\$(\d+)")
# ``:name`` but not the ``::type`` of a cast (nor the second colon of one).
SQLALCHEMY_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def discover_statements() -> dict[str, str]:
    """Every public upper-case string constant of outbox_worker.sql that is a statement: a new
    constant is covered without touching this file."""
    return {
        name: value
        for name, value in vars(sql).items()
        if name.isupper()
        and not name.startswith("_")
        and isinstance(value, str)
        and name not in NOT_STATEMENTS
    }


STATEMENTS = discover_statements()

# What each worker-side parameter name is, as the server infers it from the statement: a name
# means one thing in every statement that declares it, so arguments bound by name cannot land
# on a placeholder of another kind. A new name must be added here.
PARAMETER_TYPES = {
    "ahead": "int4",
    "args": "jsonb",
    "attempts": "int4[]",
    "batch": "int8",
    "channel": "text",
    "concurrency": "int4",
    "cron": "text",
    "delays": "float8[]",
    "errors": "text[]",
    "give_up": "bool[]",
    "grace_seconds": "float8",
    "id": "int8",
    "ids": "int8[]",
    "in_flight": "int4",
    "key": "int8",
    "keys": "text[]",
    "last_tick": "timestamptz",
    "lease_seconds": "float8",
    "limit": "int8",
    "lock_wait": "float8",
    "max_attempts": "int4",
    "max_copy": "int4",
    "max_snoozes": "int4[]",
    "missed": "text",
    "name": "text",
    "names": "text[]",
    "next_tick": "timestamptz",
    "older_than": "float8",
    "priority": "int4",
    "progress": "text[]",
    "queue": "text",
    "reasons": "text[]",
    "queues": "text[]",
    "results": "text[]",
    "seconds": "float8",
    "state": "text",
    "switch_every": "float8",
    "task": "text",
    "ticks": "timestamptz[]",
    "timezone": "text",
    "worker_id": "text",
}

# The fence as each statement that writes about an attempt renders it: the worker id is its
# own $n; the attempt is a column of the statement's input rows.
FENCE = re.compile(
    r"CASE WHEN j\.state = 'running' AND j\.locked_by = \$(\d+) AND j\.attempts = "
    r"[a-z]+\.attempt THEN true ELSE false END"
)
# Every statement that writes about an attempt the worker holds (it takes the attempts, and
# the worker id), but the one that is the fence's complement: JOB_RELEASE_ORPHANS hands back
# the rows held under the worker's name by no attempt it started.
FENCED = frozenset(
    {
        "JOB_COMPLETE_MANY",
        "JOB_COMPLETE_AND_CLAIM",
        "JOB_COMPLETE_AND_CLAIM_LIMITED",
        "JOB_FAIL_MANY",
        "JOB_RELEASE_MANY",
        "JOB_CANCEL_MANY",
        "JOB_SNOOZE_MANY",
        "JOB_UNCLAIM_MANY",
        "JOB_EXTEND_LEASES",
    }
)


def test_discovery_finds_the_statements() -> None:
    assert STATEMENTS
    assert {"JOB_CLAIM", "JOB_INSERT", "JOB_INSERT_MANY", "JOB_COMPLETE_MANY"} <= set(STATEMENTS)
    assert NOT_STATEMENTS.isdisjoint(STATEMENTS)
    # The fragments are skipped on purpose: they exist, they just are not statements.
    assert all(isinstance(getattr(sql, name), str) for name in NOT_STATEMENTS)


@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_statement_prepares(name: str, pool: asyncpg.Pool, engine: AsyncEngine) -> None:
    statement = STATEMENTS[name]
    positional = {int(n) for n in ASYNCPG_PARAM.findall(statement)}
    named = set(SQLALCHEMY_PARAM.findall(statement))
    assert not (positional and named), f"{name} mixes $n and :name parameters"
    worker_side = statement in sql.declared()
    assert worker_side or not positional, f"{name} has $n parameters and no declaration"
    declared = sql.declared().get(statement, ())

    if worker_side:
        # Declared once, with the names in $n order: exactly its placeholders.
        to_prepare = statement
        expected_params = len(declared)
        assert positional == set(range(1, expected_params + 1)), f"{name}: {declared}"
    elif named:
        # App side: what SQLAlchemy's asyncpg dialect sends is what must prepare.
        compiled = text(statement).compile(dialect=engine.dialect)
        to_prepare = str(compiled)
        assert ASYNCPG_PARAM.search(to_prepare), f"{name} did not compile to $n placeholders"
        assert not SQLALCHEMY_PARAM.search(to_prepare), to_prepare
        expected_params = len(compiled.positiontup or [])
        assert set(compiled.positiontup or []) == named
    else:
        to_prepare = statement  # app side, no parameters
        expected_params = 0

    async with pool.acquire() as conn:
        try:
            prepared = await conn.prepare(to_prepare)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"{name} does not prepare: {type(exc).__name__}: {exc}\n{to_prepare}")
        parameters = prepared.get_parameters()
    assert len(parameters) == expected_params
    if worker_side:
        # Each name is what PARAMETER_TYPES says it is ($n order is the declaration's).
        types = dict(zip(declared, (parameter.name for parameter in parameters), strict=True))
        assert types == {param: PARAMETER_TYPES[param] for param in declared}, name


def test_every_declaration_is_a_statement() -> None:
    """Nothing is declared but the worker-side statements, each under its name."""
    assert set(sql.declared()) == {
        statement for statement in STATEMENTS.values() if ASYNCPG_PARAM.search(statement)
    } | {sql.SCHEMA_PROBE}


@pytest.mark.parametrize("name", sorted(FENCED))
def test_fenced(name: str) -> None:
    statement = STATEMENTS[name]
    [worker_id] = FENCE.findall(statement)
    assert int(worker_id) == sql.declared()[statement].index("worker_id") + 1
    assert statement.count("j.locked_by = $") == 1


# A value of each worker-side parameter type, arrays two long, for plans.
SAMPLE_VALUES: dict[str, object] = {
    "int4": 1,
    "int8": 1,
    "float8": 30.0,
    "text": "w",
    "bool": False,
    "int4[]": [1, 1],
    "int8[]": [1, 2],
    "float8[]": [1.0, 1.0],
    "text[]": ["default", "default"],
    "bool[]": [False, False],
}


@pytest.mark.parametrize("name", sorted(FENCED))
async def test_fenced_writes_find_their_jobs_by_primary_key(name: str, pool: asyncpg.Pool) -> None:
    """Statistics that say few jobs run (true whenever they are taken) must not lead a fenced
    write to read outbox_jobs_running_idx whole: under a snapshot held elsewhere it keeps
    an entry of every job run since, and each write would read them all."""
    await pool.execute(
        "INSERT INTO outbox_jobs (task, state, attempts, finished_at) "
        "SELECT 'echo', 'succeeded', 1, now() FROM generate_series(1, 20000)"
    )
    await pool.execute(
        "INSERT INTO outbox_jobs (task, state, attempts, locked_by, locked_until) "
        "SELECT 'echo', 'running', 1, 'w', now() FROM generate_series(1, 3)"
    )
    await pool.execute("ANALYZE outbox_jobs")
    statement = STATEMENTS[name]
    values = [SAMPLE_VALUES[PARAMETER_TYPES[param]] for param in sql.declared()[statement]]
    plan = "\n".join(r[0] for r in await pool.fetch("EXPLAIN " + statement, *values))
    assert "outbox_jobs_running_idx" not in plan, plan
    assert "Seq Scan on outbox_jobs" not in plan, plan
    assert "outbox_jobs_pkey" in plan, plan


def test_the_fence_is_the_invariant() -> None:
    """sql.fence, which every fenced statement composes, says what FENCE above spells out."""
    assert FENCE.fullmatch(sql.fence("h.attempt").replace(":worker_id", "$3"))


def test_what_takes_an_attempt_is_fenced() -> None:
    """A new statement that writes about an attempt is fenced, or named here as why not."""
    takes_attempts = {
        name
        for name, statement in STATEMENTS.items()
        if {"attempts", "worker_id"} <= set(sql.declared().get(statement, ()))
    }
    assert takes_attempts == FENCED | {"JOB_RELEASE_ORPHANS"}
    assert not FENCE.search(STATEMENTS["JOB_RELEASE_ORPHANS"])


def test_bind_by_name() -> None:
    assert sql.bind(sql.JOB_RELEASE_MANY, worker_id="w", attempts=[1], ids=[7]) == (
        sql.JOB_RELEASE_MANY,
        [7],
        [1],
        "w",
    )
    with pytest.raises(TypeError, match="ids, attempts, worker_id"):
        sql.bind(sql.JOB_RELEASE_MANY, ids=[7], attempts=[1])
    with pytest.raises(TypeError):
        sql.bind(sql.JOB_RELEASE_MANY, ids=[7], attempts=[1], worker_id="w", lease_seconds=1)
    with pytest.raises(ValueError, match="not a statement declared"):
        sql.bind(sql.JOB_GET, id=1)  # app side: drivers render it


def test_declaration_matches_its_text() -> None:
    with pytest.raises(ValueError, match="not declared"):
        sql.statement("SELECT :a::int + :b::int", params=("a",))
    with pytest.raises(ValueError, match="never used"):
        sql.statement("SELECT :a::int", params=("a", "b"))
    with pytest.raises(ValueError, match="twice"):
        sql.statement("SELECT :a::int", params=("a", "a"))


async def test_one_empty_notification_per_inserting_statement(
    database_url: str, pool: asyncpg.Pool
) -> None:
    received: list[tuple[str, str]] = []

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        received.append((channel, payload))

    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(sql.NOTIFY_CHANNEL, on_notify)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO outbox_jobs (task, args) "
                "SELECT 'echo', jsonb_build_object('n', g) FROM generate_series(1, 1000) g"
            )
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # stragglers, if the trigger were per row
    finally:
        await listener.close()

    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1000
    assert received == [(sql.NOTIFY_CHANNEL, "")]
    # PostgreSQL folds identical notifications of one transaction, so a data-free per-row
    # trigger would also arrive once; it would still run 1,000 times: check that no insert
    # trigger is per row.
    row_level = await pool.fetchval(
        "SELECT bool_or(tgtype & 1 = 1) FROM pg_trigger "
        "WHERE tgrelid = 'outbox_jobs'::regclass AND NOT tgisinternal AND tgtype & 4 = 4"
    )
    assert row_level is False


async def test_no_notification_for_a_rolled_back_insert(
    database_url: str, pool: asyncpg.Pool
) -> None:
    received: list[str] = []

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        received.append(payload)

    listener = await asyncpg.connect(database_url)
    try:
        await listener.add_listener(sql.NOTIFY_CHANNEL, on_notify)
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")
            await tx.rollback()
            # A committed insert afterwards proves the listener was listening.
            await conn.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")
        for _ in range(200):
            if received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    finally:
        await listener.close()

    assert received == [""]
