"""The wheel is the library: what ``pip install pgoutbox`` gives an app, checked in a fresh
virtualenv built from the wheel alone.

It holds ``outbox_worker`` and its command with what they need at run time (templates,
``py.typed``), and nothing of this repository's sample service, tests or benchmarks. Without
extras it imports and runs its CLI with no FastAPI installed; ``[web]`` adds what the admin
router needs.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import run_apart

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow

# What only this repository uses: never in what an app installs.
REPOSITORY_ONLY = ("app/", "tests/", "bench/", "alembic/", "deploy/")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A virtualenv holding the wheel and its declared dependencies, nothing else."""
    venv = tmp_path_factory.mktemp("venv")
    run_apart(sys.executable, "-m", "venv", venv)
    run_apart(venv / "bin" / "pip", "install", "--quiet", wheel)
    return venv


def test_the_wheel_holds_the_library_and_nothing_of_the_repository(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    assert "outbox_worker/__init__.py" in names
    assert "outbox_worker/py.typed" in names
    assert {"outbox_worker/web/templates/base.html", "outbox_worker/web/templates/job.html"} <= set(
        names
    )
    # The schema ships with the library: outbox-worker migrate needs nothing else.
    assert {
        "outbox_worker/migrations/env.py",
        "outbox_worker/migrations/script.py.mako",
        "outbox_worker/migrations/versions/pgoutbox_0001_outbox_jobs.py",
    } <= set(names)
    strays = [name for name in names if name.startswith(REPOSITORY_ONLY)]
    assert strays == []
    requires = [line for line in lines if line.startswith("Requires-Dist:")]
    # FastAPI only through the web extra; the sample's and tests' own needs not at all.
    plain = [line for line in requires if "extra ==" not in line]
    assert not [line for line in plain if "fastapi" in line or "uvicorn" in line], plain
    assert any(
        "fastapi" in line and ">=0.121.1" in line and 'extra == "web"' in line for line in requires
    ), requires
    assert not [line for line in requires if "pytest" in line or "uvicorn" in line]


def test_the_sdist_builds_the_same_library(dist: Path) -> None:
    [sdist] = dist.glob("pgoutbox-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    assert "outbox_worker/__init__.py" in names
    assert "pyproject.toml" in names
    assert [name for name in names if name.startswith(REPOSITORY_ONLY)] == []


def test_the_library_imports_and_its_command_runs_without_fastapi(fresh_venv: Path) -> None:
    python = fresh_venv / "bin" / "python"
    out = run_apart(
        python,
        "-c",
        "import importlib.util, outbox_worker; "
        "print(importlib.util.find_spec('fastapi'), importlib.util.find_spec('app'), "
        "sorted(outbox_worker.__all__)[:3])",
    )
    assert out.startswith("None None "), out
    assert "Usage: outbox-worker" in run_apart(fresh_venv / "bin" / "outbox-worker", "--help")
    schema = run_apart(fresh_venv / "bin" / "outbox-worker", "migrate", "--sql")
    assert "CREATE TABLE outbox_jobs" in schema
    assert "pgoutbox_alembic_version" in schema


def test_the_web_extra_mounts_the_admin_router(fresh_venv: Path, wheel: Path) -> None:
    run_apart(fresh_venv / "bin" / "pip", "install", "--quiet", f"{wheel}[web]")
    out = run_apart(
        fresh_venv / "bin" / "python",
        "-c",
        "from fastapi import FastAPI\n"
        "from outbox_worker.web import create_admin_router\n"
        "async def session():\n"
        "    yield None\n"
        "app = FastAPI()\n"
        "app.include_router(create_admin_router(get_session=session, admin_token=None))\n"
        "print(sorted(app.openapi()['paths']), app.url_path_for('outbox_dashboard'))\n",
    )
    assert "'/jobs'" in out
    assert "'/jobs/{job_id}/cancel'" in out
    assert out.rstrip().endswith("/dashboard")
