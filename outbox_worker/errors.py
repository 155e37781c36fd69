"""The library's one exception hierarchy.

    OutboxError
    ├── EnqueueError            nothing was written
    │   ├── UnknownTask
    │   ├── InvalidArgs
    │   ├── InvalidName
    │   ├── InvalidOption
    │   ├── ArgsTooLarge
    │   └── QueueFull           the queue is over its depth limit (backpressure)
    ├── WrongSession            enqueue cannot use that session (sync for async, no
    │                           transaction): a bug, not the request's fault, so not an
    │                           EnqueueError; nothing was written
    ├── TaskDefinitionError     a registry was used wrongly at import time
    ├── InvalidRequest          an admin read or change asked wrongly (filter, cursor,
    │                           limit): not an EnqueueError, so an app's handler of those
    │                           never catches it; nothing changed
    ├── JobNotFound
    ├── JobStateConflict        the job's state does not allow that (retry a succeeded job…)
    ├── JobWaitTimeout          wait_for_job's timeout passed before the job finished
    │                           (also a TimeoutError)
    ├── JobControl              raised by a handler to end its attempt (outbox_worker.control)
    ├── LeaseLost               this worker no longer owns the job it tried to write
    ├── HandlerProcessDied      a run_in="process" handler's process died before it answered
    ├── DatabaseUnavailable     the database cannot be reached (refused, unknown host, auth)
    └── ConfigError             bad settings, or a MODULE:registry that does not load

Each class's docstring is its default message; a driver error that caused one is kept
as ``__cause__`` by the one place that translates it.
"""

from __future__ import annotations


class OutboxError(Exception):
    """pgoutbox error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class EnqueueError(OutboxError):
    """The job was not enqueued."""


class UnknownTask(EnqueueError):
    """No registry in this process knows that task."""


class InvalidArgs(EnqueueError):
    """Task arguments must be a JSON object."""


class InvalidName(EnqueueError):
    """Task and queue names must match ^[A-Za-z][A-Za-z0-9_.:-]{0,127}$."""


class InvalidOption(EnqueueError):
    """An enqueue option is out of range."""


class ArgsTooLarge(EnqueueError):
    """Task arguments are larger than OUTBOX_MAX_ARGS_BYTES."""


class QueueFull(EnqueueError):
    """The queue holds more queued jobs than its depth limit; try again later."""

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WrongSession(OutboxError):
    """This session or connection cannot enqueue here; the message says what to call instead."""


class InvalidRequest(OutboxError):
    """The admin request is invalid: a bad filter, cursor or limit; nothing changed."""


class TaskDefinitionError(OutboxError):
    """The task definition is invalid."""


class JobNotFound(OutboxError):
    """No job has that id."""


class JobStateConflict(OutboxError):
    """The job's state does not allow that."""


class JobWaitTimeout(OutboxError, TimeoutError):
    """The job did not finish within the time given to wait for it; it goes on."""


class LeaseLost(OutboxError):
    """This worker no longer holds the job's lease: another worker or an operator took it."""


class HandlerProcessDied(OutboxError):
    """The handler's process died before it answered."""


class DatabaseUnavailable(OutboxError):
    """The database cannot be reached."""


class ConfigError(OutboxError):
    """The configuration is invalid."""
