"""The processes of the soak: the API and the workers, started from a snapshot of the code,
watched, and stopped; and which pid was which worker."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from outbox_worker.devdb import PostgresServer, free_port, with_application_name
from tests.faults.invariants import log_events
from tests.soak.options import Options, say, sleep_or
from tests.soak.records import Fault

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "tests.soak.tasks:registry"


def snapshot_code(dest: Path) -> Path:
    """A copy of what the subprocesses run, immune to later edits of the working tree."""
    code = dest / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("outbox_worker", "app", "alembic"):
        shutil.copytree(ROOT / name, code / name, ignore=ignore)
    shutil.copy2(ROOT / "alembic.ini", code / "alembic.ini")
    (code / "tests" / "soak").mkdir(parents=True)
    for name in ("tests/__init__.py", "tests/soak/__init__.py", "tests/soak/tasks.py"):
        shutil.copy2(ROOT / name, code / name)
    return code


@dataclass(eq=False)
class Child:
    """A process the soak started: its log, and what the soak did to it."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: Any
    stopped: bool = False  # SIGSTOPped right now
    expected_exit: bool = False  # we killed it or told it to stop
    sigterm_at: float | None = None
    said_ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """What it logged so far, as the fault suite's log readers take it."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def ready(self) -> bool:
        """Whether it logged worker_ready. Its SIGTERM handler is in place by then: before,
        a SIGTERM ends it at once, as it would any process still starting."""
        if not self.said_ready:
            self.said_ready = '"worker_ready"' in self.output()
        return self.said_ready

    def sigterm(self) -> float:
        """Tell it to stop (drain, then exit 0); when that was."""
        self.expected_exit = True
        self.sigterm_at = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        return self.sigterm_at

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError, ValueError):  # closed once the worker was retired
            self.log.flush()
        return "\n".join(self.output().splitlines()[-lines:])

    def last_error(self) -> str:
        """The last exception line of its output: why it died."""
        found = [
            line.strip(" |")
            for line in self.tail(400).splitlines()
            if re.search(r"^[\s|]*[\w.]+(Error|Exception|Group)\b.*:", line)
        ]
        return found[-1] if found else self.tail(3)


class Cluster:
    """Owns every process the soak starts, and knows which pid was which worker."""

    def __init__(
        self, opts: Options, url: str, server: PostgresServer | None, code: Path, logs: Path
    ) -> None:
        self.opts = opts
        self.url = url
        self.server = server
        self.code = code
        self.logs = logs
        self.workers: list[Child] = []
        self.retired: list[Child] = []
        self.api: Child | None = None
        self.api_port = 0
        self._numbers = itertools.count(1)
        self.base_env = {
            **os.environ,
            "PYTHONPATH": str(code),
            "OUTBOX_LOG_FORMAT": "json",
            "OUTBOX_LOG_LEVEL": "info",
            "OUTBOX_RETRY_BASE_SECONDS": "0.2",
            "OUTBOX_RETRY_CAP_SECONDS": "2",
            "OUTBOX_POOL_SIZE": "4",
            # Nothing may be pruned before the checks have read it.
            "OUTBOX_RETENTION_SUCCEEDED": "",
            "OUTBOX_RETENTION_DEAD": "",
            "OUTBOX_RETENTION_CANCELLED": "",
        }

    def _popen(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log_path = self.logs / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=self.code,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl-C is ours to handle, not theirs
        )
        return Child(name, proc, log_path, log)

    def spawn_worker(self) -> Child:
        name = f"soak-w{next(self._numbers)}"
        env = {
            **self.base_env,
            "DATABASE_URL": with_application_name(self.url, name),
            "OUTBOX_LISTEN_DATABASE_URL": with_application_name(self.url, f"{name}-listen"),
        }
        args = [
            sys.executable,
            "-m",
            "outbox_worker",
            "run",
            REGISTRY,
            "--concurrency",
            str(self.opts.concurrency),
            "--lease-seconds",
            str(self.opts.lease_seconds),
            "--poll-interval-seconds",
            "0.5",
            "--drain-timeout-seconds",
            str(self.opts.drain_seconds),
        ]
        child = self._popen(name, args, env)
        self.workers.append(child)
        return child

    def retire(self, child: Child) -> None:
        if child in self.workers:
            self.workers.remove(child)
        self.retired.append(child)
        with contextlib.suppress(OSError):
            child.log.close()

    async def start_api(self, port: int | None = None) -> None:
        self.api_port = port or free_port()
        env = {
            **self.base_env,
            "DATABASE_URL": self.url,
            "OUTBOX_DB_POOL_SIZE": "5",
            "OUTBOX_DB_MAX_OVERFLOW": "10",
        }
        args = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.api_port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.api = self._popen("api", args, env)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=self.api_base) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/healthz", timeout=2)).status_code == 200:
                        return
                if not self.api.alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the API did not come up:\n{self.api.tail()}")
                await asyncio.sleep(0.2)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def stop_all(self) -> None:
        """Last resort on the way out: nothing we started may outlive us."""
        for child in [*self.workers, *self.retired, *([self.api] if self.api else [])]:
            if child.alive():
                with contextlib.suppress(OSError):
                    os.kill(child.pid, signal.SIGCONT)
                    child.proc.kill()
                child.proc.wait()
            with contextlib.suppress(OSError):
                child.log.close()


async def wait_ready(child: Child, within: float = 60.0) -> bool:
    deadline = time.monotonic() + within
    while not child.ready():
        if not child.alive() or time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def supervise(
    cluster: Cluster, stop: asyncio.Event, crashes: list[str], faults: list[Fault]
) -> None:
    """A process that exits without being killed by us is a finding: note it (as a fault,
    since it explains the repeats of the jobs it held), and replace it."""
    while not await sleep_or(stop, 0.5):
        for worker in list(cluster.workers):
            if not worker.alive() and not worker.expected_exit:
                faults.append(Fault("crash", time.time(), worker.pid, detail=worker.name))
                crashes.append(
                    f"{worker.name} (pid {worker.pid}) exited on its own with "
                    f"{worker.proc.returncode}: {worker.last_error()} (see {worker.log_path})"
                )
                say(f"worker {worker.name} exited on its own ({worker.proc.returncode})")
                cluster.retire(worker)
                cluster.spawn_worker()
        api = cluster.api
        if api is not None and not api.alive():
            crashes.append(f"the API exited with {api.proc.returncode}:\n{api.tail()}")
            say("the API exited on its own; starting it again")
            await cluster.start_api(port=cluster.api_port)


async def sigterm_exit(child: Child, within: float) -> str | None:
    """Wait for a worker told to stop; what was wrong with its exit, if anything."""
    try:
        code = await asyncio.to_thread(child.proc.wait, within)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        await asyncio.to_thread(child.proc.wait)
        return f"{child.name} (pid {child.pid}) still running {within:.0f}s after SIGTERM"
    if code != 0:
        return f"{child.name} (pid {child.pid}) exited {code} on SIGTERM:\n{child.tail()}"
    return None


async def drain(cluster: Cluster, within: float) -> list[str]:
    """SIGTERM every worker and the API; the exits that were not a clean 0."""
    problems: list[str] = []
    for worker in cluster.workers:
        await wait_ready(worker)  # a replacement just started: its SIGTERM handler first
        worker.sigterm()
    for worker in list(cluster.workers):
        problem = await sigterm_exit(worker, within)
        if problem is not None:
            problems.append(problem)
        cluster.retire(worker)
    if cluster.api is not None and cluster.api.alive():
        cluster.api.expected_exit = True
        cluster.api.proc.terminate()
        try:
            await asyncio.to_thread(cluster.api.proc.wait, 20)
        except subprocess.TimeoutExpired:
            cluster.api.proc.kill()
            cluster.api.proc.wait()
    return problems


def count_events(children: list[Child]) -> Counter[str]:
    """How many lines of each event the workers logged (JSON, one object a line)."""
    return Counter(
        entry["event"]
        for child in children
        for entry in log_events(child)
        if isinstance(entry.get("event"), str)
    )
