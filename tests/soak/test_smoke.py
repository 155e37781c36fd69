"""Half a minute of the real soak (``python -m tests.soak``), as a subprocess, with a few
faults and a hostile share of jobs: it must pass its own checks and say so in its table.
The long soak is ``make soak``; its checker is tested on crafted histories in
``test_checker.py``.

The short run's faults are kill -9 of workers, SIGTERM of workers mid-run, row locks past
the lease and shorter, PostgreSQL restarts (fast, then immediate) and kills of worker and
LISTEN connections. SIGSTOP is left to ``make soak``: one that lands between a claim and the
start of its handler lets that handler start after its lease was lost, possibly after
another worker completed the job, which fails a check by chance (a real finding, but not one
for ``make test`` to flicker on).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.soak.cluster import ROOT
from tests.soak.tasks import HOSTILE_KINDS

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow


@pytest.mark.timeout(180)
def test_short_soak_loses_nothing_and_explains_every_repeat(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    # Its own embedded server: the soak needs a database to itself.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.soak",
            *("--minutes", "0.35", "--rate", "40", "--seed", "5", "--hostile-share", "0.2"),
            *("--workers", "3", "--concurrency", "8"),
            *("--lease-seconds", "3", "--drain-seconds", "5", "--warmup", "2"),
            *("--kill-every", "7", "--stop-every", "0", "--term-every", "8"),
            *("--row-lock-every", "5", "--restart-every", "9", "--long-outage-every", "0"),
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
    faults = Counter(figures["faults"])
    assert min(faults[kind] for kind in ("kill9", "sigterm", "row_lock", "pg_restart_fast")) >= 1
    assert faults["conn_kill_listener"] >= 1
    assert "(no cause recorded)" not in figures["dead_causes"]
    # Every hostile kind was enqueued, and each defence it calls for was seen at work.
    assert set(figures["hostile"]) == set(HOSTILE_KINDS)
    events = figures["worker_events"]
    assert events["job_result_unstorable"] >= 1
    assert events["job_raised_base_exception"] >= 1
    assert events["job_dead_without_running"] >= 1
