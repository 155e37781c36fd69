"""outbox_worker.testing's assert_enqueued, refute_enqueued and clear_jobs on real PostgreSQL:
what was enqueued, as the caller's own session sees it, and a clean queue. The sample
service's tests written with them, as docs/testing.md shows, are in
tests/sample/test_welcome_email.py."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import tests.testing_tasks  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import JobState, enqueue
from outbox_worker.testing import assert_enqueued, clear_jobs, refute_enqueued
from tests.support import Enqueuer


async def test_the_callers_uncommitted_jobs_are_seen_through_its_own_session(
    db: Enqueuer, engine: AsyncEngine
) -> None:
    job = await enqueue(db, "t_add", {"a": 1, "b": 2})
    assert [found.id for found in await assert_enqueued(db, "t_add", {"a": 1, "b": 2})] == [job.id]
    async with AsyncSession(engine) as elsewhere:
        await refute_enqueued(elsewhere, "t_add")  # not committed: nobody else sees it


async def test_args_match_as_a_subset_and_a_failure_lists_what_is_enqueued(
    db: Enqueuer,
) -> None:
    job = await enqueue(db, "t_add", {"a": 1, "b": 2}, key="k-1")
    [found] = await assert_enqueued(db, "t_add", {"a": 1})
    assert found.args == {"a": 1, "b": 2}
    await assert_enqueued(db, "t_add", {})

    with pytest.raises(AssertionError) as failure:
        await assert_enqueued(db, "t_add", {"a": 2})
    message = str(failure.value)
    assert message.startswith(
        """expected a job of task 't_add' with args containing {"a": 2}, found 0\n"""
    )
    assert (
        f'#{job.id} t_add queue=t_fast state=queued attempts=0/5 args={{"a": 1, "b": 2}} '
        "key='k-1'"
    ) in message
    await refute_enqueued(db, "t_add", {"a": 2})
    await refute_enqueued(db, "t_add", {"c": None})


async def test_a_failure_on_an_empty_table_says_it_is_empty(db: Enqueuer) -> None:
    with pytest.raises(AssertionError, match="outbox_jobs is empty"):
        await assert_enqueued(db, "t_add")


MATCHING: dict[str, tuple[Any, Any]] = {
    "queue": ("other", "t_fast"),
    "state": (JobState.QUEUED, "dead"),
    "priority": (7, 0),
    "max_attempts": (3, 5),
    "key": ("k-2", "k-3"),
    "correlation_id": ("corr-1", "corr-2"),
}


@pytest.mark.parametrize("name", sorted(MATCHING))
async def test_each_filter_narrows_to_its_column(db: Enqueuer, name: str) -> None:
    job = await enqueue(
        db,
        "t_add",
        {"a": 1},
        queue="other",
        priority=7,
        max_attempts=3,
        key="k-2",
        correlation_id="corr-1",
    )
    match, miss = MATCHING[name]
    [found] = await assert_enqueued(db, "t_add", **{name: match})
    assert found.id == job.id
    with pytest.raises(AssertionError, match=f"{name}={miss!r}"):
        await assert_enqueued(db, "t_add", **{name: miss})
    await refute_enqueued(db, "t_add", **{name: miss})
    with pytest.raises(AssertionError, match=f"#{job.id} t_add"):
        await refute_enqueued(db, "t_add", **{name: match})


async def test_a_state_that_does_not_exist_is_refused(db: Enqueuer) -> None:
    with pytest.raises(ValueError, match="bogus"):
        await assert_enqueued(db, "t_add", state="bogus")


async def test_count_asks_for_exactly_that_many(db: Enqueuer) -> None:
    await enqueue(db, "t_add", {"a": 1})
    await enqueue(db, "t_add", {"a": 1, "b": 1})
    assert len(await assert_enqueued(db, "t_add", {"a": 1}, count=2)) == 2
    await assert_enqueued(db, "t_add", {"b": 1}, count=1)
    await assert_enqueued(db, "t_add", {"b": 2}, count=0)
    with pytest.raises(AssertionError, match=r"expected 1 job of task 't_add'.*, found 2"):
        await assert_enqueued(db, "t_add", {"a": 1}, count=1)


async def test_a_long_list_shows_the_newest_jobs(db: Enqueuer) -> None:
    ids = [(await enqueue(db, "t_add", {"a": n})).id for n in range(25)]
    with pytest.raises(AssertionError) as failure:
        await assert_enqueued(db, "t_fails")
    message = str(failure.value)
    assert "the newest 20 shown" in message
    assert f"#{ids[-1]} t_add" in message
    assert f"#{ids[5]} t_add" in message
    assert f"#{ids[4]} t_add" not in message


async def test_clear_jobs_empties_the_queue_in_the_callers_transaction(
    db: Enqueuer,
) -> None:
    for n in range(3):
        await enqueue(db, "t_add", {"a": n})
    assert await clear_jobs(db) == 3
    await refute_enqueued(db, "t_add")
    assert await clear_jobs(db) == 0
