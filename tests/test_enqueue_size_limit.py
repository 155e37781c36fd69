"""The size limit of the args of enqueue / enqueue_many, on a real PostgreSQL: per call, from
the environment, or one mebibyte by default; args measured before they are encoded.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox_worker import ArgsTooLarge, NewJob, enqueue, enqueue_many
from outbox_worker.enqueue_checks import ENCODER, _least_size
from tests.support import Enqueuer, job_rows

MIB = 1024 * 1024


def args_of_size(size: int) -> dict[str, str]:
    """Args whose compact JSON form is exactly ``size`` bytes."""
    overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
    args = {"p": "x" * (size - overhead)}
    assert len(json.dumps(args, separators=(",", ":")).encode()) == size
    return args


async def test_size_limit_per_call(db: Enqueuer, pool: asyncpg.Pool) -> None:
    at_limit = await enqueue(db, "echo", args_of_size(100), max_args_bytes=100)
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(101), max_args_bytes=100)
    [many] = await enqueue_many(db, [NewJob("echo", args_of_size(100))], max_args_bytes=100)
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("echo", args_of_size(101))], max_args_bytes=100)
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [at_limit.id, many.id]


async def test_args_that_share_a_list_are_measured_before_they_are_encoded(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    """Sixty levels of a list that holds the level below twice: 2**60 elements once
    encoded. Refused by their size without encoding them, where json.dumps would run for
    ever; a small structure shared a few times is stored expanded."""
    shared: list[Any] = []
    for _ in range(60):
        shared = [shared, shared]
    with pytest.raises(ArgsTooLarge, match="the limit is"):
        await enqueue(db, "echo", {"tree": shared})
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("echo", {"tree": shared})])
    leaf = {"k": [1, 2]}
    job = await enqueue(db, "echo", {"a": leaf, "b": [leaf, leaf]})
    await db.commit()
    [row] = await job_rows(pool)
    assert json.loads(row["args_text"]) == job.args == {"a": leaf, "b": [leaf, leaf]}


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_SCALAR = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
)
_JSON = st.recursive(
    _SCALAR | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(_TEXT, _JSON, max_size=4))
def test_the_size_measured_first_never_exceeds_the_encoded_size(args: dict[str, Any]) -> None:
    """So args within the limit are never refused by the measure taken before encoding."""
    assert _least_size(args, {}) <= len(ENCODER.encode(args).encode())


async def test_default_size_limit_is_one_mebibyte(
    db: Enqueuer, pool: asyncpg.Pool, default_settings: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(int(1.1 * MIB)))
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(MIB + 1))
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("noop"), NewJob("echo", args_of_size(MIB + 1))])
    job = await enqueue(db, "echo", args_of_size(MIB))
    await db.commit()
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [job.id]
    assert len(rows[0]["args_text"]) >= MIB - 16  # stored whole (jsonb text adds spaces)


async def test_size_limit_from_the_environment(
    db: Enqueuer, pool: asyncpg.Pool, default_settings: pytest.MonkeyPatch
) -> None:
    default_settings.setenv("OUTBOX_MAX_ARGS_BYTES", "64")
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(65))
    job = await enqueue(db, "echo", args_of_size(64))
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [job.id]
