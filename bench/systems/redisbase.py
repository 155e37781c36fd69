"""What the Redis-based peers share: they join only when a Redis server answers on
127.0.0.1:6379 (the suite never starts one), and each run starts from an empty Redis
database (FLUSHDB), as the PostgreSQL-based systems start from a fresh database."""

from __future__ import annotations

import importlib.util
import socket

from bench.systems.base import System

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def redis_answers() -> bool:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def missing(*packages: str) -> str | None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return f"{package} not installed (pip install -e . --group bench)"
    if not redis_answers():
        return f"no Redis server answers on {REDIS_HOST}:{REDIS_PORT}"
    return None


async def flush() -> None:
    import redis.asyncio

    client = redis.asyncio.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


class RedisSystem(System):
    """A peer whose queue lives in Redis: no PostgreSQL schema, a flushed Redis per run."""

    packages: tuple[str, ...] = ()

    def missing(self) -> str | None:
        return missing(*self.packages)

    async def prepare(self, url: str) -> None:
        return None

    async def reset(self) -> None:
        await flush()
