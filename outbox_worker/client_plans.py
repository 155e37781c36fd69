"""How an enqueue call becomes a checked plan: where the task's defaults are found, which
settings apply, and every refusal of the call itself (a NewJob given options beside it, an
unknown task). An Outbox's async and sync faces share one Planner; the module-level functions
have one that reads the environment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from outbox_worker.enqueue_checks import TaskDefaults
from outbox_worker.enqueue_plans import (
    Backpressure,
    NewJob,
    Plan,
    default_backpressure,
    default_max_args_bytes,
    plan_many,
    plan_one,
)
from outbox_worker.errors import InvalidName, InvalidOption, UnknownTask
from outbox_worker.jobs import Job
from outbox_worker.keys import JobKey
from outbox_worker.names import NAME_PATTERN, is_valid_name
from outbox_worker.registry import DeclaredTask, Registry


class Planner:
    """What an Outbox's async and sync faces share: where task names are found, the
    settings, and turning a call into a checked plan (every refusal raised here)."""

    def settings(self) -> tuple[int, Backpressure]:
        """The args size limit and the depth limits."""
        raise NotImplementedError

    def find(self, task: str) -> TaskDefaults | None:
        raise NotImplementedError

    def unknown(self, task: str) -> str:
        """Why ``task`` is not found, for UnknownTask."""
        raise NotImplementedError

    def spec(self, task: str) -> TaskDefaults:
        if not is_valid_name(task):
            raise InvalidName(f"task name {task!r} must match {NAME_PATTERN}")
        spec = self.find(task)
        if spec is None:
            raise UnknownTask(self.unknown(task))
        return spec

    def plan_one(
        self,
        task: str | NewJob,
        args: Mapping[str, Any] | None,
        options: Options,
        max_args_bytes: int | None,
    ) -> Plan[Job]:
        if isinstance(task, NewJob):
            if args is not None or options != NO_OPTIONS:
                raise InvalidOption(
                    "a NewJob carries its own args and options: set them on it "
                    "(job.with_options(key=...)), not beside it"
                )
            job = task
        else:
            job = NewJob(task, {} if args is None else args, *options)
        limit, backpressure = self.settings()
        return plan_one(
            job,
            self.spec(job.task),
            limit if max_args_bytes is None else max_args_bytes,
            backpressure,
        )

    def plan_many(self, jobs: Sequence[NewJob], max_args_bytes: int | None) -> Plan[list[Job]]:
        specs = {task: self.spec(task) for task in dict.fromkeys(job.task for job in jobs)}
        limit, backpressure = self.settings()
        return plan_many(
            jobs, specs, limit if max_args_bytes is None else max_args_bytes, backpressure
        )


# enqueue's options, in NewJob's order: key, queue, priority, max_attempts, delay, run_at,
# correlation_id, tags, concurrency_key.
Options = tuple[
    JobKey | None,
    str | None,
    int | None,
    int | None,
    float | timedelta | None,
    datetime | None,
    str | None,
    Sequence[str] | None,
    str | None,
]
NO_OPTIONS: Options = (None,) * 9


def checked_autocommit(autocommit: object) -> bool:
    """``autocommit`` checked: a truthy string must not turn a job into one that commits on
    its own."""
    if not isinstance(autocommit, bool):
        raise InvalidOption(f"autocommit must be True or False, not {autocommit!r}")
    return autocommit


class ConfiguredPlanner(Planner):
    """An Outbox's own: the settings it was given and the registry it was given."""

    def __init__(
        self,
        registry: Registry | None,
        declared: Mapping[str, DeclaredTask],
        max_args_bytes: int,
        backpressure: Backpressure,
    ) -> None:
        self._registry = registry
        self._declared = declared
        self._settings = (max_args_bytes, backpressure)

    def settings(self) -> tuple[int, Backpressure]:
        return self._settings

    def find(self, task: str) -> TaskDefaults | None:
        if self._registry is not None:
            spec = self._registry.get(task)
            if spec is not None:
                return spec
        return self._declared.get(task)

    def unknown(self, task: str) -> str:
        return (
            f"task {task!r} is neither in this Outbox's registry nor declared "
            "(Outbox(registry, tasks=[DeclaredTask(...)]))"
        )


class EnvironmentPlanner(Planner):
    """The module-level functions' core, as they always behaved: OUTBOX_MAX_ARGS_BYTES and
    OUTBOX_QUEUE_DEPTH_* read on first use, and a task found in any live registry."""

    def settings(self) -> tuple[int, Backpressure]:
        return default_max_args_bytes(), default_backpressure()

    def find(self, task: str) -> TaskDefaults | None:
        return Registry.find(task)

    def unknown(self, task: str) -> str:
        return f"no registry in this process has a task named {task!r}"
