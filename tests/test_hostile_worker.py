"""Hostile rows and a real worker: rows that pass the table's constraints but are bad for the
worker never crash it. A real worker drains them, the bad ones end dead with a clear
last_error, the good ones succeed, and it still stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import CALM, settle, stop_workers
from tests.faults.invariants import check_invariants
from tests.support import INT32_MAX, RTL, ZWJ_FAMILY

# (name, task, args (JSON text), extra columns, expected state, words in last_error)
ROWS: list[tuple[str, str, str, dict[str, Any], str, list[str]]] = [
    ("unknown-task", "A:b.c-d_9", "{}", {}, "dead", ["unknown task", "A:b.c-d_9"]),
    ("unknown-lookalike", "Echo", "{}", {}, "dead", ["unknown task", "'Echo'"]),
    ("missing-arg", "takes_id", "{}", {}, "dead", ["user_id", "missing"]),
    ("extra-arg", "takes_id", '{"user_id": 1, "admin": true}', {}, "dead", ["admin"]),
    ("ctx-as-arg", "echo", '{"ctx": 1}', {}, "dead", ["ctx", "multiple values"]),
    ("number-too-long", "takes_id", '{"user_id": 1e5000}', {}, "dead", ["args", "4300"]),
    ("not-identifier-keys", "echo", '{"": 1, "a b": 2, "ü": 3}', {}, "succeeded", []),
    ("priority-max", "echo", "{}", {"priority": INT32_MAX}, "succeeded", []),
    ("priority-min", "echo", "{}", {"priority": -(2**31)}, "succeeded", []),
    ("run-at-year-1", "echo", "{}", {"run_at": "0001-01-01 00:00:00+00"}, "succeeded", []),
    ("key-10k", "echo", "{}", {"dedupe_key": "k" * 10240}, "succeeded", []),
    ("correlation-emoji", "echo", "{}", {"correlation_id": ZWJ_FAMILY + RTL}, "succeeded", []),
    (
        "correlation-log-injection",
        "echo",
        "{}",
        {"correlation_id": '"}\n{"event": "FAKE"}\nFAKE LOG LINE\x1b[2J'},
        "succeeded",
        [],
    ),
    ("huge-args", "echo", json.dumps({"blob": "x" * 3_000_000}), {}, "succeeded", []),
    ("many-keys", "echo", json.dumps({f"k{i}": i for i in range(20_000)}), {}, "succeeded", []),
    (
        "last-attempt",
        "always_fails",
        "{}",
        {"attempts": 2, "max_attempts": 3},
        "dead",
        ["ValueError"],
    ),
    ("queue-of-its-own", "echo", "{}", {"queue": "x.y:z-1"}, "succeeded", []),
]


async def _insert_row(pool: asyncpg.Pool, task: str, args: str, extra: dict[str, Any]) -> int:
    columns = ["task", "args", *extra]
    values = ["$1", "$2::jsonb"] + [
        f"${i}::text::timestamptz" if column == "run_at" else f"${i}"
        for i, column in enumerate(extra, start=3)
    ]
    job_id: int = await pool.fetchval(
        f"INSERT INTO outbox_jobs ({', '.join(columns)}) VALUES ({', '.join(values)}) RETURNING id",
        task,
        args,
        *extra.values(),
    )
    return job_id


async def test_worker_drains_rows_that_pass_the_constraints_but_are_bad(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    ids = {name: await _insert_row(pool, task, args, extra) for name, task, args, extra, *_ in ROWS}
    worker = spawn_worker(*CALM, "--queues", "default,x.y:z-1", "--concurrency", "4")
    await settle(pool, timeout=60)
    assert worker.proc.poll() is None, worker.output()[-3000:]

    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, state, last_error, result::text AS result, args::text AS args "
            "FROM outbox_jobs"
        )
    }
    wrong = []
    for name, _, _, _, state, words in ROWS:
        row = rows[ids[name]]
        error = row["last_error"] or ""
        if row["state"] != state or not all(word in error for word in words):
            wrong.append((name, row["state"], error[:200]))
    assert wrong == []
    huge = rows[ids["huge-args"]]
    assert json.loads(huge["result"]) == json.loads(huge["args"])  # stored whole, both ways

    # The worker's log is still one JSON object per line: no forged lines.
    assert not [
        line for line in worker.output().splitlines() if "FAKE" in line and not line.startswith("{")
    ]

    await stop_workers([worker])
    await check_invariants(pool, workers=[worker], expected_ids=list(ids.values()))


async def test_args_and_results_too_deep_for_json_do_not_wedge_the_worker(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """PostgreSQL stores JSON nested thousands deep; Python's json gives up near a thousand,
    with a RecursionError. A job like that must end dead, not hold its slot forever."""
    deep_args = await _insert_row(pool, "echo", '{"a": ' + "[" * 3000 + "]" * 3000 + "}", {})
    deep_result = await _insert_row(pool, "deep_result", '{"depth": 3000}', {})
    fine = await _insert_row(pool, "echo", '{"after": true}', {})
    worker = spawn_worker(*CALM, "--concurrency", "4")

    async def rows() -> list[asyncpg.Record]:
        found: list[asyncpg.Record] = await pool.fetch(
            "SELECT id, state, last_error FROM outbox_jobs ORDER BY id"
        )
        return found

    async def finished() -> bool:
        return all(r["state"] in ("succeeded", "dead") for r in await rows())

    with contextlib.suppress(pytest.fail.Exception):  # the message below says more
        await wait_until(finished, timeout=20, what="every job to finish")
    final = await rows()
    assert await finished(), f"jobs wedged: {[dict(r) for r in final]}"
    states = {r["id"]: (r["state"], r["last_error"] or "") for r in final}
    assert states[fine][0] == "succeeded"
    assert states[deep_args][0] == "dead"
    assert "deep" in states[deep_args][1] or "recursion" in states[deep_args][1].lower()
    # The handler ran; only its result cannot be stored as JSON.
    assert states[deep_result][0] in ("succeeded", "dead")
    assert worker.proc.poll() is None
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    await check_invariants(pool, workers=[worker], expected_ids=[deep_args, deep_result, fine])
