"""A small closed-loop HTTP/1.1 load generator for loopback only, bounded in time and count.

``python -m bench.loadgen --port P --path /reports --seconds 8``: ``concurrency`` keep-alive
connections each send one POST, read the whole answer, send the next. Requests finished in
the warm-up are not counted. Reports requests/s and latency percentiles as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.measure import emit, percentile, run_async

HOST = "127.0.0.1"  # loopback only, by design
MAX_REQUESTS = 500_000


async def connection(
    port: int,
    request: bytes,
    warm_until: float,
    stop_at: float,
    latencies: list[float],
    errors: list[str],
    budget: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while budget[0] > 0:
            began = time.perf_counter()
            if began >= stop_at:
                return
            budget[0] -= 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            ended = time.perf_counter()
            status = head[9:12]
            if status != b"202":
                errors.append(status.decode(errors="replace"))
            elif began >= warm_until:
                latencies.append(ended - began)
    finally:
        writer.close()


async def load(port: int, path: str, concurrency: int, seconds: float, warmup: float) -> None:
    body = b"{}"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors: list[str] = []
    now = time.perf_counter()
    warm_until, stop_at = now + warmup, now + warmup + seconds
    budget = [MAX_REQUESTS]
    await asyncio.gather(
        *(
            connection(port, request, warm_until, stop_at, latencies, errors, budget)
            for _ in range(concurrency)
        )
    )
    measured = time.perf_counter() - warm_until
    emit(
        "load",
        requests=len(latencies),
        rps=len(latencies) / measured,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        errors=len(errors),
        first_error=errors[0] if errors else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    opts = parser.parse_args()
    run_async(lambda: load(opts.port, opts.path, opts.concurrency, opts.seconds, opts.warmup))


if __name__ == "__main__":
    main()
