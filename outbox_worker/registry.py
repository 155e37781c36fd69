"""Closed maps of task name → handler: nothing is imported by a name read from the database."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, overload

from outbox_worker.errors import TaskDefinitionError
from outbox_worker.names import NAME_PATTERN, is_valid_name

Handler = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    handler: Handler
    queue: str
    max_attempts: int
    timeout: float | None
    priority: int
    signature: inspect.Signature
    # What keyword arguments the handler takes, precomputed so that the per-job check is a
    # couple of set operations (Signature.bind costs microseconds on the hot path).
    accepts: frozenset[str] | None  # None: it takes **kwargs
    requires: frozenset[str]

    @classmethod
    def of(
        cls,
        name: str,
        handler: Handler,
        queue: str,
        max_attempts: int,
        timeout: float | None,
        priority: int,
    ) -> TaskSpec:
        signature = inspect.signature(handler)
        keyword = [
            p
            for p in list(signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        return cls(
            name,
            handler,
            queue,
            max_attempts,
            timeout,
            priority,
            signature,
            None if takes_any else frozenset(p.name for p in keyword),
            frozenset(p.name for p in keyword if p.default is p.empty),
        )

    def check_args(self, args: dict[str, Any]) -> str | None:
        """Why these args cannot call the handler, or None when they can."""
        if self.requires <= args.keys() and (self.accepts is None or self.accepts >= args.keys()):
            return None
        try:
            self.signature.bind(None, **args)
        except TypeError as exc:
            return f"args do not fit {self.name}{self.signature}: {exc}"
        return None


class Registry:
    """A set of tasks. Every live registry in the process contributes its names to enqueue."""

    _live: ClassVar[weakref.WeakSet[Registry]] = weakref.WeakSet()
    # Task name -> the registry that added it last: enqueue looks a name up on every call, and
    # walking every live registry cost a sixth of an enqueue in a FastAPI route (py-spy).
    _by_name: ClassVar[dict[str, weakref.ref[Registry]]] = {}

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        Registry._live.add(self)

    @overload
    def task(self, name: H, /) -> H: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Callable[[H], H]: ...

    def task(
        self,
        name: str | H | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
    ) -> H | Callable[[H], H]:
        """Register an ``async def handler(ctx: JobContext, **args)``; the name defaults to
        the function's. ``@registry.task`` and ``@registry.task()`` are the same: written
        bare, as Celery and procrastinate allow, it must not register nothing in silence."""
        if callable(name):
            self.add(name)
            return name
        if name is not None and not isinstance(name, str):
            raise TaskDefinitionError(f"a task name is text, not {type(name).__name__}")

        def register(handler: H) -> H:
            self.add(
                handler,
                name=name,
                queue=queue,
                max_attempts=max_attempts,
                timeout=timeout,
                priority=priority,
            )
            return handler

        return register

    def add(
        self,
        handler: Handler,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
    ) -> TaskSpec:
        task_name = name or handler.__name__
        if not is_valid_name(task_name):
            raise TaskDefinitionError(f"task name {task_name!r} must match {NAME_PATTERN}")
        if not is_valid_name(queue):
            raise TaskDefinitionError(f"queue name {queue!r} must match {NAME_PATTERN}")
        if task_name in self._tasks:
            raise TaskDefinitionError(f"task {task_name!r} is already registered")
        if not inspect.iscoroutinefunction(handler):
            raise TaskDefinitionError(f"task {task_name!r} must be an async def function")
        if max_attempts < 1:
            raise TaskDefinitionError(f"task {task_name!r}: max_attempts must be at least 1")
        if timeout is not None and timeout <= 0:
            raise TaskDefinitionError(f"task {task_name!r}: timeout must be positive")
        parameters = list(inspect.signature(handler).parameters.values())
        if not parameters or parameters[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise TaskDefinitionError(f"task {task_name!r} must take a JobContext first")
        if any(p.kind == p.VAR_POSITIONAL for p in parameters[1:]) or any(
            p.kind == p.POSITIONAL_ONLY for p in parameters[1:]
        ):
            raise TaskDefinitionError(
                f"task {task_name!r}: arguments after the context must be keyword arguments"
            )
        spec = TaskSpec.of(task_name, handler, queue, max_attempts, timeout, priority)
        self._tasks[task_name] = spec
        Registry._by_name[task_name] = weakref.ref(self)
        return spec

    def get(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def queues(self) -> list[str]:
        """The queues a worker of this registry serves by default: its tasks' and ``default``."""
        return sorted({"default", *(spec.queue for spec in self._tasks.values())})

    @classmethod
    def find(cls, name: str) -> TaskSpec | None:
        """The task of that name in any live registry of this process."""
        owner = cls._by_name.get(name)
        registry = None if owner is None else owner()
        if registry is not None:
            return registry.get(name)
        for registry in list(cls._live):
            spec = registry.get(name)
            if spec is not None:
                return spec
        return None
