"""Task registries, where enqueue looks task names up: a name resolves in any live registry
and dies with its registry, and ``@registry.task`` registers with or without parentheses.
"""

from __future__ import annotations

import gc

import pytest

from outbox_worker import JobContext, Registry, TaskDefinitionError


def test_task_names_resolve_in_any_live_registry_and_die_with_theirs() -> None:
    """Registries are found by name without walking all of them, yet a name whose registry
    was dropped is unknown again unless another live registry has it."""

    async def short_lived(ctx: JobContext) -> None:
        return None

    def queue_of(name: str) -> str | None:
        spec = Registry.find(name)
        return None if spec is None else spec.queue

    first, second = Registry(), Registry()
    first.add(short_lived, name="short_lived_task")
    second.add(short_lived, name="short_lived_task", queue="second")
    assert queue_of("short_lived_task") == "second"  # the last one added
    del second
    gc.collect()
    assert queue_of("short_lived_task") == "default"  # found in the one left
    del first
    gc.collect()
    assert queue_of("short_lived_task") is None


def test_a_task_decorator_written_without_parentheses_registers_the_task() -> None:
    """``@registry.task`` bare, as Celery and procrastinate allow, registers like
    ``@registry.task()``; it used to register nothing, and the worker then buried every job
    of the task as unknown."""
    registry = Registry()

    @registry.task
    async def bare(ctx: JobContext, n: int) -> int:
        return n

    @registry.task()
    async def called(ctx: JobContext) -> None:
        return None

    @registry.task("named", queue="elsewhere")
    async def renamed(ctx: JobContext) -> None:
        return None

    assert sorted(spec.name for spec in registry) == ["bare", "called", "named"]
    assert registry.get("named") is not None
    assert registry.get("named").queue == "elsewhere"  # type: ignore[union-attr]
    assert bare.__name__ == "bare"  # the decorator hands the function back
    with pytest.raises(TaskDefinitionError, match="text"):
        registry.task(42)  # type: ignore[call-overload]
