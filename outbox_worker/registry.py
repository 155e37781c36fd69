"""Closed maps of task name → handler: nothing is imported by a name read from the database."""

from __future__ import annotations

import functools
import inspect
import json
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import (
    Any,
    ClassVar,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from outbox_worker.context import JobContext
from outbox_worker.enqueue_checks import INT32_MAX
from outbox_worker.enqueue_plans import NewJob
from outbox_worker.errors import InvalidArgs, TaskDefinitionError
from outbox_worker.names import NAME_PATTERN, is_valid_name
from outbox_worker.schedules import DEFAULT_GRACE, Missed, Schedule

# An async def, run on the worker's event loop, or a plain def, run in the worker's threads
# or in its handler processes (TaskSpec.run_in).
Handler = Callable[..., Any]
# Where a task's handler runs: "loop" for an async def; a plain def in a "thread" (the
# default) or in a "process" of the worker's own (``run_in="process"``).
RunIn = Literal["loop", "thread", "process"]
P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
# What a plain def handler may return: a value with a JSON form (the worker stores it as the
# job's result; a process's crosses to the worker as JSON). Bounded, unlike an async
# handler's, so that mypy never takes an async def, whose call gives a coroutine, for one.
JSONValue = None | bool | int | float | str | Sequence[Any] | Mapping[str, Any]
S = TypeVar("S", bound=JSONValue)
S_co = TypeVar("S_co", bound=JSONValue, covariant=True)


class TaskHandler(Protocol[P, R_co]):
    """A handler as mypy sees it: the context, then the arguments its jobs carry. The
    context is a named parameter (``Concatenate`` would make it positional-only, which a
    handler ``(ctx, **kwargs)`` does not match); a handler whose context is positional-only
    is registered with :meth:`Registry.add`."""

    def __call__(self, ctx: JobContext, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R_co]: ...


class SyncTaskHandler(Protocol[P, S_co]):
    """A plain ``def`` handler, run in a thread or a process of the worker's, as mypy sees it."""

    def __call__(self, ctx: JobContext, *args: P.args, **kwargs: P.kwargs) -> S_co: ...


Backoff = Callable[[int], float]
"""Seconds to wait before the next attempt, given the attempt that just failed (1 first)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task's failed attempts go on: ``@registry.task(retry=RetryPolicy(...))``.

    - ``backoff``: the delay before the next attempt, in place of the worker's exponential
      backoff with jitter (``OUTBOX_RETRY_BASE_SECONDS``, ``…_CAP_SECONDS``);
    - ``retry_on``: when given, only these exception types are retried; any other failure
      goes dead at once;
    - ``give_up_on``: these exception types go dead at once (checked first);
    - ``max_snoozes``: how often a handler may snooze the job (``SnoozeJob``) before it goes
      dead instead.

    A timeout is a ``TimeoutError`` to these rules. Out of attempts, a job goes dead whatever
    the policy says.
    """

    backoff: Backoff | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    give_up_on: tuple[type[BaseException], ...] = ()
    max_snoozes: int = 100

    def __post_init__(self) -> None:
        if self.backoff is not None and not callable(self.backoff):
            raise TaskDefinitionError("RetryPolicy: backoff must be a function of the attempt")
        for field_name in ("retry_on", "give_up_on"):
            kinds = getattr(self, field_name)
            if not isinstance(kinds, tuple) or not all(
                isinstance(kind, type) and issubclass(kind, BaseException) for kind in kinds
            ):
                raise TaskDefinitionError(
                    f"RetryPolicy: {field_name} must be a tuple of exception types"
                )
        if isinstance(self.max_snoozes, bool) or not (
            isinstance(self.max_snoozes, int) and 0 <= self.max_snoozes <= INT32_MAX
        ):
            raise TaskDefinitionError("RetryPolicy: max_snoozes must be a count of 0 or more")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    name: str
    handler: Handler
    queue: str
    max_attempts: int
    timeout: float | None
    priority: int
    signature: inspect.Signature
    # The task's retry policy (see Registry.task): None for the worker's backoff, and the
    # exception types that decide between a retry and dead at once.
    backoff: Backoff | None
    retry_on: tuple[type[BaseException], ...]
    give_up_on: tuple[type[BaseException], ...]
    max_snoozes: int
    # What keyword arguments the handler takes, precomputed so that the per-job check is a
    # couple of set operations (Signature.bind costs microseconds on the hot path).
    accepts: frozenset[str] | None  # None: it takes **kwargs
    requires: frozenset[str]
    run_in: RunIn = "loop"

    @classmethod
    def of(
        cls,
        name: str,
        handler: Handler,
        queue: str,
        max_attempts: int,
        timeout: float | None,
        priority: int,
        policy: RetryPolicy | None = None,
        run_in: RunIn = "loop",
    ) -> TaskSpec:
        signature = inspect.signature(handler)
        keyword = [
            p
            for p in list(signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        takes_any = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
        policy = policy or RetryPolicy()
        return cls(
            name,
            handler,
            queue,
            max_attempts,
            timeout,
            priority,
            signature,
            policy.backoff,
            policy.retry_on,
            policy.give_up_on,
            policy.max_snoozes,
            None if takes_any else frozenset(p.name for p in keyword),
            frozenset(p.name for p in keyword if p.default is p.empty),
            run_in,
        )

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure with ``exc`` is worth another attempt, by the task's policy."""
        if isinstance(exc, self.give_up_on):
            return False
        return not self.retry_on or isinstance(exc, self.retry_on)

    def check_args(self, args: dict[str, Any]) -> str | None:
        """Why these args cannot call the handler, or None when they can."""
        if self.requires <= args.keys() and (self.accepts is None or self.accepts >= args.keys()):
            return None
        try:
            self.signature.bind(None, **args)
        except TypeError as exc:
            return f"args do not fit {self.name}{self.signature}: {exc}"
        return None


def _check_options(
    task_name: str, queue: str, max_attempts: int, timeout: float | None, priority: int
) -> None:
    """What a task's definition must hold, registered with its handler or only declared."""
    if not is_valid_name(task_name):
        raise TaskDefinitionError(f"task name {task_name!r} must match {NAME_PATTERN}")
    if not is_valid_name(queue):
        raise TaskDefinitionError(f"queue name {queue!r} must match {NAME_PATTERN}")
    if max_attempts < 1:
        raise TaskDefinitionError(f"task {task_name!r}: max_attempts must be at least 1")
    if timeout is not None and timeout <= 0:
        raise TaskDefinitionError(f"task {task_name!r}: timeout must be positive")
    if not -INT32_MAX <= priority <= INT32_MAX:
        # Enqueue takes the task's priority unchecked: the table would refuse the job.
        raise TaskDefinitionError(f"task {task_name!r}: priority must fit in 32 bits")


def _where(task_name: str, handler: Handler, run_in: str | None) -> RunIn:
    """Where the handler runs. A process imports its handler by module and name (nothing
    else crosses to it), so ``run_in="process"`` takes a function defined at the top of a
    module."""
    if inspect.iscoroutinefunction(handler):
        if run_in is not None:
            raise TaskDefinitionError(
                f"task {task_name!r}: run_in={run_in!r} is for a plain def; an async def "
                "runs on the worker's event loop"
            )
        return "loop"
    if run_in not in (None, "thread", "process"):
        raise TaskDefinitionError(
            f"task {task_name!r}: run_in is 'thread' or 'process', not {run_in!r}"
        )
    if inspect.isasyncgenfunction(handler) or inspect.iscoroutinefunction(type(handler).__call__):
        raise TaskDefinitionError(f"task {task_name!r} must be an async def or a plain def")
    if run_in != "process":
        return "thread"
    if not inspect.isfunction(handler) or "<" in handler.__qualname__:
        raise TaskDefinitionError(
            f"task {task_name!r}: run_in='process' takes a function defined at the top of a "
            f"module, which its process imports by name; not {handler!r}"
        )
    return "process"


@dataclass(frozen=True, slots=True)
class DeclaredTask:
    """A task that an API process enqueues by name without importing its handler (it lives
    in the worker's codebase): ``Outbox(tasks=[DeclaredTask("send_welcome_email",
    queue="emails", max_attempts=8)])``. Its options are what the worker's registry gives
    the task: its jobs take them unless the call says otherwise."""

    name: str
    queue: str = "default"
    max_attempts: int = 5
    priority: int = 0

    def __post_init__(self) -> None:
        _check_options(self.name, self.queue, self.max_attempts, None, self.priority)


class BaseTask(Generic[P, R]):
    """What :class:`Task` and :class:`SyncTask` share: the spec, and ``job()``."""

    # The handler's, as functools.wraps gives a wrapper: the task reads as its function.
    __name__: str
    __qualname__: str
    __wrapped__: Handler

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        functools.update_wrapper(cast(Callable[..., Any], self), spec.handler)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def declared(self) -> DeclaredTask:
        """This task's name and options without its handler: what a process that enqueues
        it but does not run it declares (``Outbox(tasks=[...])``)."""
        spec = self.spec
        return DeclaredTask(spec.name, spec.queue, spec.max_attempts, spec.priority)

    def job(self, *args: P.args, **kwargs: P.kwargs) -> NewJob:
        """The job that runs the handler with these arguments (after its context)."""
        if not args:
            problem = self.spec.check_args(kwargs)
            if problem is not None:
                raise InvalidArgs(problem)
            return NewJob(self.spec.name, kwargs)
        try:
            bound = self.spec.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise InvalidArgs(f"args do not fit {self.name}{self.spec.signature}: {exc}") from exc
        # By name, as the worker passes them: the context out, a **kwargs parameter spread.
        parameters = list(self.spec.signature.parameters.values())
        named = dict(bound.arguments)
        del named[parameters[0].name]
        for parameter in parameters:
            if parameter.kind is parameter.VAR_KEYWORD:
                named.update(named.pop(parameter.name, {}))
        return NewJob(self.spec.name, named)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} of {self.spec.handler!r}>"


class Task(BaseTask[P, R]):
    """What ``@registry.task`` gives back for an ``async def``: the handler, called as
    before, and a typed way to build its jobs.

    ``send_welcome_email.job(user_id=42)`` is the NewJob of that call: mypy checks the
    arguments against the handler's signature after its context (and so does this method,
    at run time, for callers mypy does not see). Options go on with
    ``.with_options(key=…)``; an Outbox enqueues it: ``await outbox.enqueue(session, job)``.
    """

    def __call__(self, ctx: JobContext, /, *args: P.args, **kwargs: P.kwargs) -> Awaitable[R]:
        result: Awaitable[R] = self.spec.handler(ctx, *args, **kwargs)
        return result


class SyncTask(BaseTask[P, R]):
    """What ``@registry.task`` gives back for a plain ``def``: as :class:`Task`, its call
    returning the handler's value rather than an awaitable."""

    def __call__(self, ctx: JobContext, /, *args: P.args, **kwargs: P.kwargs) -> R:
        result: R = self.spec.handler(ctx, *args, **kwargs)
        return result


AnyTask = TypeVar("AnyTask", bound=BaseTask[Any, Any])


def _task_of(spec: TaskSpec) -> Task[Any, Any] | SyncTask[Any, Any]:
    return Task(spec) if spec.run_in == "loop" else SyncTask(spec)


class _TaskDecorator(Protocol):
    """What ``registry.task(...)`` gives: the decorator that registers a handler."""

    @overload
    def __call__(self, handler: TaskHandler[P, R], /) -> Task[P, R]: ...

    @overload
    def __call__(self, handler: SyncTaskHandler[P, S], /) -> SyncTask[P, S]: ...


class Registry:
    """A set of tasks, what a worker runs.

    An :class:`~outbox_worker.client.Outbox` looks task names up in the registry it was
    given. The module-level ``enqueue`` looks them up in every live registry of the process
    (the one added last wins a name two of them have), for apps that import theirs.
    """

    _live: ClassVar[weakref.WeakSet[Registry]] = weakref.WeakSet()
    # Task name -> the registry that added it last: enqueue looks a name up on every call, and
    # walking every live registry cost a sixth of an enqueue in a FastAPI route (py-spy).
    _by_name: ClassVar[dict[str, weakref.ref[Registry]]] = {}

    def __init__(self) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        self._schedules: dict[str, Schedule] = {}
        Registry._live.add(self)

    @overload
    def task(self, name: TaskHandler[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, name: SyncTaskHandler[P, S], /) -> SyncTask[P, S]: ...

    @overload
    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        run_in: Literal["thread", "process"] | None = None,
    ) -> _TaskDecorator: ...

    def task(
        self,
        name: str | Handler | None = None,
        *,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        run_in: Literal["thread", "process"] | None = None,
    ) -> Task[Any, Any] | SyncTask[Any, Any] | _TaskDecorator:
        """Register a ``handler(ctx: JobContext, **args)``; the name defaults to the
        function's. ``@registry.task`` and ``@registry.task()`` are the same: written bare,
        as Celery and procrastinate allow, it must not register nothing in silence.
        The decorated name is a :class:`Task` (a :class:`SyncTask` for a plain ``def``): the
        handler, with ``job()`` besides. ``retry`` is the task's :class:`RetryPolicy` (its
        backoff, which failures retry).

        An ``async def`` runs on the worker's event loop; a plain ``def`` in one of the
        worker's threads, or, with ``run_in="process"``, in one of its handler processes,
        which a timeout kills (docs/handlers.md)."""
        if callable(name):
            return _task_of(self.add(name))
        if name is not None and not isinstance(name, str):
            raise TaskDefinitionError(f"a task name is text, not {type(name).__name__}")

        def register(handler: Handler) -> Task[Any, Any] | SyncTask[Any, Any]:
            return _task_of(
                self.add(
                    handler,
                    name=name,
                    queue=queue,
                    max_attempts=max_attempts,
                    timeout=timeout,
                    priority=priority,
                    retry=retry,
                    run_in=run_in,
                )
            )

        # A plain function cannot declare the decorator's two overloads; it serves both.
        return register  # type: ignore[return-value]

    def add(
        self,
        handler: Handler,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int = 5,
        timeout: float | None = None,
        priority: int = 0,
        retry: RetryPolicy | None = None,
        run_in: Literal["thread", "process"] | None = None,
    ) -> TaskSpec:
        if isinstance(handler, BaseTask):  # a task of another registry: its handler
            handler = handler.spec.handler
        task_name = name or handler.__name__
        _check_options(task_name, queue, max_attempts, timeout, priority)
        if task_name in self._tasks:
            raise TaskDefinitionError(f"task {task_name!r} is already registered")
        where = _where(task_name, handler, run_in)
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
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TaskDefinitionError(f"task {task_name!r}: retry must be a RetryPolicy")
        spec = TaskSpec.of(task_name, handler, queue, max_attempts, timeout, priority, retry, where)
        self._tasks[task_name] = spec
        Registry._by_name[task_name] = weakref.ref(self)
        return spec

    def schedule(
        self,
        name: str,
        task: str | BaseTask[Any, Any],
        cron: str,
        *,
        args: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        missed: Missed = "latest",
        grace: timedelta = DEFAULT_GRACE,
    ) -> Schedule:
        """Enqueue ``task`` with ``args`` at every tick of ``cron`` (five fields, or six with
        seconds first) read in ``timezone``, from every worker of this registry and exactly
        once per tick. ``missed`` says what happens to ticks that passed while no worker ran
        (see :class:`~outbox_worker.schedules.Schedule`). A schedule taken out of the code
        stops; a changed one takes effect when a worker with the new code starts."""
        task_name = task.name if isinstance(task, BaseTask) else task
        spec = self._tasks.get(task_name)
        if spec is None:
            raise TaskDefinitionError(
                f"schedule {name!r}: task {task_name!r} is not registered in this registry"
            )
        if name in self._schedules:
            raise TaskDefinitionError(f"schedule {name!r} is already declared")
        plain = dict(args or {})
        problem = spec.check_args(plain)
        if problem is not None:
            raise TaskDefinitionError(f"schedule {name!r}: {problem}")
        try:
            json.dumps(plain)
        except (TypeError, ValueError) as exc:
            raise TaskDefinitionError(f"schedule {name!r}: args must be JSON: {exc}") from exc
        schedule = Schedule(name, task_name, cron, plain, timezone, missed, grace)
        self._schedules[name] = schedule
        return schedule

    def periodic(
        self,
        cron: str,
        *,
        name: str | None = None,
        args: Mapping[str, Any] | None = None,
        timezone: str = "UTC",
        missed: Missed = "latest",
        grace: timedelta = DEFAULT_GRACE,
    ) -> Callable[[AnyTask], AnyTask]:
        """:meth:`schedule` as a decorator, written above ``@registry.task``; the schedule is
        named after the task unless ``name`` is given."""

        def declare(task: AnyTask) -> AnyTask:
            if not isinstance(task, BaseTask):
                raise TaskDefinitionError(
                    "@registry.periodic goes above @registry.task, on the task it schedules"
                )
            self.schedule(
                name or task.name,
                task,
                cron,
                args=args,
                timezone=timezone,
                missed=missed,
                grace=grace,
            )
            return task

        return declare

    def schedules(self) -> list[Schedule]:
        return list(self._schedules.values())

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
        """The task of that name in any live registry of this process (for the module-level
        enqueue functions; an Outbox never looks here)."""
        owner = cls._by_name.get(name)
        registry = None if owner is None else owner()
        if registry is not None:
            return registry.get(name)
        for registry in list(cls._live):
            spec = registry.get(name)
            if spec is not None:
                return spec
        return None
