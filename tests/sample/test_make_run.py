"""``make run``'s start-up path (``python -m app.dev``) against the test's database: migrations,
the API on a real socket and a worker side by side, a report done end to end, and Ctrl-C
(SIGINT) stopping both children before it exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import asyncpg
import httpx
import pytest

from alembic import command
from app.main import schema_heads
from outbox_worker.devdb import free_port
from tests.conftest import ROOT, alembic_config

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


def proc_state(pid: int) -> str | None:
    """The process's state letter from /proc, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rpartition(")")[2].split()[0]


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def children_of(parent: int) -> dict[int, str]:
    """Direct children of ``parent``: pid -> command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent:
            found[int(entry.name)] = cmdline
    return found


class DevProcess:
    """``python -m app.dev`` with its (and its children's) output in a file."""

    def __init__(self, database_url: str, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.dev", "--port", str(port)],
            env={**os.environ, "DATABASE_URL": database_url},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.children: dict[int, str] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"app.dev still running after {timeout}s:\n{self.output()}")

    async def wait_until_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"app.dev exited with {self.proc.returncode}:\n{self.output()}")
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get("/healthz")
                    if response.status_code == 200:
                        return
                if time.monotonic() > deadline:
                    pytest.fail(f"/healthz did not answer within {timeout}s:\n{self.output()}")
                await asyncio.sleep(0.1)

    def find_children(self) -> dict[int, str]:
        """The API and the worker, once both have been started."""
        deadline = time.monotonic() + 30
        while True:
            found = children_of(self.proc.pid)
            if len(found) >= 2 or time.monotonic() > deadline:
                self.children = found
                return found
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Kill what this test started if an assertion left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def dev_factory(tmp_path: Path) -> Iterator[list[DevProcess]]:
    started: list[DevProcess] = []
    yield started
    for dev in started:
        dev.cleanup()


async def schema_version(database_url: str) -> frozenset[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    return frozenset(row["version_num"] for row in rows)


@pytest.mark.timeout(300)
async def test_make_run_migrates_serves_runs_jobs_and_stops_cleanly_on_ctrl_c(
    database_url: str, tmp_path: Path, dev_factory: list[DevProcess]
) -> None:
    # Start behind head, so that the migrations `make run` applies are visible.
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), "pgoutbox@-1")
    assert await schema_version(database_url) == {"pgoutbox_0017", "sample_0001"}

    dev = DevProcess(database_url, free_port(), tmp_path / "dev.log")
    dev_factory.append(dev)
    await dev.wait_until_healthy()

    assert await schema_version(database_url) == schema_heads(), dev.output()
    children = dev.find_children()
    assert len(children) == 2, (children, dev.output())
    assert sum("uvicorn" in cmd for cmd in children.values()) == 1, children
    assert sum("outbox_worker" in cmd for cmd in children.values()) == 1, children

    async with httpx.AsyncClient(base_url=dev.base_url, timeout=10) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text

        for author in ("ann", "ben", "ann"):
            created = await client.post("/comments", json={"author": author, "body": "hi"})
            assert created.status_code == 201, created.text
        queued = await client.post("/reports", json={})
        assert queued.status_code == 202, queued.text
        body = queued.json()
        assert body["status"] == "queued"
        assert queued.headers.get("x-request-id")

        deadline = time.monotonic() + 30
        while True:
            shown = await client.get(f"/reports/{body['report_id']}")
            assert shown.status_code == 200, shown.text
            if shown.json()["status"] == "done":
                break
            assert shown.json()["status"] in {"queued", "running"}, shown.text
            if time.monotonic() > deadline:
                pytest.fail(f"report not done after 30s: {shown.text}\n{dev.output()}")
            await asyncio.sleep(0.2)
    result = shown.json()["result"]
    assert result["comments"] == 3
    assert result["active_authors"] == 2
    assert result["total_users"] == 0

    dev.proc.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(dev.wait, 40)

    output = dev.output()
    assert code == 0, output
    assert "Stopping API and worker" in output
    assert "worker_stopped" in output, output
    assert not listening(dev.port), "the API is still listening after make run exited"
    still_running = {pid: cmd for pid, cmd in children.items() if alive(pid)}
    assert still_running == {}, output


@pytest.mark.timeout(300)
async def test_make_run_stops_the_api_when_the_worker_dies(
    database_url: str, tmp_path: Path, dev_factory: list[DevProcess]
) -> None:
    dev = DevProcess(database_url, free_port(), tmp_path / "dev.log")
    dev_factory.append(dev)
    await dev.wait_until_healthy()
    children = dev.find_children()
    worker_pids = [pid for pid, cmd in children.items() if "outbox_worker" in cmd]
    assert len(worker_pids) == 1, children

    os.kill(worker_pids[0], signal.SIGKILL)
    code = await asyncio.to_thread(dev.wait, 40)

    output = dev.output()
    assert code == 1, output
    assert "A child process exited; stopping." in output
    assert not listening(dev.port), output
    assert {pid for pid in children if alive(pid)} == set(), output
