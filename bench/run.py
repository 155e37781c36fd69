"""``python -m bench.run [--quick]``: every measurement of the speed targets in one run, one table.

Uses DATABASE_URL's server when set, else an embedded PostgreSQL in a temporary folder; every
system gets its own fresh database on that server for every run. Peers that are not installed
(``pip install -e . --group bench``), and the Redis-based ones when no Redis answers on
127.0.0.1:6379, are left out with a note.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import pg
from bench.config import SECTIONS, Config, configure
from bench.context import Context
from bench.measure import git_state, run_async
from bench.report import render
from bench.systems import NAMES, load
from outbox_worker.devdb import PostgresServer


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller runs, about 10 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny runs, for the test suite")
    parser.add_argument(
        "--systems", default="", help=f"comma-separated subset of {','.join(NAMES)}"
    )
    parser.add_argument(
        "--sections", default="", help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; at least 3 counts)")
    parser.add_argument("--output", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--json", type=Path, help="also write every repetition's figures here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the workers' logs")
    return parser.parse_args(argv)


def machine() -> str:
    memory = ""
    try:
        with open("/proc/meminfo") as info:
            kb = int(info.readline().split()[1])
            memory = f", {kb / 1024 / 1024:.1f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs{memory}, Python {platform.python_version()}, {platform.system()}"


REDIS_PEERS = ("arq", "celery")


def revision() -> str:
    """Which pgoutbox was measured: the commit, and whether outbox_worker/ had changes."""
    state = git_state("outbox_worker")
    if state is None or not state[0]:
        return "unknown revision"
    head, dirty = state
    return f"commit {head}" + (" with uncommitted changes in outbox_worker/" if dirty else "")


def usable(ctx: Context, config: Config) -> None:
    seen: dict[str, str | None] = {}
    for variant in config.variants:
        if variant.system not in seen:
            if variant.system in REDIS_PEERS and not config.redis_peers:
                seen[variant.system] = f"{config.mode} mode measures the PostgreSQL peers only"
            else:
                try:
                    seen[variant.system] = load(variant.system).missing()
                except ImportError as exc:
                    seen[variant.system] = f"cannot import: {exc}"
            if seen[variant.system]:
                ctx.note(f"{variant.system} left out: {seen[variant.system]}")
        if not seen[variant.system]:
            ctx.variants.append(variant)


async def run_sections(
    config: Config, workdir: Path, server: PostgresServer | None, verbose: bool
) -> Context:
    own_server = server is None
    server = server or pg.start_server()
    ctx = Context(server=server, config=config, workdir=workdir, verbose=verbose)
    try:
        usable(ctx, config)
        kind = {"url": "DATABASE_URL", "embedded": "embedded, Unix socket"}.get(
            server.kind, server.kind
        )
        ctx.machine = f"{machine()}; {await pg.describe(server.url)}, {kind}"
        ctx.say(ctx.machine)
        for section in config.sections:
            began = time.monotonic()
            module = importlib.import_module(f"bench.{section}")
            try:
                await module.run(ctx)
            except Exception as exc:
                ctx.failures.append(f"{section}: {type(exc).__name__}: {exc}")
                ctx.note(f"{section} failed: {type(exc).__name__}: {str(exc)[:2000]}")
                if verbose:
                    traceback.print_exc()
            ctx.say(f"{section} took {time.monotonic() - began:.0f}s")
        await ctx.close()
    finally:
        if own_server:
            server.close()
    return ctx


def run_suite(
    config: Config, workdir: Path, server: PostgresServer | None = None, verbose: bool = True
) -> Context:
    """Every section of ``config`` on ``server`` (else DATABASE_URL's or an embedded one)."""
    holder: list[Context] = []

    async def run() -> None:
        holder.append(await run_sections(config, workdir, server, verbose))

    run_async(run)
    return holder[0]


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM ends a run like Ctrl-C does: workers stopped, databases dropped, server closed.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    mode = "smoke" if opts.smoke else "quick" if opts.quick else "full"
    systems = tuple(s for s in opts.systems.split(",") if s)
    sections = tuple(s for s in opts.sections.split(",") if s) or SECTIONS
    for name in systems:
        if name not in NAMES:
            raise SystemExit(f"unknown system {name!r}; choose from {', '.join(NAMES)}")
    for name in sections:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    config = configure(mode, systems, sections)
    if opts.repeat:
        config = Config(**{**config.__dict__, "repeat": opts.repeat})
    workdir = Path(tempfile.mkdtemp(prefix="pgoutbox-bench-"))
    began = time.monotonic()
    try:
        ctx = run_suite(config, workdir)
    finally:
        if opts.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python -m bench.run" + ("".join(f" {a}" for a in (argv or sys.argv[1:])))
    header = (
        f"pgoutbox bench, {mode} mode, {config.repeat} repetition(s), "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - began:.0f} s\n\n"
        f"Command: `{command}`\n\nMachine: {ctx.machine}\n\npgoutbox: {revision()}"
    )
    text = render(ctx, header)
    print(text)
    if opts.output:
        opts.output.write_text(text + "\n")
    if opts.json:
        figures = {f"{row} | {col}": s.values for (row, col), s in ctx.results.items()}
        opts.json.write_text(json.dumps(figures, indent=2) + "\n")
        if ctx.timelines:
            # Beside the figures, which hold "row | column" -> repetitions only.
            timelines = opts.json.with_suffix(".timelines.json")
            timelines.write_text(json.dumps(ctx.timelines, indent=2) + "\n")
    return 1 if ctx.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
