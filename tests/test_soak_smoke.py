"""Half a minute of the soak (``bench.soak``), as a subprocess, with a few faults: it must
pass its own checks and say so in its table. The long soak is ``make soak``.

Its faults are kill -9 of workers, PostgreSQL restarts (fast, then immediate) and kills of
worker and LISTEN connections. SIGSTOP is left to ``make soak``: one that lands between a
claim and the start of its handler lets that handler start after its lease was lost, possibly
after another worker completed the job, which fails a check by chance (a real finding, but
not one for ``make test`` to flicker on).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_short_soak_loses_nothing_and_explains_every_repeat(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    # Its own embedded server: the soak needs a database to itself.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            *("--minutes", "0.35", "--rate", "40", "--seed", "5"),
            *("--workers", "3", "--concurrency", "8"),
            *("--lease-seconds", "3", "--drain-seconds", "5", "--warmup", "2"),
            *("--kill-every", "7", "--stop-every", "0"),
            *("--restart-every", "9", "--long-outage-every", "0"),
            *("--conn-kill-every", "6", "--conn-kill-kinds", "listener,worker"),
            *("--settle-seconds", "60", "--progress-every", "600"),
            *("--work-dir", str(tmp_path / "work"), "--summary-json", str(summary_path)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    output = f"{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, output[-8000:]

    table = proc.stdout
    assert re.search(r"^lost \(must be 0\)\s+0$", table, re.MULTILINE), table
    assert re.search(r"^repeats not explained \(must be 0\)\s+0$", table, re.MULTILINE), table
    assert "all invariants hold" in table

    figures = json.loads(summary_path.read_text())
    assert figures["lost"] == 0
    assert figures["repeats_unexplained"] == 0
    assert set(figures["committed_by_path"]) == {"HTTP API", "Python API", "plain SQL"}
    assert figures["committed"] >= 300
    assert figures["faults"].get("kill9", 0) >= 1
    assert figures["faults"].get("conn_kill_listener", 0) >= 1
    assert figures["faults"].get("pg_restart_fast", 0) >= 1
    assert "(no cause recorded)" not in figures["dead_causes"]
