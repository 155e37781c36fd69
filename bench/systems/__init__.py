"""The systems under measurement. Peers are imported only when used, so the suite (and its
smoke test) runs with none of them installed; a missing one is left out with a note."""

from __future__ import annotations

import importlib

from bench.systems.base import System

NAMES = ("pgoutbox", "raw", "pgqueuer", "procrastinate", "arq", "celery")


def load(name: str) -> System:
    module = importlib.import_module(f"bench.systems.{name}")
    system: System = module.SYSTEM
    return system
