"""The names of package ``outbox_worker`` that users import, and the shape of what they get."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import outbox_worker
import outbox_worker.sync
from outbox_worker import errors
from outbox_worker.jobs import Job, JobState
from outbox_worker.names import NAME_PATTERN
from tests.conftest import ROOT

EXPECTED_ALL = [
    "ActiveKey",
    "ArgsTooLarge",
    "CancelJob",
    "ConfigError",
    "DatabaseUnavailable",
    "Debounce",
    "DeclaredTask",
    "EnqueueError",
    "HandlerProcessDied",
    "InvalidArgs",
    "InvalidName",
    "InvalidOption",
    "InvalidRequest",
    "Job",
    "JobContext",
    "JobControl",
    "JobNotFound",
    "JobState",
    "JobStateConflict",
    "JobWaitTimeout",
    "LeaseLost",
    "NewJob",
    "Outbox",
    "OutboxError",
    "QueueFull",
    "Registry",
    "RetryJob",
    "RetryPolicy",
    "SnoozeJob",
    "SyncOutbox",
    "SyncTask",
    "Task",
    "TaskDefinitionError",
    "Throttle",
    "UnknownTask",
    "Worker",
    "WorkerInfo",
    "WorkerOptions",
    "WrongSession",
    "asyncpg_dsn",
    "current_correlation_id",
    "enqueue",
    "enqueue_many",
    "get_job",
    "refresh_gauges",
    "sqlalchemy_url",
    "wait_for_job",
    "workers_alive",
]

# The modules the docs document; every other module of outbox_worker is internal. The sample
# service (its routes and its Alembic environment) and the benchmarks use these only, as any
# app would.
PUBLIC_MODULES = (
    "outbox_worker",
    "outbox_worker.devdb",
    "outbox_worker.migrate",
    "outbox_worker.sync",
    "outbox_worker.testing",
    "outbox_worker.testing.sync",
    "outbox_worker.web",
)
CONSUMERS = ("alembic", "app", "bench")

EXPECTED_ERRORS = {
    "OutboxError",
    "EnqueueError",
    "UnknownTask",
    "InvalidArgs",
    "InvalidName",
    "InvalidOption",
    "InvalidRequest",
    "ArgsTooLarge",
    "TaskDefinitionError",
    "JobNotFound",
    "JobStateConflict",
    "JobWaitTimeout",
    "LeaseLost",
    "HandlerProcessDied",
    "ConfigError",
    "DatabaseUnavailable",
    "QueueFull",
    "WrongSession",
}

ENQUEUE_ERRORS = {
    "UnknownTask",
    "InvalidArgs",
    "InvalidName",
    "InvalidOption",
    "ArgsTooLarge",
    "QueueFull",
}


def error_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in outbox_worker.errors."""
    return {
        name: value
        for name, value in vars(errors).items()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == errors.__name__
    }


def test_all_is_exactly_the_expected_sorted_names() -> None:
    assert outbox_worker.__all__ == EXPECTED_ALL
    assert outbox_worker.__all__ == sorted(outbox_worker.__all__)
    assert len(set(outbox_worker.__all__)) == len(outbox_worker.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("outbox_worker")
    assert getattr(module, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from outbox_worker import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == EXPECTED_ALL
    for name, value in namespace.items():
        assert value is getattr(outbox_worker, name)


def test_the_error_module_holds_the_whole_hierarchy() -> None:
    assert set(error_classes()) == EXPECTED_ERRORS
    # The package exports the very same classes.
    for name, cls in error_classes().items():
        assert getattr(outbox_worker, name) is cls


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_every_error_subclasses_outbox_error(name: str) -> None:
    cls = error_classes()[name]
    assert issubclass(cls, errors.OutboxError)
    assert issubclass(cls, Exception)
    assert issubclass(cls, errors.EnqueueError) == (name in ENQUEUE_ERRORS | {"EnqueueError"})


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_docstring_is_the_default_message(name: str) -> None:
    cls = error_classes()[name]
    doc = (cls.__doc__ or "").strip()
    assert doc
    assert str(cls()) == doc
    assert str(cls(None)) == doc
    assert cls().args == (doc,)
    assert str(cls("something specific")) == "something specific"


def test_invalid_name_default_message_shows_the_pattern() -> None:
    assert NAME_PATTERN in str(errors.InvalidName())


def _job() -> Job:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    return Job(
        id=1,
        queue="default",
        task="echo",
        args={"a": 1},
        state=JobState.QUEUED,
        priority=0,
        attempts=0,
        max_attempts=5,
        run_at=at,
        dedupe_key=None,
        correlation_id=None,
        last_error=None,
        result=None,
        locked_by=None,
        locked_until=None,
        created_at=at,
        started_at=None,
        finished_at=None,
    )


def test_job_is_a_frozen_dataclass() -> None:
    assert dataclasses.is_dataclass(Job)
    job = _job()
    assert job.duplicate is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.state = JobState.RUNNING  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.id = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.duplicate = True  # type: ignore[misc]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        setattr(job, "not_a_field", 1)  # noqa: B010
    assert (job.id, job.state, job.duplicate) == (1, JobState.QUEUED, False)


def test_job_has_the_contract_fields() -> None:
    fields = [f.name for f in dataclasses.fields(Job)]
    assert fields == [
        "id",
        "queue",
        "task",
        "args",
        "state",
        "priority",
        "attempts",
        "max_attempts",
        "run_at",
        "dedupe_key",
        "correlation_id",
        "last_error",
        "result",
        "locked_by",
        "locked_until",
        "created_at",
        "started_at",
        "finished_at",
        "cancel_requested_at",
        "active_key",
        "debounce_key",
        "progress",
        "tags",
        "concurrency_key",
        "trace_context",
        "duplicate",
    ]


def test_new_job_is_a_frozen_dataclass() -> None:
    job = outbox_worker.NewJob("echo", {"a": 1}, key="k")
    assert dataclasses.is_dataclass(job)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.key = "other"  # type: ignore[misc]
    assert job.key == "k"


def test_job_states_are_the_contract_states() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "succeeded", "dead", "cancelled"]
    assert isinstance(JobState.QUEUED, str)
    assert str(JobState.QUEUED) == "queued"


def test_the_sync_module_offers_enqueue_and_waiting() -> None:
    assert outbox_worker.sync.__all__ == ["enqueue", "enqueue_many", "wait_for_job"]
    namespace: dict[str, Any] = {}
    exec("from outbox_worker.sync import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == ["enqueue", "enqueue_many", "wait_for_job"]


@pytest.mark.parametrize(
    ("function", "twins"),
    [
        (
            outbox_worker.enqueue,
            [
                outbox_worker.sync.enqueue,
                outbox_worker.Outbox.enqueue,
                outbox_worker.SyncOutbox.enqueue,
            ],
        ),
        (
            outbox_worker.enqueue_many,
            [
                outbox_worker.sync.enqueue_many,
                outbox_worker.Outbox.enqueue_many,
                outbox_worker.SyncOutbox.enqueue_many,
            ],
        ),
    ],
    ids=["enqueue", "enqueue_many"],
)
def test_every_enqueue_takes_the_same_parameters(function: Any, twins: list[Any]) -> None:
    """Async or sync, module-level or an Outbox's: one way to call them all."""

    def parameters(f: Any) -> list[tuple[str, Any, Any]]:
        values = list(inspect.signature(f).parameters.values())
        return [(p.name, p.kind, p.default) for p in values if p.name != "self"]

    expected = parameters(function)
    assert [name for name, _, _ in expected][:2] in (["session", "task"], ["session", "jobs"])
    for twin in twins:
        assert parameters(twin) == expected, twin


def public_names() -> dict[str, frozenset[str]]:
    """What each public module offers to import: its ``__all__`` and its public submodules."""
    names: dict[str, frozenset[str]] = {}
    for module in PUBLIC_MODULES:
        submodules = {
            m.rpartition(".")[2] for m in PUBLIC_MODULES if m.rpartition(".")[0] == module
        }
        names[module] = frozenset(importlib.import_module(module).__all__) | submodules
    return names


def _ours(module: str) -> bool:
    return module == "outbox_worker" or module.startswith("outbox_worker.")


def private_imports(source: str, public: Mapping[str, Collection[str]]) -> list[str]:
    """The imports in ``source`` that reach past pgoutbox's public API, as line and statement:
    a module outside ``public``, or a name its ``__all__`` does not offer."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {alias.name}"
                for alias in node.names
                if _ours(alias.name) and alias.name not in public
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module or ""):
            offered = public.get(node.module or "")
            found += [
                f"line {node.lineno}: from {node.module} import {alias.name}"
                for alias in node.names
                if offered is None or (alias.name != "*" and alias.name not in offered)
            ]
    return found


def test_every_public_module_lists_what_it_offers() -> None:
    for module, names in public_names().items():
        offered = importlib.import_module(module).__all__
        assert offered == sorted(offered), module
        for name in names:
            assert hasattr(importlib.import_module(module), name), (module, name)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from outbox_worker import Outbox, enqueue", []),
        ("import outbox_worker\nimport outbox_worker.web", []),
        ("from outbox_worker import sync, testing\nfrom outbox_worker.testing.sync import *", []),
        ("from outbox_worker.devdb import PostgresServer", []),
        ("from . import outbox_worker\nimport outbox_worker_extra\nimport sqlalchemy", []),
        ("from outbox_worker import sql", ["line 1: from outbox_worker import sql"]),
        ("from outbox_worker import admin", ["line 1: from outbox_worker import admin"]),
        (
            "import os\nfrom outbox_worker.config import sqlalchemy_url",
            ["line 2: from outbox_worker.config import sqlalchemy_url"],
        ),
        ("import outbox_worker.registry", ["line 1: import outbox_worker.registry"]),
        (
            "from outbox_worker.web.router import guarded",
            ["line 1: from outbox_worker.web.router import guarded"],
        ),
        (
            "from outbox_worker.devdb import docker_answers",
            ["line 1: from outbox_worker.devdb import docker_answers"],
        ),
        (
            "def f() -> None:\n    from outbox_worker.jobs import Job, JobState",
            [
                "line 2: from outbox_worker.jobs import Job",
                "line 2: from outbox_worker.jobs import JobState",
            ],
        ),
    ],
)
def test_the_import_check_tells_public_from_internal(source: str, expected: list[str]) -> None:
    assert private_imports(source, public_names()) == expected


@pytest.mark.parametrize(
    "path",
    sorted(p for consumer in CONSUMERS for p in (ROOT / consumer).rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_sample_and_the_bench_use_only_the_public_api(path: Path) -> None:
    found = private_imports(path.read_text(), public_names())
    assert not found, f"{path.relative_to(ROOT)} imports pgoutbox internals: " + "; ".join(found)
