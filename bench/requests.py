"""The outbox's cost on the request path: ``POST /reports`` (report row + its job, one
transaction) against ``POST /reports-no-job`` (the report row only) and against
``POST /reports-bare-job`` (the same job row as a bare INSERT, none of enqueue's code), each
under the same closed-loop load on loopback, against a fresh uvicorn process on a fresh
database, each repetition starting at a different route."""

from __future__ import annotations

from bench import pg
from bench.context import Context, rotated
from bench.measure import BenchError
from bench.systems import load
from outbox_worker.devdb import free_port

ROUTES = (("job", "/reports"), ("nojob", "/reports-no-job"), ("bare", "/reports-bare-job"))


async def check_rows(url: str, which: str) -> None:
    """The routes must differ by the outbox and nothing else: one job per report row, linked,
    on /reports and /reports-bare-job; report rows and no job on /reports-no-job."""
    reports, jobs, linked = await pg.fetchrow(
        url,
        "SELECT (SELECT count(*) FROM reports), (SELECT count(*) FROM outbox_jobs),"
        " (SELECT count(*) FROM reports r JOIN outbox_jobs j ON j.id = r.job_id)",
    )
    expected = (0, 0) if which == "nojob" else (reports, reports)
    if not reports or (jobs, linked) != expected:
        raise BenchError(
            f"{which} route wrote {reports} reports, {jobs} jobs, {linked} linked to their report"
        )


async def run_once(ctx: Context, which: str, path: str) -> None:
    cfg = ctx.config
    template = await ctx.template(load("pgoutbox"))
    async with ctx.fresh(template) as url:
        port = free_port()
        server = ctx.child(
            [
                "-m",
                "uvicorn",
                "bench.webapp:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            {"DATABASE_URL": url},
            tag=f"uvicorn-{which}",
        )
        server.start()
        try:
            await server.wait_for(
                lambda c: "Application startup complete" in c.output(), 60, "uvicorn ready"
            )
            client = ctx.child(
                [
                    "-m",
                    "bench.loadgen",
                    "--port",
                    str(port),
                    "--path",
                    path,
                    "--concurrency",
                    str(cfg.http_concurrency),
                    "--seconds",
                    str(cfg.http_seconds),
                    "--warmup",
                    str(cfg.http_warmup),
                ],
                tag=f"loadgen-{which}",
            )
            client.start()
            await client.wait_ok(60 + cfg.http_seconds + cfg.http_warmup)
            await check_rows(url, which)
        finally:
            server.terminate()
            try:
                await server.wait(30)
            except BenchError:
                server.kill()
    answers = [e for e in client.events() if e.get("event") == "load"]
    if not answers:
        raise BenchError(f"no result from the load generator:\n{client.output()[-2000:]}")
    result = answers[0]
    if result["errors"] or not result["requests"]:
        raise BenchError(
            f"{path}: {result['errors']} failed requests (first: {result['first_error']})"
        )
    ctx.record(f"http_{which}_rps", "pgoutbox", float(result["rps"]))
    ctx.record(f"http_{which}_p99", "pgoutbox", float(result["p99_ms"]))
    ctx.say(f"requests   {path:<20} {result['rps']:,.0f} requests/s, p99 {result['p99_ms']:.1f} ms")


async def run(ctx: Context) -> None:
    if not any(v.system == "pgoutbox" for v in ctx.variants):
        return
    for turn in range(ctx.config.repeat):
        for which, path in rotated(list(ROUTES), turn):
            await run_once(ctx, which, path)
