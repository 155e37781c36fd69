"""A schedule's ticks and what each look at it enqueues, with a fake clock: time zones and
daylight-saving changes as properties, and the missed-tick policies against a model."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_worker import JobContext, Registry, TaskDefinitionError
from outbox_worker.schedules import MAX_MISSED, Missed, Schedule

# Zones with the kinds of change there are: none, whole hours both ways of the equator,
# half an hour of DST (Lord Howe), a half-hour offset without DST (Kolkata).
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Europe/London",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Asia/Kolkata",
]

zones = st.sampled_from(ZONES)
starts = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1)).map(
    lambda moment: moment.replace(tzinfo=UTC)
)


def wall_time_exists(day: date, at: time, zone: ZoneInfo) -> bool:
    local = datetime.combine(day, at, tzinfo=zone)
    return local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None)


@settings(max_examples=60, deadline=None)
@given(zone=zones, start=starts, hour=st.integers(0, 23), minute=st.integers(0, 59))
def test_a_job_at_a_fixed_local_time_runs_once_a_day_through_dst(
    zone: str, start: datetime, hour: int, minute: int
) -> None:
    schedule = Schedule("daily", "t", f"{minute} {hour} * * *", timezone=zone)
    tz = ZoneInfo(zone)
    ticks = list(itertools.islice(schedule.ticks_after(start), 400))
    days = [tick.astimezone(tz).date() for tick in ticks]
    assert days == sorted(set(days)), "a local day got two runs, or none between others"
    assert all(b - a == timedelta(days=1) for a, b in itertools.pairwise(days))
    for tick in ticks:
        local = tick.astimezone(tz)
        if wall_time_exists(local.date(), time(hour, minute), tz):
            # At that wall time; on the day the clocks go back, at its first occurrence.
            assert (local.hour, local.minute) == (hour, minute)
            earlier = datetime.combine(local.date(), time(hour, minute), tzinfo=tz)
            assert tick == earlier.astimezone(UTC)
        else:
            # Skipped by the clocks going forward: at the first minute after the gap.
            assert not wall_time_exists(local.date(), time(hour, minute), tz)
            wall = datetime.combine(local.date(), time(hour, minute))
            before = (tick - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None)
            assert before < wall < local.replace(tzinfo=None)


@settings(max_examples=60, deadline=None)
@given(zone=zones, start=starts, step=st.sampled_from([1, 5, 10, 15, 30]))
def test_a_job_every_few_minutes_keeps_its_real_interval_through_dst(
    zone: str, start: datetime, step: int
) -> None:
    # Every zone's offsets are whole quarters of an hour: a wall clock stepping by a divisor
    # of 30 minutes lands on the same instants as a clock that never changes.
    schedule = Schedule("often", "t", f"*/{step} * * * *", timezone=zone)
    ticks = list(itertools.islice(schedule.ticks_after(start), 3000))
    assert all(b - a == timedelta(minutes=step) for a, b in itertools.pairwise(ticks))
    assert ticks[0] > start


def test_new_york_daylight_saving_days() -> None:
    ny = ZoneInfo("America/New_York")
    daily = Schedule("daily", "t", "30 1 * * *", timezone="America/New_York")
    fall = list(itertools.islice(daily.ticks_after(datetime(2026, 10, 31, tzinfo=ny)), 3))
    assert [t.astimezone(ny).isoformat() for t in fall] == [
        "2026-10-31T01:30:00-04:00",
        "2026-11-01T01:30:00-04:00",  # the first 01:30 of the day; not again an hour later
        "2026-11-02T01:30:00-05:00",
    ]
    skipped = Schedule("gap", "t", "30 2 * * *", timezone="America/New_York")
    spring = list(itertools.islice(skipped.ticks_after(datetime(2026, 3, 7, tzinfo=ny)), 3))
    assert [t.astimezone(ny).isoformat() for t in spring] == [
        "2026-03-07T02:30:00-05:00",
        "2026-03-08T03:00:00-04:00",  # 02:30 does not exist that day
        "2026-03-09T02:30:00-04:00",
    ]


def test_ticks_before_count_a_tick_at_that_very_moment() -> None:
    schedule = Schedule("s", "t", "*/10 * * * * *")
    at = datetime(2026, 5, 1, 12, 0, 30, tzinfo=UTC)
    assert list(itertools.islice(schedule.ticks_before(at), 2)) == [at, at - timedelta(seconds=10)]
    assert next(schedule.ticks_before(at + timedelta(microseconds=5))) == at
    assert next(schedule.ticks_after(at)) == at + timedelta(seconds=10)


# -- what each look enqueues: the policies against a model --------------------------------

policies: st.SearchStrategy[Missed] = st.one_of(
    st.sampled_from(["skip", "latest"]), st.integers(0, 5)
)


@settings(max_examples=200, deadline=None)
@given(
    policy=policies,
    grace=st.integers(0, 20),
    gaps=st.lists(st.floats(0.1, 60), min_size=1, max_size=40),
)
def test_looks_at_a_schedule_enqueue_each_tick_at_most_once_and_on_time_ones_always(
    policy: Missed, grace: int, gaps: list[float]
) -> None:
    """A per-second schedule looked at after random pauses (some long: no worker ran).

    The model: a tick is on time for a look when the look comes within ``grace`` of it and
    after the previous look; each on-time tick runs; of the others (missed) the policy
    picks: none, the latest unless an on-time one runs, or the N latest.
    """
    schedule = Schedule("s", "t", "* * * * * *", missed=policy, grace=timedelta(seconds=grace))
    start = datetime(2026, 6, 1, tzinfo=UTC)
    last = start
    now = start
    enqueued: list[datetime] = []
    for gap in gaps:
        now = now + timedelta(seconds=gap)
        due = schedule.due(last, now)
        passed = list(
            itertools.takewhile(lambda t: t <= now, schedule.ticks_after(last))  # noqa: B023
        )
        on_time = [t for t in passed if t > now - timedelta(seconds=grace)]
        missed = [t for t in passed if t <= now - timedelta(seconds=grace)]
        if policy == "skip":
            expected = on_time
        elif policy == "latest":
            expected = on_time or missed[-1:]
        else:
            expected = missed[max(0, len(missed) - policy) :] + on_time
        assert due.ticks == expected
        assert due.skipped == len(passed) - len(expected)
        assert due.next_tick == next(schedule.ticks_after(now))
        enqueued += due.ticks
        last = max([last, *passed])
    assert len(enqueued) == len(set(enqueued))
    assert enqueued == sorted(enqueued)


def test_a_long_outage_is_counted_up_to_a_bound() -> None:
    schedule = Schedule("s", "t", "* * * * * *", missed=3)
    start = datetime(2026, 6, 1, tzinfo=UTC)
    due = schedule.due(start, start + timedelta(days=2))
    assert len(due.ticks) == 3 + 60  # the 3 latest missed ticks, then the minute of grace
    assert due.skipped == MAX_MISSED + 1 - 3


# -- declaring schedules --------------------------------------------------------------------


def _registry() -> Registry:
    registry = Registry()

    @registry.task
    async def report(ctx: JobContext, kind: str = "daily") -> None:
        return None

    return registry


def test_periodic_declares_a_schedule_named_after_its_task() -> None:
    registry = Registry()

    @registry.periodic("0 3 * * *", timezone="Europe/Riga", args={"kind": "nightly"})
    @registry.task
    async def report(ctx: JobContext, kind: str) -> None:
        return None

    [schedule] = registry.schedules()
    assert (schedule.name, schedule.task, schedule.cron, schedule.timezone) == (
        "report",
        "report",
        "0 3 * * *",
        "Europe/Riga",
    )
    assert dict(schedule.args) == {"kind": "nightly"}
    assert schedule.missed == "latest"
    assert schedule.key(datetime(2026, 1, 2, 1, 0, tzinfo=UTC)) == "report@2026-01-02T01:00:00Z"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "61 * * * *"}, "Bad minute"),
        ({"cron": "* * *"}, "five fields"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"cron": "0 3 * * *", "missed": "all"}, "missed must be"),
        ({"cron": "0 3 * * *", "missed": -1}, "missed must be"),
        ({"cron": "0 3 * * *", "grace": timedelta(seconds=-1)}, "grace"),
        ({"cron": "0 3 * * *", "args": {"colour": "red"}}, "args do not fit"),
        ({"cron": "0 3 * * *", "args": {"kind": object()}}, "JSON"),
        ({"cron": "0 3 * * *", "task": "nobody"}, "not registered"),
        ({"cron": "0 3 * * *", "name": "bad name"}, "schedule name"),
    ],
)
def test_a_schedule_that_cannot_work_is_refused_at_declaration(
    options: dict[str, object], message: str
) -> None:
    registry = _registry()
    name = str(options.pop("name", "nightly"))
    task = str(options.pop("task", "report"))
    cron = str(options.pop("cron"))
    with pytest.raises(TaskDefinitionError, match=message):
        registry.schedule(name, task, cron, **options)  # type: ignore[arg-type]
    assert registry.schedules() == []


def test_a_schedule_name_is_declared_once_and_periodic_goes_above_task() -> None:
    registry = _registry()
    registry.schedule("nightly", "report", "0 3 * * *")
    with pytest.raises(TaskDefinitionError, match="already declared"):
        registry.schedule("nightly", "report", "0 4 * * *")

    async def bare(ctx: JobContext) -> None:
        return None

    with pytest.raises(TaskDefinitionError, match=r"above @registry\.task"):
        registry.periodic("0 3 * * *")(bare)  # type: ignore[type-var]
