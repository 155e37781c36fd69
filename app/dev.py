"""``make run``: PostgreSQL (embedded unless DATABASE_URL is set), migrations, then the API
and one worker side by side until Ctrl-C.

    python -m app.dev [--host 127.0.0.1] [--port 8000] [--data .data]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from alembic.config import Config

from alembic import command
from outbox_worker.devdb import PostgresServer, start_embedded

ROOT = Path(__file__).resolve().parent.parent


def _migrate(url: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    command.upgrade(config, "heads")


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the sample service and a worker.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".data",
        help="where the embedded PostgreSQL keeps its files",
    )
    opts = parser.parse_args()

    server: PostgresServer | None = None
    url = os.environ.get("DATABASE_URL")
    if url:
        print(f"Using DATABASE_URL ({url.split('@')[-1]})", flush=True)
    else:
        print(f"Starting embedded PostgreSQL in {opts.data}/pg ...", flush=True)
        server = start_embedded(opts.data.resolve() / "pg", keep=True)
        url = server.url
    stopping = False

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        _migrate(url)
        env = {**os.environ, "DATABASE_URL": url}
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "app.main:app",
                    "--host",
                    opts.host,
                    "--port",
                    str(opts.port),
                ],
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "outbox_worker", "run", "app.tasks:registry"],
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        )
        print(
            f"\n  API:    http://{opts.host}:{opts.port}  (docs at /docs)\n"
            f"  Worker: outbox-worker run app.tasks:registry\n"
            f"  Try:    curl -X POST http://{opts.host}:{opts.port}/reports\n"
            f"  Ctrl-C stops both.\n",
            flush=True,
        )
        while not stopping:
            if any(proc.poll() is not None for proc in processes):
                print("A child process exited; stopping.", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
        print("Stopping API and worker ...", flush=True)
        return 0
    finally:
        _stop(processes, timeout=35)
        if server is not None:
            server.stop_server("fast")
            print("Embedded PostgreSQL stopped.", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
