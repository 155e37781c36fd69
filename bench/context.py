"""What one bench run carries from section to section: the server, the settings, the
template database of each system, the figures measured so far and the notes to print."""

from __future__ import annotations

import itertools
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import pg
from bench.config import Config
from bench.measure import Child, Sample, child_env
from bench.systems import load
from bench.systems.base import System, Variant
from outbox_worker.devdb import PostgresServer

T = TypeVar("T")


@dataclass
class Context:
    server: PostgresServer
    config: Config
    workdir: Path
    variants: list[Variant] = field(default_factory=list)
    templates: dict[str, str] = field(default_factory=dict)
    # (row, column) -> the repetitions of that figure.
    results: dict[tuple[str, str], Sample] = field(default_factory=lambda: defaultdict(Sample))
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Label -> what the xmin section saw over time (bench/xmin.py); --json writes it beside.
    timelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: str = ""
    verbose: bool = True
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    def say(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        self.notes.append(message)
        self.say(message)

    def record(self, row: str, column: str, value: float) -> None:
        self.results[(row, column)].add(value)

    def child(self, args: list[str], env: dict[str, str] | None = None, tag: str = "") -> Child:
        path = self.workdir / f"{next(self._numbers):04d}-{tag or 'child'}.log"
        return Child([sys.executable, *args], path, child_env(env))

    def path(self, name: str) -> Path:
        return self.workdir / f"{next(self._numbers):04d}-{name}"

    async def template(self, system: System) -> str:
        """The template database of ``system``, made on first use."""
        if system.name not in self.templates:
            name = f"bench_tpl_{system.name}"
            url = await pg.create_template(self.server, name)
            await system.prepare(url)
            self.templates[system.name] = name
        return self.templates[system.name]

    def fresh(self, template: str) -> pg.AsyncDatabase:
        return pg.fresh_database(self.server, template)

    async def close(self) -> None:
        for name in self.templates.values():
            await pg.drop(self.server, name)


def rotated(items: list[T], turn: int) -> list[T]:
    """The same items starting at a different one each repetition (interleaved order)."""
    if not items:
        return items
    k = turn % len(items)
    return items[k:] + items[:k]


def system_of(variant: Variant) -> System:
    return load(variant.system)
